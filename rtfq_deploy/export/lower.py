"""Lowering: a supernet and one subnet choice -> a static integer network (the IR).

The IR is plain numpy: integer weights, per-channel scales, int32 biases, and for every
tensor the integer code it is carried in. It knows nothing of ONNX (see
:mod:`rtfq_deploy.export.onnx_graph`), and the supernet's layers know nothing of it.

BatchNorm folding keeps the trained integers: a conv's weights are quantized per output
channel before BatchNorm, so BN's per-channel factor gamma / sqrt(var + eps) moves into
the weight scale and the shift into the bias; the integer weights are the ones the
quantizer produced (``to_int``), never re-quantized. A negative gamma gives a negative scale (onnxruntime's
integer kernels and the ONNX reference agree on it), so codes are never negated and the
-2^(b-1) code cannot overflow; a zero gamma gives zero weights.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from rtfq_deploy import graph
from rtfq_deploy.errors import RtfqError
from rtfq_deploy.layers import SlimBatchNorm2d, SlimConv2d, SlimLinear
from rtfq_deploy.models.base import Supernet
from rtfq_deploy.plan import ActiveSubnet
from rtfq_deploy.quant import Encoding, Quantizer

INT32_MAX = np.iinfo(np.int32).max


@dataclass
class QuantizeOp:
    """The float image entering the integer path."""

    inp: str
    out: str


@dataclass
class ConvOp:
    """Conv (or Gemm when ``gemm``) on an integer input; float output unless
    ``out`` is quantized. ``weight`` holds integer codes, ``scale`` the folded scales."""

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


@dataclass
class AddOp:
    """Residual add of two integer tensors, ReLU folded into the unsigned output."""

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
class IntNet:
    """A static integer network: ops in order, and how every tensor is carried (its
    :mod:`encoding <rtfq_deploy.quant.encoding>`).

    Tensors absent from ``qparams`` are float (the input image and the logits). An
    unsigned quantized output of a conv or add also applies ReLU: codes saturate at 0.
    """

    input: str
    output: str
    resolution: int
    num_classes: int
    ops: list[Op] = field(default_factory=list)
    qparams: dict[str, Encoding] = field(default_factory=dict)


def _encoding(quant: Quantizer, net: ActiveSubnet) -> Encoding:
    bits = net.bits[quant.name]
    if bits is None:
        raise RtfqError(f"quantizer {quant.name} is float in this bit plan; only integer subnets export")
    return quant.encoding(bits)


def fold(layer: SlimConv2d | SlimLinear, bn: SlimBatchNorm2d | None, c_in: int, in_scale: float,
         net: ActiveSubnet) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Integer weights, folded per-channel scales and int32 bias (at in_scale x scale)."""
    bits = net.bits[layer.weight_quant.name]
    if bits is None:
        raise RtfqError(f"layer {layer.weight_quant.name} is float in this bit plan; only integer subnets export")
    with torch.no_grad():
        w = layer.active_weight(c_in, net.width)
        codes = layer.weight_quant.to_int(w, bits).to(torch.float64)
        c_out = codes.shape[0]
        step = layer.weight_quant.scale(bits, c_out).clamp_min(1e-8).to(torch.float64)
        if bn is None:
            factor = torch.ones(c_out, dtype=torch.float64)
            shift = (layer.bias[:c_out] if layer.bias is not None else torch.zeros(c_out)).to(torch.float64)
        else:
            factor, shift = bn.folded(c_out, net, torch.float64)
    scale = step * factor
    dead = scale == 0  # gamma == 0: the channel outputs its shift alone
    codes[dead] = 0
    scale[dead] = step[dead]
    bias = torch.round(shift / (in_scale * scale)).clamp(-INT32_MAX, INT32_MAX)
    return (codes.numpy().astype(np.int8), scale.numpy().astype(np.float32),
            bias.numpy().astype(np.int32), bits)


class _Lowering:
    """Walks the supernet's integer graph, collecting IR ops; one handler per graph node type."""

    def __init__(self, model: Supernet, net: ActiveSubnet, resolution: int) -> None:
        self.model, self.net = model, net
        self.ir = IntNet("input", "logits", resolution, model.config.num_classes)
        self.channels: dict[str, int] = {}

    def quantized(self, name: str, channels: int) -> str:
        """Mark the tensor quantizer ``name`` produces (the tensor is named after it)."""
        self.ir.qparams[name] = _encoding(self.model.get_submodule(name), self.net)
        self.channels[name] = channels
        return name

    def quantize(self, node: graph.Quantize) -> None:
        self.ir.ops.append(QuantizeOp(self.ir.input, self.quantized(node.out, 3)))

    def conv(self, node: graph.Conv) -> None:
        layer = self.model.get_submodule(node.layer)
        bn = None if node.bn is None else self.model.get_submodule(node.bn)
        weight, scale, bias, bits = fold(layer, bn, self.channels[node.inp], self.ir.qparams[node.inp].scale, self.net)
        out = self.ir.output if node.out is None else self.quantized(node.out, weight.shape[0])
        stride, padding = (1, 0) if node.linear else (layer.stride[0], layer.padding[0])
        self.ir.ops.append(ConvOp(node.layer, node.inp, out, weight, scale, bias, bits, stride, padding, node.linear))

    def add(self, node: graph.Add) -> None:
        self.ir.ops.append(AddOp(node.a, node.b, self.quantized(node.out, self.channels[node.a])))

    def maxpool(self, node: graph.MaxPool) -> None:
        self.ir.ops.append(MaxPoolOp(node.inp, node.out, node.kernel, node.stride, node.padding))
        # max keeps the codes: the pooled tensor is carried exactly as its input
        self.ir.qparams[node.out], self.channels[node.out] = self.ir.qparams[node.inp], self.channels[node.inp]

    def avgpool(self, node: graph.AvgPool) -> None:
        self.ir.ops.append(GlobalAvgPoolOp(node.inp, self.quantized(node.out, self.channels[node.inp])))

    HANDLERS = {graph.Quantize: quantize, graph.Conv: conv, graph.Add: add, graph.MaxPool: maxpool,
                graph.AvgPool: avgpool}

    def run(self) -> IntNet:
        for node in self.model.graph():
            self.HANDLERS[type(node)](self, node)
        return self.ir


def lower(model: Supernet, net: ActiveSubnet, resolution: int) -> IntNet:
    """The integer network computing ``model(x, net)`` (eval mode) at ``resolution``."""
    try:
        model.graph()
    except NotImplementedError:
        raise RtfqError(f"no exporter for architecture {model.config.arch!r}") from None
    return _Lowering(model, net, resolution).run()
