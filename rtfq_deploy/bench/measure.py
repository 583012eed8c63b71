"""The child process that measures one model: ``python -m rtfq_deploy.bench.measure CONFIG_JSON``.

Each model runs in a fresh process so that one model's allocations, threads or crash
cannot touch the next, and so that the process's peak resident memory (which never goes
down) belongs to that model alone. The process prints exactly one JSON line on stdout:
``{"ok": true, ...}`` with the figures, or ``{"ok": false, "error": "..."}``.

Memory: after onnxruntime and numpy are imported (and nothing is created), the peak
resident set is reset to the current one (``/proc/self/clear_refs``, Linux >= 4.0) and
the current resident set is the baseline; the figure is the peak after the session is
created and run, minus the baseline. Where the peak cannot be reset, the baseline is the
peak so far. It includes the input buffers, which an application needs as well.

Latency: ``warmup`` untimed runs, then timed runs (``time.perf_counter_ns`` around
``session.run``) until the p50 is stable. Stability is judged by the batch-medians
method (batch means, with medians): the runs so far are cut into ``blocks`` consecutive
equal blocks, and the coefficient of variation of the p50 estimate is
``std(block medians) / sqrt(blocks) / p50``: unlike the spread of single runs, this
standard error shrinks as evidence accumulates. Since it assumes the blocks independent,
a machine that drifts (warming up, a neighbour starting) is caught separately: the
medians of the earlier and the later half of the runs must agree within
``2 * cv_target`` of the p50 (for independent runs that difference has about twice the
standard error). Both are checked every ``check_every`` runs; runs stop early when both
hold after at least ``min_runs`` runs and ``min_time_s`` seconds; ``max_runs`` and
``max_time_s`` are hard caps (the figures are then reported with ``stable: false``).
"""

from __future__ import annotations

import json
import math
import os
import resource
import sys
import time
from dataclasses import asdict, dataclass, fields
from typing import Any, Callable

GRAPH_OPTIMIZATION = {"disable": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC",
                      "extended": "ORT_ENABLE_EXTENDED", "all": "ORT_ENABLE_ALL"}
_DTYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(double)": "float64",
           "tensor(uint8)": "uint8", "tensor(int8)": "int8", "tensor(int32)": "int32", "tensor(int64)": "int64",
           "tensor(bool)": "bool"}


MIN_CPU_WINDOW_S = 0.2

@dataclass(frozen=True)
class MeasureConfig:
    """What one child process does. ``latency=False`` only warms up and runs
    ``memory_runs`` times: the process that measures memory without the arena."""

    model: str
    threads: int = 1
    provider: str = "CPUExecutionProvider"
    graph_optimization: str = "all"
    batch_size: int = 1
    arena: bool = True
    latency: bool = True
    warmup: int = 5
    min_runs: int = 30
    max_runs: int = 2000
    min_time_s: float = 2.0  # 0.5 s left 3 of 48 ResNet-50 subnets >5% apart run to run on a shared VM; 2 s left 1 (5.4%)
    max_time_s: float = 10.0
    cv_target: float = 0.01
    blocks: int = 10
    check_every: int = 10
    memory_runs: int = 5
    seed: int = 0

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "MeasureConfig":
        data = json.loads(text)
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass(frozen=True)
class Latency:
    runs: int
    time_s: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    std_ms: float
    p50_cv: float | None  # batch-medians estimate; None with too few runs
    p50_drift: float | None  # |median(later half) - median(earlier half)| / p50; None with one run
    stable: bool


def p50_cv(samples_ns: list[int], blocks: int) -> float:
    """Coefficient of variation of the p50 estimate by batch medians (see the module doc);
    nan with fewer than two runs per block."""
    import numpy as np

    size = len(samples_ns) // blocks
    if blocks < 2 or size < 2:
        return math.nan
    data = np.asarray(samples_ns, dtype=np.float64)
    medians = np.median(data[len(data) - size * blocks:].reshape(blocks, size), axis=1)  # the latest runs
    p50 = float(np.median(data))
    return float(medians.std(ddof=1) / math.sqrt(blocks) / p50) if p50 > 0 else math.inf


def p50_drift(samples_ns: list[int]) -> float:
    """How far the p50 of the later half of the runs is from that of the earlier half,
    relative to the p50 of all."""
    import numpy as np

    if len(samples_ns) < 2:
        return math.inf
    data = np.asarray(samples_ns, dtype=np.float64)
    half = len(data) // 2
    p50 = float(np.median(data))
    return abs(float(np.median(data[half:]) - np.median(data[:half]))) / p50 if p50 > 0 else math.inf


def is_stable(samples_ns: list[int], config: "MeasureConfig") -> tuple[bool, float, float]:
    """(stable, p50 cv, p50 drift) by the rule in the module doc."""
    cv, drift = p50_cv(samples_ns, config.blocks), p50_drift(samples_ns)
    return cv <= config.cv_target and drift <= 2 * config.cv_target, cv, drift  # nan compares False


def run_until_stable(run_once: Callable[[], int], config: MeasureConfig,
                     clock: Callable[[], int] = time.perf_counter_ns) -> Latency:
    """Warm up, then time ``run_once`` (which returns nanoseconds) by the stopping rule."""
    import numpy as np

    for _ in range(config.warmup):
        run_once()
    samples: list[int] = []
    start = clock()
    while True:
        samples.append(run_once())
        n = len(samples)
        elapsed = (clock() - start) / 1e9
        if n % config.check_every == 0 and n >= config.min_runs and elapsed >= config.min_time_s:
            if is_stable(samples, config)[0]:
                break
        if n >= config.max_runs or elapsed >= config.max_time_s:
            break
    stable, cv, drift = is_stable(samples, config)
    ms = np.asarray(samples, dtype=np.float64) / 1e6
    p50, p90, p99 = (float(v) for v in np.percentile(ms, [50, 90, 99]))
    return Latency(runs=len(samples), time_s=(clock() - start) / 1e9, p50_ms=p50, p90_ms=p90, p99_ms=p99,
                   mean_ms=float(ms.mean()), std_ms=float(ms.std(ddof=1)) if len(ms) > 1 else 0.0,
                   p50_cv=None if math.isnan(cv) else cv, p50_drift=drift if math.isfinite(drift) else None,
                   stable=bool(stable))


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def memory_baseline() -> tuple[int, str]:
    """The resident bytes to subtract, and how they were taken."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # peak RSS := current RSS
        rss = _status_kib("VmRSS")
        if rss is not None:
            return rss * 1024, "VmHWM after reset, minus VmRSS"
    except OSError:
        pass
    return peak_rss_bytes(), "peak RSS minus the peak after import"


def peak_rss_bytes() -> int:
    hwm = _status_kib("VmHWM")
    if hwm is not None:
        return hwm * 1024
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB elsewhere


def make_inputs(session: Any, batch_size: int, seed: int) -> dict[str, Any]:
    """Random inputs at each input's shape; the first symbolic dimension is the batch."""
    import numpy as np

    rng = np.random.default_rng(seed)
    feeds = {}
    for arg in session.get_inputs():
        dtype = _DTYPES.get(arg.type)
        if dtype is None:
            raise ValueError(f"input {arg.name!r} has type {arg.type}, which this benchmark cannot generate")
        shape = []
        for i, dim in enumerate(arg.shape):
            if isinstance(dim, int) and dim > 0:
                if i == 0 and dim != batch_size:
                    raise ValueError(f"input {arg.name!r} has a fixed batch dimension {dim}; "
                                     f"--batch-size {batch_size} is not possible with this model")
                shape.append(dim)
            elif i == 0:
                shape.append(batch_size)
            else:
                raise ValueError(f"input {arg.name!r} has a symbolic dimension {dim!r} beyond the batch; "
                                 "this benchmark needs fixed image sizes")
        if dtype.startswith("float"):
            feeds[arg.name] = rng.standard_normal(shape).astype(dtype)
        elif dtype == "bool":
            feeds[arg.name] = rng.integers(0, 2, shape).astype(bool)
        else:
            info = np.iinfo(dtype)
            feeds[arg.name] = rng.integers(max(info.min, -128), min(info.max, 127), shape, endpoint=True).astype(dtype)
    return feeds


def measure(config: MeasureConfig) -> dict[str, Any]:
    import numpy as np  # noqa: F401  (loaded before the baseline, like onnxruntime)
    import onnxruntime as ort

    baseline, method = memory_baseline()
    options = ort.SessionOptions()
    options.intra_op_num_threads = config.threads
    options.inter_op_num_threads = 1
    options.enable_cpu_mem_arena = config.arena
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, GRAPH_OPTIMIZATION[config.graph_optimization])
    options.log_severity_level = 3
    start = time.perf_counter_ns()
    session = ort.InferenceSession(config.model, options, providers=[config.provider])
    create_s = (time.perf_counter_ns() - start) / 1e9
    metadata = dict(session.get_modelmeta().custom_metadata_map)
    if metadata.get("rtfq.weights") == "int4-packed":
        raise ValueError("INT4-packed weights run as float convolutions in onnxruntime, which is not what a device "
                         "runs: benchmark the --pack int8 export of this subnet (same graph after expansion)")
    feeds = make_inputs(session, config.batch_size, config.seed)

    def run_once() -> int:
        t0 = time.perf_counter_ns()
        session.run(None, feeds)
        return time.perf_counter_ns() - t0

    result: dict[str, Any] = {"ok": True, "session_create_s": create_s, "providers": session.get_providers(),
                              "metadata": metadata}
    if config.latency:
        cpu0, wall0 = time.process_time_ns(), time.perf_counter_ns()
        result["latency"] = asdict(run_until_stable(run_once, config))
        # CPU time per wall time of this process while timing: about the thread count when
        # the cores were its own, well below when other work took them.
        # Over less than MIN_CPU_WINDOW_S the CPU clock's tick makes the ratio meaningless: None.
        wall = time.perf_counter_ns() - wall0
        result["cpu_per_wall"] = (time.process_time_ns() - cpu0) / wall if wall >= MIN_CPU_WINDOW_S * 1e9 else None
        result["load_average"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    else:
        for _ in range(config.warmup + config.memory_runs):
            run_once()
    result["peak_memory_bytes"] = max(0, peak_rss_bytes() - baseline)
    result["memory_method"] = method
    return result


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(json.dumps({"ok": False, "error": "usage: python -m rtfq_deploy.bench.measure CONFIG_JSON"}))
        return 2
    try:
        config = MeasureConfig.from_json(argv[0])
        result = measure(config)
    except Exception as e:  # noqa: BLE001  every failure becomes the failed row's reason
        message = " ".join(str(e).split()) or type(e).__name__
        result = {"ok": False, "error": message[:500]}
    sys.stdout.write(json.dumps(result) + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
