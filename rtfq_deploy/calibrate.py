"""Data-driven statistics: per-subnet BatchNorm recalibration and activation step init.

BatchNorm mechanism (one, for training, evaluation and export): every subnet's
statistics are recalibrated on unlabeled target-domain images, rather than kept in
switchable BatchNorm per (width, bit-width). Why:
- statistics then belong to the exact subnet that is deployed, including its
  resolution, which switchable BN per (width, bits) ignores;
- it scales to per-layer mixed precision, whose plans are far too many for a BN set
  each, and to AlignQ-style quantizers, with no change;
- the affine parameters stay shared, so a torchvision checkpoint initialises every
  subnet (the paper's "no pre-training" argument), and it costs one forward pass over
  a few hundred unlabeled images per subnet.
Training normalises with batch statistics (see :class:`~rtfq_deploy.layers.SlimBatchNorm2d`);
the calibrated statistics are cached per subnet in the checkpoint.
"""

from __future__ import annotations

import logging
from typing import Iterable, Mapping

import torch
from torch import Tensor

from rtfq_deploy.layers import SlimBatchNorm2d
from rtfq_deploy.models.base import Supernet
from rtfq_deploy.plan import ActiveSubnet

log = logging.getLogger(__name__)

BNStats = dict[str, tuple[Tensor, Tensor]]


class _Moments:
    """Per-channel running sums in float64 (exact enough for millions of values)."""

    def __init__(self) -> None:
        self.count = 0
        self.sum: Tensor | None = None
        self.sumsq: Tensor | None = None

    def add(self, x: Tensor) -> None:
        x = x.detach().to(torch.float64).transpose(0, 1).flatten(1)
        s, sq = x.sum(dim=1), (x * x).sum(dim=1)
        self.sum = s if self.sum is None else self.sum + s
        self.sumsq = sq if self.sumsq is None else self.sumsq + sq
        self.count += x.shape[1]

    def mean_var(self) -> tuple[Tensor, Tensor]:
        assert self.sum is not None and self.sumsq is not None
        n = self.count
        mean = self.sum / n
        var = (self.sumsq / n - mean * mean).clamp_min(0.0) * (n / max(n - 1, 1))  # unbiased, as torch stores it
        return mean.to(torch.float32), var.to(torch.float32)


def calibrate_bn(model: Supernet, net: ActiveSubnet, batches: Iterable[Tensor]) -> BNStats:
    """Mean and (unbiased) variance of every BatchNorm input of the subnet over all images.

    The images must be at the subnet's resolution. During the pass each BatchNorm
    normalises with its batch's statistics (as in training), the usual post-training
    calibration of slimmable networks; large batches make that closer to the result.
    """
    moments: dict[str, _Moments] = {}

    def hook(module: SlimBatchNorm2d, inputs: tuple) -> None:
        moments.setdefault(module.name, _Moments()).add(inputs[0])

    handles = [m.register_forward_pre_hook(hook) for m in model.modules() if isinstance(m, SlimBatchNorm2d)]
    was_training = model.training
    try:
        model.train()
        with torch.no_grad():
            images = 0
            for x in batches:
                model(x, net)
                images += x.shape[0]
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    if not moments:
        raise ValueError("no calibration images were given")
    log.debug("calibrated %d BatchNorm layers on %d images", len(moments), images)
    return {name: m.mean_var() for name, m in moments.items()}


def init_activation_steps(model: Supernet, net: ActiveSubnet, batch: Tensor) -> None:
    """Data initialisation of every activation quantizer (all bit-widths: LSQ's steps,
    AlignQ's sigma) from one batch, as seen by the given subnet (typically the float maxnet)."""
    seen: set[str] = set()

    def hook(quant, inputs: tuple) -> None:
        quant.init_from(inputs[0])
        seen.add(quant.name)

    quants = [q for _, q in model.quantizers() if q.channels is None]
    handles = [q.register_forward_pre_hook(hook) for q in quants]
    was_training = model.training
    try:
        model.train()
        with torch.no_grad():
            model(batch, net)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    log.debug("initialised %d activation quantizers", len(seen))


def pack_bn_stats(stats: Mapping[str, tuple[Tensor, Tensor]]) -> dict[str, Tensor]:
    """As stored in a checkpoint: one (2, C) tensor of (mean, var) per BatchNorm."""
    return {name: torch.stack([mean, var]) for name, (mean, var) in stats.items()}


def unpack_bn_stats(packed: Mapping[str, Tensor]) -> BNStats:
    return {name: (t[0], t[1]) for name, t in packed.items()}
