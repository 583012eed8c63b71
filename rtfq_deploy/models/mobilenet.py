"""Slimmable, quantized MobileNetV2 with torchvision's module names.

At full width the parameter and buffer names and shapes are exactly those of
torchvision's ``mobilenet_v2`` (``features.0.0``, ``features.0.1``, ``features.2.conv.0.0``,
``features.2.conv.1.0``, ``features.2.conv.2``, ``features.2.conv.3``, ``classifier.1``...),
so an ImageNet checkpoint loads as it is. Quantizers are added under names torchvision
does not use (``q_*``, ``*.weight_quant``).

Quantizers sit where the deployed integer graph carries integers, each tensor quantized
once, by its producer:

    image -q_input-> features.0 (conv-bn-relu6) -q-> blocks -> features.18 (1x1 conv-bn-relu6)
          -q-> avgpool -q_pool-> classifier.1
    block: x -> [expand 1x1 conv-bn-relu6 -q_expand->] depthwise 3x3 conv-bn-relu6 -q_dw->
              project 1x1 conv-bn -q_project-> [(+ x) -q_out->]

The projection has no activation (the linear bottleneck), so its quantizer is signed and
so is the residual add's output; ReLU6 becomes an integer clamp at the code of 6.
Channel widths follow torchvision at width 1.0 (every count a multiple of 8); a slimmed
subnet keeps ``slim_channels`` of every layer's channels, depthwise and the last 1280
included (torchvision's width multiplier keeps those 1280; a supernet slims every layer
as its ResNets do, so that one rule sizes every BatchNorm).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from rtfq_deploy.graph import Add, AvgPool, Conv, IntGraph, Node, Quantize
from rtfq_deploy.layers import SlimBatchNorm2d, SlimConv2d, conv_bn
from rtfq_deploy.models.base import Stage, StageFn, Supernet, SupernetConfig
from rtfq_deploy.plan import ActiveSubnet
from rtfq_deploy.quant import Quantizer

RELU6 = 6.0

# torchvision's inverted residual settings: expansion t, channels c, repeats n, stride s.
SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))
# tiny_mobilenet's: every stage kept, ten blocks instead of seventeen (three residual adds).
# At width 0.5 and 64 px: 4.2 MMACs, and a training step about twice tiny_resnet's (the
# full seventeen blocks took 3.5x: their 6x expanded activations at 32 x 32 dominate).
TINY_SETTINGS = ((1, 16, 1, 1), (6, 24, 1, 2), (6, 32, 2, 2), (6, 64, 2, 2), (6, 96, 1, 1), (6, 160, 2, 2), (6, 320, 1, 1))


def make_divisible(v: float, divisor: int = 8) -> int:
    """torchvision's channel rounding: nearest multiple of ``divisor``, never 10% below ``v``."""
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new_v + divisor if new_v < 0.9 * v else new_v


class ConvBNReLU6(nn.Module):
    """conv (``0``), BatchNorm (``1``), ReLU6 and the output quantizer ``q``."""

    def __init__(self, sn: Supernet, conv: SlimConv2d, channels: int) -> None:
        super().__init__()
        self.add_module("0", conv)
        self.add_module("1", SlimBatchNorm2d(channels))
        self.q = sn.make_quantizer(False, None, "body")

    def forward(self, x: Tensor, net: ActiveSubnet, x_quant: Quantizer) -> Tensor:
        conv, bn = self.get_submodule("0"), self.get_submodule("1")
        return self.q(F.relu6(conv_bn(conv, bn, x, net, x_quant)), net)


class InvertedResidual(nn.Module):
    """``conv``: [expand ConvBNReLU6,] depthwise ConvBNReLU6, projection conv, its BatchNorm."""

    def __init__(self, sn: Supernet, inp: int, oup: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        hidden = round(inp * expand_ratio)
        self.use_res_connect = stride == 1 and inp == oup
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(ConvBNReLU6(sn, sn.conv(inp, hidden, 1), hidden))
        layers.append(ConvBNReLU6(sn, sn.conv(hidden, hidden, 3, stride=stride, padding=1, depthwise=True), hidden))
        layers += [sn.conv(hidden, oup, 1), SlimBatchNorm2d(oup)]
        self.conv = nn.Sequential(*layers)
        self.q_project = sn.make_quantizer(True, None, "residual" if self.use_res_connect else "body")
        self.q_out = sn.make_quantizer(True, None, "body") if self.use_res_connect else None

    @property
    def acts(self) -> list[ConvBNReLU6]:
        return list(self.conv)[:-2]

    @property
    def output(self) -> Quantizer:
        return self.q_out if self.q_out is not None else self.q_project

    def forward(self, x: Tensor, net: ActiveSubnet, x_quant: Quantizer) -> Tensor:
        out, quant = x, x_quant
        for act in self.acts:
            out, quant = act(out, net, quant), act.q
        conv, bn = list(self.conv)[-2:]
        out = self.q_project(conv_bn(conv, bn, out, net, quant), net)
        if self.q_out is None:
            return out
        return self.q_out(out + x, net)

    def graph(self, p: str, x: str) -> tuple[list[Node], str]:
        nodes: list[Node] = []
        out = x
        n = len(self.conv)
        for i in range(n - 2):
            nodes.append(Conv(f"{p}.conv.{i}.0", out, f"{p}.conv.{i}.q", f"{p}.conv.{i}.1", relu_max=RELU6))
            out = f"{p}.conv.{i}.q"
        nodes.append(Conv(f"{p}.conv.{n - 2}", out, f"{p}.q_project", f"{p}.conv.{n - 1}"))
        if self.q_out is None:
            return nodes, f"{p}.q_project"
        nodes.append(Add(f"{p}.q_project", x, f"{p}.q_out"))
        return nodes, f"{p}.q_out"


class MobileNetV2(Supernet):
    """MobileNetV2 supernet; ``width_mult`` 1.0 is torchvision's, smaller values give
    narrow base networks (e.g. the CPU-sized ``tiny_mobilenet``)."""

    def __init__(self, config: SupernetConfig, width_mult: float = 1.0, last_channel: int = 1280,
                 settings: tuple[tuple[int, int, int, int], ...] = SETTINGS) -> None:
        super().__init__(config)
        inp = make_divisible(32 * width_mult)
        last = make_divisible(last_channel * max(1.0, width_mult))
        self.q_input = self.make_quantizer(True, None, "first")
        features: list[nn.Module] = [
            ConvBNReLU6(self, self.conv(3, inp, 3, stride=2, padding=1, slim_in=False, role="first"), inp)]
        for t, c, n, s in settings:
            oup = make_divisible(c * width_mult)
            for i in range(n):
                features.append(InvertedResidual(self, inp, oup, s if i == 0 else 1, t))
                inp = oup
        features.append(ConvBNReLU6(self, self.conv(inp, last, 1), last))
        self.features = nn.Sequential(*features)
        self.q_pool = self.make_quantizer(False, None, "last")
        self.classifier = nn.Sequential(nn.Dropout(0.2), self.linear(last, config.num_classes, role="last"))
        self._init_weights()
        self.finish()

    def _init_weights(self) -> None:
        # torchvision's initialisation
        for m in self.modules():
            if isinstance(m, SlimConv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, SlimBatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def graph(self) -> IntGraph:
        feats = list(self.features)
        nodes: list[Node] = [Quantize("q_input"),
                             Conv("features.0.0", "q_input", "features.0.q", "features.0.1", relu_max=RELU6)]
        x = "features.0.q"
        for i, blk in enumerate(feats[1:-1], start=1):
            block_nodes, x = blk.graph(f"features.{i}", x)
            nodes += block_nodes
        last = f"features.{len(feats) - 1}"
        nodes += [Conv(f"{last}.0", x, f"{last}.q", f"{last}.1", relu_max=RELU6), AvgPool(f"{last}.q", "q_pool"),
                  Conv("classifier.1", "q_pool", None, linear=True)]
        return IntGraph(tuple(nodes))

    def stages(self) -> list[Stage]:
        feats = list(self.features)

        def stem(x: Tensor, _: Quantizer | None, net: ActiveSubnet) -> tuple[Tensor, Quantizer]:
            return feats[0](self.q_input(x, net), net, self.q_input), feats[0].q

        def feature(m: nn.Module) -> StageFn:
            out = m.q if isinstance(m, ConvBNReLU6) else m.output
            return lambda x, quant, net: (m(x, net, quant), out)

        def head(x: Tensor, _: Quantizer | None, net: ActiveSubnet) -> tuple[Tensor, None]:
            dropout, fc = self.classifier
            return fc(dropout(self.q_pool(F.adaptive_avg_pool2d(x, 1).flatten(1), net)), net), None

        return ([Stage(("q_input", "features.0"), stem)]
                + [Stage((f"features.{i}",), feature(m)) for i, m in enumerate(feats) if i > 0]
                + [Stage(("q_pool", "classifier"), head)])
