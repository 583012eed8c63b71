"""Where the target's pseudo-labels come from: SHOT's clustering labels (rtfq_deploy.train.pseudo,
--pseudo-labels centroid) and the teacher's weak view for strongly augmented students
(--target-aug strong)."""

from __future__ import annotations

import json

import pytest
import torch

from rtfq_deploy.errors import RtfqError
from rtfq_deploy.train.config import TrainConfig
from rtfq_deploy.train.pseudo import ClusterLabels, centroid_labels
from tests.test_cli import _one_line_error, _run
from tests.test_train import _train, kill_after_logged_step, setup  # noqa: F401  (the module fixture)


def _clusters(n_per: int, k: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(k, 16, generator=g) * 4
    truth = torch.arange(k).repeat_interleave(n_per)
    return centres[truth] + torch.randn(len(truth), 16, generator=g), truth


def test_centroids_correct_a_classifier_that_is_wrong_on_a_third_of_each_cluster():
    features, truth = _clusters(60, 4)
    g = torch.Generator().manual_seed(1)
    wrong = torch.rand(len(truth), generator=g) < 0.35
    predicted = torch.where(wrong, (truth + 1 + torch.randint(0, 3, truth.shape, generator=g)) % 4, truth)
    probs = torch.nn.functional.one_hot(predicted, 4).float() * 0.6 + 0.1
    assert (predicted == truth).float().mean() < 0.7
    labels = centroid_labels(features, probs)
    assert (labels == truth).float().mean() > 0.98  # one cluster, one label: the majority's


def test_a_class_nobody_predicts_gets_no_centroid():
    features, truth = _clusters(30, 3)
    probs = torch.zeros(len(truth), 5)
    probs[torch.arange(len(truth)), truth] = 1.0  # classes 3 and 4: never predicted
    labels = centroid_labels(features, probs)
    assert torch.equal(labels, truth)


def test_state_is_checked_when_a_run_resumes():
    images = torch.zeros(6, 3, 8, 8, dtype=torch.uint8)
    clusters = ClusterLabels(images, {"mean": [0, 0, 0], "std": [1, 1, 1]}, start=10, every=5, seed=0, classes=3)
    assert not clusters.due(9) and clusters.due(10)
    clusters.load(torch.tensor([0, 1, 2, 2, 1, 0]))
    assert not clusters.due(12) and clusters.due(15) and clusters.due(20)
    assert torch.equal(clusters.batch([5, 0]), torch.tensor([0, 0]))
    for bad in (torch.tensor([0, 1, 2]), torch.tensor([0, 1, 2, 3, 0, 0]), torch.tensor([0, 1, 2, -1, 0, 0]),
                torch.zeros(6), "labels", [0, 1, 2, 2, 1, 0]):
        with pytest.raises(ValueError):
            clusters.load(bad)


def test_bad_settings_give_one_line(setup, tmp_path):  # noqa: F811
    _one_line_error(_train(setup, tmp_path / "a", "--pseudo-labels", "kmeans"), "kmeans")
    _one_line_error(_train(setup, tmp_path / "b", "--pseudo-every", "0"), "--pseudo-every")
    _one_line_error(_train(setup, tmp_path / "c", "--pseudo-every", "nan"), "--pseudo-every")
    recipe = tmp_path / "nocache.json"
    recipe.write_text('{"cache_mb": 0, "pseudo_labels": "centroid"}')
    _one_line_error(_train(setup, tmp_path / "d", "--recipe", str(recipe), "--steps", "2"), "decoded up front")
    with pytest.raises(RtfqError, match="confident or centroid"):
        TrainConfig(pseudo_labels="kmeans")


def test_centroid_run_labels_every_target_image_and_resumes_exactly(setup, tmp_path):  # noqa: F811
    steps = ["--steps", "8", "--checkpoint-every", "2", "--pseudo-labels", "centroid", "--pseudo-every", "3",
             "--target-start", "2", "--w-pseudo", "1"]
    whole = _train(setup, tmp_path / "whole", *steps)
    assert whole.returncode == 0, whole.stderr
    rows = [json.loads(line) for line in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["pseudo"] == 0 for r in rows[:2]) and all(r["pseudo"] > 0 for r in rows[2:])
    assert all(r["pseudo_rate"] == 1.0 for r in rows[2:])  # every image labelled, none thresholded
    state = torch.load(tmp_path / "whole" / "state.pt", weights_only=True)
    n_target = sum(1 for p in (setup / "data" / "target").rglob("*.png"))
    assert state["pseudo_labels"].shape == (n_target,) and state["pseudo_labels"].max() < 3
    run = tmp_path / "killed"
    args = ["--checkpoint", str(setup / "init.pt"), "--source", str(setup / "data" / "source"), "--target",
            str(setup / "data" / "target"), "--out", str(run), "--batch-size", "16", "--lr", "0.002",
            "--log-every", "1", "--calib-images", "16", "--workers", "0", *steps]
    kill_after_logged_step(args, run, 5)  # state of step 4 saved: between the refreshes of steps 2 and 5
    resumed = _run("rtfq-train", "--resume", str(run))
    assert resumed.returncode == 0, resumed.stderr
    a = torch.load(tmp_path / "whole" / "state.pt", weights_only=True)
    b = torch.load(run / "state.pt", weights_only=True)
    assert torch.equal(a["pseudo_labels"], b["pseudo_labels"])
    for name, x in a["student"].items():
        torch.testing.assert_close(b["student"][name], x, rtol=1e-5, atol=1e-6, msg=name)


def test_strong_views_keep_the_weak_views_windows_and_are_deterministic():
    from rtfq_deploy.data.pipeline import IMAGENET_NORMALIZATION, augment

    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (6, 3, 40, 40), generator=g, dtype=torch.uint8)
    weak = augment(images, 32, 0, 1, 7, IMAGENET_NORMALIZATION)
    strong = augment(images, 32, 0, 1, 7, IMAGENET_NORMALIZATION, strong=True)
    assert torch.equal(strong, augment(images, 32, 0, 1, 7, IMAGENET_NORMALIZATION, strong=True))
    assert not torch.equal(strong, augment(images, 32, 0, 1, 8, IMAGENET_NORMALIZATION, strong=True))
    assert torch.equal(weak, augment(images, 32, 0, 1, 7, IMAGENET_NORMALIZATION))  # the weak view is unchanged
    mean = torch.tensor(IMAGENET_NORMALIZATION["mean"]).reshape(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_NORMALIZATION["std"]).reshape(1, 3, 1, 1)
    pixels = strong * std + mean
    assert pixels.min() >= -1e-6 and pixels.max() <= 1 + 1e-6
    assert ((pixels - 0.5).abs() < 1e-6).flatten(1).float().mean(1).min() >= 0.03  # a grey cutout in each
    weak_pixels = weak * std + mean  # the same window: a strong view correlates with its own weak view
    own = [torch.corrcoef(torch.stack([pixels[i].flatten(), weak_pixels[i].flatten()]))[0, 1] for i in range(6)]
    other = [torch.corrcoef(torch.stack([pixels[i].flatten(), weak_pixels[(i + 1) % 6].flatten()]))[0, 1]
             for i in range(6)]
    assert sum(abs(float(c)) for c in own) > 3 * sum(abs(float(c)) for c in other)


def test_strong_target_views_train_on_the_teachers_confident_labels(setup, tmp_path):  # noqa: F811
    result = _train(setup, tmp_path / "s", "--steps", "3", "--target-aug", "strong", "--threshold", "0")
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in (tmp_path / "s" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["pseudo_rate"] == 1.0 and r["pseudo"] > 0 for r in rows)  # threshold 0: every teacher label
    record = json.loads((tmp_path / "s" / "run.json").read_text())
    assert record["config"]["target_aug"] == "strong"
    _one_line_error(_train(setup, tmp_path / "t", "--target-aug", "heavy"), "heavy")
