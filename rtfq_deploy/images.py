"""Reading image folders into normalised tensors (Pillow, no torchvision)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from rtfq_deploy.errors import RtfqError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm"}
CROP_FRACTION = 0.875  # the usual eval preprocessing: resize the short side to R / 0.875, crop R x R


def image_files(root: str | Path) -> list[Path]:
    root = Path(root)
    if not root.is_dir():
        raise RtfqError(f"{root}: not a directory of images")
    return sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def resized_crop(path: Path, short: int, crop: int) -> np.ndarray:
    """uint8 RGB, HWC: the short side resized to ``short`` (bilinear), then the centre
    ``crop`` x ``crop``. The one resize rule of evaluation, verification and training."""
    with Image.open(path) as img:
        img = img.convert("RGB")
        w, h = img.size
        scale = short / min(w, h)
        img = img.resize((max(crop, round(w * scale)), max(crop, round(h * scale))), Image.BILINEAR)
        w, h = img.size
        left, top = (w - crop) // 2, (h - crop) // 2
        return np.asarray(img.crop((left, top, left + crop, top + crop)), dtype=np.uint8)


def load_image(path: Path, resolution: int) -> np.ndarray:
    """RGB in [0, 1], HWC, short side resized to R / 0.875 then centre-cropped to R x R."""
    return resized_crop(path, round(resolution / CROP_FRACTION), resolution).astype(np.float32) / 255.0


def _spread(files: list[Path], limit: int | None) -> list[Path]:
    """``limit`` evenly spaced files first, then the others in order (spares)."""
    if limit is None or limit >= len(files):
        return files
    picked = [i * len(files) // limit for i in range(limit)]  # distinct: len(files) > limit
    chosen = set(picked)
    return [files[i] for i in picked] + [f for i, f in enumerate(files) if i not in chosen]


def load_folder(root: str | Path, resolution: int, mean: Sequence[float], std: Sequence[float],
                limit: int | None = None) -> torch.Tensor:
    """Up to ``limit`` images of a folder tree as an (N, 3, R, R) normalised tensor.
    A limit below the number of files takes them evenly spaced over the sorted list, so a
    class-per-folder tree gives every class (the first N would be one class); unreadable
    files are skipped, counted in a warning and replaced by the next unpicked ones."""
    arrays, skipped = [], 0
    for path in _spread(image_files(root), limit):
        if limit is not None and len(arrays) >= limit:
            break
        try:
            arrays.append(load_image(path, resolution))
        except (UnidentifiedImageError, OSError):
            skipped += 1
    if skipped:
        log.warning("%s: skipped %d unreadable image file(s)", root, skipped)
    if not arrays:
        raise RtfqError(f"{root}: no readable images")
    x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
    return (x - torch.tensor(mean).reshape(1, 3, 1, 1)) / torch.tensor(std).reshape(1, 3, 1, 1)
