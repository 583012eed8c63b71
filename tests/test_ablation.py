"""rtfq_deploy.ablation, the harness of train/*_ablation.py: resume trains only what is
missing, the report's mean ± std, one-line errors, and no sys.path edits in the scripts."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from rtfq_deploy import ablation

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ["uda_ablation.py", "mpq_ablation.py", "alignq_ablation.py"]


@pytest.fixture
def fake_tools(monkeypatch):
    """``sh`` stand-in: records every command; ``rtfq eval -o X`` writes a one-subnet table."""
    calls: list[list[str]] = []

    def sh(*args: str, env=None, log=None) -> None:  # noqa: ANN001
        calls.append(list(args))
        if Path(args[0]).name == "rtfq" and args[1] == "eval":
            out = Path(args[args.index("-o") + 1])
            out.write_text(json.dumps({"subnets": [{"subnet": "r64-w1.00-q8", "top1": 0.5}]}))

    monkeypatch.setattr(ablation, "sh", sh)
    return calls


def _seed_folder(out: Path, seed: int) -> Path:
    folder = out / f"seed{seed}"
    (folder / "data").mkdir(parents=True)
    (folder / "data/synth.json").write_text(json.dumps({"pixels_sha256": "abc"}))
    return folder


def _one(out: Path, seed: int, name: str, threads: int) -> dict:
    table = ablation.train_and_eval(out, seed, name, lambda: ["--recipe", name], threads)
    return {"top1": table["subnets"][0]["top1"], "train_seconds": table["train_seconds"]}


def _trained(calls: list[list[str]]) -> list[str]:
    """The runs rtfq-train was started for (their --out or --resume folder's name)."""
    return [Path(c[c.index("--out" if "--out" in c else "--resume") + 1]).name for c in calls
            if Path(c[0]).name == "rtfq-train"]


def test_resume_trains_only_missing_runs_and_resumes_interrupted_ones(fake_tools, tmp_path):
    folder = _seed_folder(tmp_path, 1)
    kept = {"subnets": [{"subnet": "r64-w1.00-q8", "top1": 0.9}], "train_seconds": 7.0}
    (folder / "done.acc.json").write_text(json.dumps(kept))
    (folder / "cut").mkdir()
    (folder / "cut/run.json").write_text("{}")  # an interrupted run
    prepared = []
    results = ablation.run_table(tmp_path, [1], ["done", "cut", "new"], _one, jobs=1,
                                 prepare=lambda out, seed, names: prepared.append((seed, names)))
    assert _trained(fake_tools) == ["cut", "new"]  # the finished run is not retrained
    cut, new = (c for c in fake_tools if Path(c[0]).name == "rtfq-train")
    assert "--resume" in cut and "--recipe" not in cut  # resumed from its own run.json
    assert "--resume" not in new and new[new.index("--recipe") + 1] == "new"
    assert prepared == [(1, ["cut", "new"])]
    assert results["done"][1] == {"top1": 0.9, "train_seconds": 7.0}  # read from the kept table
    table = json.loads((folder / "new.acc.json").read_text())
    assert table["data_pixels_sha256"] == "abc" and "train_seconds" in table
    assert not (folder / "new.eval.json").exists()  # the evaluation's own file is folded in
    fake_tools.clear()  # a second call: everything is kept, nothing runs or is prepared
    again = ablation.run_table(tmp_path, [1], ["done", "cut", "new"], _one, jobs=2,
                               prepare=lambda *a: pytest.fail("prepared with nothing to train"))
    assert fake_tools == [] and again["new"][1]["top1"] == 0.5


def test_report_only_reads_kept_runs_and_trains_nothing(fake_tools, tmp_path):
    folder = _seed_folder(tmp_path, 2)
    (folder / "a.acc.json").write_text(json.dumps({"subnets": [{"subnet": "x", "top1": 0.25}], "train_seconds": 1}))
    results = ablation.run_table(tmp_path, [1, 2], ["a", "b"], _one, jobs=2, report_only=True,
                                 prepare=lambda *a: pytest.fail("prepared in a report"))
    assert fake_tools == [] and results == {"a": {2: {"top1": 0.25, "train_seconds": 1}}, "b": {}}


def test_every_seed_of_a_row_before_the_next_and_results_in_order(tmp_path):
    order = []

    def one(out: Path, seed: int, name: str, threads: int) -> str:
        order.append((name, seed))
        assert threads == 2 and out == tmp_path / f"seed{seed}"
        return f"{name}{seed}"

    results = ablation.run_table(tmp_path, [3, 1], ["b", "a"], one, jobs=1)
    assert order == [("b", 3), ("b", 1), ("a", 3), ("a", 1)]
    assert results == {"b": {3: "b3", 1: "b1"}, "a": {3: "a3", 1: "a1"}}
    assert ablation.parallel(lambda x: x * x, list(range(20)), 4) == [x * x for x in range(20)]


def test_mean_std():
    assert ablation.mean_std([0.5]) == "0.500"
    assert ablation.mean_std([0.5, 0.7]) == "0.600 ± 0.141"  # sample std: 0.2 / sqrt(2)
    assert ablation.mean_std([0.1, 0.2, 0.6]) == "0.300 ± 0.265"
    per_seed = {1: {"q4": 0.5, "q2": 0.1}, 2: {"q4": 0.7}}
    assert ablation.mean_std_cells(per_seed, ["q4", "q2"]) == ["0.600 ± 0.141", "-"]  # q2 is not in every seed
    assert ablation.mean_std_cells({}, ["q4"]) == ["-"]


def test_write_json_replaces_atomically(tmp_path):
    path = tmp_path / "r.json"
    ablation.write_json(path, {"a": 1})
    ablation.write_json(path, {"a": 2}, newline=False)
    assert path.read_text() == '{\n  "a": 2\n}' and [p.name for p in tmp_path.iterdir()] == ["r.json"]


@pytest.mark.parametrize("script", SCRIPTS)
@pytest.mark.parametrize("runs", ["nope", "", ","])
def test_a_bad_runs_name_is_one_line_and_exit_2(script, runs, tmp_path):
    got = subprocess.run([sys.executable, str(ROOT / "train" / script), "--out", str(tmp_path / "o"), "--runs", runs],
                         capture_output=True, text=True)
    assert got.returncode == 2 and got.stdout == ""
    lines = got.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{script}: error: ") and "(known: " in lines[0], got.stderr
    assert ("unknown runs: nope" in lines[0]) == (runs == "nope")
    assert not (tmp_path / "o").exists()


def test_no_script_edits_sys_path():
    scripts = [p for folder in ("train", "bench", "export") for p in (ROOT / folder).glob("*.py")]
    assert len(scripts) > 10
    assert [p.name for p in scripts if "sys.path" in p.read_text()] == []
