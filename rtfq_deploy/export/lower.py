"""Lowering: a supernet and one subnet choice -> a static integer network (the IR).

The IR is plain numpy: integer weights, per-channel scales, int32 biases, and for every
tensor the integer code it is carried in. It knows nothing of ONNX (see
:mod:`rtfq_deploy.export.onnx_graph`), and the supernet's layers know nothing of it.

BatchNorm folding keeps the trained integers: a conv's weights are quantized per output
channel before BatchNorm, so BN's per-channel factor gamma / sqrt(var + eps) moves into
the weight scale and the shift into the bias; the integer weights are the ones LSQ
produced, never re-quantized. A negative gamma gives a negative scale (onnxruntime's
integer kernels and the ONNX reference agree on it), so codes are never negated and the
-2^(b-1) code cannot overflow; a zero gamma gives zero weights.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from rtfq_deploy.errors import RtfqError
from rtfq_deploy.layers import SlimBatchNorm2d, SlimConv2d, SlimLinear
from rtfq_deploy.models.base import Supernet
from rtfq_deploy.models.resnet import BasicBlock, Bottleneck, ResNet
from rtfq_deploy.plan import ActiveSubnet
from rtfq_deploy.quant import Quantizer, qrange

INT32_MAX = np.iinfo(np.int32).max


@dataclass(frozen=True)
class QParams:
    """How a tensor is carried: ``bits``-bit codes (zero point 0) times ``scale``."""

    scale: float
    bits: int
    signed: bool

    @property
    def qrange(self) -> tuple[int, int]:
        return qrange(self.bits, self.signed)


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
    """A static integer network: ops in order, and how every tensor is carried.

    Tensors absent from ``qparams`` are float (the input image and the logits). An
    unsigned quantized output of a conv or add also applies ReLU: codes saturate at 0.
    """

    input: str
    output: str
    resolution: int
    num_classes: int
    ops: list[Op] = field(default_factory=list)
    qparams: dict[str, QParams] = field(default_factory=dict)


def _act(quant: Quantizer, net: ActiveSubnet) -> QParams:
    bits = net.bits[quant.name]
    if bits is None:
        raise RtfqError(f"quantizer {quant.name} is float in this bit plan; only integer subnets export")
    return QParams(float(quant.scale(bits).item()), bits, quant.signed)


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
    """Walks a ResNet supernet in forward order, naming tensors and collecting ops."""

    def __init__(self, model: ResNet, net: ActiveSubnet, resolution: int) -> None:
        self.model, self.net = model, net
        self.ir = IntNet("input", "logits", resolution, model.config.num_classes)
        self.channels: dict[str, int] = {}

    def quantized(self, quant: Quantizer, channels: int) -> str:
        """Mark the tensor ``quant`` produces (named by the quantizer's module path)."""
        self.ir.qparams[quant.name] = _act(quant, self.net)
        self.channels[quant.name] = channels
        return quant.name

    def conv(self, inp: str, layer: SlimConv2d, bn: SlimBatchNorm2d, quant: Quantizer) -> str:
        weight, scale, bias, bits = fold(layer, bn, self.channels[inp], self.ir.qparams[inp].scale, self.net)
        out = self.quantized(quant, weight.shape[0])
        self.ir.ops.append(ConvOp(layer.weight_quant.name.removesuffix(".weight_quant"), inp, out, weight, scale,
                                  bias, bits, layer.stride[0], layer.padding[0]))
        return out

    def block(self, blk: BasicBlock | Bottleneck, x: str) -> str:
        if isinstance(blk, Bottleneck):
            convs = [(blk.conv1, blk.bn1, blk.q1), (blk.conv2, blk.bn2, blk.q2), (blk.conv3, blk.bn3, blk.q_res)]
        else:
            convs = [(blk.conv1, blk.bn1, blk.q1), (blk.conv2, blk.bn2, blk.q_res)]
        out = x
        for conv, bn, quant in convs:
            out = self.conv(out, conv, bn, quant)
        identity = x if blk.downsample is None else self.conv(x, *blk.downsample)
        result = self.quantized(blk.q_out, self.channels[out])
        self.ir.ops.append(AddOp(out, identity, result))
        return result

    def run(self) -> IntNet:
        m, ir = self.model, self.ir
        x = self.quantized(m.q_input, 3)
        ir.ops.append(QuantizeOp(ir.input, x))
        x = self.conv(x, m.conv1, m.bn1, m.q_stem)
        ir.ops.append(MaxPoolOp(x, "maxpool", m.maxpool.kernel_size, m.maxpool.stride, m.maxpool.padding))
        ir.qparams["maxpool"], self.channels["maxpool"] = ir.qparams[x], self.channels[x]  # max keeps the grid
        x = "maxpool"
        for _, blk in m.blocks():
            x = self.block(blk, x)
        pooled = self.quantized(m.q_pool, self.channels[x])
        ir.ops.append(GlobalAvgPoolOp(x, pooled))
        weight, scale, bias, bits = fold(m.fc, None, self.channels[pooled], ir.qparams[pooled].scale, self.net)
        ir.ops.append(ConvOp("fc", pooled, ir.output, weight, scale, bias, bits, gemm=True))
        return ir


def lower(model: Supernet, net: ActiveSubnet, resolution: int) -> IntNet:
    """The integer network computing ``model(x, net)`` (eval mode) at ``resolution``."""
    if not isinstance(model, ResNet):
        raise RtfqError(f"no exporter for architecture {model.config.arch!r}")
    return _Lowering(model, net, resolution).run()
