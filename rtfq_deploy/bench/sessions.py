"""What the research benchmarks in ``bench/`` (and ``export/code_flips.py``) share: a model
ready to run on either runtime, the interleaved and fresh-process timing loops, rounds of
``rtfq-bench run``, and their comma-list arguments.

Sessions are :func:`rtfq_deploy.bench.runtimes.open_session`'s, with the inputs of
:func:`rtfq_deploy.bench.measure.make_inputs`: a script times a graph with the same
thread and runtime options ``rtfq-bench run`` uses. Runtimes are imported only when used.

``python -m rtfq_deploy.bench.sessions RUNTIME PATH THREADS RUNS`` is the fresh measuring
process of :func:`measure_in_child`.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Hashable, Mapping, Sequence, TypeVar

from rtfq_deploy.bench.measure import make_inputs
from rtfq_deploy.bench.runtimes import RUNTIMES, open_session

K = TypeVar("K", bound=Hashable)
WARMUP = 5  # untimed runs before timing: first runs pay for allocations and kernel selection


def ort_session(model: Any, threads: int, fused: bool = True) -> Any:
    """An onnxruntime InferenceSession on the CPU of a file, serialized model or ModelProto,
    ``threads`` intra-op threads; ``fused=False`` disables graph optimisation (float convs
    between Q/DQ instead of fused integer kernels)."""
    if hasattr(model, "SerializeToString"):
        model = model.SerializeToString()
    session = open_session("onnxruntime", model, threads=threads, graph_optimization="all" if fused else "disable")
    return session.session  # type: ignore[attr-defined]


def runner(runtime: str, model: str | bytes, threads: int, batch_size: int = 1) -> Callable[[], None]:
    """A zero-argument callable that runs ``model`` (a file; on onnxruntime also a serialized
    model) once on ``runtime``, on random inputs of seed 1 at the model's shape."""
    session = open_session(runtime, model, threads=threads, batch_size=batch_size)  # type: ignore[arg-type]
    session.set_inputs(make_inputs(session, batch_size, seed=1))
    return session.run


def median_run(run: Callable[[], Any], runs: int, warmup: int = WARMUP) -> float:
    """Median seconds of ``runs`` timed calls of ``run`` after ``warmup`` untimed ones."""
    for _ in range(warmup):
        run()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def interleaved(runners: Mapping[K, Callable[[], Any]], reps: int, warmup: int = WARMUP) -> dict[K, list[float]]:
    """Seconds of every runner in each of ``reps`` turns, the runners run one after another in
    each turn: drift of the machine hits all alike (read them with :func:`median_ratio`)."""
    for run in runners.values():
        for _ in range(warmup):
            run()
    times: dict[K, list[float]] = {k: [] for k in runners}
    for _ in range(reps):
        for key, run in runners.items():
            start = time.perf_counter()
            run()
            times[key].append(time.perf_counter() - start)
    return times


def median_ratio(a: Sequence[float], b: Sequence[float]) -> float:
    """The median of the per-turn (or per-round) ratios a/b."""
    return statistics.median(x / y for x, y in zip(a, b))


def measure_in_child(runtime: str, path: str, threads: int, runs: int) -> dict[str, float]:
    """Median seconds of ``runs`` runs (after the warm-up) and the session's creation or
    compile time, measured in a fresh process holding one session: several multi-threaded
    sessions in one process keep their pools spinning and fight over the cores."""
    done = subprocess.run([sys.executable, "-m", __name__, runtime, path, str(threads), str(runs)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"measuring {path} on {runtime} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def bench_rounds(paths: Mapping[K, str], rounds: int, threads: int, workdir: str) -> dict[K, list[float]]:
    """p50 milliseconds of each file in each of ``rounds`` runs of ``rtfq-bench run`` over all
    of them (fresh processes, timed until the p50 is stable)."""
    times: dict[K, list[float]] = {k: [] for k in paths}
    for i in range(rounds):
        results = os.path.join(workdir, f"round{i}.json")
        subprocess.run([str(Path(sys.executable).parent / "rtfq-bench"), "run", *paths.values(), "-o", results,
                        "--force", "--threads", str(threads)], check=True, stdout=subprocess.DEVNULL)
        with open(results) as f:
            p50 = {row["path"]: row["latency_p50_ms"] for row in json.load(f)["models"]}
        for key, path in paths.items():
            times[key].append(p50[str(Path(path).resolve())])
    return times


def _child(runtime: str, path: str, threads: int, runs: int) -> None:
    start = time.perf_counter()
    run = runner(runtime, path, threads)
    compile_s = time.perf_counter() - start
    print(json.dumps({"median_s": median_run(run, runs), "compile_s": compile_s}))


if __name__ == "__main__":
    if len(sys.argv) != 5 or sys.argv[1] not in RUNTIMES:
        sys.exit(f"usage: python -m {__spec__.name if __spec__ else 'rtfq_deploy.bench.sessions'} "
                 f"{{{','.join(RUNTIMES)}}} PATH THREADS RUNS")
    _child(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
