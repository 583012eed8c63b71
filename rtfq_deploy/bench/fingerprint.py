"""What a benchmark result depends on besides the model: the device and the runtime settings.

Recorded with every results file and copied into the manifest, so a figure is never read
without knowing where and how it was measured.
"""

from __future__ import annotations

import os
import platform
import re
from typing import Any, Sequence

from rtfq_deploy.formats import ONNXRUNTIME

# CPU features that decide which integer kernels onnxruntime can use.
_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_int8", "amx_tile", "asimd", "asimddp",
          "i8mm", "sve")


def cpu_info() -> dict[str, Any]:
    """CPU model, logical and physical cores and the integer-relevant feature flags."""
    model, flags, physical = "", set(), set()
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
    except OSError:
        text = ""
    core: dict[str, str] = {}
    for line in text.splitlines() + [""]:
        if not line.strip():
            if "physical id" in core and "core id" in core:
                physical.add((core["physical id"], core["core id"]))
            core = {}
            continue
        key, _, value = line.partition(":")
        key, value = key.strip(), value.strip()
        core[key] = value
        if key in ("model name", "Model", "Hardware", "cpu model") and not model:
            model = value
        elif key in ("flags", "Features"):
            flags.update(value.split())
    return {
        "cpu_model": model or platform.processor() or platform.machine() or "unknown",
        "logical_cores": os.cpu_count() or 0,
        "physical_cores": len(physical) or None,
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "cpu_flags": sorted(flags.intersection(_FLAGS)),
    }


def memory_total_bytes() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def fingerprint(provider: str, threads: int, batch_size: int, graph_optimization: str,
                runtimes: Sequence[str] = (ONNXRUNTIME,), openvino_device: str = "CPU") -> dict[str, Any]:
    """The device and the settings a results file was measured with: per runtime its
    version and where it ran (onnxruntime's execution provider, OpenVINO's plugin). The
    top-level ``onnxruntime``/``provider`` keys are those of version 1 files."""
    from rtfq_deploy.bench.runtimes import version

    described: dict[str, dict[str, Any]] = {}
    for runtime in runtimes:
        if runtime == ONNXRUNTIME:
            described[runtime] = {"version": version(runtime), "provider": provider,
                                  "graph_optimization": graph_optimization}
        else:
            described[runtime] = {"version": version(runtime), "device": openvino_device}
    return {
        **cpu_info(),
        "memory_bytes": memory_total_bytes(),
        "machine": platform.machine(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "onnxruntime": version(ONNXRUNTIME),  # version 1 files' key
        "provider": provider,
        "threads": threads,
        "batch_size": batch_size,
        "graph_optimization": graph_optimization,
        "runtimes": described,
    }


def device_slug(fp: dict[str, Any]) -> str:
    """A default device name: CPU model, provider and threads, e.g.
    ``amd-epyc-9654-96-core-processor-cpu-t1`` (a valid manifest device name)."""
    model = re.sub(r"\((r|tm)\)|\bcpu @.*$|@.*$", " ", str(fp.get("cpu_model", "device")), flags=re.IGNORECASE)
    provider = re.sub(r"executionprovider$", "", str(fp.get("provider", "cpu")).lower()) or "cpu"
    parts = [model, provider, f"t{fp.get('threads', 1)}"]
    if fp.get("batch_size", 1) != 1:
        parts.append(f"b{fp['batch_size']}")
    slug = re.sub(r"[^a-z0-9]+", "-", "-".join(parts).lower()).strip("-")
    return slug[:100].strip("-") or "device"
