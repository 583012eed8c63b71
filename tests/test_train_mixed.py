"""Mixed-precision training: the rule, the bit-width scheduler, IDM and exact resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from rtfq_deploy.checkpoint import load_checkpoint, save_checkpoint
from rtfq_deploy.errors import RtfqError
from rtfq_deploy.data.synth import SynthConfig, generate
from rtfq_deploy.models import SupernetConfig, build_supernet
from rtfq_deploy.space import SearchSpace
from rtfq_deploy.train.config import TrainConfig
from rtfq_deploy.planfile import free_quantizers
from rtfq_deploy.train.mixed import BitScheduler, DistortionMitigation, MixedRule, conv_bn_pairs, unstable_score
from rtfq_deploy.train.sampler import step_rng
from tests.test_cli import _one_line_error, _run
from tests.test_train import kill_after_logged_step

SPACE = SearchSpace(resolutions=(32, 24), widths=(1.0, 0.5), bits=(6, 4, 2))
FAST = ["--batch-size", "16", "--lr", "0.002", "--log-every", "1", "--calib-images", "16", "--workers", "0"]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_supernet(SupernetConfig("tiny_resnet", num_classes=3, space=SPACE))


def test_the_rule_trains_the_max_plan_then_random_per_quantizer_plans(model):
    rule = MixedRule.for_model(model, n=3)
    free = set(free_quantizers(model))
    fixed = {n for n, _ in model.quantizers()} - free
    assert fixed == {"q_input", "conv1.weight_quant", "q_pool", "fc.weight_quant"} | {
        n for n, q in model.quantizers() if q.role == "residual"}
    seen = {n: set() for n in free}
    for step in range(40):
        plans = rule(step_rng(0, step))
        assert plans[0] == SPACE.maxnet and len(plans) == 4
        assert plans == rule(step_rng(0, step))  # a pure function of (seed, step)
        for sub in plans[1:]:
            bits = model.plan(sub).as_dict()  # checks the plan against the supernet too
            assert all(bits[n] == 8 for n in fixed)
            for n in free:
                seen[n].add(bits[n])
    assert all(v == {6, 4, 2} for v in seen.values())  # weights and activations each choose every candidate
    frozen = frozenset(sorted(free)[:5])
    for step in range(40):
        for sub in rule(step_rng(1, step), frozen)[1:]:
            assert all(sub.bits.as_dict()[n] != 2 for n in frozen)


def test_unstable_score_counts_weights_near_rounding_boundaries(model):
    layer = dict(model.layers())["layer2.0.conv1"]
    q = layer.weight_quant
    step = q.scale(2, layer.weight.shape[0]).detach().reshape(-1, 1, 1, 1)
    on_grid = torch.zeros_like(layer.weight)  # every weight exactly on a level of every bit-width
    halfway = 0.5 * step.expand_as(layer.weight)  # halfway between levels 0 and 1 at 2 bits
    assert unstable_score(on_grid, q, (2,)) == 0.0
    assert unstable_score(halfway, q, (2,)) == pytest.approx(0.5)  # 1/2^(2-1) x all weights


def test_scheduler_freezes_the_least_stable_layers_on_a_cosine(model):
    s = BitScheduler(start=10, period=5, steps=110)
    assert s.k_at(10) == pytest.approx(0.5) and s.k_at(110) == pytest.approx(0.2) and s.k_at(60) == pytest.approx(0.35)
    assert [t for t in range(30) if s.due(t)] == [10, 15, 20, 25]
    free = set(free_quantizers(model))
    weights = [n for n, layer in model.layers() if layer.weight_quant.name in free]
    layers = dict(model.layers())
    with torch.no_grad():
        for n in weights:  # all stable except one layer, moved to rounding boundaries
            w, q = layers[n].weight, layers[n].weight_quant
            w.copy_(q.quantize(w, 2))
        w, q = layers[weights[3]].weight, layers[weights[3]].weight_quant
        w.add_(0.5 * q.scale(2, w.shape[0]).reshape(-1, 1, 1, 1))
    s.update(model, free, SPACE.bits, step=110)
    assert len(s.frozen) == round(0.2 * len(weights)) and f"{weights[3]}.weight_quant" in s.frozen
    restored = BitScheduler(10, 5, 110)
    restored.load(json.loads(json.dumps(s.state())))
    assert restored.frozen == s.frozen


def test_idm_aligns_lowest_bit_layers_of_same_shape_plans(model):
    pairs = conv_bn_pairs(model)
    convs = [layer.weight_quant.name for n, layer in model.layers() if n != "fc"]
    assert sorted(pairs) == sorted(convs)  # every conv has its BatchNorm
    down = next(n for n, _ in model.layers() if n.endswith("downsample.0"))
    assert pairs[f"{down}.weight_quant"] == down[:-1] + "1"
    idm = DistortionMitigation(model, lowest=2)
    rule = MixedRule.for_model(model, n=1)
    top = SPACE.maxnet
    for step in range(20):
        sub = rule(step_rng(0, step))[1]
        names = idm.targets(sub, top)
        if (sub.resolution, sub.width) != (top.resolution, top.width):
            assert names == set()
        else:
            low = {pairs[q] for q, b in sub.bits.as_dict().items() if q in pairs and b == 2}
            assert names == low
    x = torch.randn(2, 3, 32, 32)
    model.train()
    with idm.capture({"bn1", "layer1.0.bn1"}) as outputs:
        model(x, model.active(top))
    assert set(outputs) == {"bn1", "layer1.0.bn1"}
    same = DistortionMitigation.loss(outputs, {k: v.detach() for k, v in outputs.items()})
    assert float(same.detach()) == 0.0 and same.requires_grad


def test_mixed_settings_resolve_and_are_checked():
    cfg = TrainConfig(rule="mixed", steps=300)
    assert (cfg.inplace_distill, cfg.scheduler_start, cfg.scheduler_period, cfg.idm) == (0.5, 30, 10, 0.01)
    assert TrainConfig(steps=300).inplace_distill == 0.0
    for bad in ({"idm": -1.0}, {"inplace_distill": 2.0}, {"scheduler_period": 0}, {"scheduler": "yes"}):
        with pytest.raises(RtfqError):
            TrainConfig(rule="mixed", **bad)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("mixed")
    generate(root / "data", SynthConfig(classes=3, per_class=8, test_per_class=4, size=32, seed=0))
    torch.manual_seed(0)
    save_checkpoint(root / "init.pt", build_supernet(SupernetConfig("tiny_resnet", num_classes=3, space=SPACE)))
    return root


def _args(setup: Path, out: Path, *extra: str) -> list[str]:
    return ["--checkpoint", str(setup / "init.pt"), "--source", str(setup / "data" / "source"),
            "--target", str(setup / "data" / "target"), "--out", str(out), "--rule", "mixed", "--n-random", "2",
            "--scheduler-start", "1", "--scheduler-period", "2", *FAST, *extra]


def test_mixed_training_logs_its_terms_and_resumes_exactly_after_sigkill(setup, tmp_path):
    steps = ["--steps", "8", "--checkpoint-every", "4"]
    whole = _run("rtfq-train", *_args(setup, tmp_path / "whole", *steps))
    assert whole.returncode == 0, whole.stderr
    rows = [json.loads(line) for line in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["inplace"] > 0 for r in rows) and any(r.get("idm", 0) > 0 for r in rows)
    assert "inplace" in whole.stderr
    record = json.loads((tmp_path / "whole" / "run.json").read_text())["config"]
    assert record["rule"] == "mixed" and record["inplace_distill"] == 0.5 and record["scheduler"] is True
    run = tmp_path / "killed"
    kill_after_logged_step(_args(setup, run, *steps), run, 5)  # the state of step 4 is saved by then
    state = torch.load(run / "state.pt", weights_only=True)
    assert state["step"] == 4 and state["scheduler"]["frozen"]  # step 3's freeze, needed at steps 4 and 5
    _one_line_error(_run("rtfq-train", "--resume", str(run), "--no-idm"), "drop --no-idm")
    resumed = _run("rtfq-train", "--resume", str(run))
    assert resumed.returncode == 0, resumed.stderr
    a, b = load_checkpoint(tmp_path / "whole" / "supernet.pt"), load_checkpoint(run / "supernet.pt")
    for (name, x), (_, y) in zip(a.model.state_dict().items(), b.model.state_dict().items()):
        torch.testing.assert_close(y, x, rtol=1e-5, atol=1e-6, msg=name)


def test_ablation_flags_switch_the_terms_off(setup, tmp_path):
    result = _run("rtfq-train", *_args(setup, tmp_path / "abl", "--steps", "2", "--no-idm", "--no-scheduler",
                                       "--inplace-distill", "0"))
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in (tmp_path / "abl" / "metrics.jsonl").read_text().splitlines()]
    assert all("idm" not in r and "inplace" not in r for r in rows)
    state = torch.load(tmp_path / "abl" / "state.pt", weights_only=True)
    assert "scheduler" not in state
    _one_line_error(_run("rtfq-train", *_args(setup, tmp_path / "bad", "--idm", "nan")), "--idm")
