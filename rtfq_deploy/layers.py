"""Slimmable, quantized layers of the supernet.

Each layer keeps the full-width parameters under torchvision's names (``weight``,
``bias``, ``running_mean``...) and computes with their leading channels, as views: a
subnet owns no copies. The active width, bit plan and BatchNorm statistics arrive with
every call in an :class:`~rtfq_deploy.plan.ActiveSubnet`; layers hold no mutable
selection state. Layers never touch ONNX: the exporter reads them.
"""

from __future__ import annotations

from typing import Callable

import torch.nn.functional as F
from torch import Tensor, nn

from rtfq_deploy.plan import ActiveSubnet
from rtfq_deploy.quant import Quantizer
from rtfq_deploy.space import slim_channels

# Builds the weight quantizer of a layer: (signed, channels, role) -> Quantizer.
QuantizerFactory = Callable[[bool, "int | None", str], Quantizer]


def _check_in(layer: nn.Module, c_in: int, full: int, slim: bool) -> None:
    if c_in > full or (not slim and c_in != full):
        raise ValueError(f"{layer.__class__.__name__} expects {'<= ' if slim else ''}{full} input channels, got {c_in}")


class SlimConv2d(nn.Conv2d):
    """Conv2d whose active output channels follow the width multiplier and whose
    weights are fake-quantized by ``weight_quant`` at the plan's bit-width."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, *, stride: int = 1,
                 padding: int = 0, bias: bool = False, slim_in: bool = True, slim_out: bool = True,
                 channel_divisor: int, quantizer: QuantizerFactory, role: str = "body") -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=padding, bias=bias)
        self.slim_in, self.slim_out = slim_in, slim_out
        self.channel_divisor = channel_divisor
        self.weight_quant = quantizer(True, out_channels, role)

    def active_out(self, width: float) -> int:
        if not self.slim_out:
            return self.out_channels
        return slim_channels(self.out_channels, width, self.channel_divisor)

    def active_weight(self, c_in: int, width: float) -> Tensor:
        """The float weight slice of the active subnet (a view of ``weight``)."""
        return self.weight[: self.active_out(width), :c_in]

    def forward(self, x: Tensor, net: ActiveSubnet) -> Tensor:  # type: ignore[override]
        _check_in(self, x.shape[1], self.in_channels, self.slim_in)
        w = self.weight_quant(self.active_weight(x.shape[1], net.width), net)
        bias = None if self.bias is None else self.bias[: w.shape[0]]
        return F.conv2d(x, w, bias, self.stride, self.padding, self.dilation, self.groups)


class SlimLinear(nn.Linear):
    """Linear layer (the classifier): slimmable input, fixed output, quantized weights."""

    def __init__(self, in_features: int, out_features: int, *, slim_in: bool = True, slim_out: bool = False,
                 channel_divisor: int, quantizer: QuantizerFactory, role: str = "last") -> None:
        super().__init__(in_features, out_features)
        self.slim_in, self.slim_out = slim_in, slim_out
        self.channel_divisor = channel_divisor
        self.weight_quant = quantizer(True, out_features, role)

    def active_out(self, width: float) -> int:
        if not self.slim_out:
            return self.out_features
        return slim_channels(self.out_features, width, self.channel_divisor)

    def active_weight(self, c_in: int, width: float) -> Tensor:
        return self.weight[: self.active_out(width), :c_in]

    def forward(self, x: Tensor, net: ActiveSubnet) -> Tensor:  # type: ignore[override]
        _check_in(self, x.shape[1], self.in_features, self.slim_in)
        w = self.weight_quant(self.active_weight(x.shape[1], net.width), net)
        return F.linear(x, w, self.bias[: w.shape[0]])


class SlimBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm over the leading channels.

    Training normalises with batch statistics and leaves the stored running statistics
    alone: they would mix every sampled subnet. Eval uses the statistics calibrated for
    the active subnet (``net.bn_stats``, see :mod:`rtfq_deploy.calibrate`) when given,
    else the stored ones. ``name`` is the module path, assigned when the net is built.
    """

    def __init__(self, num_features: int) -> None:
        super().__init__(num_features)
        self.name = ""

    def forward(self, x: Tensor, net: ActiveSubnet) -> Tensor:  # type: ignore[override]
        c = x.shape[1]
        weight, bias = self.weight[:c], self.bias[:c]
        if self.training:
            return F.batch_norm(x, None, None, weight, bias, True, 0.0, self.eps)
        if net.bn_stats is not None and self.name in net.bn_stats:
            mean, var = net.bn_stats[self.name]
        else:
            mean, var = self.running_mean[:c], self.running_var[:c]
        return F.batch_norm(x, mean, var, weight, bias, False, 0.0, self.eps)
