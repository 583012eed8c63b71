"""Learned step size quantization (LSQ, Esser et al. 2019; RTF-Q eqs. 1-2).

Pure tensor math first (usable by any layer or by the exporter), then the module that
keeps one learnable step size per candidate bit-width.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from rtfq_deploy.quant.base import Quantizer, qrange

_MIN_STEP = 1e-8
# Mean |x| of the tensors an activation quantizer sees before data calibration, assuming
# BatchNorm-normalised inputs: E|z| of N(0, 1) (signed), E[relu(z)] (unsigned).
_PRIOR_MEAN_ABS = {True: math.sqrt(2.0 / math.pi), False: 1.0 / math.sqrt(2.0 * math.pi)}


def round_ste(x: Tensor) -> Tensor:
    """Round half to even (as ONNX QuantizeLinear does) with a straight-through gradient."""
    return x + (torch.round(x) - x).detach()


def scale_grad(x: Tensor, scale: float) -> Tensor:
    """Identity in the forward pass; multiplies the gradient by ``scale``."""
    return (x - x * scale).detach() + x * scale


def lsq_quantize(x: Tensor, step: Tensor, qmin: int, qmax: int, grad_scale: float) -> Tensor:
    """Fake-quantize ``x``: ``round(clamp(x / s, qmin, qmax)) * s``.

    ``step`` broadcasts against ``x`` (per-tensor or per-channel). The step's gradient
    is LSQ's, scaled by ``grad_scale`` = 1 / sqrt(N * Qp).
    """
    s = scale_grad(step.clamp_min(_MIN_STEP), grad_scale)
    return round_ste(torch.clamp(x / s, qmin, qmax)) * s


def lsq_init_step(x: Tensor, bits: int, signed: bool, dim: int | None = None) -> Tensor:
    """LSQ's initial step 2 * mean(|x|) / sqrt(Qp), per tensor or reduced over all but ``dim``."""
    qp = qrange(bits, signed)[1]
    if dim is None:
        mean_abs = x.detach().abs().mean()
    else:
        mean_abs = x.detach().abs().transpose(0, dim).flatten(1).mean(dim=1)
    return (2.0 * mean_abs / math.sqrt(qp)).clamp_min(_MIN_STEP)


class LSQQuantizer(Quantizer):
    """LSQ with a step-size row per candidate bit-width.

    ``channels=None`` gives one step per tensor (activations); otherwise one step per
    output channel (weights), of which a slimmed layer uses the leading ones.
    """

    kind = "lsq"

    def __init__(self, bit_choices: tuple[int, ...], signed: bool, channels: int | None = None,
                 role: str = "body") -> None:
        super().__init__(bit_choices, signed, channels, role)
        shape = (len(self.bit_choices),) if channels is None else (len(self.bit_choices), channels)
        self.step = torch.nn.Parameter(torch.empty(shape))
        self.reset_steps()

    def reset_steps(self) -> None:
        """Prior steps for activations (before data calibration); weights use :meth:`init_from`."""
        with torch.no_grad():
            for row, bits in enumerate(self.bit_choices):
                qp = qrange(bits, self.signed)[1]
                self.step[row] = 2.0 * _PRIOR_MEAN_ABS[self.signed] / math.sqrt(qp)

    def init_from(self, x: Tensor) -> None:
        """LSQ initialisation of every bit-width's step from a sample of the quantized tensor."""
        with torch.no_grad():
            for row, bits in enumerate(self.bit_choices):
                dim = None if self.channels is None else 0
                self.step[row] = lsq_init_step(x, bits, self.signed, dim)

    def scale(self, bits: int, channels: int | None = None) -> Tensor:
        step = self.step[self.bit_index(bits)]
        if self.channels is not None and channels is not None:
            step = step[:channels]
        return step

    def quantize(self, x: Tensor, bits: int) -> Tensor:
        qmin, qmax = qrange(bits, self.signed)
        if self.channels is None:
            step = self.step[self.bit_index(bits)]
            per_step = x[0].numel() if x.dim() > 1 else x.numel()
        else:
            step = self.scale(bits, x.shape[0]).reshape((-1,) + (1,) * (x.dim() - 1))
            per_step = x[0].numel()
        return lsq_quantize(x, step, qmin, qmax, 1.0 / math.sqrt(per_step * qmax))
