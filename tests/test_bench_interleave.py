"""The interleaved harness: its statistics on made-up samples, and `rtfq-bench run --interleave`
with `select` on real exported models in real processes."""

from __future__ import annotations

import json
import random

import pytest

from rtfq_deploy.bench import confidence as ci
from rtfq_deploy.bench.interleave import kept_indices, kept_samples
from rtfq_deploy.budget import choose, parse_budget
from tests.test_cli import _run
from tests.test_enroll import exported  # noqa: F401  (the module's exported models)


def test_the_median_interval_covers_the_true_median_about_95_percent_of_the_time():
    rng = random.Random(1)
    hits = 0
    for _ in range(2000):
        samples = [rng.lognormvariate(0, 0.5) for _ in range(60)]  # skewed, true median 1.0
        low, high = ci.median_ci(samples)
        hits += low <= 1.0 <= high
    assert 0.93 <= hits / 2000 <= 0.985
    assert ci.median_ci([3.0, 1.0, 2.0]) == (1.0, 3.0)  # too few samples: the whole range
    p50, low, high = ci.pooled_ci([[1.0] * 20, [1.2] * 20])
    assert (low, high) == (1.0, 1.2) and p50 == 1.1  # widened to each process's own p50


def test_contended_samples_and_slow_rounds_are_left_out():
    """Three models over 100 rounds; every fourth round the host is 30% slower for all,
    and a few samples lost their core (CPU per wall 0.5). The p50 of what is kept is each
    model's quiet latency; with every sample it would not be."""
    rng = random.Random(2)
    quiet = [1.0, 2.0, 3.0]
    samples, ratios = [[], [], []], [[], [], []]
    for j in range(100):
        slow = 1.3 if j % 4 == 0 or j % 4 == 1 else 1.0
        for i, base in enumerate(quiet):
            contended = rng.random() < 0.2
            samples[i].append(base * slow * (1.6 if contended else 1.0) * rng.uniform(0.99, 1.01))
            ratios[i].append(0.5 if contended else 1.0)
    kept = kept_samples(samples, ratios, 0.25)
    for base, k, every in zip(quiet, kept, samples):
        assert abs(ci.median(k) / base - 1) < 0.011
        assert ci.median(every) / base > 1.05
    idx = kept_indices(samples, ratios, 0.25)
    assert all(j % 4 in (2, 3) for k in idx for j in k)  # only quiet rounds
    assert all(ratios[i][j] == 1.0 for i, k in enumerate(idx) for j in k)  # only clean samples


def test_doubt_names_a_choice_whose_interval_straddles_the_budget():
    entries = [{"subnet": "a", "runtime": "onnxruntime", "accuracy": 0.5, "latency_p50_ms": 1.0,
                "latency_p50_ci_ms": [0.95, 1.05]},
               {"subnet": "b", "runtime": "onnxruntime", "accuracy": 0.6, "latency_p50_ms": 2.04,
                "latency_p50_ci_ms": [1.97, 2.1]}]
    straddled = choose(entries, parse_budget("1.02ms"))
    assert "straddles the budget" in ci.doubt(straddled, entries)
    rival = choose(entries, parse_budget("2ms"))  # a chosen; b might meet it when measured again
    assert rival.entry["subnet"] == "a" and "b (more accurate) may meet it too" in ci.doubt(rival, entries)
    assert ci.doubt(choose(entries, parse_budget("3ms")), entries) is None
    assert ci.doubt(choose(entries, parse_budget("1.5ms")), entries) is None
    no_interval = [{k: v for k, v in e.items() if k != ci.CI_KEY} for e in entries]
    assert ci.doubt(choose(no_interval, parse_budget("1.02ms")), no_interval) is None


def test_bench_run_interleave_and_select_name_a_straddling_choice(exported, tmp_path):  # noqa: F811
    models = [exported / f"{s}.onnx" for s in ("r32-w0.50-q4", "r64-w1.00-q8")]
    out = tmp_path / "results.json"
    run = _run("rtfq-bench", "run", *map(str, models), "-o", str(out), "--interleave", "--processes", "2",
               "--warmup", "2", "--min-runs", "10", "--min-time", "0.1", "--max-time", "0.4")
    assert run.returncode == 0, run.stderr
    assert "round robin" in run.stderr and "Traceback" not in run.stderr
    data = json.loads(out.read_text())
    assert data["settings"]["harness"] == "interleaved" and data["settings"]["processes"] == 2
    for row in data["models"]:
        low, high = row["latency_p50_ci_ms"]
        assert row["ok"] and low <= row["latency_p50_ms"] <= high and row["harness"] == "interleaved"
        assert len(row["process_p50_ms"]) == 2 and row["rounds"] >= 20
        assert 0 < row["peak_memory_bytes"] < 2e9 and row["peak_memory_no_arena_bytes"] > 0
    big = next(r for r in data["models"] if r["subnet"] == "r64-w1.00-q8")
    table = tmp_path / "acc.json"
    table.write_text(json.dumps({"r32-w0.50-q4": 0.5, "r64-w1.00-q8": 0.7}))
    at_its_p50 = f"latency={big['latency_p50_ms']!r}ms"  # the big one meets it, inside its interval
    select = _run("rtfq-bench", "select", "--results", str(out), "--accuracy", str(table), "--budget", at_its_p50,
                  "-o", str(tmp_path / "dist"), "--no-report", "--device", "pi")
    assert select.returncode == 0, select.stderr
    assert "r64-w1.00-q8 may differ when measured again: its p50 interval" in select.stdout
    interleave_images = _run("rtfq-bench", "run", str(models[0]), "-o", str(tmp_path / "r2.json"), "--interleave",
                             "--images", str(tmp_path))
    assert interleave_images.returncode == 2 and "--interleave" in interleave_images.stderr


@pytest.mark.parametrize("share", [0.0, 1.0])
def test_without_quiet_rounds_every_clean_sample_counts(share):
    samples = [[1.0 + 0.01 * j for j in range(20)]]
    ratios = [[1.0] * 20]
    assert kept_samples(samples, ratios, share) == samples
