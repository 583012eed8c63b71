"""How each encoding (:mod:`rtfq_deploy.quant.encoding`) is emitted, one handler each.

A handler gives, for its encoding:

- ``codes``: the nodes from a float tensor to its (8-bit saturated) codes;
- ``needs_clip``: whether those codes need an integer-side Clip to their exact range;
- ``pool``: max pooling on its codes (max commutes with any nondecreasing code map);
- ``float_form``: the fp32 graph's stand-in for the quantizer (ReLU, a capped ReLU, or
  the float transform the codes approximate);
- ``domain``: the whole input domain of its code map where that domain is finite (the
  256 pre-codes of a CDF map), which verification then checks in full, or None where
  sampled inputs decide (uniform codes are one QuantizeLinear).

The emitters (:mod:`rtfq_deploy.export.onnx_graph`) look a handler up by the encoding's
type (``ENCODINGS``), so a new quantizer kind with a new encoding is one handler here.
No ONNX import: handlers call the emitter's ``node``/``const``/``qconsts``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from rtfq_deploy.quant import CdfCodes, Encoding, LinearCodes


def _activation(fe: Any, pre: str, out: str, signed: bool, relu_max: float | None) -> None:
    """The float activation a quantizer stands for: none when signed, else ReLU (capped)."""
    if signed:
        fe.node("Identity", [pre], [out])
    elif relu_max is not None:
        fe.node("Clip", [pre, fe.scalar(f"{out}.relu_min", 0.0), fe.scalar(f"{out}.relu_max", relu_max)], [out])
    else:
        fe.node("Relu", [pre], [out])


class LinearHandler:
    """Uniform codes: one QuantizeLinear."""

    def codes(self, em: Any, pre: str, t: str, saturated: str) -> None:
        em.node("QuantizeLinear", [pre, *em.qconsts(t)], [saturated])

    def needs_clip(self, q: LinearCodes) -> bool:
        return q.bits < 8

    def pool(self, em: Any, inp: str, out: str, pooled: str, attrs: dict) -> None:
        em.node("MaxPool", [em.saturated[inp]], [pooled], **attrs)

    def float_form(self, fe: Any, pre: str, out: str, q: LinearCodes, relu_max: float | None) -> None:
        _activation(fe, pre, out, q.signed, relu_max)

    def domain(self, q: LinearCodes) -> np.ndarray | None:
        return None


class CdfHandler:
    """AlignQ's codes: 8-bit pre-codes (what the integer conv writes), then the CDF on
    them: Q(pre_scale) -> DQ(pre_scale / (sigma sqrt 2)) -> Erf -> Q(1 / levels). The
    measured cheapest exact form: the conv stays a QLinearConv and the CDF costs three
    elementwise ops on the codes (a Gather table would add layout Transposes)."""

    def codes(self, em: Any, pre: str, t: str, saturated: str) -> None:
        q: CdfCodes = em.ir.qparams[t]
        em.node("QuantizeLinear", [pre, em.qconsts(t, q.pre_scale, ".pre")[0], self.pre_zero_point(em, t)],
                [f"{t}_q.pre8"])
        self.code_map(em, f"{t}_q.pre8", t, saturated)

    def pre_zero_point(self, em: Any, t: str) -> str:
        """The 8-bit pre-codes' zero point (not the k-bit codes', which differs for
        unsigned logistic codes)."""
        q: CdfCodes = em.ir.qparams[t]
        return em.const(f"{t}.pre_zp", np.array(q.pre_zero_point, np.uint8))

    def code_map(self, em: Any, pre_codes: str, t: str, saturated: str) -> None:
        """The code map of ``t``'s CdfCodes applied to 8-bit pre-codes. The logistic CDF's
        chain, DequantizeLinear -> Sigmoid -> QuantizeLinear, is one QLinearSigmoid (a
        256-entry table) in onnxruntime's optimized graph."""
        q: CdfCodes = em.ir.qparams[t]
        em.node("DequantizeLinear", [pre_codes, em.qconsts(t, q.erf_scale, ".erf")[0], self.pre_zero_point(em, t)],
                [f"{t}.u"])
        if q.cdf == "logistic":
            em.node("Sigmoid", [f"{t}.u"], [f"{t}.cdf"])
            zp = em.const(f"{t}.cdf_zp", np.array(q.zero_point - q.levels, np.uint8))
            em.node("QuantizeLinear", [f"{t}.cdf", em.qconsts(t, 0.5 / q.levels, ".levels")[0], zp], [saturated])
            return
        em.node("Erf", [f"{t}.u"], [f"{t}.erf"])
        em.node("QuantizeLinear", [f"{t}.erf", *em.qconsts(t, 1.0 / q.levels, ".levels")], [saturated])

    def needs_clip(self, q: CdfCodes) -> bool:
        return q.signed  # unsigned CDF codes never pass 2^k - 1; signed ones reach +2^(k-1)

    def pool(self, em: Any, inp: str, out: str, pooled: str, attrs: dict) -> None:
        # pool the 8-bit pre-codes, so that the Erf chain runs on the pooled tensor (the
        # input's own chain is then dead and dropped, unless something else reads it)
        em.node("MaxPool", [f"{inp}_q.pre8"], [f"{out}_q.pre8"], **attrs)
        self.code_map(em, f"{out}_q.pre8", out, pooled)

    def float_form(self, fe: Any, pre: str, out: str, q: CdfCodes, relu_max: float | None) -> None:
        """The float transform the codes approximate: alpha erf(act(x) / (sigma sqrt 2)), or
        alpha (2 sigmoid(act(x) / s) - 1) for the logistic CDF."""
        _activation(fe, pre, f"{out}.act", q.signed, relu_max)
        fe.node("Mul", [f"{out}.act", fe.scalar(f"{out}.cdf_in", q.erf_scale / q.pre_scale)], [f"{out}.u"])
        if q.cdf == "logistic":
            fe.node("Sigmoid", [f"{out}.u"], [f"{out}.sig"])
            fe.node("Mul", [f"{out}.sig", fe.scalar(f"{out}.two_alpha", 2.0 * q.alpha)], [f"{out}.twice"])
            fe.node("Sub", [f"{out}.twice", fe.scalar(f"{out}.alpha", q.alpha)], [out])
            return
        fe.node("Erf", [f"{out}.u"], [f"{out}.erf"])
        fe.node("Mul", [f"{out}.erf", fe.scalar(f"{out}.alpha", q.alpha)], [out])

    def domain(self, q: CdfCodes) -> np.ndarray:
        lo, hi = q.pre_qrange
        return np.arange(lo, hi + 1, dtype=np.float32) * np.float32(q.pre_scale)


ENCODINGS: dict[type, LinearHandler | CdfHandler] = {LinearCodes: LinearHandler(), CdfCodes: CdfHandler()}


def handler(q: Encoding) -> LinearHandler | CdfHandler:
    try:
        return ENCODINGS[type(q)]
    except KeyError:
        raise TypeError(f"no export handler for encoding {type(q).__name__}") from None
