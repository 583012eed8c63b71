"""Reading image folders into normalised tensors (Pillow, no torchvision).

Every image the toolkit decodes goes through :func:`open_image`: a file whose header
claims more than ``MAX_PIXELS`` pixels (a decompression bomb) is refused before any
pixel is decoded, and a truncated or undecodable file raises :class:`UnreadableImage`
naming the file, whatever Pillow raised. Every command then skips such a file with one
warning line (how many, the first few by name and why) and uses the others; a folder
left with no readable image, or fewer than BatchNorm statistics need, is one error.
Torch is imported only where tensors are made, so the device-side benchmark (no torch)
shares this code.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np
from PIL import Image

from rtfq_deploy.errors import RtfqError
from rtfq_deploy.formats import CROP_FRACTION, IMAGE_SUFFIXES

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

# Pillow's own decompression-bomb threshold (about 9459 x 9459): above it open_image refuses
# the file from its header. Pillow only warns between 1x and 2x of it (and then decodes);
# that warning is silenced because this check refuses those files first.
MAX_PIXELS = 89_478_485
MIN_BN_IMAGES = 2  # BatchNorm statistics in training mode need more than one value per channel
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


class UnreadableImage(RtfqError):
    """An image file that cannot be decoded safely; the message names the file and why."""

    def __init__(self, path: Path | str, why: str | None = None) -> None:
        # one argument: the whole message (as a DataLoader worker's exception is re-raised)
        super().__init__(str(path) if why is None else f"{path}: {why}")
        self.path, self.why = Path(path), why


def open_image(path: Path | str) -> Image.Image:
    """The decoded RGB image at ``path``, or :class:`UnreadableImage`: checked for its
    pixel count before decoding, then decoded in full (a truncated file fails here, not
    later)."""
    try:
        with Image.open(path) as img:
            w, h = img.size
            if w * h > MAX_PIXELS or w < 1 or h < 1:
                raise UnreadableImage(path, f"its header claims {w} x {h} pixels (limit {MAX_PIXELS:,}: a "
                                            "decompression bomb?)")
            img.load()
            return img.convert("RGB")
    except UnreadableImage:
        raise
    except Image.DecompressionBombError:
        raise UnreadableImage(path, f"its header claims more than {MAX_PIXELS:,} pixels (a decompression bomb?)") \
            from None
    except Exception as e:  # Pillow raises OSError, ValueError, SyntaxError, struct.error... on hostile files
        text = " ".join(str(e).split())[:120] or type(e).__name__
        raise UnreadableImage(path, f"not a readable image ({text})") from None


def check_image(path: Path | str) -> None:
    """Decode ``path`` once (raise :class:`UnreadableImage` if that fails)."""
    open_image(path).close()


def describe_skipped(skipped: Sequence[UnreadableImage], total: int) -> str:
    """'skipped N unreadable image file(s) of T: the first three and why' (one line)."""
    named = "; ".join(str(e) for e in skipped[:3])
    more = f"; and {len(skipped) - 3} more" if len(skipped) > 3 else ""
    return f"skipped {len(skipped)} unreadable image file(s) of {total}: {named}{more}"


def no_readable(where: str, skipped: Sequence[UnreadableImage], total: int) -> RtfqError:
    """The error of a folder where nothing could be read."""
    if not total:
        return RtfqError(f"{where}: no readable images (no {', '.join(sorted(IMAGE_SUFFIXES))} files)")
    return RtfqError(f"{where}: no readable images ({describe_skipped(skipped, total)})")


def too_few_for_bn(where: str, count: int, skipped: Sequence[UnreadableImage] = ()) -> RtfqError:
    extra = f"; {describe_skipped(skipped, count + len(skipped))}" if skipped else ""
    return RtfqError(f"{where}: BatchNorm statistics need at least {MIN_BN_IMAGES} readable images, got {count}"
                     f"{extra}")


def image_files(root: str | Path) -> list[Path]:
    root = Path(root)
    if not root.is_dir():
        raise RtfqError(f"{root}: not a directory of images")
    return sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def resized_crop(path: Path, short: int, crop: int) -> np.ndarray:
    """uint8 RGB, HWC: the short side resized to ``short`` (bilinear), then the centre
    ``crop`` x ``crop``. The one resize rule of evaluation, verification and training.
    Raises :class:`UnreadableImage` for a file that cannot be decoded."""
    with open_image(path) as img:
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


def readable_arrays(paths: Sequence[Path], resolution: int, where: str, limit: int | None = None,
                    warn: bool = True, min_count: int = 1) -> tuple[list[np.ndarray], list[int]]:
    """:func:`load_image` of ``paths`` in order (at most ``limit``), skipping unreadable
    files with one warning (``warn``); the arrays and the indices of the files they are.
    Fewer than ``min_count`` readable files (BatchNorm statistics need MIN_BN_IMAGES) is
    one error naming ``where`` and the skipped files' reasons, with no warning before it."""
    arrays, kept, skipped = [], [], []
    for i, path in enumerate(paths):
        if limit is not None and len(arrays) >= limit:
            break
        try:
            arrays.append(load_image(path, resolution))
            kept.append(i)
        except UnreadableImage as e:
            skipped.append(e)
    if not arrays:
        raise no_readable(where, skipped, len(paths))
    if len(arrays) < min_count:
        raise too_few_for_bn(where, len(arrays), skipped)
    if skipped and warn:
        log.warning("%s: %s", where, describe_skipped(skipped, len(arrays) + len(skipped)))
    return arrays, kept


def load_folder(root: str | Path, resolution: int, mean: Sequence[float], std: Sequence[float],
                limit: int | None = None) -> "torch.Tensor":
    """Up to ``limit`` images of a folder tree as an (N, 3, R, R) normalised tensor.
    A limit below the number of files takes them evenly spaced over the sorted list, so a
    class-per-folder tree gives every class (the first N would be one class); unreadable
    files are skipped, named in a warning and replaced by the next unpicked ones."""
    import torch

    arrays, _ = readable_arrays(_spread(image_files(root), limit), resolution, str(root), limit)
    x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
    return (x - torch.tensor(mean).reshape(1, 3, 1, 1)) / torch.tensor(std).reshape(1, 3, 1, 1)
