"""AlignQ: quantization in the domain of a fitted normal CDF (Chen et al.; Eqs. 1-4).

The tensor is mapped through ``alpha * erf((x - mu) / (sigma sqrt 2))`` (the shifted and
scaled normal CDF, Eq. 1) and quantized uniformly there (Eq. 2): thresholds are dense
where values are dense, so codes stay evenly used when a domain shift moves the data
(Theorem 3.1). The network then computes in the transformed domain; nothing inverts it.

How it is computed, so that the integer export is exact:

- Activations are first carried as 8-bit uniform codes ``p`` of step ``3 sigma / 127``
  (signed) or ``3 sigma / 255`` (unsigned): that is what an integer conv writes. The
  k-bit code is then a fixed function of ``p`` (a 256-entry table here, an Erf between a
  QuantizeLinear and a DequantizeLinear in the exported graph); ``sigma`` is calibrated
  from data (the paper fixes N(0, 1) after BatchNorm; our quantizers sit after ReLU and
  residual adds). Post-ReLU tensors use the half-normal CDF, ``(2^k - 1) erf(...)``,
  which uses every unsigned code (not in the paper).
- Weights use their own mean and standard deviation (per tensor, of the active slice,
  as statistics: no gradient through them) and need no pre-quantization: their codes
  are fixed at export.
- Gradients: activations pass straight through the rounding, times the CDF's derivative;
  weights use Eqs. 3-4 (the sigmoid-derivative surrogate of the staircase).
- At 7-8 bits the CDF step near zero is finer than the 8-bit pre-step, so codes become
  unreachable: there the quantizer is LSQ (its step sizes are kept for those bits).
  Note that an LSQ bit-width computes in the original domain, so a supernet whose space
  mixes 8 with lower bits shares weights across two domains; prefer spaces <= 6 bits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import torch
from torch import Tensor

from rtfq_deploy.errors import RtfqError
from rtfq_deploy.quant.encoding import PRE_BITS, CdfCodes, Encoding, cdf_levels, qrange
from rtfq_deploy.quant.lsq import LSQQuantizer

CDF_MAX_BITS = 6
PRE_RANGE_SIGMAS = 3.0  # the 8-bit pre-quantization covers 3 sigma (every k <= 6 code is reached within it)
ALPHA = 1.0  # the transformed domain is [-alpha, alpha] (the paper's choice)
_MIN_SIGMA = 1e-8
_MAX_SIGMA = 1e30  # a (hostile or diverged) sigma beyond it would make the pre-step overflow float32


def erf_scale(signed: bool, cdf: str = "normal") -> float:
    """Pre-code -> the CDF's argument, independent of sigma: p * (3 sigma / qmax8) / (sigma
    sqrt 2) for erf; for the logistic, whose scale s = sigma sqrt 3 / pi has the normal's
    variance, p * (3 sigma / qmax8) / s."""
    if cdf == "logistic":
        return PRE_RANGE_SIGMAS * math.pi / (qrange(PRE_BITS, signed)[1] * math.sqrt(3.0))
    return PRE_RANGE_SIGMAS / (qrange(PRE_BITS, signed)[1] * math.sqrt(2.0))


def _cdf(u: Tensor, cdf: str) -> Tensor:
    """The transform onto [-1, 1]: erf, or 2 sigmoid - 1 (the symmetric logistic's)."""
    return torch.erf(u) if cdf == "normal" else 2.0 * torch.sigmoid(u) - 1.0


def _cdf_slope(u: Tensor, cdf: str) -> Tensor:
    if cdf == "normal":
        return torch.exp(-u * u) * (2.0 / math.sqrt(math.pi))
    s = torch.sigmoid(u)
    return 2.0 * s * (1.0 - s)


@dataclass(frozen=True)
class CdfOptions:
    """What an AlignQ variant does with activations (weights are the same in every one).

    - ``sigma``: "calibrated" (from the first batch, then fixed), "learned" (log sigma
      trained with the weights: a gradient through the CDF, as LSQ learns its step) or
      "fixed" (the paper's code: N(0, 1) after BatchNorm, never fitted to data);
    - ``post_relu``: "half" (the half-normal CDF, every unsigned code used) or "full"
      (the signed CDF the paper applies everywhere: post-ReLU values use half the codes);
    - ``placement``: "all" activations, or "conv-inputs": only tensors that nothing but
      convolutions read, so residual adds and pooling keep uniform (LSQ) codes and the
      network's residual stream stays in the original domain, as in the paper's code,
      which quantizes each conv's input and adds the float identity; "branch": only
      tensors that one convolution reads (inside a residual branch: not a block's output,
      which the next block's conv and its shortcut both read); or "none": no activation
      (AlignQ on the weights only, activations are LSQ's);
    - ``cdf``: "normal" (the paper's) or "logistic", whose code map onnxruntime runs as one
      256-entry table (QLinearSigmoid) instead of three elementwise ops with an Erf;
    - ``domain``: "cdf" (the paper's: the network computes on the codes' uniform levels in
      [-alpha, alpha]) or "original", a diagnostic that does not export: each code's value
      is mapped back through the inverse CDF (sigma sqrt 2 erfinv(code / levels), capped at
      the pre-range's 3 sigma), a non-uniform quantizer in the input's own domain, which no
      integer kernel reads (its values are not code x one scale).
    """

    sigma: str = "calibrated"
    post_relu: str = "half"
    placement: str = "all"
    domain: str = "cdf"
    cdf: str = "normal"

    def __post_init__(self) -> None:
        for field, value, known in (("sigma", self.sigma, ("calibrated", "learned", "fixed")),
                                    ("post_relu", self.post_relu, ("half", "full")),
                                    ("placement", self.placement, ("all", "conv-inputs", "branch", "none")),
                                    ("domain", self.domain, ("cdf", "original")),
                                    ("cdf", self.cdf, ("normal", "logistic"))):
            if value not in known:
                raise ValueError(f"AlignQ {field} must be one of {', '.join(known)}, got {value!r}")


@lru_cache(maxsize=64)
def _table(bits: int, signed: bool, scale: float, full: bool = False, cdf: str = "normal") -> Tensor:
    p = torch.arange(qrange(PRE_BITS, signed)[0], qrange(PRE_BITS, signed)[1] + 1, dtype=torch.float32)
    return cdf_codes(p, scale, bits, signed, full, cdf)


def cdf_codes(p: Tensor, scale: float, bits: int, signed: bool, full: bool = False, cdf: str = "normal") -> Tensor:
    """k-bit codes of pre-codes ``p``, in float32 arithmetic as the exported graph computes
    them: DequantizeLinear (p x scale), Erf, QuantizeLinear (divide by 1/levels, round half
    to even), then the k-bit clamp. ``full``: the signed CDF's levels on unsigned codes.
    Logistic: Sigmoid, then QuantizeLinear by 1/(2 levels), less the levels (its zero
    point); all 256 pre-codes of every bit-width equal onnxruntime's QLinearSigmoid table,
    the nearest at 1.3e-4 of a rounding boundary (tests/test_alignq.py)."""
    levels = cdf_levels(bits, signed or full)
    u = p.to(torch.float32) * torch.tensor(scale, dtype=torch.float32)
    if cdf == "logistic":
        codes = torch.round(torch.sigmoid(u) / torch.tensor(0.5 / levels, dtype=torch.float32)) - levels
    else:
        codes = torch.round(torch.erf(u) / torch.tensor(1.0 / levels, dtype=torch.float32))
    lo, hi = qrange(bits, signed)
    return codes.clamp(lo, hi)


def code_table(bits: int, signed: bool, full: bool = False, cdf: str = "normal") -> Tensor:
    """The k-bit code of every 8-bit pre-code (index 0 = the lowest pre-code)."""
    return _table(bits, signed, erf_scale(signed, cdf), full, cdf)


class _CdfActivation(torch.autograd.Function):
    """Pre-quantize, look the code up, scale; backward: straight through the rounding
    inside the pre-range, times the CDF's derivative at the pre-quantized value. The
    pre-step (3 sigma / qmax) gets the gradient of the CDF value for sigma, -p times that
    derivative, summed (zero outside the pre-range, where the code does not depend on
    sigma)."""

    @staticmethod
    def forward(ctx, x: Tensor, step: Tensor, table: Tensor, lo: int, hi: int, unit: float,  # type: ignore[override]
                scale: float, cdf: str = "normal") -> Tensor:
        v = x / step
        p = torch.round(v).clamp_(lo, hi)
        inside = v.ge(lo).logical_and_(v.le(hi))
        factor = inside * (_cdf_slope(p * scale, cdf) * (ALPHA * scale) / step)
        ctx.save_for_backward(factor, p if ctx.needs_input_grad[1] else None)
        return table[(p - lo).long()] * unit

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple:  # type: ignore[override]
        factor, p = ctx.saved_tensors
        gx = grad * factor
        gstep = None if p is None else -torch.vdot(gx.reshape(-1), p.reshape(-1)).reshape(())
        return gx, gstep, None, None, None, None, None, None


def inverse_values(codes: Tensor, lo: int, hi: int, levels: int, signed: bool) -> Tensor:
    """erfinv of the middle of each code's interval in the CDF domain (the end codes' reach
    -1 or 1), capped at the pre-range's 3 sigma; an unsigned code 0 (ReLU's zeros) stays 0.
    In units of sigma sqrt 2."""
    lower = torch.where(codes == lo, torch.full_like(codes, -1.0 if signed else 0.0), (codes - 0.5) / levels)
    upper = torch.where(codes == hi, torch.ones_like(codes), (codes + 0.5) / levels)
    cap = math.erf(PRE_RANGE_SIGMAS / math.sqrt(2.0))
    values = torch.erfinv(((lower + upper) / 2).clamp(-cap, cap))
    return values if signed else torch.where(codes == 0, torch.zeros_like(values), values)


class _CdfInverse(torch.autograd.Function):
    """Pre-quantize, take each code's value in the input's domain; backward: straight
    through inside the pre-range (the map is near the identity there, as LSQ's is)."""

    @staticmethod
    def forward(ctx, x: Tensor, step: Tensor, values: Tensor, lo: int, hi: int) -> Tensor:  # type: ignore[override]
        v = x / step
        p = torch.round(v).clamp_(lo, hi)
        ctx.save_for_backward(v.ge(lo).logical_and_(v.le(hi)))
        return values[(p - lo).long()]

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple:  # type: ignore[override]
        (inside,) = ctx.saved_tensors
        return grad * inside, None, None, None, None


class _CdfWeight(torch.autograd.Function):
    """Eqs. 2-4: codes of the CDF-transformed weights; the gradient is the sigmoid
    derivative s(t)(1 - s(t)) at t = (2 (w_q + 0.5)(2^k - 1)) mod 1, times 2 alpha f(w)."""

    @staticmethod
    def forward(ctx, w: Tensor, mu: Tensor, sigma: Tensor, bits: int, lo: int, hi: int,  # type: ignore[override]
                levels: int) -> Tensor:
        u = (w - mu) / (sigma * math.sqrt(2.0))
        wq = torch.round(torch.erf(u) * levels).clamp_(lo, hi) / levels * ALPHA
        t = torch.remainder(2.0 * (wq + 0.5) * ((1 << bits) - 1), 1.0)
        s = torch.sigmoid(t)
        pdf2 = torch.exp(-u * u) * (2.0 / math.sqrt(math.pi)) / (sigma * math.sqrt(2.0))  # 2 f(w)
        ctx.save_for_backward(s * (1 - s) * ALPHA * pdf2)
        return wq

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple:  # type: ignore[override]
        (factor,) = ctx.saved_tensors
        return grad * factor, None, None, None, None, None, None


def _weight_stats(w: Tensor) -> tuple[Tensor, Tensor]:
    w = w.detach()
    return w.mean(), w.std(unbiased=False).clamp_min(_MIN_SIGMA)


class AlignQQuantizer(LSQQuantizer):
    """AlignQ at <= 6 bits, LSQ above (see the module docstring); ``options`` picks the
    variant (:class:`CdfOptions`), ``kind`` is its registered name."""

    kind = "alignq-v1"

    def __init__(self, bit_choices: tuple[int, ...], signed: bool, channels: int | None = None,
                 role: str = "body", options: CdfOptions = CdfOptions(), kind: str = "alignq-v1") -> None:
        super().__init__(bit_choices, signed, channels, role)
        self.options = options
        self.kind = kind
        self.full = options.post_relu == "full" and not signed
        # an activation under "conv-inputs" or "branch" learns where it goes once, from place()
        self.uses_cdf = channels is not None or options.placement != "none"
        if channels is None:
            if options.sigma == "learned":
                self.log_sigma = torch.nn.Parameter(torch.zeros(()))  # N(0, 1) until calibrated
            else:
                self.register_buffer("sigma", torch.ones(()))

    def place(self, readers: tuple[str, ...]) -> None:
        """Where the supernet's graph says this activation goes (the node kinds reading it)."""
        if self.channels is None and self.options.placement == "conv-inputs":
            self.uses_cdf = bool(readers) and all(r == "Conv" for r in readers)
        elif self.channels is None and self.options.placement == "branch":
            self.uses_cdf = readers == ("Conv",)

    def cdf(self, bits: int) -> bool:
        return bits <= CDF_MAX_BITS and self.uses_cdf

    def sigma_value(self) -> Tensor:
        if self.options.sigma == "learned":
            return self.log_sigma.clamp(math.log(_MIN_SIGMA), math.log(_MAX_SIGMA)).exp()
        return self.sigma.clamp(_MIN_SIGMA, _MAX_SIGMA)

    def arg_scale(self) -> float:
        """Pre-code -> the CDF's argument (:func:`erf_scale`) for this quantizer."""
        return erf_scale(self.signed, self.options.cdf)

    def table(self, bits: int) -> Tensor:
        """This quantizer's k-bit code of every 8-bit pre-code (:func:`code_table`)."""
        return code_table(bits, self.signed, self.full, self.options.cdf)

    def init_from(self, x: Tensor) -> None:
        super().init_from(x)
        if self.channels is None and self.options.sigma != "fixed":
            with torch.no_grad():
                x = x.detach()
                sample = x[x > 0] if not self.signed else x
                if sample.numel():
                    rms = sample.pow(2).mean().sqrt().clamp_min(_MIN_SIGMA)
                    if self.options.sigma == "learned":
                        self.log_sigma.copy_(rms.log())
                    else:
                        self.sigma.copy_(rms)

    def changes_domain(self, bits: int) -> bool:
        return self.channels is None and self.cdf(bits) and self.options.domain == "cdf"

    def pre_step(self) -> Tensor:
        return self.sigma_value() * (PRE_RANGE_SIGMAS / qrange(PRE_BITS, self.signed)[1])

    def levels(self, bits: int) -> int:
        return cdf_levels(bits, self.signed or self.full)

    def scale(self, bits: int, channels: int | None = None) -> Tensor:
        if not self.cdf(bits):
            return super().scale(bits, channels)
        unit = ALPHA / self.levels(bits)
        if self.channels is None:
            return self.step.new_tensor(unit)
        return self.step.new_full((channels or self.channels,), unit)

    def encoding(self, bits: int) -> Encoding:
        if not self.cdf(bits) or self.channels is not None:
            return super().encoding(bits)
        if self.options.domain != "cdf":
            raise RtfqError(f"{self.kind} is a diagnostic and does not export: its activations take non-uniform "
                            "values in the input's domain, which no integer kernel reads")
        return CdfCodes(float(self.pre_step().item()), self.arg_scale(), ALPHA, bits, self.signed, self.full,
                        self.options.cdf)

    def quantize(self, x: Tensor, bits: int) -> Tensor:
        if not self.cdf(bits):
            return super().quantize(x, bits)
        lo, hi = qrange(bits, self.signed)
        levels = self.levels(bits)
        if self.channels is not None:
            mu, sigma = _weight_stats(x)
            return _CdfWeight.apply(x, mu, sigma, bits, lo, hi, levels)
        table = self.table(bits).to(device=x.device, dtype=x.dtype)
        plo, phi = qrange(PRE_BITS, self.signed)
        if self.options.domain == "original":
            values = inverse_values(table, lo, hi, levels, self.signed) * (self.sigma_value().to(x.dtype) * math.sqrt(2.0))
            return _CdfInverse.apply(x, self.pre_step().to(x.dtype), values, plo, phi)
        return _CdfActivation.apply(x, self.pre_step().to(x.dtype), table, plo, phi, ALPHA / levels,
                                    self.arg_scale(), self.options.cdf)

    def aligned(self, x: Tensor, bits: int) -> Tensor | None:
        """The continuous transformed value before the k-bit rounding (ADMM's X), with
        gradients straight through the pre-quantization; None at LSQ bit-widths."""
        if not self.cdf(bits) or self.channels is not None:
            return None
        plo, phi = qrange(PRE_BITS, self.signed)
        v = x / self.pre_step().to(x.dtype)
        p = v + (torch.round(v).clamp(plo, phi) - v).detach()
        return ALPHA * _cdf(p * self.arg_scale(), self.options.cdf)

    def unrounded(self, x: Tensor, bits: int) -> Tensor:
        """Weights: levels x the CDF value; activations: the 8-bit pre-code before its
        rounding (the rounding that decides everything after it)."""
        if not self.cdf(bits):
            return super().unrounded(x, bits)
        if self.channels is None:
            return x / self.pre_step().to(x.dtype)
        mu, sigma = _weight_stats(x)
        return torch.erf((x - mu) / (sigma * math.sqrt(2.0))) * self.levels(bits)

    def to_int(self, x: Tensor, bits: int) -> Tensor:
        if not self.cdf(bits):
            return super().to_int(x, bits)
        if self.channels is None:
            plo, phi = qrange(PRE_BITS, self.signed)
            p = torch.round(x.detach() / self.pre_step().to(x.dtype)).clamp(plo, phi)
            return self.table(bits).to(x.device)[(p - plo).long()].to(x.dtype)
        lo, hi = qrange(bits, self.signed)
        return torch.round(self.unrounded(x.detach().to(torch.float64), bits)).clamp(lo, hi)

    def extra_repr(self) -> str:
        cdf = f"cdf at <= {CDF_MAX_BITS} bits" if self.uses_cdf else f"uniform (placement {self.options.placement})"
        return super().extra_repr() + f", {cdf}, sigma {self.options.sigma}, post-ReLU {self.options.post_relu}"
