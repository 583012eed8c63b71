"""The integer graph's ops, one object each.

An op of :mod:`rtfq_deploy.graph` (Quantize, Conv, Add, MaxPool, AvgPool) is described
here once, by a rule that gives all four of its meanings:

- ``shape``: how (channels, size) propagate and what a layer costs (:mod:`rtfq_deploy.costs`);
- ``lower``: the static integer IR op it becomes for one subnet (:mod:`rtfq_deploy.export.lower`);
- ``emit``: its ONNX QDQ nodes (:mod:`rtfq_deploy.export.onnx_graph`);
- ``emit_float``: its plain fp32 ONNX nodes (the benchmarks' reference).

The cost walk, lowering and both emitters are loops over the graph that look the rule up
by type (``RULES``), so adding an op is one class here and one entry in ``RULES``. Rules
hold no state: every call receives the walk, lowering or emitter it works for. How a
tensor is quantized (its encoding) is not an op's business: the emitters hand that to
:mod:`rtfq_deploy.export.encodings`. No ONNX import here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from rtfq_deploy import graph

if TYPE_CHECKING:  # pragma: no cover
    from rtfq_deploy.models.base import Supernet


@dataclass(frozen=True)
class LayerShape:
    """One layer of a sliced network as the cost walk saw it."""

    name: str
    macs: int
    weights: int
    out_channels: int


# -- IR ops: what a graph node becomes for one subnet (plain numpy) -------------------
@dataclass
class QuantizeOp:
    """The float image entering the integer path."""

    inp: str
    out: str


@dataclass
class ConvOp:
    """Conv (or Gemm when ``gemm``) on an integer input; float output unless ``out`` is
    quantized. ``weight`` holds integer codes, ``scale`` the folded scales; ``groups``
    is the channel count of a depthwise conv, else 1; ``relu_max`` caps the ReLU."""

    name: str
    inp: str
    out: str
    weight: np.ndarray
    scale: np.ndarray
    bias: np.ndarray
    weight_bits: int
    stride: int = 1
    padding: int = 0
    gemm: bool = False
    groups: int = 1
    relu_max: float | None = None


@dataclass
class AddOp:
    """Residual add of two integer tensors; ReLU folded into an unsigned output."""

    a: str
    b: str
    out: str


@dataclass
class MaxPoolOp:
    inp: str
    out: str
    kernel: int
    stride: int
    padding: int


@dataclass
class GlobalAvgPoolOp:
    inp: str
    out: str


Op = QuantizeOp | ConvOp | AddOp | MaxPoolOp | GlobalAvgPoolOp


@dataclass
class ShapeWalk:
    """State of the cost walk: every tensor's (channels, spatial size) so far."""

    model: "Supernet"
    resolution: int
    width: float
    tensors: dict[str, tuple[int, int]] = field(default_factory=dict)


def _pool_attrs(op: MaxPoolOp) -> dict[str, Any]:
    return {"kernel_shape": [op.kernel] * 2, "strides": [op.stride] * 2, "pads": [op.padding] * 4}


class OpRule:
    """What every op rule provides (see the module docstring)."""

    node: ClassVar[type]
    ir: ClassVar[type]

    def shape(self, node: Any, walk: ShapeWalk) -> LayerShape | None:
        raise NotImplementedError

    def lower(self, node: Any, lw: Any) -> Op:
        raise NotImplementedError

    def emit(self, op: Any, em: Any) -> None:
        raise NotImplementedError

    def emit_float(self, op: Any, fe: Any) -> None:
        raise NotImplementedError


class QuantizeRule(OpRule):
    node, ir = graph.Quantize, QuantizeOp

    def shape(self, node: graph.Quantize, walk: ShapeWalk) -> None:
        walk.tensors[node.out] = (3, walk.resolution)

    def lower(self, node: graph.Quantize, lw: Any) -> QuantizeOp:
        return QuantizeOp(lw.ir.input, lw.quantized(node.out, 3))

    def emit(self, op: QuantizeOp, em: Any) -> None:
        em.quantize(op.inp, op.out)

    def emit_float(self, op: QuantizeOp, fe: Any) -> None:
        fe.activation(op.inp, op.out)


class ConvRule(OpRule):
    """A conv (depthwise or not) or the classifier, with BatchNorm folded in."""

    node, ir = graph.Conv, ConvOp

    def shape(self, node: graph.Conv, walk: ShapeWalk) -> LayerShape:
        layer = walk.model.get_submodule(node.layer)
        c_in, size = walk.tensors[node.inp]
        w = layer.active_weight(c_in, walk.width)
        if not node.linear:
            size = graph.out_size(size, layer.kernel_size[0], layer.stride[0], layer.padding[0])
        if node.out is not None:
            walk.tensors[node.out] = (w.shape[0], size)
        per_output = w[0].numel()  # input channels per group x kernel area
        return LayerShape(node.layer, size * size * w.shape[0] * per_output, w.numel(), w.shape[0])

    def lower(self, node: graph.Conv, lw: Any) -> ConvOp:
        layer = lw.model.get_submodule(node.layer)
        c_in = lw.channels[node.inp]
        weight, scale, bias, bits = lw.fold(node)
        out = lw.ir.output if node.out is None else lw.quantized(node.out, weight.shape[0], node.relu_max)
        if node.linear:
            return ConvOp(node.layer, node.inp, out, weight, scale, bias, bits, gemm=True)
        return ConvOp(node.layer, node.inp, out, weight, scale, bias, bits, layer.stride[0], layer.padding[0],
                      groups=layer.active_groups(c_in), relu_max=node.relu_max)

    @staticmethod
    def _node(op: ConvOp, em: Any, w: str, b: str) -> str | None:
        """The Gemm (writing the logits) or the Conv (writing ``out.pre``, returned)."""
        if op.gemm:
            em.node("Gemm", [op.inp, w, b], [op.out], transB=1)
            return None
        k = op.weight.shape[2]
        em.node("Conv", [op.inp, w, b], [f"{op.out}.pre"], kernel_shape=[k, k], strides=[op.stride] * 2,
                pads=[op.padding] * 4, group=op.groups)
        return f"{op.out}.pre"

    def emit(self, op: ConvOp, em: Any) -> None:
        pre = self._node(op, em, *em.weight(op))
        if pre is not None:
            em.quantize(pre, op.out)

    def emit_float(self, op: ConvOp, fe: Any) -> None:
        pre = self._node(op, fe, *fe.folded_weight(op))
        if pre is not None:
            fe.activation(pre, op.out, op.relu_max)


class AddRule(OpRule):
    node, ir = graph.Add, AddOp

    def shape(self, node: graph.Add, walk: ShapeWalk) -> None:
        walk.tensors[node.out] = walk.tensors[node.a]

    def lower(self, node: graph.Add, lw: Any) -> AddOp:
        return AddOp(node.a, node.b, lw.quantized(node.out, lw.channels[node.a]))

    def emit(self, op: AddOp, em: Any) -> None:
        em.node("Add", [op.a, op.b], [f"{op.out}.pre"])
        em.quantize(f"{op.out}.pre", op.out)

    def emit_float(self, op: AddOp, fe: Any) -> None:
        fe.node("Add", [op.a, op.b], [f"{op.out}.pre"])
        fe.activation(f"{op.out}.pre", op.out)


class MaxPoolRule(OpRule):
    """Max pooling on codes: the pooled tensor is carried exactly as its input."""

    node, ir = graph.MaxPool, MaxPoolOp

    def shape(self, node: graph.MaxPool, walk: ShapeWalk) -> None:
        c, size = walk.tensors[node.inp]
        walk.tensors[node.out] = (c, graph.out_size(size, node.kernel, node.stride, node.padding))

    def lower(self, node: graph.MaxPool, lw: Any) -> MaxPoolOp:
        lw.carry(node.inp, node.out)
        return MaxPoolOp(node.inp, node.out, node.kernel, node.stride, node.padding)

    def emit(self, op: MaxPoolOp, em: Any) -> None:
        # max commutes with the clamp and with any monotone code map: the encoding pools
        # its saturated codes (or its pre-codes), so the clamp and any code map run on
        # the 4x smaller pooled tensor
        pooled = f"{op.out}_q.sat" if em.clipped(op.out) else f"{op.out}_q"
        em.encoding(op.inp).pool(em, op.inp, op.out, pooled, _pool_attrs(op))
        em.saturated[op.out] = pooled
        em.clamp(pooled, op.out, f"{op.out}_q")
        em.dequantize(f"{op.out}_q", op.out)

    def emit_float(self, op: MaxPoolOp, fe: Any) -> None:
        fe.node("MaxPool", [op.inp], [op.out], **_pool_attrs(op))


class AvgPoolRule(OpRule):
    """Global average pooling, flattened, requantized."""

    node, ir = graph.AvgPool, GlobalAvgPoolOp

    def shape(self, node: graph.AvgPool, walk: ShapeWalk) -> None:
        walk.tensors[node.out] = (walk.tensors[node.inp][0], 1)

    def lower(self, node: graph.AvgPool, lw: Any) -> GlobalAvgPoolOp:
        return GlobalAvgPoolOp(node.inp, lw.quantized(node.out, lw.channels[node.inp]))

    def emit(self, op: GlobalAvgPoolOp, em: Any) -> None:
        em.node("GlobalAveragePool", [op.inp], [f"{op.out}.pre"])
        em.quantize(f"{op.out}.pre", op.out, codes=f"{op.out}_q4d")
        em.node("Flatten", [f"{op.out}_q4d"], [f"{op.out}_q"], axis=1)
        em.dequantize(f"{op.out}_q", op.out)

    def emit_float(self, op: GlobalAvgPoolOp, fe: Any) -> None:
        fe.node("GlobalAveragePool", [op.inp], [f"{op.out}.4d"])
        fe.node("Flatten", [f"{op.out}.4d"], [op.out], axis=1)


RULES: tuple[OpRule, ...] = (QuantizeRule(), ConvRule(), AddRule(), MaxPoolRule(), AvgPoolRule())
BY_NODE: dict[type, OpRule] = {r.node: r for r in RULES}
BY_IR: dict[type, OpRule] = {r.ir: r for r in RULES}


def rule_for(obj: object) -> OpRule:
    """The rule of a graph node or an IR op."""
    rule = BY_NODE.get(type(obj)) or BY_IR.get(type(obj))
    if rule is None:
        raise TypeError(f"no op rule for {type(obj).__name__}")
    return rule
