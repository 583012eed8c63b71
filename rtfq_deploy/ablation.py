"""The harness the ablation scripts in ``train/`` share, importable without ``sys.path`` edits.

An ablation is a runs table (run name -> the script's own recipe and config overrides),
trained once per data seed into ``OUT/seed<N>/<run>`` and kept only as its accuracy table
``OUT/seed<N>/<run>.acc.json``. This module owns what every such script repeats: the
common command line (``--out --runs --seeds --jobs``), training the runs ``--jobs`` at a
time with resume (a finished run is reused, an interrupted one resumed, only missing ones
trained), and the report's parts (mean ± std over seeds, JSON and PNG written atomically).
Each script keeps its runs table, how one run is trained and what its report compares.

Torch and the training code are imported lazily: reporting from stored tables needs neither.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence, TypeVar

from rtfq_deploy.fileio import atomic_write
from rtfq_deploy.scriptargs import Parser, out_dir, positive, seed_list

T = TypeVar("T")
R = TypeVar("R")
CPUS = 2  # the threads the runs share (the project's 2-core machine): each run gets CPUS // jobs

# (seed folder, seed, run name, threads) -> the run's figures
RunFn = Callable[[Path, int, str, int], T]
# (seed folder, seed, names of the runs still to train there) -> None: data and initial weights
PrepareFn = Callable[[Path, int, list[str]], None]


# ---- command line ---------------------------------------------------------------------------

def parser(doc: str, runs: Iterable[str], default_runs: Iterable[str] | None = None) -> Parser:
    """The options every ablation takes: --out, --runs, --seeds, --jobs (add the script's own)."""
    runs = list(runs)
    ap = Parser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=out_dir, required=True)
    ap.add_argument("--runs", default=",".join(default_runs or runs), help="comma-separated subset of: " + ", ".join(runs))
    ap.add_argument("--seeds", type=seed_list, default="1,2,3", help="data, initial weights and training seeds")
    ap.add_argument("--jobs", type=positive, default=2, help=f"runs at a time (each with {CPUS} // jobs threads)")
    return ap


def run_names(ap: argparse.ArgumentParser, text: str, known: Iterable[str]) -> list[str]:
    """The run names of ``--runs``, or the parser's one-line error (exit 2)."""
    known = list(known)
    names = [n for n in text.split(",") if n]
    unknown = [n for n in names if n not in known]
    if not names:
        ap.error(f"--runs names no run (known: {', '.join(known)})")
    if unknown:
        ap.error(f"unknown runs: {', '.join(unknown)} (known: {', '.join(known)})")
    return list(dict.fromkeys(names))


# ---- training -------------------------------------------------------------------------------

def tool(name: str) -> str:
    """A console script of this installation (the one beside this Python)."""
    return str(Path(sys.executable).parent / name)


def sh(*args: str, env: dict | None = None, log: Path | None = None) -> None:
    """Run a command; its progress (stderr) goes to ``log`` when given."""
    if log is None:
        subprocess.run(args, check=True, stdout=subprocess.DEVNULL, env=env)
        return
    with open(log, "a") as f:
        subprocess.run(args, check=True, stdout=subprocess.DEVNULL, stderr=f, env=env)


def recipe_steps(recipe: str) -> dict[str, int]:
    """The schedule of a recipe (a name under the package's recipes or a JSON file), as
    rtfq-train options, so that a run can scale it."""
    import rtfq_deploy
    from rtfq_deploy.train.config import TrainConfig

    path = Path(recipe) if recipe.endswith(".json") else Path(rtfq_deploy.__file__).parent / "train/recipes" / f"{recipe}.json"
    cfg = TrainConfig.from_dict({k: v for k, v in json.loads(path.read_text()).items() if not k.startswith("_")})
    return {"steps": cfg.steps, "warmup-steps": cfg.warmup_steps, "target-start": cfg.target_start,
            "rampup-steps": cfg.rampup_steps, "checkpoint-every": cfg.checkpoint_every}


def scaled(steps: dict[str, int], share: float, override: int | None) -> list[str]:
    """Options that run ``share`` of the recipe's schedule (every phase scaled alike)."""
    if override:
        share *= override / steps["steps"]
    if share == 1.0:
        return []
    return [arg for key, value in steps.items() for arg in (f"--{key}", str(max(1, round(value * share))))]


def make_data(out: Path, seed: int, shift: str) -> None:
    """The seed's synthetic data set OUT/data (``rtfq data synth``), unless it is there."""
    out.mkdir(parents=True, exist_ok=True)
    if not (out / "data").exists():
        sh(tool("rtfq"), "data", "synth", str(out / "data"), "--shift", shift, "--seed", str(seed))


def acc_path(seed_dir: Path, name: str) -> Path:
    """The accuracy table of a run: all that is kept of it, and what marks it finished."""
    return seed_dir / f"{name}.acc.json"


def finished(seed_dir: Path, name: str) -> bool:
    return acc_path(seed_dir, name).exists()


def train_and_eval(out: Path, seed: int, name: str, args: Callable[[], list[str]], threads: int) -> dict:
    """Train OUT/NAME (``args()``: the checkpoint, recipe and options; called only when the
    run is missing; an interrupted run is resumed), then evaluate every subnet on the
    seed's held-out target images. The accuracy table OUT/NAME.acc.json, with the training
    time and the data's pixel digest, is all that is kept and what a later call reuses;
    it is written atomically, so a killed call leaves either the whole table or none."""
    run, acc = out / name, acc_path(out, name)
    if not acc.exists():
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        started = time.monotonic()
        train = ["--resume", str(run)] if (run / "run.json").exists() else [
            "--source", str(out / "data/source"), "--target", str(out / "data/target"), "--out", str(run),
            "--seed", str(seed), *args()]
        sh(tool("rtfq-train"), *train, env=env, log=out / f"{name}.log")
        train_s = time.monotonic() - started
        evaluated = out / f"{name}.eval.json"
        evaluated.unlink(missing_ok=True)  # a killed call's
        sh(tool("rtfq"), "eval", "--checkpoint", str(run / "supernet.pt"), "--data", str(out / "data/target_test"),
           "-o", str(evaluated), env=env)
        table = json.loads(evaluated.read_text())
        table["train_seconds"] = train_s
        # which pixels it trained on: runs on two CPUs differ, and this tells whether the data did
        record = json.loads((out / "data/synth.json").read_text())
        table["data_pixels_sha256"] = record.get("pixels_sha256") if isinstance(record, dict) else None
        write_json(acc, table, newline=False)
        evaluated.unlink()
        print(f"seed {seed} {name}: trained in {train_s:.0f} s", flush=True)
    return json.loads(acc.read_text())


def parallel(fn: Callable[[T], R], items: Sequence[T], jobs: int) -> list[R]:
    """``fn`` over ``items``, ``jobs`` at a time, results in the items' order."""
    with ThreadPoolExecutor(jobs) as pool:
        return list(pool.map(fn, items))


def run_table(out: Path, seeds: Sequence[int], names: Sequence[str], one: RunFn, *, jobs: int,
              prepare: PrepareFn | None = None, report_only: bool = False) -> dict[str, dict[int, Any]]:
    """Every run of ``names`` on every seed, as {run: {seed: one(...)}}: runs whose table is
    kept are only read, the rest are trained ``jobs`` at a time (every seed of a row before
    the next row). ``prepare`` makes a seed's data and initial weights, only where a run is
    still to train there. ``report_only``: the kept runs only, nothing trained (a seed a run
    lacks is absent from its row)."""
    folder = {seed: out / f"seed{seed}" for seed in seeds}
    tasks = [(seed, name) for name in names for seed in seeds
             if not report_only or finished(folder[seed], name)]
    if prepare is not None:
        for seed in seeds:
            missing = [name for s, name in tasks if s == seed and not finished(folder[seed], name)]
            if missing:
                prepare(folder[seed], seed, missing)
    threads = max(1, CPUS // jobs)
    done = parallel(lambda t: one(folder[t[0]], t[0], t[1], threads), tasks, jobs)
    results: dict[str, dict[int, Any]] = {name: {} for name in names}
    for (seed, name), figures in zip(tasks, done):
        results[name][seed] = figures
    return results


# ---- report ---------------------------------------------------------------------------------

def mean_std(values: Sequence[float]) -> str:
    """``mean ± std`` (sample std) to three places; a single value as it is; ``-`` for none
    (a report of runs not trained yet)."""
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.fmean(values):.3f} ± {statistics.stdev(values):.3f}"


def mean_std_cells(per_seed: Mapping[int, Mapping[str, float]], keys: Sequence[str]) -> list[str]:
    """One report row's cells: ``mean ± std`` over seeds of each key, ``-`` where a seed's
    figures lack it (a run that does not have that figure)."""
    return [mean_std([figures[key] for figures in per_seed.values()])
            if per_seed and all(key in figures for figures in per_seed.values()) else "-" for key in keys]


def write_json(path: Path, doc: Any, *, newline: bool = True) -> None:
    """``doc`` as indented JSON, atomically (a killed call leaves the old file or the new)."""
    with atomic_write(path, overwrite=True) as f:
        f.write((json.dumps(doc, indent=2) + ("\n" if newline else "")).encode())


def bar_chart(summary: Mapping[str, Mapping[int, Mapping[str, float]]], keys: Sequence[str], seeds: Sequence[int],
              path: Path, ylabel: str = "target top-1") -> None:
    """Bars of each run's ``keys`` (mean over seeds, std as error bars), written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    names = list(summary)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(names)), 3.6))
    width = 0.8 / len(keys)
    for i, key in enumerate(keys):
        values = np.array([[summary[n][s][key] for s in seeds] for n in names])
        std = values.std(axis=1, ddof=1) if len(seeds) > 1 else None
        ax.bar(np.arange(len(names)) + (i - (len(keys) - 1) / 2) * width, values.mean(axis=1), width, yerr=std,
               capsize=2, label=key)
    ax.set_xticks(np.arange(len(names)), names, rotation=30, ha="right")
    ax.set_ylabel(ylabel)
    ax.set_ylim(0, 1)
    ax.set_title(f"mean ± std over seeds {','.join(map(str, seeds))}")
    ax.legend(ncols=len(keys), fontsize=8, loc="lower right")
    fig.tight_layout()
    with atomic_write(path, overwrite=True) as f:
        fig.savefig(f, dpi=110, format=path.suffix.lstrip(".") or "png")
    plt.close(fig)
