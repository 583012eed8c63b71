"""What every quantizer kind provides, so layers and the exporter never depend on one kind.

A quantizer quantizes one tensor of the network (a layer's weights or an activation) and
keeps parameters for each candidate bit-width, so one supernet serves every bit-width
and, later, per-layer mixed precision. Layers ask the active subnet's bit plan for the
bit-width by the quantizer's name; ``None`` means the tensor stays float.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from rtfq_deploy.quant.encoding import Encoding, LinearCodes, qrange

if TYPE_CHECKING:
    from rtfq_deploy.plan import ActiveSubnet


class Quantizer(nn.Module):
    """Base of quantizer kinds.

    ``role`` tells bit policies where the tensor sits ("first" and "last" layer tensors,
    "residual" add operands, "body" for the rest). ``name`` is the module path inside
    the supernet, assigned once when the network is built; bit plans are keyed by it.
    """

    kind = "base"

    def __init__(self, bit_choices: tuple[int, ...], signed: bool, channels: int | None, role: str) -> None:
        super().__init__()
        self.bit_choices = tuple(sorted(set(bit_choices), reverse=True))
        self.signed = signed
        self.channels = channels
        self.role = role
        self.name = ""

    def bit_index(self, bits: int) -> int:
        try:
            return self.bit_choices.index(bits)
        except ValueError:
            raise ValueError(
                f"quantizer {self.name or '?'} has no {bits}-bit parameters (has {list(self.bit_choices)})"
            ) from None

    def forward(self, x: Tensor, net: "ActiveSubnet") -> Tensor:
        bits = net.bits[self.name]
        return x if bits is None else self.quantize(x, bits)

    def quantize(self, x: Tensor, bits: int) -> Tensor:
        """Fake-quantized ``x`` (values on the integer grid times the scale)."""
        raise NotImplementedError

    def scale(self, bits: int, channels: int | None = None) -> Tensor:
        """Real value of one integer step: a scalar, or the leading ``channels`` per-channel steps."""
        raise NotImplementedError

    def init_from(self, x: Tensor) -> None:
        """Initialise every bit-width's parameters from a sample of the tensor it quantizes."""
        raise NotImplementedError

    def place(self, readers: tuple[str, ...]) -> None:
        """Told once, when the supernet is built, which nodes of the integer graph read
        this activation ("Conv", "Add", "AvgPool"); kinds whose codes depend on that
        override it."""

    def changes_domain(self, bits: int) -> bool:
        """Whether the output lives in another domain than the input at ``bits`` (AlignQ's
        [-alpha, alpha]): quantizers downstream must then be initialised on such outputs."""
        return False

    def encoding(self, bits: int) -> Encoding:
        """How the exported graph carries this (activation) tensor at ``bits``."""
        return LinearCodes(float(self.scale(bits).item()), bits, self.signed)

    def unrounded(self, x: Tensor, bits: int) -> Tensor:
        """The code value of ``x`` before rounding and clamping: ``to_int`` is its clamped
        rounding (how close weights sit to a rounding boundary, whatever the kind)."""
        s = self.scale(bits, None if self.channels is None else x.shape[0])
        if self.channels is not None:
            s = s.reshape((-1,) + (1,) * (x.dim() - 1))
        return x / s.clamp_min(1e-8)

    def to_int(self, x: Tensor, bits: int) -> Tensor:
        """The integer codes :meth:`quantize` gives the float tensor ``x`` (the exporter's
        weight codes); their value is code times :meth:`scale`."""
        qmin, qmax = qrange(bits, self.signed)
        return torch.clamp(torch.round(self.unrounded(x, bits)), qmin, qmax)

    def extra_repr(self) -> str:
        sign = "signed" if self.signed else "unsigned"
        per = "per-tensor" if self.channels is None else f"per-channel({self.channels})"
        return f"{self.kind}, bits={list(self.bit_choices)}, {sign}, {per}, role={self.role}"
