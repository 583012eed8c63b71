"""Training batches: decoded images, per-step sampling and augmentation.

Every random choice of step ``k`` (which images, crops, flips) is drawn from generators
seeded by ``(seed, stream, k)``, never from global RNG state: a resumed run, or a run
with another number of workers or processes, sees exactly the same batches.

Small sets (Office-31, the synthetic benchmark) are decoded once into a uint8 tensor;
larger ones are decoded per batch by DataLoader workers. Images are held at
``S = round(max R / 0.875)`` pixels; a step crops ``max R`` at random, flips, and each
sampled subnet resizes the batch to its own resolution (:func:`resize_to`).
"""

from __future__ import annotations

import functools
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from rtfq_deploy.data.folders import ImageFolder
from rtfq_deploy.errors import RtfqError
from rtfq_deploy.formats import CROP_FRACTION, IMAGENET_NORMALIZATION  # noqa: F401  (re-exported for scripts)
from rtfq_deploy.images import (UnreadableImage, check_image, describe_skipped, no_readable,
                                resized_crop, too_few_for_bn)

log = logging.getLogger(__name__)


def stored_size(max_resolution: int) -> int:
    return round(max_resolution / CROP_FRACTION)


def decode(path: Path, size: int) -> np.ndarray:
    """uint8 CHW: short side resized to ``size``, centre-cropped to size x size."""
    return np.ascontiguousarray(resized_crop(path, size, size).transpose(2, 0, 1))


class _Decoded(torch.utils.data.Dataset):
    def __init__(self, paths: Sequence[Path], size: int) -> None:
        self.paths, self.size = list(paths), size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> Tensor:
        return torch.from_numpy(decode(self.paths[index], self.size))


def _readable(path: Path, size: int) -> np.ndarray | UnreadableImage:
    try:
        return decode(path, size)
    except UnreadableImage as e:
        return e


def _checked(path: Path) -> bool | UnreadableImage:
    """Decode once without keeping the pixels: a file that passes cannot fail at step N."""
    try:
        check_image(path)
        return True
    except UnreadableImage as e:
        return e


@dataclass
class Domain:
    """The readable images of one domain and their labels (-1 where unknown)."""

    name: str
    paths: list[Path]
    labels: Tensor
    size: int
    cache: Tensor | None  # (N, 3, S, S) uint8 when decoded up front
    skipped: int

    def __len__(self) -> int:
        return len(self.paths)


def load_domain(folder: ImageFolder, name: str, size: int, cache_mb: float, workers: int = 2,
                min_count: int = 1) -> Domain:
    """Decode every image once, up front (kept when the set fits ``cache_mb``, else only
    checked), at the start of a run and at every resume: unreadable files (undecodable,
    truncated, decompression bombs) are skipped, named in one warning and counted, never
    silently relabelled, and no image that passed can fail a later step. Fewer than
    ``min_count`` readable images is one error."""
    paths = [p for p, _ in folder.samples]
    labels = [label for _, label in folder.samples]
    fits = len(paths) * 3 * size * size <= cache_mb * 2**20
    with ThreadPoolExecutor(max(1, workers)) as pool:
        if fits:
            arrays = list(pool.map(functools.partial(_readable, size=size), paths))
        else:
            arrays = list(pool.map(_checked, paths))
    keep = [i for i, a in enumerate(arrays) if not isinstance(a, UnreadableImage)]
    bad = [a for a in arrays if isinstance(a, UnreadableImage)]
    skipped = len(bad)
    if not keep:
        raise no_readable(f"{name} folder {folder.root}", bad, len(paths))
    if len(keep) < min_count:
        raise too_few_for_bn(f"{name} folder {folder.root}", len(keep), bad)
    if skipped:
        log.warning("%s folder %s: %s", name, folder.root, describe_skipped(bad, len(paths)))
    cache = torch.from_numpy(np.stack([arrays[i] for i in keep])) if fits else None
    return Domain(name, [paths[i] for i in keep], torch.tensor([labels[i] for i in keep]), size, cache, skipped)


def _generator(*key: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(np.random.SeedSequence(list(key)).generate_state(1, np.uint64)[0] >> 1))


def step_indices(n: int, batch: int, seed: int, stream: int, step: int) -> list[int]:
    """Images of step ``step``: consecutive slices of per-epoch permutations, so every
    image is seen once per epoch whatever the batch size."""
    out: list[int] = []
    pos = step * batch
    while len(out) < batch:
        epoch, offset = divmod(pos, n)
        perm = _permutation(n, seed, stream, epoch)
        take = min(batch - len(out), n - offset)
        out.extend(perm[offset:offset + take])
        pos += take
    return out


@functools.lru_cache(maxsize=8)
def _permutation(n: int, seed: int, stream: int, epoch: int) -> list[int]:
    return torch.randperm(n, generator=_generator(seed, stream, epoch)).tolist()


class Stream:
    """Batches of one domain for steps ``start..`` (this process's share of each)."""

    def __init__(self, domain: Domain, batch: int, seed: int, stream: int, rank: int = 0, world: int = 1,
                 workers: int = 2) -> None:
        if batch % world:
            raise RtfqError(f"batch size {batch} is not divisible by the {world} processes")
        self.domain, self.batch, self.seed, self.stream = domain, batch, seed, stream
        self.rank, self.world, self.workers = rank, world, workers

    def indices(self, step: int) -> list[int]:
        return step_indices(len(self.domain), self.batch, self.seed, self.stream, step)[self.rank::self.world]

    def batches(self, start: int, end: int) -> Iterator[tuple[Tensor, Tensor]]:
        """(uint8 images, labels) for each step in [start, end)."""
        if self.domain.cache is not None:
            for step in range(start, end):
                idx = torch.tensor(self.indices(step))
                yield self.domain.cache[idx], self.domain.labels[idx]
            return
        sampler = [self.indices(step) for step in range(start, end)]
        loader = torch.utils.data.DataLoader(_Decoded(self.domain.paths, self.domain.size), batch_sampler=sampler,
                                             num_workers=self.workers, persistent_workers=False)
        try:
            for idx, images in zip(sampler, loader):
                yield images, self.domain.labels[torch.tensor(idx)]
        except UnreadableImage as e:  # from a worker, its message ends with the original one
            last = str(e).strip().splitlines()[-1].split("UnreadableImage: ")[-1]
            raise RtfqError(f"{last} (the file changed after the run checked it)") from None


def augment(images: Tensor, crop: int, seed: int, stream: int, step: int, normalization: dict,
            strong: bool = False) -> Tensor:
    """Random ``crop`` x ``crop`` window and horizontal flip per image, then float and
    normalised; the randomness is a function of (seed, stream, step) only. ``strong``
    adds :func:`strong_augment` to the same windows."""
    g = _generator(seed, stream, step, 1 << 20)
    n, _, s, _ = images.shape
    offsets = torch.randint(0, s - crop + 1, (n, 2), generator=g).tolist()
    flips = (torch.rand(n, generator=g) < 0.5).tolist()
    out = torch.empty(n, 3, crop, crop, dtype=torch.float32)
    for i, ((y, x), flip) in enumerate(zip(offsets, flips)):
        patch = images[i, :, y:y + crop, x:x + crop]
        out[i] = (patch.flip(-1) if flip else patch).to(torch.float32)
    out.div_(255.0)
    if strong:
        out = strong_augment(out, _generator(seed, stream, step, 1 << 21))
    return normalize(out, normalization)


def strong_augment(x: Tensor, g: torch.Generator) -> Tensor:
    """FixMatch-style photometric and occlusion noise on [0, 1] images, per image: colour
    (saturation, contrast, brightness), inversion (one in five), a box blur (one in two),
    pixel noise and one cutout square of a fifth to half the side, filled grey."""
    n, _, h, w = x.shape

    def r() -> Tensor:
        return torch.rand(n, 1, 1, 1, generator=g)

    grey = x.mean(1, keepdim=True)
    x = grey + (x - grey) * (1.5 * r())
    mean = x.mean((1, 2, 3), keepdim=True)
    x = mean + (x - mean) * (0.4 + 1.2 * r()) + 0.6 * (r() - 0.5)
    x = torch.where(r() < 0.2, 1.0 - x, x)
    blurred = F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    x = x + (blurred - x) * (r() < 0.5).float()
    x = x + torch.randn(x.shape, generator=g) * (0.08 * r())
    sides = (torch.rand(n, generator=g) * 0.3 + 0.2) * min(h, w)
    corners = torch.rand(n, 2, generator=g)
    for i in range(n):
        side = int(sides[i])
        y0, x0 = int(corners[i, 0] * (h - side + 1)), int(corners[i, 1] * (w - side + 1))
        x[i, :, y0:y0 + side, x0:x0 + side] = 0.5
    return x.clamp_(0.0, 1.0)


def normalize(x: Tensor, normalization: dict) -> Tensor:
    mean = torch.tensor(normalization["mean"], dtype=x.dtype).reshape(1, 3, 1, 1)
    std = torch.tensor(normalization["std"], dtype=x.dtype).reshape(1, 3, 1, 1)
    return (x - mean) / std


def resize_to(x: Tensor, resolution: int) -> Tensor:
    if x.shape[-1] == resolution:
        return x
    return F.interpolate(x, size=(resolution, resolution), mode="bilinear", antialias=True, align_corners=False)
