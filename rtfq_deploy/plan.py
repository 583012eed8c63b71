"""Bit plans and the active-subnet description passed down every forward call.

A :class:`BitPlan` gives every quantizer of the supernet its bit-width (or ``None`` for
float). A uniform subnet (``q4``) is one plan among many, produced by a
:class:`BitPolicy`; per-layer mixed precision is a plan too, so layers never depend on a
single global bit-width. Nothing here is mutable: the forward pass receives an
:class:`ActiveSubnet` and reads from it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterable, Iterator, Mapping

if TYPE_CHECKING:  # torch-free at run time: devices read plans and ids
    from torch import Tensor

    from rtfq_deploy.layers import WeightCache


@dataclass(frozen=True)
class BitPolicy:
    """How a uniform bit-width Q maps onto quantizers by role.

    ``edge_bits``: the first conv (and the image it reads) and the classifier (and the
    pooled features it reads); 8 by default, as is common practice and as OneShot-MPQ
    fixes them. ``residual_bits``: the operands of residual adds (a block's branch output
    and its downsample output), which enter no multiply, so they cost no BitOPs; 8 by
    default to keep the skip path precise. ``None`` for either means "follow Q".
    """

    edge_bits: int | None = 8
    residual_bits: int | None = 8

    def bits_for(self, role: str, bits: int) -> int:
        fixed = self.fixed_bits(role)
        return bits if fixed is None else fixed

    def fixed_bits(self, role: str) -> int | None:
        """The bits the policy pins a role to, or None when the role follows the plan."""
        if role in ("first", "last"):
            return self.edge_bits
        if role == "residual":
            return self.residual_bits
        return None

    def extra_bits(self) -> tuple[int, ...]:
        """Bit-widths quantizers need besides the space's own."""
        return tuple(b for b in (self.edge_bits, self.residual_bits) if b is not None)

    def to_dict(self) -> dict:
        return {"edge_bits": self.edge_bits, "residual_bits": self.residual_bits}

    @classmethod
    def from_dict(cls, data: Mapping) -> "BitPolicy":
        return cls(edge_bits=data["edge_bits"], residual_bits=data["residual_bits"])


@dataclass(frozen=True)
class BitPlan:
    """Bit-width per quantizer name; ``None`` keeps that tensor in float."""

    items: tuple[tuple[str, int | None], ...]

    @classmethod
    def of(cls, mapping: Mapping[str, int | None]) -> "BitPlan":
        return cls(tuple(sorted(mapping.items())))

    @classmethod
    def uniform(cls, quantizers: Iterable[tuple[str, str]], bits: int, policy: BitPolicy) -> "BitPlan":
        """Plan for a uniform subnet from (name, role) pairs."""
        return cls.of({name: policy.bits_for(role, bits) for name, role in quantizers})

    @classmethod
    def float(cls, names: Iterable[str]) -> "BitPlan":
        return cls.of({name: None for name in names})

    def as_dict(self) -> dict[str, int | None]:
        return dict(self.items)

    def __getitem__(self, name: str) -> int | None:
        # Linear lookups would cost O(layers) per quantizer per forward; the dict is cached.
        try:
            return self._lookup()[name]
        except KeyError:
            raise KeyError(f"bit plan has no entry for quantizer {name!r}") from None

    def _lookup(self) -> dict[str, int | None]:
        cached = self.__dict__.get("_dict")
        if cached is None:
            cached = dict(self.items)
            object.__setattr__(self, "_dict", cached)
        return cached

    def __iter__(self) -> Iterator[str]:
        return (name for name, _ in self.items)

    def __len__(self) -> int:
        return len(self.items)


@dataclass(frozen=True)
class ActiveSubnet:
    """What a supernet forward computes: the width, every quantizer's bits and,
    in eval mode, the BatchNorm statistics calibrated for this subnet.

    ``bn_stats`` maps BatchNorm module names to (mean, var) over the subnet's active
    channels; without it eval-mode BatchNorm uses the supernet's stored running
    statistics, which are right only for the network they came from (e.g. a
    pretrained full-width float network). ``weights``, when given, keeps each layer's
    fake-quantized weights for the next forward pass (see :class:`~rtfq_deploy.layers.WeightCache`).
    """

    width: float
    bits: BitPlan
    bn_stats: "Mapping[str, tuple[Tensor, Tensor]] | None" = field(default=None, compare=False, hash=False)
    # fake-quantized weights reused across forward passes that do not train (a search)
    weights: "WeightCache | None" = field(default=None, compare=False, hash=False)
