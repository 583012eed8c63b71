"""Emit an ONNX QDQ graph from the integer IR.

Every quantized tensor ``t`` exists twice in the graph: its codes ``t_q`` (uint8) and their
dequantized float ``t``. QuantizeLinear, Clip and DequantizeLinear nodes are made only in
:meth:`_Emitter.quantize`, :meth:`_Emitter.clamp` and :meth:`_Emitter.dequantize`; nodes
whose outputs nothing reads are dropped at the end (onnxruntime keeps a dead
DequantizeLinear and the layout Transpose it drags in). Placement follows what
onnxruntime fuses into integer kernels (its qdq_selectors.cc rules, measured on 1.32):

- Activations are uint8 (signed ones with zero point 128, see ``_zero_point``).
- Conv/Gemm read DequantizeLinear'd inputs, weights (int8, per-channel scales on axis 0)
  and bias (int32 at input scale x weight scale) and write through QuantizeLinear:
  fused to QLinearConv / QGemm.
- ReLU is not a node: an unsigned output with zero point 0 saturates at 0, which is ReLU.
- A b-bit code (b < 8) rides in an 8-bit container; its exact range is enforced by a
  Clip on the integer side (QuantizeLinear -> Clip -> DequantizeLinear), which keeps the
  integer kernels; a float Clip before QuantizeLinear would not.
- MaxPool and Flatten run on the codes themselves; MaxPool reads the codes before the
  b-bit Clip (max commutes with a clamp), so the Clip runs on the pooled, 4x smaller tensor.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from rtfq_deploy.int4 import int4_tensor
from rtfq_deploy.export.lower import AddOp, ConvOp, GlobalAvgPoolOp, IntNet, MaxPoolOp, QuantizeOp
from rtfq_deploy.quant import CdfCodes, Encoding, LinearCodes

OPSET = 21
IR_VERSION = 10


def _zero_point(q: Encoding) -> int:
    """Every activation rides in uint8: signed codes [-2^(b-1), 2^(b-1)-1] shifted by 128.

    The values are exactly those of int8 with zero point 0, but one container type lets
    onnxruntime fuse a residual add of a signed branch and an unsigned shortcut into
    QLinearAdd (its inputs and output must share a type), and keeps convs U8S8.
    """
    return 128 if q.signed else 0


class _Emitter:
    """Emits one IR op at a time (``OPS``: a handler per op type) and every tensor's
    quantization in one place (``ENCODINGS``: a handler per encoding)."""

    def __init__(self, ir: IntNet, pack_int4: bool) -> None:
        self.ir = ir
        self.pack_int4 = pack_int4
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.consts_made: set[str] = set()
        self.saturated: dict[str, str] = {}  # tensor -> its codes before the b-bit Clip
        # Residual add operands get an integer-side Clip even at 8 bits (then an identity):
        # OpenVINO fuses an Add into the conv feeding it and skips that operand's
        # requantization unless something sits between its Q and DQ, and departed from the
        # QDQ semantics there (48% of codes at the first add); with the Clip its top-1
        # equals onnxruntime's on every image of all 48 trained demo subnets, at 0.6-2.1%
        # of onnxruntime's latency (bench/openvino_semantics.py).
        # A MaxPool output needs none (measured exact), and an 8-bit Clip there would cost
        # onnxruntime a layout Transpose.
        self.add_inputs = ({t for op in ir.ops if isinstance(op, AddOp) for t in (op.a, op.b)}
                           - {op.out for op in ir.ops if isinstance(op, MaxPoolOp)})

    def node(self, op: str, inputs: list[str], outputs: list[str], **attrs) -> None:
        self.nodes.append(helper.make_node(op, inputs, outputs, name=f"{op}_{len(self.nodes)}", **attrs))

    def const(self, name: str, array: np.ndarray) -> str:
        # Not np.ascontiguousarray: it turns 0-d scales into shape (1,), and onnxruntime
        # fuses QLinearAdd only with scalar (per-tensor) scales.
        if name not in self.consts_made:
            self.inits.append(numpy_helper.from_array(array if array.flags.c_contiguous else array.copy(), name))
            self.consts_made.add(name)
        return name

    def qconsts(self, t: str, scale: float | None = None, suffix: str = "") -> tuple[str, str]:
        """Scale and zero point initializers of tensor ``t``'s codes (made once)."""
        q = self.ir.qparams[t]
        return (self.const(f"{t}.scale{suffix}", np.array(q.scale if scale is None else scale, np.float32)),
                self.const(f"{t}.zp", np.array(_zero_point(q), np.uint8)))

    # -- quantization: one handler per encoding -----------------------------------
    def quantize(self, pre: str, t: str, codes: str | None = None) -> None:
        """float ``pre`` -> codes ``t_q`` (in the exact b-bit range) -> float ``t``."""
        codes = codes or f"{t}_q"
        saturated = f"{codes}.sat" if self.clipped(t) else codes
        self.ENCODINGS[type(self.ir.qparams[t])](self, pre, t, saturated)
        self.saturated[t] = saturated
        self.clamp(saturated, t, codes)
        if codes == f"{t}_q":
            self.dequantize(codes, t)

    def linear_codes(self, pre: str, t: str, saturated: str) -> None:
        self.node("QuantizeLinear", [pre, *self.qconsts(t)], [saturated])

    def cdf_codes(self, pre: str, t: str, saturated: str) -> None:
        """AlignQ: 8-bit pre-codes (what the integer conv writes), then the CDF on them:
        Q(pre_scale) -> DQ(pre_scale / (sigma sqrt 2)) -> Erf -> Q(1 / levels). The measured
        cheapest exact form: the conv stays a QLinearConv and the CDF costs three
        elementwise ops on the codes (a Gather table would add layout Transposes)."""
        q: CdfCodes = self.ir.qparams[t]
        self.node("QuantizeLinear", [pre, *self.qconsts(t, q.pre_scale, ".pre")], [f"{t}_q.pre8"])
        self.cdf_map(f"{t}_q.pre8", t, saturated)

    def cdf_map(self, pre_codes: str, t: str, saturated: str) -> None:
        """The code map of ``t``'s CdfCodes applied to 8-bit pre-codes."""
        q: CdfCodes = self.ir.qparams[t]
        self.node("DequantizeLinear", [pre_codes, *self.qconsts(t, q.erf_scale, ".erf")], [f"{t}.u"])
        self.node("Erf", [f"{t}.u"], [f"{t}.erf"])
        self.node("QuantizeLinear", [f"{t}.erf", *self.qconsts(t, 1.0 / q.levels, ".levels")], [saturated])

    ENCODINGS = {LinearCodes: linear_codes, CdfCodes: cdf_codes}

    def clipped(self, t: str) -> bool:
        q = self.ir.qparams[t]
        if t in self.add_inputs:
            return True
        if isinstance(q, CdfCodes):  # unsigned CDF codes never pass 2^k - 1; signed ones reach +2^(k-1)
            return q.signed
        return q.bits < 8

    def clamp(self, saturated: str, t: str, codes: str) -> None:
        """Codes as QuantizeLinear saturates them to 8 bits -> ``codes`` in the exact b-bit
        range of ``t`` (nothing to do at 8 bits, but for residual add operands)."""
        q = self.ir.qparams[t]
        if self.clipped(t):
            lo, hi = (v + _zero_point(q) for v in q.qrange)
            self.node("Clip", [saturated, self.const(f"{t}.min", np.array(lo, np.uint8)),
                               self.const(f"{t}.max", np.array(hi, np.uint8))], [codes])

    def dequantize(self, codes: str, t: str) -> None:
        self.node("DequantizeLinear", [codes, *self.qconsts(t)], [t])

    # -- ops: one handler per IR op -------------------------------------------------
    def weight(self, op: ConvOp) -> tuple[str, str]:
        c_out = op.weight.shape[0]
        if self.pack_int4 and op.weight_bits <= 4:
            self.inits.append(int4_tensor(f"{op.name}.weight_q", op.weight))
            self.inits.append(int4_tensor(f"{op.name}.weight_zp", np.zeros(c_out, np.int8)))
        else:
            self.const(f"{op.name}.weight_q", op.weight)
            self.const(f"{op.name}.weight_zp", np.zeros(c_out, np.int8))
        self.const(f"{op.name}.weight_scale", op.scale)
        self.node("DequantizeLinear", [f"{op.name}.weight_q", f"{op.name}.weight_scale", f"{op.name}.weight_zp"],
                  [f"{op.name}.weight"], axis=0)
        in_scale = np.float32(self.ir.qparams[op.inp].scale)
        self.const(f"{op.name}.bias_q", op.bias)
        self.const(f"{op.name}.bias_scale", (in_scale * op.scale).astype(np.float32))
        self.const(f"{op.name}.bias_zp", np.zeros(c_out, np.int32))
        self.node("DequantizeLinear", [f"{op.name}.bias_q", f"{op.name}.bias_scale", f"{op.name}.bias_zp"],
                  [f"{op.name}.bias"], axis=0)
        return f"{op.name}.weight", f"{op.name}.bias"

    def quantize_input(self, op: QuantizeOp) -> None:
        self.quantize(op.inp, op.out)

    def conv(self, op: ConvOp) -> None:
        w, b = self.weight(op)
        if op.gemm:
            self.node("Gemm", [op.inp, w, b], [op.out], transB=1)
        else:
            k = op.weight.shape[2]
            self.node("Conv", [op.inp, w, b], [f"{op.out}.pre"], kernel_shape=[k, k],
                      strides=[op.stride] * 2, pads=[op.padding] * 4)
            self.quantize(f"{op.out}.pre", op.out)

    def add(self, op: AddOp) -> None:
        self.node("Add", [op.a, op.b], [f"{op.out}.pre"])
        self.quantize(f"{op.out}.pre", op.out)

    def maxpool(self, op: MaxPoolOp) -> None:
        # max commutes with the clamp and with any monotone code map: pool the saturated
        # codes, or for CDF codes the 8-bit pre-codes, so that the Erf chain runs on the 4x
        # smaller pooled tensor (the input's own chain is then dead and dropped, unless
        # something else reads it)
        pooled = f"{op.out}_q.sat" if self.clipped(op.out) else f"{op.out}_q"
        attrs = {"kernel_shape": [op.kernel] * 2, "strides": [op.stride] * 2, "pads": [op.padding] * 4}
        if isinstance(self.ir.qparams[op.inp], CdfCodes):
            self.node("MaxPool", [f"{op.inp}_q.pre8"], [f"{op.out}_q.pre8"], **attrs)
            self.cdf_map(f"{op.out}_q.pre8", op.out, pooled)
        else:
            self.node("MaxPool", [self.saturated[op.inp]], [pooled], **attrs)
        self.saturated[op.out] = pooled
        self.clamp(pooled, op.out, f"{op.out}_q")
        self.dequantize(f"{op.out}_q", op.out)

    def avgpool(self, op: GlobalAvgPoolOp) -> None:
        self.node("GlobalAveragePool", [op.inp], [f"{op.out}.pre"])
        self.quantize(f"{op.out}.pre", op.out, codes=f"{op.out}_q4d")
        self.node("Flatten", [f"{op.out}_q4d"], [f"{op.out}_q"], axis=1)
        self.dequantize(f"{op.out}_q", op.out)

    OPS = {QuantizeOp: quantize_input, ConvOp: conv, AddOp: add, MaxPoolOp: maxpool, GlobalAvgPoolOp: avgpool}

    def emit(self, op: object) -> None:
        self.OPS[type(op)](self, op)


def _drop_unused(nodes: list[onnx.NodeProto], inits: list[onnx.TensorProto],
                 output: str) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """Nodes (last to first) and initializers that something reads on the way to ``output``."""
    needed, kept = {output}, []
    for n in reversed(nodes):
        if any(o in needed for o in n.output):
            kept.append(n)
            needed.update(n.input)
    return kept[::-1], [i for i in inits if i.name in needed]


def to_onnx(ir: IntNet, metadata: Mapping[str, str], *, pack_int4: bool = False) -> onnx.ModelProto:
    """The ONNX model of ``ir`` (input: float NCHW image, output: float logits)."""
    emitter = _Emitter(ir, pack_int4)
    for op in ir.ops:
        emitter.emit(op)
    nodes, inits = _drop_unused(emitter.nodes, emitter.inits, ir.output)
    r = ir.resolution
    graph = helper.make_graph(
        nodes, "rtfq_subnet",
        [helper.make_tensor_value_info(ir.input, TensorProto.FLOAT, ["N", 3, r, r])],
        [helper.make_tensor_value_info(ir.output, TensorProto.FLOAT, ["N", ir.num_classes])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="rtfq_deploy")
    model.ir_version = IR_VERSION
    helper.set_model_props(model, dict(metadata))
    return model


def to_float_onnx(ir: IntNet) -> onnx.ModelProto:
    """The same subnet as a plain fp32 graph (folded weights and biases, ReLU nodes, no
    quantization): the reference for benchmarks and for onnxruntime's own quantizer."""
    nodes: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = []

    def node(op: str, inputs: list[str], outputs: list[str], **attrs) -> None:
        nodes.append(helper.make_node(op, inputs, outputs, name=f"{op}_{len(nodes)}", **attrs))

    def relu_if_unsigned(pre: str, out: str) -> None:
        q = ir.qparams[out]
        if isinstance(q, CdfCodes):  # the float transform the CDF codes approximate: alpha erf(x / (sigma sqrt 2))
            node("Relu" if not q.signed else "Identity", [pre], [f"{out}.relu"])
            inits.append(numpy_helper.from_array(np.array(q.erf_scale / q.pre_scale, np.float32), f"{out}.cdf_in"))
            inits.append(numpy_helper.from_array(np.array(q.alpha, np.float32), f"{out}.alpha"))
            node("Mul", [f"{out}.relu", f"{out}.cdf_in"], [f"{out}.u"])
            node("Erf", [f"{out}.u"], [f"{out}.erf"])
            node("Mul", [f"{out}.erf", f"{out}.alpha"], [out])
        else:
            node("Relu" if not q.signed else "Identity", [pre], [out])

    for op in ir.ops:
        if isinstance(op, QuantizeOp):
            if isinstance(ir.qparams[op.out], CdfCodes):
                relu_if_unsigned(op.inp, op.out)
            else:
                node("Identity", [op.inp], [op.out])
        elif isinstance(op, ConvOp):
            in_scale = np.float64(ir.qparams[op.inp].scale)
            shape = (-1,) + (1,) * (op.weight.ndim - 1)
            w = (op.weight.astype(np.float64) * op.scale.astype(np.float64).reshape(shape)).astype(np.float32)
            b = (op.bias.astype(np.float64) * in_scale * op.scale.astype(np.float64)).astype(np.float32)
            inits += [numpy_helper.from_array(w, f"{op.name}.weight"), numpy_helper.from_array(b, f"{op.name}.bias")]
            if op.gemm:
                node("Gemm", [op.inp, f"{op.name}.weight", f"{op.name}.bias"], [op.out], transB=1)
            else:
                k = op.weight.shape[2]
                node("Conv", [op.inp, f"{op.name}.weight", f"{op.name}.bias"], [f"{op.out}.pre"], kernel_shape=[k, k],
                     strides=[op.stride] * 2, pads=[op.padding] * 4)
                relu_if_unsigned(f"{op.out}.pre", op.out)
        elif isinstance(op, AddOp):
            node("Add", [op.a, op.b], [f"{op.out}.pre"])
            relu_if_unsigned(f"{op.out}.pre", op.out)
        elif isinstance(op, MaxPoolOp):
            node("MaxPool", [op.inp], [op.out], kernel_shape=[op.kernel] * 2, strides=[op.stride] * 2,
                 pads=[op.padding] * 4)
        elif isinstance(op, GlobalAvgPoolOp):
            node("GlobalAveragePool", [op.inp], [f"{op.out}.4d"])
            node("Flatten", [f"{op.out}.4d"], [op.out], axis=1)
    r = ir.resolution
    graph = helper.make_graph(nodes, "rtfq_subnet_fp32",
                              [helper.make_tensor_value_info(ir.input, TensorProto.FLOAT, ["N", 3, r, r])],
                              [helper.make_tensor_value_info(ir.output, TensorProto.FLOAT, ["N", ir.num_classes])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="rtfq_deploy")
    model.ir_version = IR_VERSION
    return model
