"""Labeled held-out images for accuracy on the device, prepared as each exported file asks.

The device has no torch; the toolkit's one evaluation rule needs numpy and Pillow only
(``rtfq_deploy.images.load_image``, which ``rtfq eval`` uses: the short side resized
bilinearly to round(R / 0.875), the centre R x R, RGB in [0, 1], then ``(x - mean) / std``
per channel), and hostile image files are skipped with one warning as everywhere. The
metadata's JSON goes through the bounded reader of ``rtfq_deploy.fileio``. The folder is
read as ``rtfq eval`` reads it: one sub-folder per class, classes in sorted order, the
files of each class sorted. R, mean and std come from the file's ``rtfq.input``
metadata, and its ``rtfq.class_names`` must be the folder's classes.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from rtfq_deploy.errors import RtfqError
from rtfq_deploy.formats import IMAGE_SUFFIXES, META_CLASS_NAMES, META_INPUT

log = logging.getLogger(__name__)

MAX_IMAGES = 200_000


@dataclass(frozen=True)
class ImageSet:
    root: Path
    classes: tuple[str, ...]
    paths: tuple[Path, ...]
    labels: tuple[int, ...]

    def describe(self) -> dict[str, Any]:
        return {"folder": str(self.root.resolve()), "images": len(self.paths), "classes": len(self.classes)}

    def check_model(self, metadata: Mapping[str, str], name: str) -> None:
        """The model's class list must be the folder's (labels are indices in that order)."""
        names = class_names(metadata, name)
        if names is None:
            return
        if names != list(self.classes):
            only_model = sorted(set(map(str, names)) - set(self.classes))[:3]
            only_folder = sorted(set(self.classes) - set(map(str, names)))[:3]
            raise RtfqError(f"{name}: its classes differ from the image folder's {self.root} "
                            f"({len(names)} against {len(self.classes)}; only in the model: {only_model or '-'}, "
                            f"only in the folder: {only_folder or '-'})")

    def arrays_for(self, model: Path, workdir: Path | None) -> tuple[Path, Path]:
        """``.npy`` files of the images as ``model`` takes them and of the labels (cached
        in ``workdir`` per resolution and normalisation)."""
        from rtfq_deploy.bench.onnxmeta import MetadataError, read_metadata

        try:
            metadata = read_metadata(model)
        except (OSError, MetadataError) as e:
            raise RtfqError(f"{model}: cannot read its metadata: {e}") from None
        resolution, mean, std = input_spec(metadata, model.name)
        self.check_model(metadata, model.name)
        if workdir is None:
            raise RtfqError("no working folder for the preprocessed images")
        key = hashlib.sha256(json.dumps([str(self.root), resolution, mean, std]).encode()).hexdigest()[:16]
        images, labels = workdir / f"images-{key}.npy", workdir / f"labels-{key}.npy"
        if not images.exists():
            import numpy as np

            from rtfq_deploy.images import readable_arrays

            _require_pillow()
            arrays, indices = readable_arrays(self.paths, resolution, str(self.root))
            kept = [self.labels[i] for i in indices]
            x = np.stack(arrays).transpose(0, 3, 1, 2)
            x = (x - np.asarray(mean, np.float32).reshape(1, 3, 1, 1)) / np.asarray(std, np.float32).reshape(1, 3, 1, 1)
            np.save(labels, np.asarray(kept, dtype=np.int64), allow_pickle=False)
            np.save(images, np.ascontiguousarray(x, dtype=np.float32), allow_pickle=False)
        return images, labels


def _metadata_json(metadata: Mapping[str, str], key: str, name: str, expect: type) -> Any:
    """A JSON metadata entry through the toolkit's bounded reader (depth, size, finite
    numbers), of the expected top-level type; None when absent."""
    from rtfq_deploy.fileio import parse_json

    text = metadata.get(key)
    if text is None:
        return None
    return parse_json(text, name, f"{key} metadata", max_bytes=1 << 20, max_depth=8, expect=expect)


def class_names(metadata: Mapping[str, str], name: str) -> list[str] | None:
    """The model's ``rtfq.class_names`` (a JSON array of strings), None when absent."""
    names = _metadata_json(metadata, META_CLASS_NAMES, name, list)
    if names is not None and not all(isinstance(n, str) for n in names):
        raise RtfqError(f"{name}: malformed rtfq.class_names metadata (not an array of names)")
    return names


def input_spec(metadata: Mapping[str, str], name: str) -> tuple[int, list[float], list[float]]:
    """(resolution, mean, std) from an export's ``rtfq.input`` metadata."""
    unusable = RtfqError(f"{name}: no usable rtfq.input metadata (not written by rtfq-export?); "
                         "accuracy needs its resolution and normalisation")
    try:
        spec = _metadata_json(metadata, META_INPUT, name, dict)
    except RtfqError as e:
        raise RtfqError(f"{unusable} ({e})") from None
    if spec is None:
        raise unusable
    shape, mean, std = spec.get("shape"), spec.get("mean"), spec.get("std")
    numbers = [*mean, *std] if isinstance(mean, list) and isinstance(std, list) and len(mean) == len(std) == 3 else []
    if not (isinstance(shape, list) and len(shape) == 4 and all(type(v) is int for v in shape[1:])
            and shape[2] == shape[3] and 0 < shape[2] <= 8192 and numbers
            and all(type(v) in (int, float) for v in numbers) and min(std) > 0):
        raise unusable
    mean, std = [float(v) for v in mean], [float(v) for v in std]
    check_normalization(mean, std, name)
    return shape[2], mean, std


def _require_pillow() -> None:
    import importlib.util

    if importlib.util.find_spec("PIL") is None:
        raise RtfqError("accuracy on images needs Pillow (pip install pillow)")


# What an image normalisation can be: inputs are in [0, 1], so a mean far outside it or a
# std near 0 (or NaN, which passes every comparison) makes every input meaningless.
MEAN_RANGE = (-10.0, 10.0)
STD_RANGE = (1e-4, 100.0)


def check_normalization(mean: Sequence[float], std: Sequence[float], name: str) -> None:
    """One RtfqError line unless every mean and std is finite and in range (std > 0)."""
    import math

    bad = [f"mean {v!r}" for v in mean if not (math.isfinite(v) and MEAN_RANGE[0] <= v <= MEAN_RANGE[1])]
    bad += [f"std {v!r}" for v in std if not (math.isfinite(v) and STD_RANGE[0] <= v <= STD_RANGE[1])]
    if bad:
        raise RtfqError(f"{name}: the rtfq.input normalisation holds {bad[0]} (mean must be finite within "
                        f"[{MEAN_RANGE[0]:g}, {MEAN_RANGE[1]:g}], std within [{STD_RANGE[0]:g}, {STD_RANGE[1]:g}])")


def load_image(path: Path, resolution: int) -> Any:
    """RGB in [0, 1], HWC float32: the short side resized to round(R / 0.875), centre R x R
    (:func:`rtfq_deploy.images.load_image`, Pillow and numpy only; an unreadable file
    raises its UnreadableImage)."""
    _require_pillow()
    from rtfq_deploy.images import load_image as toolkit_load_image

    return toolkit_load_image(path, resolution)


def scan(root: Path) -> ImageSet:
    """An ImageFolder tree (``root/<class>/**/<image>``), as ``rtfq eval`` reads it."""
    if not root.is_dir():
        raise RtfqError(f"image folder {root} does not exist or is not a directory")
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not class_dirs:
        raise RtfqError(f"image folder {root} has no class sub-folders (expected ROOT/<class>/<image>)")
    paths: list[Path] = []
    labels: list[int] = []
    for index, d in enumerate(class_dirs):
        files = sorted(p for p in d.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise RtfqError(f"image class folder {d} has no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
        paths.extend(files)
        labels.extend([index] * len(files))
        if len(paths) > MAX_IMAGES:
            raise RtfqError(f"image folder {root} holds more than {MAX_IMAGES} images; use a held-out subset")
    return ImageSet(root, tuple(d.name for d in class_dirs), tuple(paths), tuple(labels))


def check_models(images: ImageSet, models: Sequence[Path]) -> None:
    """Every readable model's classes are the folder's (one error line otherwise)."""
    from rtfq_deploy.bench.onnxmeta import MetadataError, read_metadata

    for model in models:
        try:
            metadata = read_metadata(model)
        except (OSError, MetadataError):
            continue  # the model's own row reports it
        images.check_model(metadata, model.name)
