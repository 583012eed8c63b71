"""Benchmark model files one by one, each in fresh child processes, into a results file.

Per model, two children run ``python -m rtfq_deploy.bench.measure``: the first with
onnxruntime's default memory arena measures session creation, latency and peak memory;
the second, without the arena, measures peak memory only (a process's peak never goes
down, so each figure needs its own process). A child that fails, prints garbage, crashes
or runs past its timeout makes a failed row with the reason; the other models still run.

Results file (``format: rtfq-bench-results``, version 1)::

    {"format": "rtfq-bench-results", "version": 1, "created": "...Z",
     "fingerprint": {...},                     # rtfq_deploy.bench.fingerprint
     "settings": {...},                        # the stopping rule and timeouts
     "models": [{"path": "/abs/model.onnx", "ok": true, "error": null,
                 "subnet": "r160-w0.73-q4", "macs": 123, "bitops": 456,
                 "size_bytes": 1234, "sha256": "...",
                 "session_create_s": 0.1, "latency_p50_ms": 3.1, "latency_p90_ms": 3.3,
                 "latency_p99_ms": 3.9, "latency_mean_ms": 3.2, "latency_std_ms": 0.2,
                 "runs": 300, "measure_time_s": 1.0, "p50_cv": 0.004, "p50_drift": 0.002,
                 "stable": true, "cpu_per_wall": 0.99, "load_average": 1.1,
                 "peak_memory_bytes": 25000000, "peak_memory_no_arena_bytes": 21000000,
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
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable, Sequence

from rtfq_deploy.bench.fingerprint import fingerprint
from rtfq_deploy.bench.measure import MeasureConfig
from rtfq_deploy.errors import RtfqError
from rtfq_deploy.fileio import atomic_write, is_number, read_json, sha256_file

log = logging.getLogger(__name__)

FORMAT = "rtfq-bench-results"
VERSION = 1


@dataclass(frozen=True)
class BenchSettings:
    """How every model is measured (``measure`` is the template of the child's config)."""

    measure: MeasureConfig
    timeout_s: float = 300.0
    python: str = sys.executable


def resolve_provider(name: str) -> str:
    """'cpu' or 'CPUExecutionProvider' -> the provider onnxruntime offers on this device."""
    import onnxruntime as ort

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
                result = json.loads(line)
            except json.JSONDecodeError:
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


def bench_model(path: Path, settings: BenchSettings) -> dict[str, Any]:
    """Measure one model file; never raises for a bad model (the row says what failed)."""
    row: dict[str, Any] = {"path": str(path.resolve()), "ok": False, "error": None, "subnet": path.stem}
    try:
        row["sha256"], row["size_bytes"] = sha256_file(path), path.stat().st_size
    except OSError as e:
        row["error"] = f"cannot read: {e.strerror}"
        return row
    first = run_child(replace(settings.measure, model=row["path"], arena=True, latency=True), settings)
    if not first.get("ok"):
        row["error"] = str(first.get("error"))
        return row
    second = run_child(replace(settings.measure, model=row["path"], arena=False, latency=False), settings)
    if not second.get("ok"):
        row["error"] = f"without the memory arena: {second.get('error')}"
        return row
    meta = {k: str(v) for k, v in (first.get("metadata") or {}).items() if k.startswith("rtfq.")}
    lat = first["latency"]
    row.update({
        "ok": True,
        "subnet": meta.get("rtfq.subnet", path.stem),
        "macs": _int_or_none(meta.get("rtfq.macs")),
        "bitops": _int_or_none(meta.get("rtfq.bitops")),
        "session_create_s": first["session_create_s"],
        "latency_p50_ms": lat["p50_ms"], "latency_p90_ms": lat["p90_ms"], "latency_p99_ms": lat["p99_ms"],
        "latency_mean_ms": lat["mean_ms"], "latency_std_ms": lat["std_ms"],
        "runs": lat["runs"], "measure_time_s": lat["time_s"], "p50_cv": lat["p50_cv"],
        "p50_drift": lat["p50_drift"], "stable": lat["stable"],
        "cpu_per_wall": first.get("cpu_per_wall"), "load_average": first.get("load_average"),
        "peak_memory_bytes": first["peak_memory_bytes"],
        "peak_memory_no_arena_bytes": second["peak_memory_bytes"],
        "memory_method": first.get("memory_method"),
        "providers": first.get("providers"),
        "metadata": meta,
    })
    return row


def collect_models(paths: Sequence[Path]) -> list[Path]:
    """Files as given; a directory stands for its ``*.onnx`` files (sorted)."""
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
    return out


def bench_models(paths: Sequence[Path], settings: BenchSettings, output: Path | None = None,
                 progress: Callable[[Path, dict[str, Any] | None], None] | None = None) -> dict[str, Any]:
    """Benchmark every model; the results file (if given) is rewritten atomically after
    each model, so an interrupted run keeps what it measured. ``progress`` is called with
    None as a model starts and with its row when it is done."""
    m = settings.measure
    results: dict[str, Any] = {
        "format": FORMAT, "version": VERSION, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "fingerprint": fingerprint(m.provider, m.threads, m.batch_size, m.graph_optimization),
        "settings": {k: v for k, v in asdict(m).items() if k not in ("model", "arena", "latency")}
        | {"timeout_s": settings.timeout_s},
        "models": [],
    }
    for path in paths:
        if progress is not None:
            progress(path, None)
        row = bench_model(path, settings)
        if not row["ok"]:
            log.info("%s failed: %s", path, row["error"])
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
    """A results file, checked enough that select can trust its shape."""
    data = read_json(path, "results", expect=dict)
    if data.get("format") != FORMAT:
        raise RtfqError(f"{path}: not an rtfq-bench results file")
    if data.get("version") != VERSION:
        raise RtfqError(f"{path}: results version {data.get('version')!r} is not supported (this toolkit reads {VERSION})")
    if not isinstance(data.get("models"), list) or not isinstance(data.get("fingerprint"), dict):
        raise RtfqError(f"{path}: results without 'models' or 'fingerprint'")
    for i, row in enumerate(data["models"]):
        if not isinstance(row, dict) or not isinstance(row.get("ok"), bool) or not isinstance(row.get("path"), str):
            raise RtfqError(f"{path}: model row {i} is malformed")
        if row["ok"]:
            bad = [k for k in _NUMBERS if not _is_number(row.get(k))]
            if bad or not isinstance(row.get("subnet"), str) or not _SHA_RE.fullmatch(str(row.get("sha256"))):
                what = ", ".join(bad) or "subnet or sha256"
                raise RtfqError(f"{path}: model row {i} ({row.get('subnet')}) has no valid {what}")
            counts = [k for k in ("macs", "bitops") if row.get(k) is not None and not (_is_number(row[k]) and isinstance(row[k], int))]
            if counts:
                raise RtfqError(f"{path}: model row {i} ({row['subnet']}) has a malformed {', '.join(counts)}")
    return data


_NUMBERS = ("size_bytes", "latency_p50_ms", "latency_p90_ms", "peak_memory_bytes", "peak_memory_no_arena_bytes")
_SHA_RE = re.compile(r"[0-9a-f]{64}")


def _is_number(value: Any) -> bool:
    return is_number(value) and math.isfinite(value) and value >= 0
