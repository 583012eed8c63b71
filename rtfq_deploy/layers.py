"""Slimmable, quantized layers of the supernet.

Each layer keeps the full-width parameters under torchvision's names (``weight``,
``bias``, ``running_mean``...) and computes with their leading channels, as views: a
subnet owns no copies. The active width, bit plan and BatchNorm statistics arrive with
every call in an :class:`~rtfq_deploy.plan.ActiveSubnet`; layers hold no mutable
selection state. Layers never touch ONNX: the exporter reads them.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rtfq_deploy.plan import ActiveSubnet
from rtfq_deploy.quant import Quantizer
from rtfq_deploy.space import slim_channels

# Builds the weight quantizer of a layer: (signed, channels, role) -> Quantizer.
QuantizerFactory = Callable[[bool, "int | None", str], Quantizer]


class _Slim:
    """Slimming and weight quantization shared by conv and linear layers."""

    weight: nn.Parameter

    depthwise = False

    def _init_slim(self, full_in: int, full_out: int, slim_in: bool, slim_out: bool, channel_divisor: int,
                   quantizer: QuantizerFactory, role: str) -> None:
        self.full_in, self.full_out = full_in, full_out
        self.slim_in, self.slim_out = slim_in, slim_out
        self.channel_divisor = channel_divisor
        self.weight_quant = quantizer(True, full_out, role)

    def active_out(self, width: float) -> int:
        return slim_channels(self.full_out, width, self.channel_divisor) if self.slim_out else self.full_out

    def active_weight(self, c_in: int, width: float) -> Tensor:
        """The float weight slice of the active subnet (a view of ``weight``). A depthwise
        conv has one filter per input channel, so its active outputs follow its input."""
        if self.depthwise:
            return self.weight[:c_in]
        return self.weight[: self.active_out(width), :c_in]

    def active_groups(self, c_in: int) -> int:
        """The conv's ``group`` attribute at ``c_in`` active input channels."""
        return c_in if self.depthwise else 1

    def quantized_weight(self, x: Tensor, net: ActiveSubnet) -> Tensor:
        c_in = x.shape[1]
        if c_in > self.full_in or (not self.slim_in and c_in != self.full_in):
            raise ValueError(f"{self.__class__.__name__} expects {'<= ' if self.slim_in else ''}{self.full_in} "
                             f"input channels, got {c_in}")
        if net.weights is not None:
            return net.weights.get(self, c_in, net)
        return self.weight_quant(self.active_weight(c_in, net.width), net)


class WeightCache:
    """Fake-quantized weight slices kept across forward passes that do not train.

    A search scores hundreds of plans of one width in which each layer takes one of a
    few bit-widths, so each (layer, bits, input channels) is quantized once instead of
    at every pass. Valid only while the weights and step sizes stay as they are.
    """

    def __init__(self) -> None:
        self._kept: dict[tuple[str, int | None, int, float], Tensor] = {}

    def get(self, layer: _Slim, c_in: int, net: ActiveSubnet) -> Tensor:
        if torch.is_grad_enabled():
            raise RuntimeError("a WeightCache serves forward passes without gradients only")
        name = layer.weight_quant.name
        key = (name, net.bits[name], c_in, net.width)
        w = self._kept.get(key)
        if w is None:
            w = self._kept[key] = layer.weight_quant(layer.active_weight(c_in, net.width), net)
        return w


class SlimConv2d(_Slim, nn.Conv2d):
    """Conv2d whose active output channels follow the width multiplier and whose
    weights are fake-quantized by ``weight_quant`` at the plan's bit-width.

    ``depthwise``: one k x k filter per channel (``groups`` = channels, weight shape
    (C, 1, k, k) as torchvision stores it); slimming keeps the leading channels.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, *, stride: int = 1,
                 padding: int = 0, bias: bool = False, slim_in: bool = True, slim_out: bool = True,
                 depthwise: bool = False, channel_divisor: int, quantizer: QuantizerFactory,
                 role: str = "body") -> None:
        if depthwise and in_channels != out_channels:
            raise ValueError(f"a depthwise conv has as many outputs as inputs, got {in_channels} -> {out_channels}")
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=padding, bias=bias,
                         groups=in_channels if depthwise else 1)
        self.depthwise = depthwise
        self._init_slim(in_channels, out_channels, slim_in, slim_out, channel_divisor, quantizer, role)

    def forward(self, x: Tensor, net: ActiveSubnet) -> Tensor:  # type: ignore[override]
        w = self.quantized_weight(x, net)
        bias = None if self.bias is None else self.bias[: w.shape[0]]
        return F.conv2d(x, w, bias, self.stride, self.padding, self.dilation, self.active_groups(x.shape[1]))


class SlimLinear(_Slim, nn.Linear):
    """Linear layer (the classifier): slimmable input, fixed output, quantized weights."""

    def __init__(self, in_features: int, out_features: int, *, slim_in: bool = True, slim_out: bool = False,
                 channel_divisor: int, quantizer: QuantizerFactory, role: str = "last") -> None:
        super().__init__(in_features, out_features)
        self._init_slim(in_features, out_features, slim_in, slim_out, channel_divisor, quantizer, role)

    def forward(self, x: Tensor, net: ActiveSubnet) -> Tensor:  # type: ignore[override]
        w = self.quantized_weight(x, net)
        return F.linear(x, w, self.bias[: w.shape[0]])


class SlimBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm over the leading channels.

    Training normalises with batch statistics and leaves the stored running statistics
    alone: they would mix every sampled subnet. Eval uses the statistics calibrated for
    the active subnet (``net.bn_stats``, see :mod:`rtfq_deploy.calibrate`), which must
    then cover every BatchNorm; ``bn_stats=None`` explicitly selects the stored running
    statistics, right only for the network they came from (e.g. pretrained full-width
    float weights). ``name`` is the module path, assigned when the net is built.
    """

    def __init__(self, num_features: int) -> None:
        super().__init__(num_features)
        self.name = ""

    def forward(self, x: Tensor, net: ActiveSubnet, bias_lsb: Tensor | None = None) -> Tensor:  # type: ignore[override]
        """``bias_lsb``: in eval, the per-channel step of the integer accumulator of the
        conv before (input step x weight step); the shift is then rounded onto that grid
        times BN's factor, exactly as the int32 bias of the exported conv is."""
        c = x.shape[1]
        weight, bias = self.weight[:c], self.bias[:c]
        if self.training:
            return F.batch_norm(x, None, None, weight, bias, True, 0.0, self.eps)
        mean, var = self._eval_stats(c, net)
        if bias_lsb is None:
            return F.batch_norm(x, mean, var, weight, bias, False, 0.0, self.eps)
        factor, shift = self.folded(c, net)
        lsb = torch.where(factor == 0, bias_lsb, bias_lsb * factor)
        shift = torch.round(shift / lsb) * lsb
        return x * factor.reshape(1, -1, 1, 1) + shift.reshape(1, -1, 1, 1)

    def folded(self, c: int, net: ActiveSubnet, dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor]:
        """Eval-mode BN as y = x * factor + shift over the leading ``c`` channels (the
        form the exporter folds into the preceding conv)."""
        mean, var = self._eval_stats(c, net)
        weight, bias, mean, var = (t.to(dtype) if dtype else t for t in (self.weight[:c], self.bias[:c], mean, var))
        factor = weight / torch.sqrt(var + self.eps)
        return factor, bias - mean * factor

    def _eval_stats(self, c: int, net: ActiveSubnet) -> tuple[Tensor, Tensor]:
        if net.bn_stats is None:
            return self.running_mean[:c], self.running_var[:c]
        else:
            try:
                mean, var = net.bn_stats[self.name]
            except KeyError:
                raise KeyError(f"calibrated BatchNorm statistics have no entry for {self.name!r}") from None
            if mean.shape != (c,) or var.shape != (c,):
                raise ValueError(f"BatchNorm {self.name!r}: calibrated statistics have {tuple(mean.shape)} "
                                 f"channels, the subnet has {c}")
            return mean, var


def conv_bn(conv: SlimConv2d, bn: SlimBatchNorm2d, x: Tensor, net: ActiveSubnet, x_quant: Quantizer) -> Tensor:
    """conv then BatchNorm; in eval, as the exported integer conv computes it (the BN
    shift on the int32 bias grid), so evaluation reports what deployment computes."""
    y = conv(x, net)
    lsb = None
    if not bn.training:
        w_bits, a_bits = net.bits[conv.weight_quant.name], net.bits[x_quant.name]
        if w_bits is not None and a_bits is not None:
            lsb = x_quant.scale(a_bits) * conv.weight_quant.scale(w_bits, y.shape[1]).clamp_min(1e-8)
    return bn(y, net, lsb)


@contextmanager
def batch_statistics(model: nn.Module) -> Iterator[None]:
    """BatchNorm normalising by the batch's own statistics and everything else in eval
    mode (dropout off): how a network is run to judge a plan without training it."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    for m in model.modules():
        if isinstance(m, SlimBatchNorm2d):
            m.train(True)
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training
