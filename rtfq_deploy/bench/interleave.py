"""Latency of many models measured round robin in one process, so a slow period of the host hits them alike.

Why: on a shared or busy device the latency of one model measured alone depends on what
else ran during its seconds; two runs can then rank two close models differently, and
the choice for a budget flips. Here one child process opens a session for every model,
and each round times one sample of every model in a fresh random order; a slow period
stretches every model's samples of those rounds, not one model's figure. The parent runs
``processes`` such children per runtime (alternating runtimes) and pools their samples.

Two kinds of interference are left out, since on a busy host they, not the model, would
set the p50 (measured on a shared 2-core machine: p50s of one model 100% apart between
runs with every sample, about 1% with these rules):

- a sample during which the process did not hold its cores (a neighbour's time slice):
  its CPU time per wall time below 90% of what that model's samples usually show;
- rounds in which the host was slow for everyone (a neighbour on the sibling core, a
  memory-bound job): each round's slowness is the median over the models of sample /
  model's p50, and only the quietest ``quiet_share`` of the rounds count.

The reported p50 is thus that of the quiet rounds' clean samples: the device's latency
when its cores are its own. The p50 of every sample is kept as ``latency_p50_all_ms``, and
``contended_samples`` counts the samples left out.

Each row reports its p50 with a 95% interval (:mod:`rtfq_deploy.bench.confidence`);
timing stops once every model's interval is within ``ci_target`` of its p50 (after
``min_rounds`` rounds and ``min_time_s``), or at ``max_rounds`` / ``max_time_s``.
Peak memory is measured as by ``rtfq-bench run``, one fresh process per figure (a
process's peak never goes down), and the rows have its format plus
``latency_p50_ci_ms``, ``rounds`` and ``harness: "interleaved"``.

Child protocol: ``python -m rtfq_deploy.bench.interleave CONFIG_JSON`` prints one JSON
line; a model whose session fails to open is reported and left out of the rounds.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Sequence

from rtfq_deploy.bench import confidence as ci
from rtfq_deploy.bench.measure import MeasureConfig
from rtfq_deploy.errors import RtfqError
from rtfq_deploy.formats import (METADATA_PREFIX, META_BITOPS, META_MACS, META_SUBNET, META_WEIGHTS, ONNXRUNTIME,
                                  WEIGHTS_INT4_PACKED)

log = logging.getLogger(__name__)

_MAX_CHILD_OUTPUT = 64 << 20


@dataclass(frozen=True)
class RoundsConfig:
    """How the round-robin child times its models (``template``: threads, provider, batch...)."""

    template: MeasureConfig
    models: tuple[str, ...] = ()
    runtime: str = ONNXRUNTIME
    ci_target: float = 0.01  # relative half-width of every p50 interval to stop at
    min_rounds: int = 30
    max_rounds: int = 2000
    min_time_s: float = 3.0
    max_time_s: float = 60.0
    check_every: int = 5
    seed: int = 0
    quiet_share: float = 0.1  # of the rounds, the quietest, whose samples count

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "RoundsConfig":
        from rtfq_deploy.fileio import parse_json

        data = parse_json(text, "the interleaving process's argument", "configuration", expect=dict)
        template = MeasureConfig(**data.pop("template"))
        data["models"] = tuple(data.get("models", ()))
        return cls(template=template, **data)


CLEAN_SHARE = 0.9  # of a model's usual CPU per wall time, below which a sample was contended
MIN_CLEAN_FRACTION = 0.2


def clean_mask(ratios: Sequence[float]) -> list[bool]:
    """Which samples were taken while the process held its cores: CPU per wall time at
    least CLEAN_SHARE of the model's 90th percentile ratio (what it gets uncontended);
    all of them if fewer than MIN_CLEAN_FRACTION qualify."""
    if len(ratios) < 10:
        return [True] * len(ratios)
    top = sorted(ratios)[int(0.9 * (len(ratios) - 1))]
    mask = [r >= CLEAN_SHARE * top for r in ratios]
    return mask if sum(mask) >= max(6, MIN_CLEAN_FRACTION * len(ratios)) else [True] * len(ratios)


def kept_indices(samples: Sequence[Sequence[float]], ratios: Sequence[Sequence[float]],
                 quiet_share: float) -> list[list[int]]:
    """Per model, the rounds whose sample counts: the clean samples of the quietest
    rounds (``samples[model][round]``); a model left with fewer than 6 keeps every
    sample of those rounds."""
    masks = [clean_mask(r) for r in ratios]
    rounds = min((len(s) for s in samples), default=0)
    if rounds < 8 or not 0 < quiet_share < 1:
        return [[j for j, ok in enumerate(m) if ok] for m in masks]
    typical = [ci.median([x for x, ok in zip(s, m) if ok]) for s, m in zip(samples, masks)]
    slowness = [ci.median([samples[i][j] / typical[i] for i in range(len(samples))]) for j in range(rounds)]
    quiet = sorted(sorted(range(rounds), key=lambda j: slowness[j])[:max(8, math.ceil(quiet_share * rounds))])
    out = []
    for m in masks:
        chosen = [j for j in quiet if m[j]]
        out.append(chosen if len(chosen) >= 6 else quiet)
    return out


def kept_samples(samples: Sequence[Sequence[float]], ratios: Sequence[Sequence[float]],
                 quiet_share: float) -> list[list[float]]:
    """:func:`kept_indices`' samples."""
    return [[s[j] for j in idx] for s, idx in zip(samples, kept_indices(samples, ratios, quiet_share))]


def _time_rounds(run: Sequence[Callable[[int], tuple[int, int]]], ks: Sequence[int], config: RoundsConfig,
                 clock: Callable[[], int] = time.perf_counter_ns
                 ) -> tuple[list[list[float]], list[list[float]], int, float]:
    """Samples (ns per run) of every model taken round robin, with each sample's CPU per
    wall time; (samples, ratios, rounds, seconds)."""
    rng = random.Random(config.seed)
    samples: list[list[float]] = [[] for _ in run]
    ratios: list[list[float]] = [[] for _ in run]
    order = list(range(len(run)))
    start, rounds = clock(), 0
    while order:
        rng.shuffle(order)
        for i in order:
            wall, cpu = run[i](ks[i])
            samples[i].append(wall / ks[i])
            ratios[i].append(cpu / wall if wall > 0 else 0.0)
        rounds += 1
        elapsed = (clock() - start) / 1e9
        if rounds >= config.min_rounds and elapsed >= config.min_time_s and rounds % config.check_every == 0:
            kept = kept_samples(samples, ratios, config.quiet_share)
            widths = [ci.relative_half_width(ci.median(k), *ci.median_ci(k)) for k in kept]
            if max(widths) <= config.ci_target:
                break
        if rounds >= config.max_rounds or elapsed >= config.max_time_s:
            break
    return samples, ratios, rounds, (clock() - start) / 1e9


def measure_rounds(config: RoundsConfig) -> dict[str, Any]:
    """The child's work: open every model, warm each up, time them round robin."""
    from rtfq_deploy.bench.measure import _import_runtime, _metadata, make_inputs, runs_per_sample
    from rtfq_deploy.bench.runtimes import open_session

    _import_runtime(config.runtime)
    t = config.template
    opened, failed = [], {}
    for path in config.models:
        try:
            start = time.perf_counter_ns()
            session = open_session(config.runtime, path, threads=t.threads, provider=t.provider,
                                   graph_optimization=t.graph_optimization, arena=True,
                                   openvino_device=t.openvino_device, batch_size=t.batch_size,
                                   metadata=lambda p=path: _metadata(p))
            if session.metadata.get(META_WEIGHTS) == WEIGHTS_INT4_PACKED:
                raise ValueError("INT4-packed weights: benchmark the --pack int8 export of this subnet")
            session.set_inputs(make_inputs(session, t.batch_size, t.seed))
            opened.append((path, session, (time.perf_counter_ns() - start) / 1e9))
        except Exception as e:  # noqa: BLE001  one bad model is that model's failed row
            failed[path] = " ".join(str(e).split())[:500] or type(e).__name__

    def timer(session: Any) -> Callable[[int], tuple[int, int]]:
        def run_batch(k: int) -> tuple[int, int]:
            run = session.run
            c0, t0 = time.process_time_ns(), time.perf_counter_ns()
            for _ in range(k):
                run()
            return time.perf_counter_ns() - t0, time.process_time_ns() - c0
        return run_batch

    runs = [timer(s) for _, s, _ in opened]
    ks = []
    for run_batch in runs:
        warm = [run_batch(1)[0] for _ in range(max(t.warmup, 1 if t.sample_time_s > 0 else 0))]
        ks.append(runs_per_sample(warm, t.sample_time_s))
    cpu0, wall0 = time.process_time_ns(), time.perf_counter_ns()
    samples, ratios, rounds, seconds = _time_rounds(runs, ks, config) if runs else ([], [], 0, 0.0)
    wall = time.perf_counter_ns() - wall0
    models = {}
    for (path, session, create_s), k, s, r in zip(opened, ks, samples, ratios):
        models[path] = {"ok": True, "session_create_s": create_s, "runs_per_sample": k,
                        "samples_ms": [round(x / 1e6, 6) for x in s], "cpu_per_wall": [round(x, 4) for x in r],
                        "metadata": dict(session.metadata), **session.details}
    for path, error in failed.items():
        models[path] = {"ok": False, "error": error}
    return {"ok": True, "models": models, "rounds": rounds, "time_s": seconds,
            "cpu_per_wall": (time.process_time_ns() - cpu0) / wall if wall >= 2e8 else None,
            "load_average": os.getloadavg()[0] if hasattr(os, "getloadavg") else None}


@dataclass(frozen=True)
class InterleaveSettings:
    """The parent's settings: the rounds' rule, how many processes, the memory children's
    timeout (``bench``: an :class:`rtfq_deploy.bench.run.BenchSettings`)."""

    bench: Any
    rounds: RoundsConfig = field(default_factory=lambda: RoundsConfig(MeasureConfig(model="")))


def run_rounds_child(config: RoundsConfig, python: str, timeout_s: float) -> dict[str, Any]:
    """One round-robin process; every failure comes back as ``{"ok": False, "error": ...}``."""
    command = [python, "-m", "rtfq_deploy.bench.interleave", config.to_json()]
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": f"timed out after {timeout_s:g} s"}
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if lines and len(lines[-1]) <= _MAX_CHILD_OUTPUT:
        try:
            result = json.loads(lines[-1])
            if isinstance(result, dict) and "ok" in result:
                return result
        except ValueError:
            pass
    tail = [line for line in proc.stderr.splitlines() if line.strip()][-1:]
    return {"ok": False, "error": f"the interleaving process exited with status {proc.returncode} and no result"
                                  + (f": {tail[0].strip()[:300]}" if tail else "")}


def memory_rows(path: Path, runtime: str, settings: Any) -> dict[str, Any]:
    """Peak memory of one model in fresh processes (with and, on onnxruntime, without the
    arena), as ``rtfq-bench run`` measures it; ``{"error": ...}`` if a child failed."""
    from rtfq_deploy.bench.run import run_child

    template = replace(settings.measure, model=str(path.resolve()), runtime=runtime, latency=False)
    first = run_child(replace(template, arena=True), settings)
    if not first.get("ok"):
        return {"error": str(first.get("error"))}
    out = {"peak_memory_bytes": first["peak_memory_bytes"], "peak_memory_no_arena_bytes": None,
           "memory_method": first.get("memory_method")}
    if runtime == ONNXRUNTIME:
        second = run_child(replace(template, arena=False), settings)
        if not second.get("ok"):
            return {"error": f"without the memory arena: {second.get('error')}"}
        out["peak_memory_no_arena_bytes"] = second["peak_memory_bytes"]
    return out


def interleaved_rows(paths: Sequence[Path], settings: InterleaveSettings,
                     progress: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """Rows (the results file's format) for every model on every runtime of ``settings.bench``."""
    from rtfq_deploy.bench.run import _int_or_none
    from rtfq_deploy.fileio import sha256_file

    bench = settings.bench
    say = progress or (lambda message: None)
    base: dict[str, dict[str, Any]] = {}
    for path in paths:
        row: dict[str, Any] = {"path": str(path.resolve()), "ok": False, "error": None, "subnet": path.stem}
        try:
            row["sha256"], row["size_bytes"] = sha256_file(path, what="model file"), path.stat().st_size
        except OSError as e:  # a file that went away is its row's error
            row["error"] = f"cannot read: {e.strerror or e}"
        except RtfqError as e:  # not a regular file (any more)
            row["error"] = str(e)
        base[str(path.resolve())] = row
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    for i, path in enumerate(paths):
        key = str(path.resolve())
        for runtime in bench.runtimes:
            row = dict(base[key], runtime=runtime)
            if row["error"] is None:
                say(f"memory {i + 1}/{len(paths)}: {path.name} on {runtime}")
                memory = memory_rows(path, runtime, bench)
                if "error" in memory:
                    row["error"] = memory["error"]
                else:
                    row.update(memory)
            rows[key, runtime] = row
    runs: dict[tuple[str, str], list[dict[str, Any]]] = {k: [] for k in rows}
    details: dict[str, list[dict[str, Any]]] = {r: [] for r in bench.runtimes}
    for p in range(bench.processes):
        for runtime in bench.runtimes:
            models = tuple(k for k, r in rows if r == runtime and rows[k, r]["error"] is None)
            if not models:
                continue
            say(f"latency, process {p + 1}/{bench.processes} on {runtime}: {len(models)} models round robin")
            config = replace(settings.rounds, template=replace(bench.measure, model=""), models=models,
                             runtime=runtime, seed=settings.rounds.seed + p)
            result = run_rounds_child(config, bench.python, bench.timeout_s + config.max_time_s)
            details[runtime].append(result)
            for model in models:
                got = (result.get("models") or {}).get(model) if result.get("ok") else None
                if got is None:
                    rows[model, runtime]["error"] = str(result.get("error") or "no result for this model")
                elif not got.get("ok"):
                    rows[model, runtime]["error"] = str(got.get("error"))
                else:
                    runs[model, runtime].append(got)
    kept: dict[tuple[str, str], list[list[float]]] = {}
    for runtime in bench.runtimes:
        done = [k for k in rows if k[1] == runtime and rows[k]["error"] is None and len(runs[k]) == bench.processes]
        for k, samples in zip(done, pooled_kept([runs[k] for k in done], settings.rounds.quiet_share)):
            kept[k] = samples
    out = []
    for (model, runtime), row in rows.items():
        got = runs[model, runtime]
        if row["error"] is None and (model, runtime) in kept:
            row.update(_latency_fields(got, details[runtime], settings.rounds.ci_target, kept[model, runtime]))
            meta = {k: str(v) for k, v in (got[0].get("metadata") or {}).items() if k.startswith(METADATA_PREFIX)}
            row.update({"ok": True, "subnet": meta.get(META_SUBNET, row["subnet"]),
                        "macs": _int_or_none(meta.get(META_MACS)), "bitops": _int_or_none(meta.get(META_BITOPS)),
                        "metadata": meta})
            for k in ("providers", "openvino_device", "inference_threads"):
                if k in got[0]:
                    row[k] = got[0][k]
        elif row["error"] is None:
            row["error"] = "a timing process gave no result for this model"
        out.append(row)
    return out


def pooled_kept(per_model: Sequence[Sequence[dict[str, Any]]], quiet_share: float) -> list[list[list[float]]]:
    """``per_model[m][p]``: model m's result from process p. The clean samples of the
    quietest rounds over every process's rounds together (so a process that ran through
    a slow period of the host contributes little), per model and process."""
    processes = len(per_model[0]) if per_model else 0
    lengths = [min(len(m[p]["samples_ms"]) for m in per_model) for p in range(processes)]
    samples = [[x for p in range(processes) for x in m[p]["samples_ms"][:lengths[p]]] for m in per_model]
    ratios = [[x for p in range(processes) for x in (m[p].get("cpu_per_wall") or [1.0] * lengths[p])[:lengths[p]]]
              for m in per_model]
    starts = [sum(lengths[:p]) for p in range(processes)]
    out = []
    for s, idx in zip(samples, kept_indices(samples, ratios, quiet_share)):
        out.append([[s[j] for j in idx if starts[p] <= j < starts[p] + lengths[p]] for p in range(processes)])
    return out


def _latency_fields(got: Sequence[dict[str, Any]], children: Sequence[dict[str, Any]],
                    ci_target: float, kept: Sequence[Sequence[float]]) -> dict[str, Any]:
    """p50 (pooled), its interval, and the other figures of ``rtfq-bench run``'s rows;
    ``kept``: per process, the samples that count."""
    from rtfq_deploy.bench.measure import p50_cv, p50_drift

    per_process = [list(k) for k in kept if len(k) >= 6] or [[x for k in kept for x in k]]
    every = [x for g in got for x in g["samples_ms"]]
    pooled = sorted(x for s in per_process for x in s)
    p50, low, high = ci.pooled_ci(per_process)
    n = len(pooled)
    mean = sum(pooled) / n
    std = math.sqrt(sum((x - mean) ** 2 for x in pooled) / (n - 1)) if n > 1 else 0.0
    width = ci.relative_half_width(p50, low, high)
    drift = p50_drift(pooled) if pooled else math.inf
    cv = p50_cv(pooled, 10)
    return {
        "latency_p50_ms": p50, "latency_p90_ms": pooled[min(n - 1, int(0.9 * n))],
        "latency_p99_ms": pooled[min(n - 1, int(0.99 * n))], "latency_mean_ms": mean, "latency_std_ms": std,
        ci.CI_KEY: [low, high], "p50_ci_rel": width,
        "samples": n, "runs_per_sample": got[0]["runs_per_sample"], "runs": n * got[0]["runs_per_sample"],
        "rounds": sum(int(c.get("rounds") or 0) for c in children), "harness": "interleaved",
        "contended_samples": len(every) - n, "latency_p50_all_ms": ci.median(every),
        "measure_time_s": sum(float(c.get("time_s") or 0) for c in children),
        "session_create_s": got[0]["session_create_s"],
        "p50_cv": None if math.isnan(cv) else cv, "p50_drift": drift if math.isfinite(drift) else None,
        "stable": bool(width <= ci_target),
        **({"process_p50_ms": [ci.median(k or g["samples_ms"]) for k, g in zip(kept, got)]} if len(got) > 1 else {}),
        "cpu_per_wall": children[0].get("cpu_per_wall") if children else None,
        "load_average": children[0].get("load_average") if children else None,
    }


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(json.dumps({"ok": False, "error": "usage: python -m rtfq_deploy.bench.interleave CONFIG_JSON"}))
        return 2
    try:
        result = measure_rounds(RoundsConfig.from_json(argv[0]))
    except Exception as e:  # noqa: BLE001  every failure becomes the rows' reason
        result = {"ok": False, "error": (" ".join(str(e).split()) or type(e).__name__)[:500]}
    sys.stdout.write(json.dumps(result) + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))


def interleaved_results(paths: Sequence[Path], settings: InterleaveSettings,
                        progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """A whole results file (``rtfq-bench run``'s format, ``settings.harness``: interleaved)."""
    from rtfq_deploy.bench.fingerprint import fingerprint
    from rtfq_deploy.bench.run import FORMAT, VERSION

    bench, m = settings.bench, settings.bench.measure
    rounds = {k: v for k, v in asdict(settings.rounds).items() if k not in ("template", "models", "runtime")}
    return {
        "format": FORMAT, "version": VERSION, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "fingerprint": fingerprint(m.provider, m.threads, m.batch_size, m.graph_optimization,
                                   runtimes=bench.runtimes, openvino_device=m.openvino_device),
        "settings": {"harness": "interleaved", "threads": m.threads, "provider": m.provider,
                     "graph_optimization": m.graph_optimization, "batch_size": m.batch_size, "warmup": m.warmup,
                     "sample_time_s": m.sample_time_s, "seed": m.seed, "timeout_s": bench.timeout_s,
                     "runtimes": list(bench.runtimes), "processes": bench.processes, **rounds},
        "models": interleaved_rows(paths, settings, progress),
    }
