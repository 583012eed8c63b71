"""A run's product: the trained supernet with every subnet's BatchNorm calibrated on target
images (RUN_DIR/supernet.pt), ready for ``rtfq eval`` and ``rtfq-export``.

The statistics are measured once, here, rather than kept per subnet during training
(see :mod:`rtfq_deploy.calibrate` for why), on a fixed random sample of the target images.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from rtfq_deploy.checkpoint import Checkpoint, save_checkpoint
from rtfq_deploy.data.folders import ImageFolder
from rtfq_deploy.evaluate import calibrate_subnets
from rtfq_deploy.formats import NORMALIZATION_KEY
from rtfq_deploy.models.base import Supernet
from rtfq_deploy.train.config import TrainConfig

SUPERNET = "supernet.pt"


def write_supernet(out: Path, cfg: TrainConfig, ckpt: Checkpoint, student: Supernet, source: ImageFolder,
                   target: ImageFolder, target_paths: Sequence[Path], normalization: Mapping,
                   skipped: Mapping[str, int], device: torch.device) -> Path:
    """Calibrate every subnet's BatchNorm on ``cfg.calib_images`` target images and write
    ``out`` with the metadata a trained checkpoint carries (classes, normalisation, how
    it was trained)."""
    g = torch.Generator().manual_seed(cfg.seed)
    order = torch.randperm(len(target_paths), generator=g)[: cfg.calib_images].tolist()
    paths = [target_paths[i] for i in sorted(order)]
    stats = calibrate_subnets(student, list(student.config.space), paths, normalization, device=device,
                              where=f"target folder {target.root}")
    student.cpu()
    meta: dict[str, Any] = {
        **ckpt.meta, "created_by": "rtfq-train", "class_names": list(source.classes),
        NORMALIZATION_KEY: normalization, "trained": {"steps": cfg.steps, "rule": cfg.rule, "config": cfg.to_dict(),
                                                      "skipped": dict(skipped)},
        "calibration": {"images": len(paths), "domain": "target"}}
    save_checkpoint(out, student, bn_stats=stats, meta=meta, overwrite=True)
    return out
