"""A deterministic, download-free domain-shift benchmark in the ImageFolder layout.

Classes are shapes; the source domain (both shifts) draws them filled, in saturated
colours, on a light plain background.

``mild``: the target draws the same shapes in dark muted colours on a mid-grey, striped
and blotched background, slightly blurred (lower contrast, other palette, texture; the
contrast polarity is kept, as a camera change would). A source-only classifier keeps
about 95% of the target right: most of the gap is closed by the target's BatchNorm
statistics alone.

``strong``: the target changes what per-channel statistics cannot undo. Appearance: each
image is painted one of three ways (filled, hatched, or only outlined with a stroke of
random width), in either contrast polarity, on a background with a lighting gradient,
two-scale texture and clutter strokes, then blurred and noised by random amounts.
Geometry: wider ranges of scale, position and rotation, and an anisotropic stretch.
Occlusion: a quarter of the images have a band of background drawn across the shape.
The class evidence (the outline of the shape) is kept in every image, so a person labels
them all; the mix of styles leaves the filled ones close to the source, which is what
self-training adapts from. Written as::

    OUT/source/<class>/<n>.png        labeled source domain
    OUT/target/<class>/<n>.png        target domain (labels used only for evaluation)
    OUT/target_test/<class>/<n>.png   held-out target images for honest evaluation
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from rtfq_deploy.errors import RtfqError

SHAPES = ("circle", "square", "triangle", "diamond", "pentagon", "hexagon", "star", "cross", "arrow", "halfdisk",
          "bar", "ring", "tee", "ell", "chevron", "trapezoid")  # appended classes leave earlier ones unchanged
SPLITS = ("source", "target", "target_test")
SHIFTS = ("mild", "strong")
DEFAULT_CLASSES = {"mild": 10, "strong": 16}


@dataclass(frozen=True)
class SynthConfig:
    classes: int = 10
    per_class: int = 60
    test_per_class: int = 30
    size: int = 64
    seed: int = 0
    shift: str = "mild"

    def __post_init__(self) -> None:
        if self.shift not in SHIFTS:
            raise RtfqError(f"--shift must be one of {', '.join(SHIFTS)}, got {self.shift!r}")
        if not 0 <= self.seed < 2**32:
            raise RtfqError(f"--seed must be between 0 and {2**32 - 1}, got {self.seed}")
        if not 2 <= self.classes <= len(SHAPES):
            raise RtfqError(f"--classes must be between 2 and {len(SHAPES)}, got {self.classes}")
        if not (1 <= self.per_class <= 100_000 and 1 <= self.test_per_class <= 100_000):
            raise RtfqError("--per-class and --test-per-class must be between 1 and 100000")
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
    if shape == "tee":
        return rotated([(-0.9, -0.9), (0.9, -0.9), (0.9, -0.5), (0.2, -0.5), (0.2, 0.9), (-0.2, 0.9), (-0.2, -0.5),
                        (-0.9, -0.5)])
    if shape == "ell":
        return rotated([(-0.6, -0.9), (-0.2, -0.9), (-0.2, 0.5), (0.7, 0.5), (0.7, 0.9), (-0.6, 0.9)])
    if shape == "chevron":
        return rotated([(-0.9, -0.8), (-0.4, -0.8), (0.5, 0), (-0.4, 0.8), (-0.9, 0.8), (0, 0)])
    if shape == "trapezoid":
        return rotated([(-0.45, -0.6), (0.45, -0.6), (0.95, 0.6), (-0.95, 0.6)])
    if shape == "circle":
        return rotated([(math.cos(t), math.sin(t)) for t in np.linspace(0, 2 * math.pi, 48, endpoint=False)])
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


def _stretched(points: list[tuple[float, float]], cx: float, cy: float, sx: float, sy: float) -> list[tuple[float, float]]:
    return [(cx + (x - cx) * sx, cy + (y - cy) * sy) for x, y in points]


@dataclass(frozen=True)
class StrongStyle:
    """The strong target's factors of variation. Every image draws all its random numbers
    whatever these are, so changing one factor leaves the others' draws as they were
    (which lets a factor's share of the gap be measured alone)."""

    outline: float = 0.15  # share of images drawn as an outline only
    hatch: float = 0.15  # share of images with a hatched fill
    flip: float = 0.1  # share of images whose shape is lighter than the background
    darkest: float = 120.0  # background luminance is drawn from [darkest, 215]
    occlude: float = 0.1  # share of images with a band of background across the shape
    clutter: int = 2  # at most this many clutter strokes and blobs
    texture: float = 0.4  # scale of the background's lighting gradient and texture
    noise: float = 6.0  # largest noise standard deviation, grey levels
    blur: float = 0.8  # largest blur radius at 64 px
    rotation: float = 0.4  # largest rotation, radians
    stretch: float = 0.1  # largest log stretch of each axis

STRONG = StrongStyle()


def _shape_mask(shape: str, rng: np.random.Generator, big: int, style: StrongStyle) -> Image.Image:
    """The shape's silhouette (L mode, 255 inside) at a random place, size, rotation and
    stretch, or its outline alone with a stroke of random width."""
    r = big * rng.uniform(0.2, 0.36)
    cx, cy = (big / 2 + rng.uniform(-0.15, 0.15) * big for _ in range(2))
    angle = rng.uniform(-1, 1) * style.rotation
    sx, sy = np.exp(rng.uniform(-1, 1, size=2) * style.stretch)
    outline = rng.random() < style.outline
    stroke = max(2, int(r * rng.uniform(0.12, 0.22)))
    mask = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(mask)
    base = "circle" if shape == "ring" else shape
    points = _stretched(_polygon(base, cx, cy, r, angle), cx, cy, sx, sy)
    if outline:
        draw.polygon(points, outline=255, width=stroke)
    else:
        draw.polygon(points, fill=255)
    if shape == "ring":  # the hole, outlined too when the shape is
        inner = _stretched(_polygon("circle", cx, cy, r * 0.55, angle), cx, cy, sx, sy)
        draw.polygon(inner, fill=0)
        if outline:
            draw.polygon(inner, outline=255, width=stroke)
    return mask


def _strong_background(rng: np.random.Generator, size: int, style: StrongStyle) -> tuple[np.ndarray, float]:
    """Float HxWx3 background (lighting gradient, two-scale texture, clutter strokes) and its mean luminance."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    base = style.darkest + rng.uniform(0, 1) * (215 - style.darkest) + rng.normal(0, 25, size=3)
    theta = rng.uniform(0, 2 * math.pi)
    light = rng.uniform(0, 60) * ((xx - 0.5) * math.cos(theta) + (yy - 0.5) * math.sin(theta))
    texture = np.zeros((size, size))
    for cell, amp in ((size // 4, rng.uniform(4, 16)), (max(1, size // 16), rng.uniform(3, 12))):
        noise = rng.normal(0, 1, size=(size // cell + 1, size // cell + 1))
        texture += amp * np.kron(noise, np.ones((cell, cell)))[:size, :size]
    img = base + style.texture * (light + texture)[..., None] * rng.uniform(0.6, 1.0, size=3)
    pil = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(pil)
    count = int(rng.integers(0, 6))
    for i in range(5):  # clutter: short strokes and small blobs of any colour
        colour = tuple(int(v) for v in rng.uniform(0, 255, size=3))
        x0, y0, length, phi, rad = *rng.uniform(0, size, size=2), *rng.uniform(0, 1, size=3)
        line, width = rng.random() < 0.6, int(rng.integers(1, max(2, size // 24)))
        if i >= min(count, style.clutter):
            continue
        if line:
            length, phi = (0.15 + 0.25 * length) * size, 2 * math.pi * phi
            draw.line([(x0, y0), (x0 + length * math.cos(phi), y0 + length * math.sin(phi))], fill=colour, width=width)
        else:
            rad = (0.03 + 0.04 * rad) * size
            draw.ellipse([x0 - rad, y0 - rad, x0 + rad, y0 + rad], fill=colour)
    return np.asarray(pil, dtype=np.float64), float(np.mean(img))


def render_strong(shape: str, rng: np.random.Generator, size: int, style: StrongStyle = STRONG) -> Image.Image:
    """One target image of the strong shift (see the module docstring)."""
    big = size * 4
    background, luminance = _strong_background(rng, size, style)
    mask = _shape_mask(shape, rng, big, style).resize((size, size), Image.LANCZOS)
    mask = np.asarray(mask, dtype=np.float64)[..., None] / 255
    # Paint: a contrast of 45-110 grey levels against the background, in either polarity
    # on mid-grey backgrounds (always the visible one on dark or light ones).
    lighter = rng.random() < style.flip
    sign = 1.0 if luminance < 90 else -1.0 if luminance > 165 else (1.0 if lighter else -1.0)
    colour = np.clip(luminance + sign * rng.uniform(45, 110) + rng.normal(0, 30, size=3), 0, 255)
    paint = np.broadcast_to(colour, (size, size, 3)).copy()
    hatch, phi, period = rng.random() < style.hatch, rng.uniform(0, math.pi), rng.uniform(3, 6) * size / 64
    if hatch:
        yy, xx = np.mgrid[0:size, 0:size]
        stripes = np.sin(2 * math.pi * (xx * math.cos(phi) + yy * math.sin(phi)) / period) > 0
        paint[stripes] = background[stripes] * 0.5 + paint[stripes] * 0.5
    img = background * (1 - mask) + paint * mask
    occlude, c, phi, half = rng.random() < style.occlude, rng.uniform(0.35, 0.65, size=2) * size, \
        rng.uniform(0, math.pi), rng.uniform(0.035, 0.07) * size
    if occlude:  # a band of the background's mean colour across the shape
        pil = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
        dx, dy = math.cos(phi) * size, math.sin(phi) * size
        nx, ny = -math.sin(phi) * half, math.cos(phi) * half
        band = [(c[0] - dx + nx, c[1] - dy + ny), (c[0] + dx + nx, c[1] + dy + ny), (c[0] + dx - nx, c[1] + dy - ny),
                (c[0] - dx - nx, c[1] - dy - ny)]
        ImageDraw.Draw(pil).polygon(band, fill=tuple(int(v) for v in np.clip(background.mean(axis=(0, 1)), 0, 255)))
        img = np.asarray(pil, dtype=np.float64)
    radius, sigma = rng.uniform(0, 1) * style.blur * size / 64, rng.uniform(0.2, 1) * style.noise
    pil = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(radius=radius))
    noisy = np.asarray(pil, dtype=np.float64) + rng.normal(0, 1, size=(size, size, 3)) * sigma
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


def pixels_sha256(root: str | Path) -> dict[str, str]:
    """Per split, a digest of every image's path and decoded RGB pixels (not the PNG bytes,
    which depend on the zlib build): the same options give the same pixels on one machine,
    and this tells whether two machines' data differ when their training results do."""
    out = {}
    for split in SPLITS:
        h = hashlib.sha256()
        for path in sorted((Path(root) / split).rglob("*.png")):
            with Image.open(path) as img:
                h.update(path.relative_to(root).as_posix().encode() + b"\0" + img.convert("RGB").tobytes())
        out[split] = h.hexdigest()
    return out


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
                if split != "source" and config.shift == "strong":
                    image = render_strong(shape, rng, config.size)
                else:
                    image = render(shape, rng, config.size, target=split != "source")
                image.save(folder / f"{i:05d}.png")
        counts[split] = n * config.classes
    record = {"generator": "rtfq data synth", **asdict(config), "pixels_sha256": pixels_sha256(tmp)}
    (tmp / "synth.json").write_text(json.dumps(record, indent=2) + "\n")
    if out.exists():
        out.rmdir()
    tmp.rename(out)  # the dataset appears whole or not at all
    return counts
