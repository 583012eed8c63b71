from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw

from rtfq_deploy.data.folders import check_same_classes, scan
from rtfq_deploy.data.pipeline import Stream, augment, load_domain, step_indices
from rtfq_deploy.data.synth import SHAPES, SynthConfig, generate, pixels_sha256
from rtfq_deploy.errors import RtfqError
from tests.test_cli import _one_line_error, _run


def _digest(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(root)).encode() + p.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "d"
    generate(out, SynthConfig(classes=4, per_class=6, test_per_class=2, size=32, seed=1))
    return out


def test_synth_layout_and_determinism(synth, tmp_path):
    for split, n in (("source", 6), ("target", 6), ("target_test", 2)):
        folder = scan(synth / split)
        assert folder.classes == tuple(sorted(SHAPES[:4])) and len(folder) == 4 * n
    again = tmp_path / "again"
    generate(again, SynthConfig(classes=4, per_class=6, test_per_class=2, size=32, seed=1))
    assert _digest(again) == _digest(synth)
    other = tmp_path / "other"
    generate(other, SynthConfig(classes=4, per_class=6, test_per_class=2, size=32, seed=2))
    assert _digest(other) != _digest(synth)


def test_synth_records_a_digest_of_its_pixels(synth, tmp_path):
    """synth.json names the pixels it wrote, so two machines can tell whether their data differ."""
    import json

    import numpy as np

    recorded = json.loads((synth / "synth.json").read_text())["pixels_sha256"]
    assert set(recorded) == {"source", "target", "target_test"} and recorded == pixels_sha256(synth)
    assert len(set(recorded.values())) == 3
    copy = tmp_path / "copy"
    shutil.copytree(synth, copy)
    png = sorted((copy / "target").rglob("*.png"))[3]
    pixels = np.asarray(Image.open(png).convert("RGB")).copy()
    Image.fromarray(pixels, "RGB").save(png, compress_level=0)  # other PNG bytes, same pixels
    assert pixels_sha256(copy) == recorded
    pixels[0, 0, 0] ^= 1  # one bit of one pixel
    Image.fromarray(pixels, "RGB").save(png)
    changed = pixels_sha256(copy)
    assert changed["target"] != recorded["target"] and changed["source"] == recorded["source"]


def test_synth_domains_differ_in_appearance(synth):
    """The gap is real: brightness and contrast of source and target differ a lot."""
    import numpy as np

    def mean(split: str) -> float:
        return float(np.mean([np.asarray(Image.open(p)) for p, _ in scan(synth / split).samples]))

    assert mean("source") - mean("target") > 40


def test_synth_cli_and_errors(tmp_path):
    result = _run("rtfq", "data", "synth", str(tmp_path / "s"), "--classes", "3", "--per-class", "2",
                  "--test-per-class", "1", "--size", "24")
    assert result.returncode == 0, result.stderr
    assert "source 6 images" in result.stdout
    _one_line_error(_run("rtfq", "data", "synth", str(tmp_path / "s")), "not empty")
    _one_line_error(_run("rtfq", "data", "synth", str(tmp_path / "t"), "--classes", "40"), "not between 2 and 16")
    for bad in (["--seed", "-1"], ["--seed", "9" * 30], ["--size", "nan"], ["--shift", "huge"], ["--per-class", "0"]):
        _one_line_error(_run("rtfq", "data", "synth", str(tmp_path / "u"), *bad), "Invalid value")
    _one_line_error(_run("rtfq", "data", "synth", ""), "must name a folder")
    assert not (tmp_path / "u").exists() and not (tmp_path / "t").exists()


def test_strong_shift_keeps_the_source_and_changes_the_target(tmp_path):
    """Deterministic; its source split is the mild shift's; its target is another distribution."""
    import numpy as np

    config = dict(classes=16, per_class=3, test_per_class=1, size=32, seed=4)
    generate(tmp_path / "strong", SynthConfig(shift="strong", **config))
    generate(tmp_path / "again", SynthConfig(shift="strong", **config))
    generate(tmp_path / "mild", SynthConfig(shift="mild", **config))
    assert _digest(tmp_path / "strong") == _digest(tmp_path / "again")
    assert _digest(tmp_path / "strong" / "source") == _digest(tmp_path / "mild" / "source")
    assert scan(tmp_path / "strong" / "target").classes == tuple(sorted(SHAPES))
    pixels = {name: np.stack([np.asarray(Image.open(p), dtype=float) for p, _ in scan(tmp_path / name / "target").samples])
              for name in ("strong", "mild")}
    # Both polarities and a wide range of backgrounds: the per-image mean varies far more than the mild target's.
    assert pixels["strong"].mean(axis=(1, 2, 3)).std() > 2 * pixels["mild"].mean(axis=(1, 2, 3)).std()
    assert _digest(tmp_path / "strong" / "target") != _digest(tmp_path / "mild" / "target")


def test_every_shape_has_its_own_silhouette():
    """The strong target draws the 16 classes from polygons: no two silhouettes coincide."""
    import numpy as np

    from rtfq_deploy.data.synth import _polygon

    masks = []
    for shape in SHAPES:
        img = Image.new("L", (64, 64), 0)
        ImageDraw.Draw(img).polygon(_polygon("circle" if shape == "ring" else shape, 32, 32, 24, 0.0), fill=255)
        masks.append(np.asarray(img) > 0)
    masks[SHAPES.index("ring")] = masks[SHAPES.index("circle")] & ~(np.hypot(*np.mgrid[-32:32, -32:32]) < 13)
    for i in range(len(SHAPES)):
        for j in range(i):
            assert (masks[i] ^ masks[j]).sum() > 40, (SHAPES[i], SHAPES[j])


def _image(path: Path, colour=(10, 20, 30)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (12, 12), colour).save(path)


def test_folder_errors_are_clear(tmp_path):
    with pytest.raises(RtfqError, match="does not exist"):
        scan(tmp_path / "missing")
    _image(tmp_path / "flat" / "a.png")
    with pytest.raises(RtfqError, match="top level"):
        scan(tmp_path / "flat")
    (tmp_path / "empty").mkdir()
    with pytest.raises(RtfqError, match="no class sub-folders"):
        scan(tmp_path / "empty")
    _image(tmp_path / "d" / "cat" / "1.png")
    (tmp_path / "d" / "dog").mkdir()
    with pytest.raises(RtfqError, match="dog has no images"):
        scan(tmp_path / "d")
    _image(tmp_path / "s" / "cat" / "1.png")
    _image(tmp_path / "s" / "dog" / "1.png")
    _image(tmp_path / "t" / "cat" / "1.png")
    _image(tmp_path / "t" / "cow" / "1.png")
    with pytest.raises(RtfqError, match="only in source: dog; only in target: cow"):
        check_same_classes(scan(tmp_path / "s"), scan(tmp_path / "t"))


def test_unreadable_images_are_skipped_and_counted(tmp_path, caplog):
    _image(tmp_path / "d" / "a" / "good.png")
    (tmp_path / "d" / "a" / "bad.png").write_bytes(b"not an image")
    _image(tmp_path / "d" / "b" / "good.png", (200, 0, 0))
    domain = load_domain(scan(tmp_path / "d"), "source", 16, cache_mb=100)
    assert len(domain) == 2 and domain.skipped == 1 and domain.labels.tolist() == [0, 1]
    assert "skipped 1 unreadable" in caplog.text
    streamed = load_domain(scan(tmp_path / "d"), "source", 16, cache_mb=0)  # too big to cache: header check
    assert streamed.cache is None and streamed.skipped == 1 and len(streamed) == 2


def test_step_indices_cover_each_image_once_per_epoch():
    n, batch = 10, 4
    seen = [i for step in range(5) for i in step_indices(n, batch, seed=0, stream=1, step=step)]  # 20 = 2 epochs
    assert sorted(seen[:10]) == list(range(10)) and sorted(seen[10:]) == list(range(10))
    assert step_indices(n, batch, 0, 1, 3) == step_indices(n, batch, 0, 1, 3)
    assert step_indices(n, batch, 0, 2, 3) != step_indices(n, batch, 0, 1, 3)


def test_cached_and_streamed_batches_are_identical_and_shard_by_rank(synth):
    folder = scan(synth / "source")
    cached = load_domain(folder, "source", 36, cache_mb=100)
    streamed = load_domain(folder, "source", 36, cache_mb=0)
    a = list(Stream(cached, 8, 0, 1).batches(2, 5))
    b = list(Stream(streamed, 8, 0, 1, workers=0).batches(2, 5))
    for (xa, ya), (xb, yb) in zip(a, b):
        assert torch.equal(xa, xb) and torch.equal(ya, yb) and xa.dtype == torch.uint8 and xa.shape == (8, 3, 36, 36)
    r0, r1 = (list(Stream(cached, 8, 0, 1, rank=r, world=2).batches(2, 3))[0] for r in (0, 1))
    assert torch.equal(torch.cat([r0[1], r1[1]]).sort().values, a[0][1].sort().values)
    with pytest.raises(RtfqError, match="divisible"):
        Stream(cached, 7, 0, 1, world=2)


def test_augment_is_a_function_of_seed_and_step():
    images = torch.randint(0, 256, (4, 3, 20, 20), dtype=torch.uint8)
    norm = {"mean": [0.5] * 3, "std": [0.25] * 3}
    a, b = augment(images, 16, 0, 1, 7, norm), augment(images, 16, 0, 1, 7, norm)
    assert torch.equal(a, b) and a.shape == (4, 3, 16, 16)
    assert not torch.equal(a, augment(images, 16, 0, 1, 8, norm))
    assert float(a.min()) >= -2.0 - 1e-6 and float(a.max()) <= 2.0 + 1e-6  # (x - 0.5) / 0.25 of [0, 1]


@pytest.mark.parametrize("target", [False, True])
def test_ring_has_a_hole_unlike_circle(target):
    """Same random draws, so the two images differ only where the ring's hole is."""
    import numpy as np

    from rtfq_deploy.data.synth import render

    circle = np.asarray(render("circle", np.random.default_rng(5), 48, target), dtype=float)
    ring = np.asarray(render("ring", np.random.default_rng(5), 48, target), dtype=float)
    diff = np.abs(circle - ring).max(axis=2)
    assert (diff > 40).sum() > 20  # a clearly visible hole of background
