"""Benchmark model files on one or more runtimes, each in fresh child processes, into a results file.

Per model and runtime (the runtimes interleaved model by model, so a machine that slows
down touches both alike), children run ``python -m rtfq_deploy.bench.measure``. On
onnxruntime the first, with its default memory arena, measures session creation, latency
and peak memory; the second, without the arena, measures peak memory only (a process's
peak never goes down, so each figure needs its own process). OpenVINO has no such switch:
one child measures compile time, latency and peak memory. A child that fails, prints
garbage, crashes or runs past its timeout makes a failed row with the reason; the other
rows still run.

With labeled images (:class:`rtfq_deploy.bench.images.ImageSet`) a third child per row
runs them: top-1 on that runtime, and the agreement with the exact integer semantics,
which onnxruntime computes (its top-1 equals PyTorch's evaluation of the same integer
network, image for image): the share of images whose top-1 class equals onnxruntime's,
and the largest logit difference. onnxruntime is run for that reference whenever it is
installed, even when only OpenVINO is benchmarked.

Results file (``format: rtfq-bench-results``, version 2; version 1, before runtimes,
still reads: its rows are onnxruntime's)::

    {"format": "rtfq-bench-results", "version": 2, "created": "...Z",
     "fingerprint": {...,                     # rtfq_deploy.bench.fingerprint
                     "runtimes": {"onnxruntime": {"version": "1.32.0", "provider": "CPUExecutionProvider",
                                                  "graph_optimization": "all"},
                                  "openvino": {"version": "2026.4.0", "device": "CPU"}}},
     "settings": {...},                        # the stopping rule and timeouts
     "models": [{"path": "/abs/model.onnx", "runtime": "onnxruntime", "ok": true, "error": null,
                 "subnet": "r160-w0.73-q4", "macs": 123, "bitops": 456,
                 "size_bytes": 1234, "sha256": "...",
                 "session_create_s": 0.1, "latency_p50_ms": 3.1, "latency_p90_ms": 3.3,
                 "latency_p99_ms": 3.9, "latency_mean_ms": 3.2, "latency_std_ms": 0.2,
                 "runs": 3000, "samples": 300, "runs_per_sample": 10,
                 "measure_time_s": 1.0, "p50_cv": 0.004, "p50_drift": 0.002,
                 "stable": true, "cpu_per_wall": 0.99, "load_average": 1.1,
                 "peak_memory_bytes": 25000000,
                 "peak_memory_no_arena_bytes": 21000000,   # null on runtimes without an arena switch
                 "top1": 0.81, "images": 1797,             # with --images
                 "agreement": 0.95, "max_logit_diff": 0.4, "agreement_reference": "onnxruntime",
                 "metadata": {...}}]}   # every rtfq.* metadata entry of the file

The metric keys are the manifest's (:mod:`rtfq_deploy.manifest`), so a row can be
checked against a budget (:mod:`rtfq_deploy.budget`) as it is.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import signal
import stat
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Sequence

from rtfq_deploy.bench.fingerprint import fingerprint
from rtfq_deploy.bench.measure import MeasureConfig
from rtfq_deploy.bench.runtimes import version
from rtfq_deploy.errors import RtfqError
from rtfq_deploy.fileio import atomic_write, is_int, is_number, parse_json, read_json, sha256_file
from rtfq_deploy.formats import (DEFAULT_RUNTIME, META_BITOPS, META_MACS, META_SUBNET, METADATA_PREFIX, ONNXRUNTIME,
                                 RUNTIMES)

log = logging.getLogger(__name__)

FORMAT = "rtfq-bench-results"
VERSION = 2
READABLE_VERSIONS = (1, 2)


@dataclass(frozen=True)
class BenchSettings:
    """How every model is measured (``measure`` is the template of the child's config)."""

    measure: MeasureConfig
    timeout_s: float = 300.0
    python: str = sys.executable
    runtimes: tuple[str, ...] = (DEFAULT_RUNTIME,)
    images: Any = None  # an rtfq_deploy.bench.images.ImageSet: measure top-1 and agreement too
    workdir: Path | None = field(default=None)  # where preprocessed images and logits go (a temporary folder)
    # Latency processes per row: p50 varies between fresh processes of one model (0.099,
    # 0.114, 0.108 ms in three runs of a 0.1 ms model) more than within one; the row
    # reports the process with the median p50.
    processes: int = 1


def resolve_provider(name: str) -> str:
    """'cpu' or 'CPUExecutionProvider' -> the provider onnxruntime offers on this device."""
    from rtfq_deploy.bench.runtimes import require

    ort = require(ONNXRUNTIME)
    available = ort.get_available_providers()
    wanted = name.lower().removesuffix("executionprovider")
    for provider in available:
        if provider.lower().removesuffix("executionprovider") == wanted:
            return provider
    raise RtfqError(f"execution provider {name!r} is not available here (onnxruntime offers: {', '.join(available)})")


def run_child(config: MeasureConfig, settings: BenchSettings) -> dict[str, Any]:
    """One measuring process; failures of any kind come back as ``{"ok": False, "error": ...}``."""
    command = [settings.python, "-m", "rtfq_deploy.bench.measure", config.to_json()]
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=settings.timeout_s,
                              stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": f"timed out after {settings.timeout_s:g} s"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("{"):
            try:
                result = parse_json(line, "the measuring process", "result")
            except RtfqError:
                break
            if isinstance(result, dict) and "ok" in result:
                return result
            break
    if proc.returncode < 0:
        try:
            name = signal.Signals(-proc.returncode).name
        except ValueError:
            name = f"signal {-proc.returncode}"
        why = f"crashed ({name})"
    else:
        why = f"the measuring process exited with status {proc.returncode} and no result"
    tail = [line for line in proc.stderr.splitlines() if line.strip()][-1:]
    return {"ok": False, "error": why + (f": {tail[0].strip()[:300]}" if tail else "")}


def _int_or_none(text: Any) -> int | None:
    try:
        return int(text)
    except (TypeError, ValueError):
        return None


def bench_model(path: Path, settings: BenchSettings, runtime: str = DEFAULT_RUNTIME,
                reference: Path | None = None) -> dict[str, Any]:
    """Measure one model file on one runtime; never raises for a bad model (the row says
    what failed). ``reference``: onnxruntime's logits on the images, for the agreement."""
    row: dict[str, Any] = {"path": str(path.resolve()), "runtime": runtime, "ok": False, "error": None,
                           "subnet": path.stem}
    try:
        size = path.stat().st_size
        row["sha256"], row["size_bytes"] = sha256_file(path, what="model file"), size
    except OSError as e:
        row["error"] = f"cannot read: {e.strerror}"
        return row
    except RtfqError as e:  # not a regular file (any more): never hashed
        row["error"] = str(e)
        return row
    template = replace(settings.measure, model=row["path"], runtime=runtime)
    first = run_child(replace(template, arena=True, latency=True), settings)
    if not first.get("ok"):
        row["error"] = str(first.get("error"))
        return row
    second: dict[str, Any] = {"peak_memory_bytes": None}
    if runtime == ONNXRUNTIME:
        second = run_child(replace(template, arena=False, latency=False), settings)
        if not second.get("ok"):
            row["error"] = f"without the memory arena: {second.get('error')}"
            return row
    meta = {k: str(v) for k, v in (first.get("metadata") or {}).items() if k.startswith(METADATA_PREFIX)}
    timed = [first]
    for _ in range(settings.processes - 1):
        more = run_child(replace(template, arena=True, latency=True), settings)
        if not more.get("ok"):
            row["error"] = str(more.get("error"))
            return row
        timed.append(more)
    p50s = [t["latency"]["p50_ms"] for t in timed]
    lat = sorted((t["latency"] for t in timed), key=lambda x: x["p50_ms"])[(len(timed) - 1) // 2]
    row.update({
        "ok": True,
        "subnet": meta.get(META_SUBNET, path.stem),
        "macs": _int_or_none(meta.get(META_MACS)),
        "bitops": _int_or_none(meta.get(META_BITOPS)),
        "session_create_s": first["session_create_s"],
        "latency_p50_ms": lat["p50_ms"], "latency_p90_ms": lat["p90_ms"], "latency_p99_ms": lat["p99_ms"],
        "latency_mean_ms": lat["mean_ms"], "latency_std_ms": lat["std_ms"],
        "runs": lat["runs"], "samples": lat["samples"], "runs_per_sample": lat["runs_per_sample"],
        "measure_time_s": lat["time_s"], "p50_cv": lat["p50_cv"],
        "p50_drift": lat["p50_drift"], "stable": lat["stable"],
        **({"process_p50_ms": p50s} if len(p50s) > 1 else {}),
        "cpu_per_wall": first.get("cpu_per_wall"), "load_average": first.get("load_average"),
        "peak_memory_bytes": first["peak_memory_bytes"],
        "peak_memory_no_arena_bytes": second["peak_memory_bytes"],
        "memory_method": first.get("memory_method"),
        "metadata": meta,
    })
    for key in ("providers", "openvino_device", "inference_threads"):
        if key in first:
            row[key] = first[key]
    if settings.images is not None:
        row.update(_accuracy(path, runtime, settings, reference))
    return row


def _accuracy(path: Path, runtime: str, settings: BenchSettings, reference: Path | None) -> dict[str, Any]:
    """Top-1 and agreement fields for a row; ``accuracy_error`` when the images could not be run."""
    try:
        images, labels = settings.images.arrays_for(path, settings.workdir)
    except RtfqError as e:
        return {"accuracy_error": str(e)}
    is_reference = runtime == ONNXRUNTIME
    config = replace(settings.measure, model=str(path.resolve()), runtime=runtime, accuracy_images=str(images),
                     accuracy_labels=str(labels), reference_logits=None if is_reference or reference is None
                     else str(reference), logits_out=str(_logits_path(path, runtime, settings.workdir)))
    result = run_child(config, settings)
    if not result.get("ok"):
        return {"accuracy_error": str(result.get("error"))}
    out = {"top1": result.get("top1"), "images": result.get("images")}
    if is_reference:
        out |= {"agreement": 1.0, "max_logit_diff": 0.0, "agreement_reference": ONNXRUNTIME}
    elif "agreement" in result:
        out |= {"agreement": result["agreement"], "max_logit_diff": result["max_logit_diff"],
                "agreement_reference": ONNXRUNTIME}
    return out


def _logits_path(path: Path, runtime: str, workdir: Path | None) -> Path:
    import hashlib

    key = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:16]
    return Path(workdir or tempfile.gettempdir()) / f"logits-{key}-{runtime}.npy"


def _reference(path: Path, settings: BenchSettings) -> Path | None:
    """onnxruntime's logits on the images (run now unless its row already made them)."""
    if settings.images is None or version(ONNXRUNTIME) is None:
        return None
    out = _logits_path(path, ONNXRUNTIME, settings.workdir)
    if out.exists():
        return out
    try:
        images, labels = settings.images.arrays_for(path, settings.workdir)
    except RtfqError:
        return None
    config = replace(settings.measure, model=str(path.resolve()), runtime=ONNXRUNTIME,
                     accuracy_images=str(images), accuracy_labels=str(labels), logits_out=str(out))
    return out if run_child(config, settings).get("ok") and out.exists() else None


def collect_models(paths: Sequence[Path]) -> list[Path]:
    """Files as given; a directory stands for its ``*.onnx`` files (sorted). Each must be a
    regular file: a FIFO or /dev/zero named ``.onnx`` would be hashed without end."""
    out: list[Path] = []
    for p in paths:
        if p.is_dir():
            found = sorted(p.glob("*.onnx"))
            if not found:
                raise RtfqError(f"{p}: no .onnx files in this directory")
            out.extend(found)
        else:
            out.append(p)
    if not out:
        raise RtfqError("no model files given")
    for p in out:
        try:
            mode = os.stat(p).st_mode
        except FileNotFoundError:
            continue  # its row reports it, as for a file that goes away while others are measured
        except OSError as e:
            raise RtfqError(f"{p}: cannot read the model file: {e.strerror or e}") from None
        if not stat.S_ISREG(mode):
            raise RtfqError(f"{p}: not a regular file; a model must be an .onnx file")
    return out


def bench_models(paths: Sequence[Path], settings: BenchSettings, output: Path | None = None,
                 progress: Callable[[Path, dict[str, Any] | None], None] | None = None) -> dict[str, Any]:
    """Benchmark every model on every runtime of ``settings``; the results file (if given)
    is rewritten atomically after each row, so an interrupted run keeps what it measured.
    ``progress`` is called with None as a row starts and with the row when it is done."""
    m = settings.measure
    results: dict[str, Any] = {
        "format": FORMAT, "version": VERSION, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "fingerprint": fingerprint(m.provider, m.threads, m.batch_size, m.graph_optimization,
                                   runtimes=settings.runtimes, openvino_device=m.openvino_device),
        "settings": {k: v for k, v in asdict(m).items()
                     if k not in ("model", "arena", "latency", "runtime") and not k.startswith(("accuracy_", "reference_",
                                                                                               "logits_"))}
        | {"timeout_s": settings.timeout_s, "runtimes": list(settings.runtimes), "processes": settings.processes}
        | ({"images": settings.images.describe()} if settings.images is not None else {}),
        "models": [],
    }
    with tempfile.TemporaryDirectory(prefix="rtfq-bench-") as tmp:
        if settings.images is not None and settings.workdir is None:
            settings = replace(settings, workdir=Path(tmp))
        for path in paths:
            for runtime in settings.runtimes:
                if progress is not None:
                    progress(path, None)
                reference = _reference(path, settings) if runtime != ONNXRUNTIME else None
                row = bench_model(path, settings, runtime, reference)
                if not row["ok"]:
                    log.info("%s on %s failed: %s", path, runtime, row["error"])
                results["models"].append(row)
                if output is not None:
                    write_results(output, results)
                if progress is not None:
                    progress(path, row)
    return results


def write_results(path: Path, results: dict[str, Any]) -> None:
    with atomic_write(path, overwrite=True) as f:
        f.write((json.dumps(results, indent=2) + "\n").encode())


def read_results(path: str | os.PathLike) -> dict[str, Any]:
    """A results file, checked enough that select can trust its shape: every row's runtime
    is known and one the fingerprint describes, and no model is measured twice on one
    runtime."""
    return check_results(read_json(path, "results", expect=dict), path)


def check_results(data: dict[str, Any], path: str | os.PathLike) -> dict[str, Any]:
    """:func:`read_results`'s checks of parsed results (an upload to rtfq-serve, too)."""
    if data.get("format") != FORMAT:
        raise RtfqError(f"{path}: not an rtfq-bench results file")
    if not is_int(data.get("version")) or data.get("version") not in READABLE_VERSIONS:
        raise RtfqError(f"{path}: results version {data.get('version')!r} is not supported "
                        f"(this toolkit reads {', '.join(map(str, READABLE_VERSIONS))})")
    if not isinstance(data.get("models"), list) or not isinstance(data.get("fingerprint"), dict):
        raise RtfqError(f"{path}: results without 'models' or 'fingerprint'")
    described = data["fingerprint"].get("runtimes", {DEFAULT_RUNTIME: {}} if data["version"] == 1 else None)
    if not isinstance(described, dict) or not described or any(r not in RUNTIMES for r in described):
        raise RtfqError(f"{path}: the fingerprint's 'runtimes' is missing or names an unknown runtime")
    seen: dict[tuple[str, str], int] = {}
    for i, row in enumerate(data["models"]):
        if not isinstance(row, dict) or not isinstance(row.get("ok"), bool) or not isinstance(row.get("path"), str):
            raise RtfqError(f"{path}: model row {i} is malformed")
        runtime = row.get("runtime", DEFAULT_RUNTIME)
        if data["version"] == 1 and "runtime" in row:
            raise RtfqError(f"{path}: model row {i} names a runtime in a version 1 results file")
        if not isinstance(runtime, str) or runtime not in described:
            raise RtfqError(f"{path}: model row {i} was measured on runtime {str(runtime)[:40]!r}, which the "
                            f"fingerprint does not describe (it has {', '.join(sorted(described))})")
        if row["ok"]:
            needed = _NUMBERS + (("peak_memory_no_arena_bytes",) if runtime == ONNXRUNTIME else ())
            bad = [k for k in needed if not _is_number(row.get(k))]
            if bad or not isinstance(row.get("subnet"), str) or not _SHA_RE.fullmatch(str(row.get("sha256"))):
                what = ", ".join(bad) or "subnet or sha256"
                raise RtfqError(f"{path}: model row {i} ({row.get('subnet')}) has no valid {what}")
            counts = [k for k in ("macs", "bitops") if row.get(k) is not None and not (_is_number(row[k]) and isinstance(row[k], int))]
            if counts:
                raise RtfqError(f"{path}: model row {i} ({row['subnet']}) has a malformed {', '.join(counts)}")
            ranged = [k for k in ("top1", "agreement") if row.get(k) is not None
                      and not (_is_number(row[k]) and row[k] <= 1)]
            if ranged or (row.get("max_logit_diff") is not None and not _is_number(row["max_logit_diff"])):
                raise RtfqError(f"{path}: model row {i} ({row['subnet']}) has a malformed "
                                f"{', '.join(ranged) or 'max_logit_diff'}")
            key = (row["subnet"], runtime)
            if key in seen:
                raise RtfqError(f"{path}: {row['subnet']} was measured twice on {runtime} (rows {seen[key]} and {i}); "
                                "keep one in the results")
            seen[key] = i
    return data


_NUMBERS = ("size_bytes", "latency_p50_ms", "latency_p90_ms", "peak_memory_bytes")
_SHA_RE = re.compile(r"[0-9a-f]{64}")


def _is_number(value: Any) -> bool:
    return is_number(value) and math.isfinite(value) and value >= 0
