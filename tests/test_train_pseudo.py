"""Where the target's pseudo-labels come from: SHOT's clustering labels (rtfq_deploy.train.pseudo,
--pseudo-labels centroid) and the teacher's weak view for strongly augmented students
(--target-aug strong)."""

from __future__ import annotations

import json

import pytest
import torch

from rtfq_deploy.errors import RtfqError
from rtfq_deploy.train.config import TrainConfig
from rtfq_deploy.train.losses import LossWeights
from rtfq_deploy.train.pseudo import ClusterLabels, centroid_labels
from tests.test_cli import _one_line_error, _run
from tests.test_train import FAST, _train, kill_after_logged_step, setup  # noqa: F401  (the module fixture)


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
    logits = torch.zeros(len(truth), 5)
    logits[torch.arange(len(truth)), truth] = 1.0  # classes 3 and 4: never the top prediction
    probs = torch.softmax(logits, dim=1)  # yet every class has some probability everywhere
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
    assert not any("pseudo_rate" in r for r in rows[2:])  # every image labelled, no confidence threshold
    state = torch.load(tmp_path / "whole" / "state.pt", weights_only=True)
    n_target = sum(1 for p in (setup / "data" / "target").rglob("*.png"))
    assert state["pseudo_labels"].shape == (n_target,) and state["pseudo_labels"].max() < 3
    run = tmp_path / "killed"
    args = ["--checkpoint", str(setup / "init.pt"), "--source", str(setup / "data" / "source"), "--target",
            str(setup / "data" / "target"), "--out", str(run), *FAST, *steps]
    kill_after_logged_step(args, run, 5)
    # the last saved state lies strictly between two label refreshes (steps 2, 5, 8): step 4,
    # or step 6 where a fast machine got one more step done before the kill landed
    assert torch.load(run / "state.pt", weights_only=True)["step"] in (4, 6) and not (run / "supernet.pt").exists()
    resumed = _run("rtfq-train", "--resume", str(run))
    assert resumed.returncode == 0, resumed.stderr
    a = torch.load(tmp_path / "whole" / "state.pt", weights_only=True)
    b = torch.load(run / "state.pt", weights_only=True)
    assert torch.equal(a["pseudo_labels"], b["pseudo_labels"])
    for name, x in a["student"].items():
        torch.testing.assert_close(b["student"][name], x, rtol=1e-5, atol=1e-6, msg=name)


def test_strong_views_keep_the_weak_views_windows_and_are_deterministic():
    from rtfq_deploy.data.pipeline import augment
    from rtfq_deploy.formats import IMAGENET_NORMALIZATION

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


def test_strong_target_views_train_on_the_teachers_weak_view_labels(setup, tmp_path, monkeypatch):  # noqa: F811
    """In process, recording what each network sees and which labels the loss gets: the
    teacher only weak target views, the subnets strong ones, the labels the teacher's."""
    from rtfq_deploy.models.resnet import ResNet
    from rtfq_deploy.train import loop

    views: dict[bool, list[torch.Tensor]] = {False: [], True: []}
    seen: dict[str, list[torch.Tensor]] = {"teacher": [], "student": []}
    teacher_labels: list[torch.Tensor] = []
    used_labels: list[torch.Tensor] = []
    augment, forward, step_losses = loop.augment, ResNet.forward, loop.step_losses

    def recording_augment(*args, strong=False, **kw):
        out = augment(*args, strong=strong, **kw)
        views[strong].append(out)
        return out

    def recording_forward(self, x, net):
        logits = forward(self, x, net)
        who = "student" if next(self.parameters()).requires_grad else "teacher"
        seen[who].append(x.detach().clone())
        if who == "teacher":
            teacher_labels.append(logits.argmax(1))
        return logits

    def recording_step_losses(*args, **kw):
        used_labels.append(args[-1][0])  # target_labels, passed positionally
        return step_losses(*args, **kw)

    monkeypatch.setattr(loop, "augment", recording_augment)
    monkeypatch.setattr(ResNet, "forward", recording_forward)
    monkeypatch.setattr(loop, "step_losses", recording_step_losses)
    cfg = TrainConfig(steps=2, batch_size=16, lr=0.002, log_every=1, calib_images=16, workers=0,
                      target_aug="strong", losses=LossWeights(threshold=0.0))
    run = loop.Run.create(tmp_path / "s", cfg, setup / "init.pt", setup / "data" / "source",
                          setup / "data" / "target", loop.Distributed())
    run.train()
    strong, weak = views[True], views[False]
    assert len(strong) == 2  # one strong target view per step
    assert len(seen["teacher"]) == 2 and all(any(torch.equal(x, v) for v in weak) for x in seen["teacher"])
    assert not any(torch.equal(x, v) for x in seen["teacher"] for v in strong)
    batch = [x for x in seen["student"] if x.shape == strong[0].shape]
    assert sum(any(torch.equal(x, v) for v in strong) for x in batch) >= 2  # the top subnets see strong views
    assert not any(torch.equal(x, v) for x in batch for v in seen["teacher"])  # never the teacher's weak one
    assert len(used_labels) == 2
    for used, labels in zip(used_labels, teacher_labels):
        assert torch.equal(used, labels)  # threshold 0: every teacher label, as the loss's labels


def test_strong_aug_settings_are_checked(setup, tmp_path):  # noqa: F811
    _one_line_error(_train(setup, tmp_path / "t", "--target-aug", "heavy"), "heavy")
    _one_line_error(_train(setup, tmp_path / "u", "--source-aug", "heavy"), "heavy")
    with pytest.raises(RtfqError, match="weak or strong"):
        TrainConfig(source_aug="heavy")


def test_step_losses_train_on_the_labels_they_are_given():
    from rtfq_deploy.models import SupernetConfig, build_supernet
    from rtfq_deploy.train.step import step_losses
    from tests.test_train import SPACE

    torch.manual_seed(0)
    model = build_supernet(SupernetConfig("tiny_resnet", num_classes=3, space=SPACE)).train()
    xs, xt = torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32)
    ys = torch.tensor([0, 1, 2, 0])
    cfg = TrainConfig(losses=LossWeights(distill=0.0, im=0.0, pseudo=1.0, threshold=0.0))
    given = torch.tensor([2, 2, 1, 0])
    for mask in (None, torch.tensor([True, False, True, True])):
        totals = step_losses(model, model, [SPACE.maxnet], xs, ys, xt, None, cfg, lambda loss, last: None,
                             target_labels=(given, mask))
        with torch.no_grad():
            per_image = torch.nn.functional.cross_entropy(model(xt, model.active(SPACE.maxnet)), given,
                                                          reduction="none")
        expected = per_image.mean() if mask is None else (per_image * mask).sum() / 4
        assert totals["pseudo"] == pytest.approx(float(expected), rel=1e-4)
        assert ("pseudo_rate" in totals) == (mask is not None)


def test_two_process_run_shares_rank_0s_clustering_labels(setup, tmp_path):  # noqa: F811
    import os
    import subprocess
    import sys
    from pathlib import Path

    out = tmp_path / "ddp"
    args = ["--checkpoint", str(setup / "init.pt"), "--source", str(setup / "data" / "source"), "--target",
            str(setup / "data" / "target"), "--out", str(out), *FAST, "--steps", "3", "--pseudo-labels", "centroid",
            "--pseudo-every", "2", "--w-pseudo", "1", "--target-aug", "strong", "-v"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RTFQ_BACKEND": "gloo"}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             str(Path(sys.executable).parent / "rtfq-train"), *args], capture_output=True, text=True,
                            timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "all 2 processes hold identical weights" in result.stderr
    state = torch.load(out / "state.pt", weights_only=True)
    assert state["pseudo_labels"].shape == (sum(1 for _ in (setup / "data" / "target").rglob("*.png")),)
