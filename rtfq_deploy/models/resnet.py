"""Slimmable, quantized ResNets with torchvision's module names.

At full width the parameter and buffer names and shapes are exactly those of
torchvision's ``resnet18``/``resnet50`` (``conv1``, ``bn1``, ``layer1.0.conv1``,
``layer1.0.downsample.0``, ``fc``...), so an ImageNet checkpoint loads as it is; the
stride sits on the 3x3 conv of a bottleneck (torchvision's "V1.5"). Quantizers are
added under names torchvision does not use (``q_*``, ``*.weight_quant``,
``downsample.2``).

Quantizers sit where the deployed integer graph carries integers, each tensor quantized
once, by its producer:

    image -q_input-> conv1-bn1-relu -q_stem-> maxpool -> blocks -> avgpool -q_pool-> fc
    block: x -> conv1-bn-relu -q1-> conv2-bn-relu [-q2-> conv3-bn] -q_res-> (+) -relu -q_out->
           x -> [downsample: conv-bn -downsample.2->] (+)

so a block's conv1 and downsample read the same quantized input, the two add operands
are quantized (role "residual") and so is the add's output.
"""

from __future__ import annotations

from torch import Tensor, nn

from rtfq_deploy.graph import Add, AvgPool, Conv, IntGraph, MaxPool, Node, Quantize
from rtfq_deploy.layers import SlimBatchNorm2d, SlimConv2d, conv_bn
from rtfq_deploy.models.base import Stage, StageFn, Supernet, SupernetConfig
from rtfq_deploy.plan import ActiveSubnet
from rtfq_deploy.quant import Quantizer


class Downsample(nn.Sequential):
    """1x1 conv, BatchNorm and the quantizer of the shortcut operand (``downsample.0/1/2``)."""

    def forward(self, x: Tensor, net: ActiveSubnet, x_quant: Quantizer) -> Tensor:  # type: ignore[override]
        conv, bn, quant = self
        return quant(conv_bn(conv, bn, x, net, x_quant), net)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, sn: Supernet, inplanes: int, planes: int, stride: int, downsample: Downsample | None) -> None:
        super().__init__()
        self.conv1 = sn.conv(inplanes, planes, 3, stride=stride, padding=1)
        self.bn1 = SlimBatchNorm2d(planes)
        self.q1 = sn.make_quantizer(False, None, "body")
        self.conv2 = sn.conv(planes, planes, 3, padding=1)
        self.bn2 = SlimBatchNorm2d(planes)
        self.q_res = sn.make_quantizer(True, None, "residual")
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.q_out = sn.make_quantizer(False, None, "body")

    # (conv, bn, quantizer writing its output), in order along the residual branch.
    branch = (("conv1", "bn1", "q1"), ("conv2", "bn2", "q_res"))

    def forward(self, x: Tensor, net: ActiveSubnet, x_quant: Quantizer) -> Tensor:
        """``x_quant``: the quantizer that produced ``x`` (its step sets the bias grid in eval)."""
        out = self.q1(self.relu(conv_bn(self.conv1, self.bn1, x, net, x_quant)), net)
        out = self.q_res(conv_bn(self.conv2, self.bn2, out, net, self.q1), net)
        identity = x if self.downsample is None else self.downsample(x, net, x_quant)
        return self.q_out(self.relu(out + identity), net)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, sn: Supernet, inplanes: int, planes: int, stride: int, downsample: Downsample | None) -> None:
        super().__init__()
        self.conv1 = sn.conv(inplanes, planes, 1)
        self.bn1 = SlimBatchNorm2d(planes)
        self.q1 = sn.make_quantizer(False, None, "body")
        self.conv2 = sn.conv(planes, planes, 3, stride=stride, padding=1)
        self.bn2 = SlimBatchNorm2d(planes)
        self.q2 = sn.make_quantizer(False, None, "body")
        self.conv3 = sn.conv(planes, planes * self.expansion, 1)
        self.bn3 = SlimBatchNorm2d(planes * self.expansion)
        self.q_res = sn.make_quantizer(True, None, "residual")
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.q_out = sn.make_quantizer(False, None, "body")

    branch = (("conv1", "bn1", "q1"), ("conv2", "bn2", "q2"), ("conv3", "bn3", "q_res"))

    def forward(self, x: Tensor, net: ActiveSubnet, x_quant: Quantizer) -> Tensor:
        out = self.q1(self.relu(conv_bn(self.conv1, self.bn1, x, net, x_quant)), net)
        out = self.q2(self.relu(conv_bn(self.conv2, self.bn2, out, net, self.q1)), net)
        out = self.q_res(conv_bn(self.conv3, self.bn3, out, net, self.q2), net)
        identity = x if self.downsample is None else self.downsample(x, net, x_quant)
        return self.q_out(self.relu(out + identity), net)


class ResNet(Supernet):
    """ResNet supernet; ``base_width`` 64 is torchvision's, smaller values give narrow nets."""

    def __init__(self, config: SupernetConfig, block: type[BasicBlock | Bottleneck], layers: list[int],
                 base_width: int = 64) -> None:
        super().__init__(config)
        self.inplanes = base_width
        self.q_input = self.make_quantizer(True, None, "first")
        self.conv1 = self.conv(3, base_width, 7, stride=2, padding=3, slim_in=False, role="first")
        self.bn1 = SlimBatchNorm2d(base_width)
        self.relu = nn.ReLU(inplace=True)
        self.q_stem = self.make_quantizer(False, None, "body")
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, base_width, layers[0], 1)
        self.layer2 = self._make_layer(block, base_width * 2, layers[1], 2)
        self.layer3 = self._make_layer(block, base_width * 4, layers[2], 2)
        self.layer4 = self._make_layer(block, base_width * 8, layers[3], 2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.q_pool = self.make_quantizer(False, None, "last")
        self.fc = self.linear(base_width * 8 * block.expansion, config.num_classes, role="last")
        self._init_weights()
        self.finish()

    def _make_layer(self, block: type[BasicBlock | Bottleneck], planes: int, blocks: int, stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = Downsample(
                self.conv(self.inplanes, planes * block.expansion, 1, stride=stride),
                SlimBatchNorm2d(planes * block.expansion),
                self.make_quantizer(True, None, "residual"),
            )
        modules = [block(self, self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        modules += [block(self, self.inplanes, planes, 1, None) for _ in range(1, blocks)]
        return nn.Sequential(*modules)

    def _init_weights(self) -> None:
        # torchvision's initialisation, so a supernet built without weights trains as usual.
        for m in self.modules():
            if isinstance(m, SlimConv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, SlimBatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def blocks(self) -> list[tuple[str, BasicBlock | Bottleneck]]:
        return [(f"layer{i}.{j}", blk) for i in range(1, 5) for j, blk in enumerate(getattr(self, f"layer{i}"))]

    def graph(self) -> IntGraph:
        mp = self.maxpool
        nodes: list[Node] = [Quantize("q_input"), Conv("conv1", "q_input", "q_stem", "bn1"),
                             MaxPool("q_stem", "maxpool", mp.kernel_size, mp.stride, mp.padding)]
        x = "maxpool"
        for p, blk in self.blocks():
            out = x
            for conv, bn, quant in blk.branch:
                nodes.append(Conv(f"{p}.{conv}", out, f"{p}.{quant}", f"{p}.{bn}"))
                out = f"{p}.{quant}"
            identity = x
            if blk.downsample is not None:
                identity = f"{p}.downsample.2"
                nodes.append(Conv(f"{p}.downsample.0", x, identity, f"{p}.downsample.1"))
            nodes.append(Add(out, identity, f"{p}.q_out"))
            x = f"{p}.q_out"
        nodes += [AvgPool(x, "q_pool"), Conv("fc", "q_pool", None, linear=True)]
        return IntGraph(tuple(nodes))

    def stages(self) -> list[Stage]:
        def stem(x: Tensor, _: Quantizer | None, net: ActiveSubnet) -> tuple[Tensor, Quantizer]:
            x = self.q_input(x, net)
            x = self.q_stem(self.relu(conv_bn(self.conv1, self.bn1, x, net, self.q_input)), net)
            return self.maxpool(x), self.q_stem

        def block(blk: BasicBlock | Bottleneck) -> StageFn:
            return lambda x, quant, net: (blk(x, net, quant), blk.q_out)

        def head(x: Tensor, _: Quantizer | None, net: ActiveSubnet) -> tuple[Tensor, None]:
            return self.fc(self.q_pool(self.avgpool(x).flatten(1), net), net), None

        return ([Stage(("q_input", "conv1", "bn1", "q_stem"), stem)]
                + [Stage((p,), block(blk)) for p, blk in self.blocks()]
                + [Stage(("q_pool", "fc"), head)])
