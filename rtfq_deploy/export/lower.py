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
from rtfq_deploy.ops import AddOp, ConvOp, GlobalAvgPoolOp, MaxPoolOp, Op, QuantizeOp, rule_for
from rtfq_deploy.plan import ActiveSubnet
from rtfq_deploy.quant import Encoding, Quantizer

__all__ = ["AddOp", "ConvOp", "GlobalAvgPoolOp", "IntNet", "MaxPoolOp", "Op", "QuantizeOp", "fold", "lower"]

INT32_MAX = np.iinfo(np.int32).max


@dataclass
class IntNet:
    """A static integer network: ops in order, and how every tensor is carried (its
    :mod:`encoding <rtfq_deploy.quant.encoding>`).

    Tensors absent from ``qparams`` are float (the input image and the logits). An
    unsigned quantized output of a conv or add also applies ReLU: codes saturate at 0.
    ``ceilings``: the largest code of tensors whose activation is capped (ReLU6): the
    quantizer's code of the cap, where it is below the code range's top. Every encoding's
    code is a nondecreasing function of its input, so code(min(x, cap)) =
    min(code(x), code(cap)): an integer clamp of the codes is the capped activation exactly.
    """

    input: str
    output: str
    resolution: int
    num_classes: int
    ops: list[Op] = field(default_factory=list)
    qparams: dict[str, Encoding] = field(default_factory=dict)
    ceilings: dict[str, int] = field(default_factory=dict)


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
    """State of one lowering: the IR so far and every tensor's active channel count.
    Each graph node is lowered by its op rule (:mod:`rtfq_deploy.ops`)."""

    def __init__(self, model: Supernet, net: ActiveSubnet, resolution: int) -> None:
        self.model, self.net = model, net
        self.ir = IntNet("input", "logits", resolution, model.config.num_classes)
        self.channels: dict[str, int] = {}

    def quantized(self, name: str, channels: int, relu_max: float | None = None) -> str:
        """Mark the tensor quantizer ``name`` produces (the tensor is named after it)."""
        quant = self.model.get_submodule(name)
        encoding = self.ir.qparams[name] = _encoding(quant, self.net)
        self.channels[name] = channels
        if relu_max is not None:
            with torch.no_grad():
                cap = int(quant.to_int(torch.tensor([relu_max], dtype=torch.float32), encoding.bits).item())
            if cap < encoding.qrange[1]:
                self.ir.ceilings[name] = cap
        return name

    def fold(self, node: graph.Conv) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
        """``node``'s layer with its BatchNorm folded, on its input's grid (:func:`fold`)."""
        layer = self.model.get_submodule(node.layer)
        bn = None if node.bn is None else self.model.get_submodule(node.bn)
        return fold(layer, bn, self.channels[node.inp], self.ir.qparams[node.inp].scale, self.net)

    def carry(self, inp: str, out: str) -> None:
        """``out`` carries ``inp``'s codes unchanged (max pooling)."""
        self.ir.qparams[out], self.channels[out] = self.ir.qparams[inp], self.channels[inp]
        if inp in self.ir.ceilings:
            self.ir.ceilings[out] = self.ir.ceilings[inp]

    def run(self) -> IntNet:
        for node in self.model.graph():
            self.ir.ops.append(rule_for(node).lower(node, self))
        return self.ir


def lower(model: Supernet, net: ActiveSubnet, resolution: int) -> IntNet:
    """The integer network computing ``model(x, net)`` (eval mode) at ``resolution``."""
    try:
        model.graph()
    except NotImplementedError:
        raise RtfqError(f"no exporter for architecture {model.config.arch!r}") from None
    return _Lowering(model, net, resolution).run()
