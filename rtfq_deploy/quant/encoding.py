"""How a quantized tensor is carried in the deployed graph: its encoding.

A quantizer kind hands the exporter one of these per bit-width (``Quantizer.encoding``);
the exporter emits each encoding through its own handler and never asks which kind
produced it. Torch-free: plain numbers.

Every encoding has ``bits``, ``signed`` and ``scale``: the tensor's value is its integer
code times ``scale``, which is what the next integer kernel multiplies, so conv biases
live on the grid ``scale(input) x scale(weight)`` whatever the encoding.
"""

from __future__ import annotations

from dataclasses import dataclass


def qrange(bits: int, signed: bool) -> tuple[int, int]:
    """Integer range of a ``bits``-bit code: [-2^(b-1), 2^(b-1)-1] signed, [0, 2^b-1] unsigned."""
    if signed:
        return -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    return 0, (1 << bits) - 1


class _Codes:
    """What every encoding shares: the k-bit range of its codes."""

    bits: int
    signed: bool

    @property
    def qrange(self) -> tuple[int, int]:
        return qrange(self.bits, self.signed)

    @property
    def zero_point(self) -> int:
        """Where code 0 sits in the uint8 tensor the graph carries (signed codes shifted by 128)."""
        return 128 if self.signed else 0


@dataclass(frozen=True)
class LinearCodes(_Codes):
    """Uniform codes: code = clamp(round(x / scale)) (LSQ and any uniform quantizer)."""

    scale: float
    bits: int
    signed: bool


PRE_BITS = 8


@dataclass(frozen=True)
class CdfCodes(_Codes):
    """AlignQ's codes: the input is first carried as 8-bit uniform codes ``p`` of step
    ``pre_scale`` (what the integer conv writes), then

        code = clamp(round(levels * erf(p * erf_scale)), k-bit range)

    (``erf_scale`` = pre_scale / (sigma sqrt 2) for the fitted normal's sigma)
    and the tensor's value is ``code * alpha / levels``. ``levels`` is 2^(k-1) for signed
    codes (the paper's Eq. 2, clamped to k bits) and 2^k - 1 for unsigned (post-ReLU)
    ones, whose CDF is the half-normal's, so every code is used; with ``full``, unsigned
    codes use the signed (full-normal) CDF's levels, as the paper does, and leave the
    upper half of the codes unused.

    ``cdf`` "logistic": the logistic CDF in place of the normal's, as onnxruntime fuses it
    into one 256-entry table (QLinearSigmoid): ``code = round(2 levels sigmoid(p *
    erf_scale)) - levels`` (2 sigmoid - 1 = tanh(u / 2) is the CDF of the symmetric
    logistic), carried with zero point ``levels`` when unsigned.
    """

    pre_scale: float
    erf_scale: float
    alpha: float
    bits: int
    signed: bool
    full: bool = False
    cdf: str = "normal"

    @property
    def pre_qrange(self) -> tuple[int, int]:
        return qrange(PRE_BITS, self.signed)

    @property
    def levels(self) -> int:
        return cdf_levels(self.bits, self.signed or self.full)

    @property
    def scale(self) -> float:
        return self.alpha / self.levels

    @property
    def pre_zero_point(self) -> int:
        """The 8-bit pre-codes' zero point: that of any codes of this sign."""
        return super().zero_point

    @property
    def zero_point(self) -> int:
        if self.cdf == "logistic" and not self.signed:
            return self.levels  # round(2 levels sigmoid(u)) is in [levels, 2 levels] for u >= 0
        return self.pre_zero_point


def cdf_levels(bits: int, signed: bool) -> int:
    return 1 << (bits - 1) if signed else (1 << bits) - 1


Encoding = LinearCodes | CdfCodes
