"""ImageFolder-layout datasets (one sub-folder per class), as Office-31, Office-Home and
DomainNet ship, with the checks that keep a wrong label from ever passing silently."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from rtfq_deploy.errors import RtfqError
from rtfq_deploy.images import IMAGE_SUFFIXES

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ImageFolder:
    """Sorted class names and (path, class index) samples, sorted by path."""

    root: Path
    classes: tuple[str, ...]
    samples: tuple[tuple[Path, int], ...]

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def labels(self) -> list[int]:
        return [label for _, label in self.samples]


def scan(root: str | Path, what: str = "data") -> ImageFolder:
    """Read ``root/<class>/**/<image>``; a class folder without images, stray files at the
    top level or a folder without class folders is an error naming the problem."""
    root = Path(root)
    if not root.is_dir():
        raise RtfqError(f"{what} folder {root} does not exist or is not a directory")
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    stray = sorted(p.name for p in root.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if stray:
        raise RtfqError(f"{what} folder {root} has images at its top level ({stray[0]}, ...): "
                        "expected one sub-folder per class (ImageFolder layout)")
    if not class_dirs:
        raise RtfqError(f"{what} folder {root} has no class sub-folders (expected ROOT/<class>/<image>)")
    samples: list[tuple[Path, int]] = []
    for index, d in enumerate(class_dirs):
        files = sorted(p for p in d.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise RtfqError(f"{what} class folder {d} has no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
        samples.extend((p, index) for p in files)
    return ImageFolder(root, tuple(d.name for d in class_dirs), tuple(samples))


def check_same_classes(a: ImageFolder, b: ImageFolder, a_name: str = "source", b_name: str = "target") -> None:
    """Labels are class indices in sorted-name order, so both domains must list the same classes."""
    if a.classes == b.classes:
        return
    only_a, only_b = sorted(set(a.classes) - set(b.classes)), sorted(set(b.classes) - set(a.classes))
    parts = []
    if only_a:
        parts.append(f"only in {a_name}: {', '.join(only_a[:5])}{' ...' if len(only_a) > 5 else ''}")
    if only_b:
        parts.append(f"only in {b_name}: {', '.join(only_b[:5])}{' ...' if len(only_b) > 5 else ''}")
    raise RtfqError(f"{a_name} and {b_name} class lists differ ({'; '.join(parts)})")
