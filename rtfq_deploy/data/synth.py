"""A deterministic, download-free domain-shift benchmark in the ImageFolder layout.

Classes are shapes. The source domain draws them in saturated colours on a light plain
background; the target domain draws the same shapes in dark muted colours on a
mid-grey, striped and blotched background, slightly blurred (lower contrast, other
palette, texture; the contrast polarity is kept, as a camera change would). Shape (the label) survives the
shift, appearance does not: a source-only classifier loses a measurable share of its
accuracy on the target, which adaptation can win back. Written as::

    OUT/source/<class>/<n>.png        labeled source domain
    OUT/target/<class>/<n>.png        target domain (labels used only for evaluation)
    OUT/target_test/<class>/<n>.png   held-out target images for honest evaluation
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from rtfq_deploy.errors import RtfqError

SHAPES = ("circle", "square", "triangle", "diamond", "pentagon", "hexagon", "star", "cross", "arrow", "halfdisk",
          "bar", "ring")
SPLITS = ("source", "target", "target_test")


@dataclass(frozen=True)
class SynthConfig:
    classes: int = 10
    per_class: int = 60
    test_per_class: int = 30
    size: int = 64
    seed: int = 0

    def __post_init__(self) -> None:
        if not 2 <= self.classes <= len(SHAPES):
            raise RtfqError(f"--classes must be between 2 and {len(SHAPES)}, got {self.classes}")
        if self.per_class < 1 or self.test_per_class < 1:
            raise RtfqError("--per-class must be at least 1")
        if not 16 <= self.size <= 512:
            raise RtfqError(f"--size must be between 16 and 512, got {self.size}")


def _polygon(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    def ring(n: int, radius: float, phase: float = 0.0) -> list[tuple[float, float]]:
        return [(cx + radius * math.cos(angle + phase + 2 * math.pi * k / n),
                 cy + radius * math.sin(angle + phase + 2 * math.pi * k / n)) for k in range(n)]

    def rotated(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
        c, s = math.cos(angle), math.sin(angle)
        return [(cx + r * (x * c - y * s), cy + r * (x * s + y * c)) for x, y in points]

    if shape == "square":
        return ring(4, r, math.pi / 4)
    if shape == "triangle":
        return ring(3, r, -math.pi / 2)
    if shape == "diamond":
        return rotated([(0, -1), (0.6, 0), (0, 1), (-0.6, 0)])
    if shape == "pentagon":
        return ring(5, r, -math.pi / 2)
    if shape == "hexagon":
        return ring(6, r)
    if shape == "star":
        outer, inner = ring(5, r, -math.pi / 2), ring(5, r * 0.42, -math.pi / 2 + math.pi / 5)
        return [p for pair in zip(outer, inner) for p in pair]
    if shape == "cross":
        a, b = 0.3, 1.0
        return rotated([(-a, -b), (a, -b), (a, -a), (b, -a), (b, a), (a, a), (a, b), (-a, b), (-a, a), (-b, a),
                        (-b, -a), (-a, -a)])
    if shape == "arrow":
        return rotated([(-1, -0.25), (0.2, -0.25), (0.2, -0.7), (1, 0), (0.2, 0.7), (0.2, 0.25), (-1, 0.25)])
    if shape == "halfdisk":
        return rotated([(math.cos(t), math.sin(t)) for t in np.linspace(0, math.pi, 24)])
    if shape == "bar":
        return rotated([(-1, -0.22), (1, -0.22), (1, 0.22), (-1, 0.22)])
    raise ValueError(shape)


def _background(rng: np.random.Generator, size: int, target: bool) -> Image.Image:
    if not target:
        base = rng.uniform(200, 245, size=3)
        noise = rng.normal(0, 6, size=(size, size, 1))
        return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8))
    base = rng.uniform(110, 170, size=3)
    # Texture: random oriented stripes plus blotches, so the background carries edges too.
    yy, xx = np.mgrid[0:size, 0:size] / size
    theta, freq = rng.uniform(0, math.pi), rng.uniform(4, 10)
    stripes = np.sin(2 * math.pi * freq * (xx * math.cos(theta) + yy * math.sin(theta)) + rng.uniform(0, 6.3))
    blotch = rng.normal(0, 1, size=(size // 8 + 1, size // 8 + 1))
    blotch = np.kron(blotch, np.ones((8, 8)))[:size, :size]
    tint = rng.uniform(0.5, 1.0, size=3)
    img = base + (8 * stripes + 6 * blotch)[..., None] * tint + rng.normal(0, 8, size=(size, size, 3))
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def render(shape: str, rng: np.random.Generator, size: int, target: bool) -> Image.Image:
    """One image of ``shape`` in the source or target style (drawn at 4x, then reduced)."""
    big = size * 4
    img = _background(rng, size, target).resize((big, big), Image.BILINEAR)
    draw = ImageDraw.Draw(img)
    r = big * rng.uniform(0.24, 0.36)
    cx, cy = (big / 2 + rng.uniform(-0.12, 0.12) * big for _ in range(2))
    angle = rng.uniform(-0.35, 0.35)
    if target:
        fill = tuple(int(v) for v in rng.uniform([20, 20, 20], [80, 70, 60]))  # dark, muted
    else:
        hue = rng.integers(0, 3)
        fill = tuple(int(v) for v in np.roll(rng.uniform([150, 0, 0], [255, 90, 110]), hue))  # saturated
    if shape in ("circle", "ring"):
        background = img.copy()
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        if shape == "ring":  # the hole shows the background again
            inner = r * 0.55
            hole = Image.new("L", img.size, 0)
            ImageDraw.Draw(hole).ellipse([cx - inner, cy - inner, cx + inner, cy + inner], fill=255)
            img.paste(background, mask=hole)
    else:
        draw.polygon(_polygon(shape, cx, cy, r, angle), fill=fill)
    img = img.resize((size, size), Image.LANCZOS)
    if target:
        img = img.filter(ImageFilter.GaussianBlur(radius=size / 96))
    return img


def generate(out: str | Path, config: SynthConfig) -> dict[str, int]:
    """Write the three splits under ``out`` (which must not exist or be empty); returns
    the number of images per split. The same config always gives the same pixels."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise RtfqError(f"{out} exists and is not empty (choose a new folder)")
    counts = {}
    tmp = out.with_name(f".{out.name}.partial")
    if tmp.exists():
        import shutil

        shutil.rmtree(tmp)
    for split_index, split in enumerate(SPLITS):
        n = config.per_class if split != "target_test" else config.test_per_class
        for class_index, shape in enumerate(SHAPES[: config.classes]):
            folder = tmp / split / shape
            folder.mkdir(parents=True)
            # One stream per (split, class): adding classes never changes existing images.
            rng = np.random.default_rng([config.seed, split_index, class_index])
            for i in range(n):
                render(shape, rng, config.size, target=split != "source").save(folder / f"{i:05d}.png")
        counts[split] = n * config.classes
    (tmp / "synth.json").write_text(json.dumps({"generator": "rtfq data synth", **asdict(config)}, indent=2) + "\n")
    if out.exists():
        out.rmdir()
    tmp.rename(out)  # the dataset appears whole or not at all
    return counts
