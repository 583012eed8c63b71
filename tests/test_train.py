"""End to end: synth -> init -> train -> eval, resume after SIGKILL, 2-process DDP."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from rtfq_deploy.checkpoint import load_checkpoint, save_checkpoint
from rtfq_deploy.data.synth import SynthConfig, generate
from rtfq_deploy.models import SupernetConfig, build_supernet
from rtfq_deploy.space import SearchSpace
from rtfq_deploy.train.config import ADAM_STEP_LR_SCALE, TrainConfig
from rtfq_deploy.train.step import ema_update, lr_at, make_optimizer, rampup
from tests.test_cli import _one_line_error, _run

SPACE = SearchSpace(resolutions=(32, 24), widths=(1.0, 0.5), bits=(8, 4))
FAST = ["--batch-size", "16", "--lr", "0.002", "--log-every", "1", "--calib-images", "16", "--workers", "0"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    generate(root / "data", SynthConfig(classes=3, per_class=8, test_per_class=4, size=32, seed=0))
    torch.manual_seed(0)
    save_checkpoint(root / "init.pt", build_supernet(SupernetConfig("tiny_resnet", num_classes=3, space=SPACE)))
    return root


def _train(setup: Path, out: Path, *extra: str, exe: list[str] | None = None, **kw) -> subprocess.CompletedProcess:
    args = ["--checkpoint", str(setup / "init.pt"), "--source", str(setup / "data" / "source"),
            "--target", str(setup / "data" / "target"), "--out", str(out), *FAST, *extra]
    return _run("rtfq-train", *args)


def test_train_then_eval_gives_one_row_per_subnet(setup, tmp_path):
    out = tmp_path / "run"
    result = _train(setup, out, "--steps", "4")
    assert result.returncode == 0, result.stderr
    assert "step 4/4" in result.stderr and "img/s" in result.stderr and "distill" in result.stderr
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [0, 1, 2, 3]
    assert all({"ce", "distill", "pseudo", "im", "images_per_s", "lr"} <= r.keys() for r in lines)
    ckpt = load_checkpoint(out / "supernet.pt")
    assert sorted(ckpt.bn_stats) == sorted(str(c) for c in SPACE)
    assert ckpt.meta["class_names"] == ["circle", "square", "triangle"]
    assert ckpt.meta["normalization"]["mean"] == [0.485, 0.456, 0.406]
    acc = tmp_path / "acc.json"
    result = _run("rtfq", "eval", "--checkpoint", str(out / "supernet.pt"), "--data", str(setup / "data" / "target_test"),
                  "-o", str(acc), "--json")
    assert result.returncode == 0, result.stderr
    table = json.loads(acc.read_text())
    assert sorted(r["subnet"] for r in table["subnets"]) == sorted(str(c) for c in SPACE)
    assert all(0.0 <= r["top1"] <= 1.0 and r["images"] == 12 and r["macs"] > 0 for r in table["subnets"])
    assert json.loads(result.stdout) == table["subnets"]
    from rtfq_deploy.export.select import read_accuracy

    assert set(read_accuracy(acc)) == {str(c) for c in SPACE}  # what rtfq-export --accuracy reads
    _one_line_error(_run("rtfq", "eval", "--checkpoint", str(out / "supernet.pt"), "--data",
                         str(setup / "data" / "target_test"), "-o", str(acc)), "exists")


def test_source_only_trains_no_target_terms(setup, tmp_path):
    result = _train(setup, tmp_path / "so", "--steps", "2", "--source-only")
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in (tmp_path / "so" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["distill"] == 0 and r["pseudo"] == 0 and r["im"] == 0 for r in rows)


def kill_after_logged_step(args: list[str], run: Path, step: int) -> None:
    """Start rtfq-train with ``args`` and SIGKILL it once ``run``'s metrics log ``step``."""
    proc = subprocess.Popen([str(Path(sys.executable).parent / "rtfq-train"), *args], stderr=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, text=True)
    deadline = time.monotonic() + 900  # a slow or busy machine: wait, rather than kill too early
    metrics = run / "metrics.jsonl"

    def logged() -> bool:
        return metrics.exists() and any(json.loads(line)["step"] >= step for line in metrics.read_text().splitlines())

    reached = False
    while time.monotonic() < deadline and not (reached := logged()) and proc.poll() is None:
        time.sleep(0.02)
    reached = reached or logged()
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert reached, f"rtfq-train never logged step {step} (exit {proc.returncode}): {proc.stderr.read()[-2000:]}"


def test_resume_after_sigkill_matches_an_uninterrupted_run(setup, tmp_path):
    steps = ["--steps", "8", "--checkpoint-every", "2"]
    whole = _train(setup, tmp_path / "whole", *steps)
    assert whole.returncode == 0, whole.stderr
    run = tmp_path / "killed"
    args = ["--checkpoint", str(setup / "init.pt"), "--source", str(setup / "data" / "source"), "--target",
            str(setup / "data" / "target"), "--out", str(run), *FAST, *steps]
    kill_after_logged_step(args, run, 5)  # the state of step 4 is saved by then
    assert not (run / "supernet.pt").exists()
    state = torch.load(run / "state.pt", weights_only=True)  # whole, never half-written
    assert 4 <= state["step"] < 8
    _one_line_error(_run("rtfq-train", "--resume", str(run), "--steps", "9"), "drop --steps")
    resumed = _run("rtfq-train", "--resume", str(run))
    assert resumed.returncode == 0, resumed.stderr
    a, b = load_checkpoint(tmp_path / "whole" / "supernet.pt"), load_checkpoint(run / "supernet.pt")
    for (name, x), (_, y) in zip(a.model.state_dict().items(), b.model.state_dict().items()):
        torch.testing.assert_close(y, x, rtol=1e-5, atol=1e-6, msg=name)
    steps_logged = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps_logged == list(range(8))  # lines of the killed run past its saved state were dropped


def test_two_process_gloo_ddp_run_keeps_ranks_in_sync(setup, tmp_path):
    script = Path(sys.executable).parent / "rtfq-train"
    out = tmp_path / "ddp"
    args = ["--checkpoint", str(setup / "init.pt"), "--source", str(setup / "data" / "source"), "--target",
            str(setup / "data" / "target"), "--out", str(out), *FAST, "--steps", "3", "-v"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RTFQ_BACKEND": "gloo"}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             str(script), *args], capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "all 2 processes hold identical weights" in result.stderr
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2]  # written once, by rank 0
    assert len(load_checkpoint(out / "supernet.pt").bn_stats) == len(SPACE)


def test_bad_inputs_give_one_line(setup, tmp_path):
    _one_line_error(_run("rtfq-train", "--source", "x"), "missing --checkpoint")
    _one_line_error(_run("rtfq-train", "--resume", str(tmp_path)), "no run to resume")
    _one_line_error(_train(setup, tmp_path / "b", "--batch-size", "5"), "must be even")
    bad = tmp_path / "bad_target"
    (bad / "circle").mkdir(parents=True)
    (bad / "circle" / "x.png").write_bytes((setup / "data" / "target" / "circle" / "00000.png").read_bytes())
    result = _run("rtfq-train", "--checkpoint", str(setup / "init.pt"), "--source", str(setup / "data" / "source"),
                  "--target", str(bad), "--out", str(tmp_path / "c"), *FAST)
    _one_line_error(result, "class lists differ")
    torch.manual_seed(0)
    save_checkpoint(tmp_path / "five.pt", build_supernet(SupernetConfig("tiny_resnet", num_classes=5, space=SPACE)))
    result = _run("rtfq-train", "--checkpoint", str(tmp_path / "five.pt"), "--source", str(setup / "data" / "source"),
                  "--target", str(setup / "data" / "target"), "--out", str(tmp_path / "d"), *FAST)
    _one_line_error(result, "the data has 3 classes but the supernet has 5")
    recipe = tmp_path / "r.json"
    recipe.write_text('{"stepz": 3}')
    _one_line_error(_train(setup, tmp_path / "e", "--recipe", str(recipe)), "unknown training settings: stepz")
    done = tmp_path / "done"
    assert _train(setup, done, "--steps", "1").returncode == 0
    _one_line_error(_train(setup, done, "--steps", "1"), "already holds a run")


def test_ema_and_lr_schedule():
    a, b = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    before = a.weight.detach().clone()
    ema_update(a, b, 0.9)
    torch.testing.assert_close(a.weight, 0.9 * before + 0.1 * b.weight.detach())
    cfg = TrainConfig(steps=100, lr=1.0, warmup_steps=10)
    assert lr_at(cfg, 0) == pytest.approx(0.1) and lr_at(cfg, 9) == pytest.approx(1.0)
    assert lr_at(cfg, 10) == pytest.approx(1.0) and lr_at(cfg, 55) == pytest.approx(0.5)
    assert lr_at(cfg, 100) == pytest.approx(0.0, abs=1e-12)


def test_step_sizes_get_their_own_lr_scaled_for_the_optimizer():
    torch.manual_seed(0)
    model = build_supernet(SupernetConfig("tiny_resnet", num_classes=3, space=SPACE))
    steps = {id(q.step) for _, q in model.quantizers()}

    def step_group(cfg: TrainConfig) -> dict:
        (group,) = [g for g in make_optimizer(model, cfg).param_groups if {id(p) for p in g["params"]} == steps]
        return group

    # Adam moves a parameter by about lr whatever its gradient scale: tiny 8-bit steps get a
    # twentieth of the weights' lr; SGD keeps LSQ's gradient scale in charge.
    assert step_group(TrainConfig()).get("lr_scale") == ADAM_STEP_LR_SCALE
    assert step_group(TrainConfig(optimizer="sgd"))["lr_scale"] == 1.0
    assert step_group(TrainConfig(step_lr_scale=0.3))["lr_scale"] == 0.3
    assert len(make_optimizer(model, TrainConfig()).param_groups) == 2  # a third only when needed (old states load)
    assert TrainConfig().to_dict()["step_lr_scale"] == ADAM_STEP_LR_SCALE  # run.json records the value used
    assert step_group(TrainConfig())["weight_decay"] == 0.0


def test_a_learned_log_sigma_is_paced_like_the_weights_without_weight_decay():
    # at the step sizes' twentieth, log sigma could move about 3% over a 600-step recipe
    model = build_supernet(SupernetConfig("tiny_resnet", num_classes=3, space=SPACE, act_quantizer="alignq-learned"))
    sigmas = {id(q.log_sigma) for _, q in model.quantizers() if q.channels is None}
    groups = make_optimizer(model, TrainConfig(weight_decay=0.1)).param_groups
    (group,) = [g for g in groups if {id(p) for p in g["params"]} == sigmas]
    assert group["lr_scale"] == 1.0 and group["weight_decay"] == 0.0 and len(groups) == 3
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))


@pytest.mark.parametrize("name", ["synth_cpu", "synth_strong_cpu", "synth_strong_paper_cpu", "office31", "officehome", "domainnet"])
def test_built_in_recipes_are_valid_settings(name):
    from rtfq_deploy.cli.train import _read_recipe

    settings = _read_recipe(Path(name))  # found by name, as --recipe NAME does
    cfg = TrainConfig.from_dict(settings)
    assert cfg.optimizer == "adam" and cfg.step_lr_scale == ADAM_STEP_LR_SCALE
    assert cfg.to_dict() == TrainConfig.from_dict(cfg.to_dict()).to_dict()  # what run.json stores reloads


def test_target_terms_start_late_and_ramp_up():
    cfg = TrainConfig(steps=100, target_start=20, rampup_steps=10)
    assert rampup(cfg, 0) == 0.0 and rampup(cfg, 19) == 0.0
    assert rampup(cfg, 20) == pytest.approx(math.exp(-5.0))
    assert rampup(cfg, 25) == pytest.approx(math.exp(-5.0 * 0.25))
    assert rampup(cfg, 30) == 1.0 and rampup(TrainConfig(steps=100), 0) == 1.0



def test_the_loop_module_keeps_the_names_that_moved_by_job():
    from rtfq_deploy.train import distributed, loop, state, step

    assert loop.step_losses is step.step_losses and loop.lr_at is step.lr_at and loop.rampup is step.rampup
    assert loop.make_optimizer is step.make_optimizer and loop.ema_update is step.ema_update
    assert loop.STATE_FORMAT == state.STATE_FORMAT == "rtfq-train-state" and loop.Diverged is state.Diverged
    assert loop.Distributed is distributed.Distributed and loop.distributed_from_env is distributed.distributed_from_env
