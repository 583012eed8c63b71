"""Supernet architectures by name (the names: :data:`rtfq_deploy.formats.ARCH_NAMES`)."""

from __future__ import annotations

from typing import Callable

from rtfq_deploy.errors import RtfqError
from rtfq_deploy.formats import ARCH_NAMES
from rtfq_deploy.models.base import Supernet, SupernetConfig
from rtfq_deploy.models.mobilenet import TINY_SETTINGS, MobileNetV2
from rtfq_deploy.models.resnet import BasicBlock, Bottleneck, ResNet

_BUILDERS: dict[str, Callable[[SupernetConfig], Supernet]] = {
    # The paper's supernet.
    "resnet50": lambda c: ResNet(c, Bottleneck, [3, 4, 6, 3]),
    "resnet18": lambda c: ResNet(c, BasicBlock, [2, 2, 2, 2]),
    # A narrow ResNet-10 (one basic block per stage, 16..128 channels) for CPU-minute
    # experiments and tests: about 1/40 of ResNet-18's MACs.
    "tiny_resnet": lambda c: ResNet(c, BasicBlock, [1, 1, 1, 1], base_width=16),
    # The edge family: depthwise separable convolutions, inverted residuals, ReLU6.
    "mobilenet_v2": lambda c: MobileNetV2(c),
    # MobileNetV2 at width 0.5, ten blocks and a 320-channel head, for CPU-minute experiments
    # on 64 px images: 4.2 MMACs against tiny_resnet's 6.3 (see `rtfq subnets`).
    "tiny_mobilenet": lambda c: MobileNetV2(c, width_mult=0.5, last_channel=320, settings=TINY_SETTINGS),
}
# Keyed and ordered by the names checkpoints and the CLI use (a name without a builder fails here).
ARCHS: dict[str, Callable[[SupernetConfig], Supernet]] = {name: _BUILDERS[name] for name in ARCH_NAMES}


def build_supernet(config: SupernetConfig) -> Supernet:
    try:
        builder = ARCHS[config.arch]
    except KeyError:
        raise RtfqError(f"unknown architecture {config.arch!r} (known: {', '.join(ARCHS)})") from None
    return builder(config)


__all__ = ["ARCHS", "Supernet", "SupernetConfig", "build_supernet"]
