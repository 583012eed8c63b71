"""rtfq_deploy.evaluate: ensure_calibrated, the one rule for subnets a checkpoint has no statistics for."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from rtfq_deploy.errors import RtfqError
from rtfq_deploy.evaluate import calibrate_subnets, calibration_sample, ensure_calibrated
from rtfq_deploy.formats import IMAGENET_NORMALIZATION
from rtfq_deploy.models import SupernetConfig, build_supernet
from rtfq_deploy.space import SearchSpace, SubnetConfig

SPACE = SearchSpace(resolutions=(32,), widths=(1.0,), bits=(8, 4))


@pytest.fixture
def images(tmp_path):
    rng = np.random.default_rng(0)
    paths = []
    for i in range(6):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(paths[-1])
    return paths


def _ckpt(bn_stats=None, meta=None):
    torch.manual_seed(0)
    model = build_supernet(SupernetConfig("tiny_resnet", num_classes=3, space=SPACE))
    return SimpleNamespace(model=model, bn_stats=dict(bn_stats or {}), meta=dict(meta or {}))


def test_only_the_missing_subnets_are_measured_with_one_line(images, tmp_path):
    q8, q4 = SubnetConfig(32, 1.0, 8), SubnetConfig(32, 1.0, 4)
    ckpt = _ckpt(bn_stats={str(q8): {}})
    said: list[str] = []
    stats = ensure_calibrated(ckpt, [q8, q4], images, 4, tmp_path, note=" (a note)", say=said.append)
    assert list(stats) == [str(q4)]
    assert said == [f"calibrating BatchNorm of 1 subnet(s) on 4 images of {tmp_path} (a note)"]
    assert str(q4) not in ckpt.bn_stats  # returned, not stored
    expected = calibrate_subnets(ckpt.model, [q4], calibration_sample(images, 4), IMAGENET_NORMALIZATION)
    assert all(torch.equal(stats[str(q4)][k][0], m) for k, (m, _) in expected[str(q4)].items())


def test_recalibrate_measures_every_subnet_and_nothing_missing_is_silent(images, tmp_path):
    q8, q4 = SubnetConfig(32, 1.0, 8), SubnetConfig(32, 1.0, 4)
    ckpt = _ckpt(bn_stats={str(q8): {}, str(q4): {}})
    said: list[str] = []
    assert ensure_calibrated(ckpt, [q8, q4], images, 4, tmp_path, say=said.append) == {} and said == []
    assert set(ensure_calibrated(ckpt, [q8, q4], images, 4, tmp_path, recalibrate=True)) == {str(q8), str(q4)}


def test_the_checkpoints_normalization_is_used_and_too_few_images_refused(images, tmp_path):
    q4 = SubnetConfig(32, 1.0, 4)
    own = {"mean": [0.0, 0.0, 0.0], "std": [1.0, 1.0, 1.0]}
    stats = ensure_calibrated(_ckpt(meta={"normalization": own}), [q4], images, 4, tmp_path)
    expected = calibrate_subnets(_ckpt().model, [q4], calibration_sample(images, 4), own)
    assert all(torch.equal(stats[str(q4)][k][0], m) for k, (m, _) in expected[str(q4)].items())
    with pytest.raises(RtfqError):
        ensure_calibrated(_ckpt(), [q4], images[:1], 4, tmp_path)
