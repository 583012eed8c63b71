"""train/uda_ablation.py: equal-compute rows scale every phase of the recipe alike, and
the report's figures are the means they claim to be."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ablation():
    spec = importlib.util.spec_from_file_location("uda_ablation", ROOT / "train" / "uda_ablation.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _options(args: list[str]) -> dict[str, int]:
    return {args[i].lstrip("-"): int(args[i + 1]) for i in range(0, len(args), 2)}


def test_equal_compute_rows_match_rtfq_subnet_passes(ablation):
    steps = ablation.recipe_steps("synth_strong_cpu")
    recipe = json.loads((ROOT / "rtfq_deploy/train/recipes/synth_strong_cpu.json").read_text())
    assert steps["steps"] == recipe["steps"] and steps["target-start"] == recipe["target_start"]
    passes = {"sandwich-eqc": 12, "max6min-eqc": 8}  # subnets per step with three bit-widths
    for name, per_step in passes.items():
        options, share = ablation.RUNS[name]
        scaled = _options(ablation.scaled(steps, share, None))
        assert scaled["steps"] * per_step == steps["steps"] * 4  # SandwichQ: max + 2 random + min
        # every phase shrinks alike, so the target terms still start at the same share of training
        assert scaled["target-start"] / scaled["steps"] == pytest.approx(steps["target-start"] / steps["steps"], abs=0.01)
        assert scaled["rampup-steps"] / scaled["steps"] == pytest.approx(steps["rampup-steps"] / steps["steps"], abs=0.01)
    assert ablation.scaled(steps, 1.0, None) == []  # equal-step rows run the recipe as it is
    assert _options(ablation.scaled(steps, 1.0, 300))["steps"] == 300


def test_summary_and_report(ablation, tmp_path, capsys):
    subnets = [f"r{r}-w{w}-q{q}" for r in (64, 56, 48, 40) for w in ("1.00", "0.86", "0.73", "0.60") for q in (8, 6, 4)]
    top1 = {name: (0.9 if name.endswith("q8") else 0.6) for name in subnets}
    top1["r64-w1.00-q8"], top1["r40-w0.60-q4"] = 1.0, 0.5
    summary = ablation.summarise(top1)
    assert summary["max q8"] == 1.0 and summary["min q4"] == 0.5
    assert summary["q8"] == pytest.approx((15 * 0.9 + 1.0) / 16) and summary["q6"] == pytest.approx(0.6)
    assert summary["mean"] == pytest.approx(sum(top1.values()) / 48)
    results = {run: {seed: {"top1": {k: v + 0.01 * seed + (0.1 if run == "rtfq" else 0) for k, v in top1.items()},
                            "train_seconds": 10.0} for seed in (1, 2)} for run in ("source-only", "rtfq")}
    ablation.report(results, [1, 2], 5.0, tmp_path)
    out = capsys.readouterr().out
    assert "+0.100" in out  # RTF-Q minus source-only, per seed
    saved = json.loads((tmp_path / "ablation.json").read_text())
    assert saved["seeds"] == [1, 2] and saved["summary"]["rtfq"]["2"]["max q8"] == pytest.approx(1.12)
    assert (tmp_path / "ablation.png").stat().st_size > 1000



@pytest.mark.parametrize("script", ["uda_ablation.py", "mpq_ablation.py", "alignq_ablation.py"])
@pytest.mark.parametrize("out", ["", "  "])
def test_an_empty_out_folder_is_one_line_and_exit_2(script, out, tmp_path):
    import subprocess
    import sys

    got = subprocess.run([sys.executable, str(ROOT / "train" / script), "--out", out], cwd=tmp_path,
                         capture_output=True, text=True)
    assert got.returncode == 2 and got.stderr.strip().splitlines()[-1].endswith("argument --out: empty path")
    assert list(tmp_path.iterdir()) == []


def test_out_folder_is_absolute_and_a_nul_is_refused(tmp_path, monkeypatch):
    from rtfq_deploy.ablation import out_dir

    monkeypatch.chdir(tmp_path)
    assert out_dir("runs") == tmp_path.resolve() / "runs"
    with pytest.raises(Exception, match="not a usable path"):  # argv cannot carry a NUL; Python callers can
        out_dir("a\0b")
