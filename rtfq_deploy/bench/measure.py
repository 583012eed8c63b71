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

Latency: ``warmup`` untimed runs, then timed *samples* until the p50 is stable. A sample
is one run, or for a model faster than ``sample_time_s`` a batch of consecutive runs
timed together (``time.perf_counter_ns`` around the batch, divided by its runs): the
batch size is fixed after warm-up so that a sample lasts about ``sample_time_s``. Without
it a sub-millisecond model hit ``max_runs`` within a fraction of a second, and per-call
overhead and single-run jitter decided its figures; with it every sample carries about
the same amount of time whatever the model. The percentiles are over samples (for a
batched model, of per-run means over ``sample_time_s``). Stability is judged by the
batch-medians method (batch means, with medians): the samples so far are cut into
``blocks`` consecutive equal blocks, and the coefficient of variation of the p50 estimate
is ``std(block medians) / sqrt(blocks) / p50``: unlike the spread of single samples, this
standard error shrinks as evidence accumulates. Since it assumes the blocks independent,
a machine that drifts (warming up, a neighbour starting) is caught separately: the
medians of the earlier and the later half of the samples must agree within
``2 * cv_target`` of the p50 (for independent samples that difference has about twice the
standard error). Both are checked every ``check_every`` samples; timing stops early when
both hold after at least ``min_runs`` samples and ``min_time_s`` seconds; ``max_runs``
(samples) and ``max_time_s`` are hard caps (the figures are then reported with
``stable: false``).

Runtimes (:mod:`rtfq_deploy.bench.runtimes`): onnxruntime or OpenVINO, imported only
here, in the child. ``accuracy_images`` switches the child to accuracy: it runs the
preprocessed images (an ``.npy`` file) and writes the logits beside, for top-1 and for
the agreement with another runtime's logits (``reference_logits``).
"""

from __future__ import annotations

import json
import math
import os
import resource
import sys
import time
from dataclasses import asdict, dataclass, fields
from typing import Any, Callable, Sequence

from rtfq_deploy.bench.runtimes import GRAPH_OPTIMIZATION, Input, Session, open_session  # noqa: F401  (re-exported)
from rtfq_deploy.formats import DEFAULT_RUNTIME, META_WEIGHTS, WEIGHTS_INT4_PACKED

MIN_CPU_WINDOW_S = 0.2
ACCURACY_BATCH = 32


@dataclass(frozen=True)
class MeasureConfig:
    """What one child process does. ``latency=False`` only warms up and runs
    ``memory_runs`` times: the process that measures memory without the arena.
    ``accuracy_images`` set: the process that runs labeled images (no timing)."""

    model: str
    runtime: str = DEFAULT_RUNTIME
    threads: int = 1
    provider: str = "CPUExecutionProvider"
    openvino_device: str = "CPU"
    graph_optimization: str = "all"
    batch_size: int = 1
    arena: bool = True
    latency: bool = True
    warmup: int = 5
    min_runs: int = 30
    max_runs: int = 2000
    min_time_s: float = 2.0  # 0.5 s left 3 of 48 ResNet-50 subnets >5% apart run to run on a shared VM; 2 s left 1 (5.4%)
    max_time_s: float = 10.0
    sample_time_s: float = 0.002
    cv_target: float = 0.01
    blocks: int = 10
    check_every: int = 10
    memory_runs: int = 5
    seed: int = 0
    accuracy_images: str | None = None  # .npy (N, 3, R, R) float32, preprocessed as the export's metadata says
    accuracy_labels: str | None = None  # .npy (N,) int64
    reference_logits: str | None = None  # .npy (N, classes) of the reference runtime
    logits_out: str | None = None  # where this runtime's logits go (.npy)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "MeasureConfig":
        from rtfq_deploy.fileio import parse_json

        data = parse_json(text, "the measuring process's argument", "configuration", expect=dict)
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass(frozen=True)
class Latency:
    runs: int  # runs timed, over all samples
    samples: int
    runs_per_sample: int
    time_s: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    std_ms: float
    p50_cv: float | None  # batch-medians estimate; None with too few samples
    p50_drift: float | None  # |median(later half) - median(earlier half)| / p50; None with one sample
    stable: bool


def p50_cv(samples_ns: Sequence[float], blocks: int) -> float:
    """Coefficient of variation of the p50 estimate by batch medians (see the module doc);
    nan with fewer than two samples per block."""
    import numpy as np

    size = len(samples_ns) // blocks
    if blocks < 2 or size < 2:
        return math.nan
    data = np.asarray(samples_ns, dtype=np.float64)
    medians = np.median(data[len(data) - size * blocks:].reshape(blocks, size), axis=1)  # the latest samples
    p50 = float(np.median(data))
    return float(medians.std(ddof=1) / math.sqrt(blocks) / p50) if p50 > 0 else math.inf


def p50_drift(samples_ns: Sequence[float]) -> float:
    """How far the p50 of the later half of the samples is from that of the earlier half,
    relative to the p50 of all."""
    import numpy as np

    if len(samples_ns) < 2:
        return math.inf
    data = np.asarray(samples_ns, dtype=np.float64)
    half = len(data) // 2
    p50 = float(np.median(data))
    return abs(float(np.median(data[half:]) - np.median(data[:half]))) / p50 if p50 > 0 else math.inf


def is_stable(samples_ns: Sequence[float], config: "MeasureConfig") -> tuple[bool, float, float]:
    """(stable, p50 cv, p50 drift) by the rule in the module doc."""
    cv, drift = p50_cv(samples_ns, config.blocks), p50_drift(samples_ns)
    return cv <= config.cv_target and drift <= 2 * config.cv_target, cv, drift  # nan compares False


def runs_per_sample(warmup_ns: Sequence[int], sample_time_s: float) -> int:
    """How many runs make one sample: enough that it lasts about ``sample_time_s``, judged
    by the median warm-up run (the first warm-up run, often slow, is left out)."""
    import numpy as np

    times = list(warmup_ns[1:]) or list(warmup_ns)
    one = float(np.median(times)) if times else 0.0
    if sample_time_s <= 0 or one <= 0:
        return 1
    return int(min(100_000, max(1, math.ceil(sample_time_s * 1e9 / one))))


def run_until_stable(run_batch: Callable[[int], int], config: MeasureConfig,
                     clock: Callable[[], int] = time.perf_counter_ns) -> Latency:
    """Warm up, then time samples of ``run_batch(k)`` (which runs k times and returns the
    nanoseconds they took together) by the stopping rule."""
    import numpy as np

    warm = [run_batch(1) for _ in range(max(config.warmup, 1 if config.sample_time_s > 0 else 0))]
    k = runs_per_sample(warm, config.sample_time_s)
    samples: list[float] = []
    start = clock()
    while True:
        samples.append(run_batch(k) / k)
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
    return Latency(runs=len(samples) * k, samples=len(samples), runs_per_sample=k, time_s=(clock() - start) / 1e9,
                   p50_ms=p50, p90_ms=p90, p99_ms=p99, mean_ms=float(ms.mean()),
                   std_ms=float(ms.std(ddof=1)) if len(ms) > 1 else 0.0,
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


def _inputs(session: Any) -> list[Input]:
    if hasattr(session, "get_inputs"):  # an onnxruntime InferenceSession
        from rtfq_deploy.bench.runtimes import _ORT_DTYPES

        return [Input(a.name, _ORT_DTYPES.get(a.type), a.type, tuple(a.shape)) for a in session.get_inputs()]
    return list(session.inputs)


def make_inputs(session: Any, batch_size: int, seed: int) -> dict[str, Any]:
    """Random inputs at each input's shape; the first symbolic dimension is the batch."""
    import numpy as np

    rng = np.random.default_rng(seed)
    feeds = {}
    for arg in _inputs(session):
        dtype = arg.dtype
        if dtype is None:
            raise ValueError(f"input {arg.name!r} has type {arg.type_text}, which this benchmark cannot generate")
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


def _metadata(path: str) -> dict[str, str]:
    from rtfq_deploy.bench.onnxmeta import read_metadata

    return dict(read_metadata(path))


def _open(config: MeasureConfig, batch_size: int) -> Session:
    return open_session(config.runtime, config.model, threads=config.threads, provider=config.provider,
                        graph_optimization=config.graph_optimization, arena=config.arena,
                        openvino_device=config.openvino_device, batch_size=batch_size,
                        metadata=lambda: _metadata(config.model))


def _import_runtime(runtime: str) -> None:
    """Load the runtime before the memory baseline, so the figure is the model's alone."""
    from rtfq_deploy.bench.runtimes import require

    require(runtime)


def measure(config: MeasureConfig) -> dict[str, Any]:
    import numpy as np  # noqa: F401  (loaded before the baseline, like the runtime)

    _import_runtime(config.runtime)
    if config.accuracy_images is not None:
        return measure_accuracy(config)
    baseline, method = memory_baseline()
    start = time.perf_counter_ns()
    session = _open(config, config.batch_size)
    create_s = (time.perf_counter_ns() - start) / 1e9
    metadata = session.metadata
    if metadata.get(META_WEIGHTS) == WEIGHTS_INT4_PACKED:
        raise ValueError("INT4-packed weights run as float convolutions in onnxruntime, which is not what a device "
                         "runs: benchmark the --pack int8 export of this subnet (same graph after expansion)")
    session.set_inputs(make_inputs(session, config.batch_size, config.seed))

    def run_batch(k: int) -> int:
        run = session.run
        t0 = time.perf_counter_ns()
        for _ in range(k):
            run()
        return time.perf_counter_ns() - t0

    result: dict[str, Any] = {"ok": True, "session_create_s": create_s, **session.details, "metadata": metadata}
    if config.latency:
        cpu0, wall0 = time.process_time_ns(), time.perf_counter_ns()
        result["latency"] = asdict(run_until_stable(run_batch, config))
        # CPU time per wall time of this process while timing: about the thread count when
        # the cores were its own, well below when other work took them.
        # Over less than MIN_CPU_WINDOW_S the CPU clock's tick makes the ratio meaningless: None.
        wall = time.perf_counter_ns() - wall0
        result["cpu_per_wall"] = (time.process_time_ns() - cpu0) / wall if wall >= MIN_CPU_WINDOW_S * 1e9 else None
        result["load_average"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    else:
        run_batch(config.warmup + config.memory_runs)
    result["peak_memory_bytes"] = max(0, peak_rss_bytes() - baseline)
    result["memory_method"] = method
    return result


def measure_accuracy(config: MeasureConfig) -> dict[str, Any]:
    """Top-1 of this runtime on the preprocessed images, its logits saved to
    ``logits_out``, and its agreement with ``reference_logits`` when given: the share of
    images with the same top-1 class, and the largest logit difference."""
    import numpy as np

    images = np.load(config.accuracy_images, allow_pickle=False)
    labels = np.load(config.accuracy_labels, allow_pickle=False) if config.accuracy_labels else None
    session = _open(config, ACCURACY_BATCH)
    name = _inputs(session)[0].name
    outputs = []
    for i in range(0, len(images), ACCURACY_BATCH):
        chunk = images[i:i + ACCURACY_BATCH]
        pad = ACCURACY_BATCH - len(chunk)  # the compiled batch is fixed: pad the last one, drop its rows
        batch = np.concatenate([chunk, np.zeros((pad, *chunk.shape[1:]), chunk.dtype)]) if pad else chunk
        outputs.append(np.asarray(session.infer({name: np.ascontiguousarray(batch)}))[:len(chunk)])
    logits = np.concatenate(outputs).astype(np.float32)
    if config.logits_out:
        np.save(config.logits_out, logits, allow_pickle=False)
    predicted = logits.argmax(1)
    result: dict[str, Any] = {"ok": True, "images": int(len(images)), "metadata": session.metadata}
    if labels is not None:
        result["top1"] = float((predicted == labels).mean())
    if config.reference_logits:
        reference = np.load(config.reference_logits, allow_pickle=False)
        if reference.shape != logits.shape:
            raise ValueError(f"reference logits have shape {reference.shape}, this runtime gave {logits.shape}")
        result["agreement"] = float((reference.argmax(1) == predicted).mean())
        result["max_logit_diff"] = float(np.abs(reference - logits).max()) if logits.size else 0.0
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
