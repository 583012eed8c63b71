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
- ReLU is not a node: an unsigned output with zero point 0 saturates at 0, which is ReLU;
  ReLU6 is the same plus an integer-side Clip at the code of 6 (see ``IntNet.ceilings``).
- A depthwise conv is a Conv with ``group`` = channels: fused to a QLinearConv too.
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

from rtfq_deploy.export.encodings import handler
from rtfq_deploy.export.lower import AddOp, ConvOp, IntNet, MaxPoolOp
from rtfq_deploy.int4 import int4_tensor
from rtfq_deploy.ops import rule_for
from rtfq_deploy.quant import Encoding

OPSET = 21
IR_VERSION = 10


def _zero_point(q: Encoding) -> int:
    """Every activation rides in uint8: signed codes [-2^(b-1), 2^(b-1)-1] shifted by 128
    (logistic CDF codes, unsigned, by their level count: ``CdfCodes.zero_point``).

    The values are exactly those of int8 with zero point 0, but one container type lets
    onnxruntime fuse a residual add of a signed branch and an unsigned shortcut into
    QLinearAdd (its inputs and output must share a type), and keeps convs U8S8.
    """
    return q.zero_point


class _Emitter:
    """Emits the QDQ graph: each IR op through its rule (:mod:`rtfq_deploy.ops`), every
    tensor's quantization here, in one place, through its encoding's handler
    (:mod:`rtfq_deploy.export.encodings`)."""

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

    def encoding(self, t: str):
        return handler(self.ir.qparams[t])

    # -- quantization, for every op and encoding ---------------------------------------
    def quantize(self, pre: str, t: str, codes: str | None = None) -> None:
        """float ``pre`` -> codes ``t_q`` (in the exact b-bit range) -> float ``t``."""
        codes = codes or f"{t}_q"
        saturated = f"{codes}.sat" if self.clipped(t) else codes
        self.encoding(t).codes(self, pre, t, saturated)
        self.saturated[t] = saturated
        self.clamp(saturated, t, codes)
        if codes == f"{t}_q":
            self.dequantize(codes, t)

    def clipped(self, t: str) -> bool:
        """Whether ``t``'s codes pass an integer-side Clip: a residual add operand, a capped
        activation (ReLU6), or codes narrower than QuantizeLinear's 8-bit saturation."""
        return t in self.add_inputs or t in self.ir.ceilings or self.encoding(t).needs_clip(self.ir.qparams[t])

    def clamp(self, saturated: str, t: str, codes: str) -> None:
        """Codes as QuantizeLinear saturates them to 8 bits -> ``codes`` in the exact range
        of ``t``: its b-bit range, capped at its ceiling (ReLU6) if it has one."""
        q = self.ir.qparams[t]
        if self.clipped(t):
            lo, hi = q.qrange
            hi = min(hi, self.ir.ceilings.get(t, hi))
            zp = _zero_point(q)
            self.node("Clip", [saturated, self.const(f"{t}.min", np.array(lo + zp, np.uint8)),
                               self.const(f"{t}.max", np.array(hi + zp, np.uint8))], [codes])

    def dequantize(self, codes: str, t: str) -> None:
        self.node("DequantizeLinear", [codes, *self.qconsts(t)], [t])

    def weight(self, op: ConvOp) -> tuple[str, str]:
        """Dequantized integer weights and int32 bias of a conv or Gemm."""
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

    def emit(self, op: object) -> None:
        rule_for(op).emit(op, self)


class _FloatEmitter:
    """Emits the plain fp32 graph of an IR: folded weights, activations as float ops."""

    def __init__(self, ir: IntNet) -> None:
        self.ir = ir
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []

    def node(self, op: str, inputs: list[str], outputs: list[str], **attrs) -> None:
        self.nodes.append(helper.make_node(op, inputs, outputs, name=f"{op}_{len(self.nodes)}", **attrs))

    def scalar(self, name: str, value: float) -> str:
        self.inits.append(numpy_helper.from_array(np.array(value, np.float32), name))
        return name

    def activation(self, pre: str, out: str, relu_max: float | None = None) -> None:
        """What quantizer ``out`` stands for in float: its encoding's float form."""
        q = self.ir.qparams[out]
        handler(q).float_form(self, pre, out, q, relu_max)

    def folded_weight(self, op: ConvOp) -> tuple[str, str]:
        in_scale = np.float64(self.ir.qparams[op.inp].scale)
        shape = (-1,) + (1,) * (op.weight.ndim - 1)
        w = (op.weight.astype(np.float64) * op.scale.astype(np.float64).reshape(shape)).astype(np.float32)
        b = (op.bias.astype(np.float64) * in_scale * op.scale.astype(np.float64)).astype(np.float32)
        self.inits += [numpy_helper.from_array(w, f"{op.name}.weight"), numpy_helper.from_array(b, f"{op.name}.bias")]
        return f"{op.name}.weight", f"{op.name}.bias"


def _drop_unused(nodes: list[onnx.NodeProto], inits: list[onnx.TensorProto],
                 output: str) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """Nodes (last to first) and initializers that something reads on the way to ``output``."""
    needed, kept = {output}, []
    for n in reversed(nodes):
        if any(o in needed for o in n.output):
            kept.append(n)
            needed.update(n.input)
    return kept[::-1], [i for i in inits if i.name in needed]


def _model(ir: IntNet, name: str, nodes: list, inits: list) -> onnx.ModelProto:
    r = ir.resolution
    graph = helper.make_graph(
        nodes, name,
        [helper.make_tensor_value_info(ir.input, TensorProto.FLOAT, ["N", 3, r, r])],
        [helper.make_tensor_value_info(ir.output, TensorProto.FLOAT, ["N", ir.num_classes])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="rtfq_deploy")
    model.ir_version = IR_VERSION
    return model


def to_onnx(ir: IntNet, metadata: Mapping[str, str], *, pack_int4: bool = False) -> onnx.ModelProto:
    """The ONNX model of ``ir`` (input: float NCHW image, output: float logits)."""
    emitter = _Emitter(ir, pack_int4)
    for op in ir.ops:
        emitter.emit(op)
    nodes, inits = _drop_unused(emitter.nodes, emitter.inits, ir.output)
    model = _model(ir, "rtfq_subnet", nodes, inits)
    helper.set_model_props(model, dict(metadata))
    return model


def to_float_onnx(ir: IntNet) -> onnx.ModelProto:
    """The same subnet as a plain fp32 graph (folded weights and biases, ReLU nodes, no
    quantization): the reference for benchmarks and for onnxruntime's own quantizer."""
    fe = _FloatEmitter(ir)
    for op in ir.ops:
        rule_for(op).emit_float(op, fe)
    return _model(ir, "rtfq_subnet_fp32", fe.nodes, fe.inits)
