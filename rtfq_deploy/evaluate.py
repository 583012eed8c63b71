"""Per-subnet BatchNorm calibration and top-1 accuracy over a whole space.

:func:`ensure_calibrated` is the one rule of ``rtfq calibrate``, ``rtfq eval`` and
``rtfq-export`` for subnets a checkpoint has no statistics for: measure them now on a
fixed sample of target images, saying so on one line.

Images are preprocessed exactly as deployment does (:func:`rtfq_deploy.images.load_image`:
resize to R / 0.875, centre crop R), once per resolution, and shared by every subnet of
that resolution.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from rtfq_deploy.calibrate import BNStats, calibrate_bn
from rtfq_deploy.costs import costs_of
from rtfq_deploy.data.pipeline import normalize
from rtfq_deploy.errors import RtfqError
from rtfq_deploy.formats import normalization_of
from rtfq_deploy.images import MIN_BN_IMAGES, readable_arrays
from rtfq_deploy.models.base import Supernet
from rtfq_deploy.space import SubnetConfig

if TYPE_CHECKING:
    from rtfq_deploy.checkpoint import Checkpoint

log = logging.getLogger(__name__)


def load_at(paths: Sequence[Path], resolution: int, normalization: Mapping, where: str = "images",
            warn: bool = True, min_count: int = 1) -> tuple[Tensor, list[int]]:
    """Normalised (N, 3, R, R) images and the indices of ``paths`` that were readable
    (unreadable files skipped with one warning when ``warn``; fewer than ``min_count``
    readable is an error)."""
    arrays, kept = readable_arrays(paths, resolution, where, warn=warn, min_count=min_count)
    x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
    return normalize(x, normalization), kept


def subnet_fields(cfg: SubnetConfig) -> dict:
    """A table row's description of a subnet: ``bits`` is Q, or null for a mixed plan."""
    return {"resolution": cfg.resolution, "width": cfg.width, "bits": cfg.bits if cfg.uniform else None,
            "precision": f"q{cfg.bits}" if cfg.uniform else "mixed"}


def _batches(x: Tensor, batch: int, device: torch.device) -> Iterable[Tensor]:
    for i in range(0, x.shape[0], batch):
        yield x[i:i + batch].to(device)


def _by_resolution(subnets: Iterable[SubnetConfig]) -> dict[int, list[SubnetConfig]]:
    groups: dict[int, list[SubnetConfig]] = defaultdict(list)
    for cfg in subnets:
        groups[cfg.resolution].append(cfg)
    return dict(sorted(groups.items(), reverse=True))


def calibration_sample(paths: Sequence[Path], count: int, seed: int = 0) -> list[Path]:
    """A fixed random subset of ``count`` images (in path order), the same on every run."""
    g = torch.Generator().manual_seed(seed)
    return [paths[i] for i in sorted(torch.randperm(len(paths), generator=g)[:count].tolist())]


def calibrate_subnets(model: Supernet, subnets: Sequence[SubnetConfig], paths: Sequence[Path], normalization: Mapping,
                      batch: int = 128, device: torch.device | str = "cpu", where: str = "calibration images",
                      announce: Callable[[int], None] | None = None) -> dict[str, BNStats]:
    """BatchNorm statistics of every subnet on the (unlabeled) images at ``paths``: at
    least MIN_BN_IMAGES of them must be readable (``where`` names them in the error), and
    no batch holds a single image (BatchNorm in training mode cannot normalise one).
    ``announce`` is told the number of readable images once they are known to suffice."""
    device = torch.device(device)
    out: dict[str, BNStats] = {}
    for i, (resolution, configs) in enumerate(_by_resolution(subnets).items()):
        x, kept = load_at(paths, resolution, normalization, where, warn=i == 0, min_count=MIN_BN_IMAGES)
        if i == 0 and announce is not None:
            announce(len(kept))
        while x.shape[0] % batch == 1:
            batch += 1  # the last batch would be one image
        for cfg in configs:
            stats = calibrate_bn(model, model.active(cfg), _batches(x, batch, device))
            out[str(cfg)] = {k: (m.cpu(), v.cpu()) for k, (m, v) in stats.items()}
    return out


def ensure_calibrated(ckpt: "Checkpoint", subnets: Sequence[SubnetConfig], images: Sequence[Path], count: int,
                      where: str | Path, *, device: torch.device | str = "cpu", recalibrate: bool = False,
                      note: str = "", say: Callable[[str], None] | None = None) -> dict[str, BNStats]:
    """BatchNorm statistics of the ``subnets`` the checkpoint has none for (every one with
    ``recalibrate``), measured now on a fixed random sample of ``count`` of ``images`` (the
    files under ``where``) with the checkpoint's normalisation. ``say`` gets one line
    (how many subnets, on how many readable images of ``where``, then ``note``) once the
    images are known to suffice. Returned, not stored: the caller decides where they go.
    The model stays where it is (move it to ``device`` first)."""
    todo = list(subnets) if recalibrate else [c for c in subnets if str(c) not in ckpt.bn_stats]
    if not todo:
        return {}

    def announce(n: int) -> None:
        if say is not None:
            say(f"calibrating BatchNorm of {len(todo)} subnet(s) on {n} images of {where}{note}")

    return calibrate_subnets(ckpt.model, todo, calibration_sample(images, count), normalization_of(ckpt.meta),
                             device=device, where=str(where), announce=announce)


@torch.no_grad()
def evaluate_subnets(model: Supernet, subnets: Sequence[SubnetConfig], bn_stats: Mapping[str, BNStats],
                     paths: Sequence[Path], labels: Sequence[int], normalization: Mapping, batch: int = 256,
                     device: torch.device | str = "cpu", where: str = "evaluation images") -> list[dict]:
    """One row per subnet: top-1 accuracy on the labeled images, with its costs."""
    device = torch.device(device)
    costs = costs_of(model, subnets)
    rows = []
    was_training = model.training
    model.eval()
    try:
        for i, (resolution, configs) in enumerate(_by_resolution(subnets).items()):
            x, kept = load_at(paths, resolution, normalization, where, warn=i == 0)
            y = torch.tensor([labels[i] for i in kept])
            for cfg in configs:
                net = model.active(cfg, {k: (m.to(device), v.to(device)) for k, (m, v) in bn_stats[str(cfg)].items()})
                pred = torch.cat([model(xb, net).argmax(1).cpu() for xb in _batches(x, batch, device)])
                c = costs[cfg]
                rows.append({"subnet": str(cfg), **subnet_fields(cfg), "top1": float((pred == y).float().mean()), "images": int(y.numel()),
                             "macs": c.macs, "bitops": c.bitops, "params": c.params, "weight_bytes": c.weight_bytes})
    finally:
        model.train(was_training)
    order = {str(c): i for i, c in enumerate(subnets)}
    return sorted(rows, key=lambda r: order[r["subnet"]])


def torch_device(name: str):
    """--device auto/cpu/cuda as a torch device; cuda without one is a user error."""
    if name == "cuda" and not torch.cuda.is_available():
        raise RtfqError("--device cuda: this PyTorch build has no CUDA or no GPU is visible (use --device cpu)")
    return torch.device("cuda" if name == "cuda" or (name == "auto" and torch.cuda.is_available()) else "cpu")
