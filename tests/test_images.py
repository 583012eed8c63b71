from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from rtfq_deploy.errors import RtfqError
from rtfq_deploy.images import load_folder, load_image


def test_resize_crop_and_normalise(tmp_path):
    img = np.zeros((100, 200, 3), np.uint8)
    img[:, 90:110] = 255  # a white vertical bar in the centre survives the centre crop
    Image.fromarray(img).save(tmp_path / "a.png")
    arr = load_image(tmp_path / "a.png", 32)
    assert arr.shape == (32, 32, 3) and arr[:, 16].min() > 0.9 and arr[:, 0].max() < 0.1
    x = load_folder(tmp_path, 32, mean=[0.5] * 3, std=[0.25] * 3)
    assert x.shape == (1, 3, 32, 32) and torch.allclose(x[0, :, 0, 0], torch.full((3,), -2.0))


def test_limit_and_errors(tmp_path):
    for i in range(3):
        Image.fromarray(np.full((8, 8, 3), i * 50, np.uint8)).save(tmp_path / f"{i}.png")
    assert load_folder(tmp_path, 8, [0, 0, 0], [1, 1, 1], limit=2).shape[0] == 2
    with pytest.raises(RtfqError, match="not a directory"):
        load_folder(tmp_path / "0.png", 8, [0, 0, 0], [1, 1, 1])
    (tmp_path / "empty").mkdir()
    with pytest.raises(RtfqError, match="no readable images"):
        load_folder(tmp_path / "empty", 8, [0, 0, 0], [1, 1, 1])


def test_limit_spreads_over_every_class_and_replaces_unreadable_files(tmp_path):
    """A class-per-folder tree sorted by name: the first 4 of 12 files would all be class a."""
    for c, value in zip("abc", (0, 100, 200)):
        (tmp_path / c).mkdir()
        for i in range(4):
            Image.fromarray(np.full((8, 8, 3), value, np.uint8)).save(tmp_path / c / f"{i}.png")
    x = load_folder(tmp_path, 8, [0, 0, 0], [1, 1, 1], limit=3)
    assert sorted(round(float(v) * 255) for v in x[:, 0, 0, 0]) == [0, 100, 200]
    (tmp_path / "b" / "0.png").write_bytes(b"not an image")  # the pick for class b is replaced
    x = load_folder(tmp_path, 8, [0, 0, 0], [1, 1, 1], limit=3)
    assert x.shape[0] == 3
