"""The per-device model directory (DIST_DIR) and its ``manifest.json``, schema v1/v2.

``rtfq-bench select`` writes it, ``rtfq-serve`` serves it, ``rtfq fetch`` resolves
against it; none of them needs torch. Layout::

    DIST_DIR/manifest.json
    DIST_DIR/<device>/<subnet>.onnx

Schema (version 2; version 1 has no ``runtime``, and every entry is onnxruntime's)::

    {"format": "rtfq-manifest", "version": 2,
     "devices": {"<device>": {
        "fingerprint": {...},            # what rtfq-bench run recorded about the device
        "updated": "2026-11-23T10:00:00Z",
        "files": [{"subnet": "r160-w0.73-q4", "runtime": "openvino",
                   "path": "<device>/r160-w0.73-q4.onnx",
                   "sha256": "<64 hex>", "size_bytes": 1234,
                   "latency_p50_ms": 3.1, "latency_p90_ms": 3.3, "stable": true,
                   "peak_memory_bytes": 12345678, "accuracy": 0.81 | null,
                   "accuracy_source": "measured" | "table" | null,   # on this runtime, or rtfq eval's table
                   "agreement": 0.95 | null,     # top-1 agreement with onnxruntime's exact integer results
                   "macs": 123, "bitops": 456, "budgets": ["latency=20ms", ...]}]}}}

An entry is keyed by (device, runtime, subnet); the runtimes of one device may share a
file (one export runs on both). A manifest whose entries are all onnxruntime's is
written as version 1, which toolkits from before runtimes read as they always did; one
with another runtime is version 2, which they refuse rather than serve an OpenVINO
choice to an onnxruntime device. ``stable: false`` marks a latency figure whose p50 did
not settle within the benchmark's caps (absent: not recorded).

Budgets use the syntax of :mod:`rtfq_deploy.budget`. A reader never trusts a path: it
must be ``<device>/<name>.onnx`` with plain names, so it cannot leave DIST_DIR.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping

from rtfq_deploy.errors import RtfqError
from rtfq_deploy.formats import DEFAULT_RUNTIME, RUNTIMES
from rtfq_deploy.fileio import atomic_write, is_int, is_number, read_json, sha256_file  # noqa: F401  (sha256_file: part of this API)

FORMAT = "rtfq-manifest"
VERSION = 2
READABLE_VERSIONS = (1, 2)
MANIFEST = "manifest.json"
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_SHA_RE = re.compile(r"[0-9a-f]{64}")


def check_name(name: str, what: str = "device name") -> str:
    """Device and file names are plain: letters, digits, '.', '_', '-', not starting with '.'."""
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name) or ".." in name:
        raise RtfqError(f"invalid {what} {name!r}: use letters, digits, '.', '_' and '-' (no leading '.', no '..')")
    return name


@dataclass(frozen=True)
class Entry:
    """One model file served to a device, with what was measured on it."""

    subnet: str
    path: str
    sha256: str
    size_bytes: int
    latency_p50_ms: float
    latency_p90_ms: float
    peak_memory_bytes: int
    macs: int
    bitops: int
    accuracy: float | None = None
    budgets: tuple[str, ...] = ()
    runtime: str = DEFAULT_RUNTIME
    stable: bool | None = None  # None: not recorded (manifests from before it was)
    accuracy_source: str | None = None  # "measured" on this runtime, or "table" (rtfq eval)
    agreement: float | None = None  # top-1 agreement with onnxruntime on the measured images

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["budgets"] = list(self.budgets)
        for key in ("stable", "accuracy_source", "agreement"):
            if d[key] is None:
                del d[key]  # a version 1 entry stays as it was
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], device: str) -> "Entry":
        """An entry from parsed JSON, every field of the type the schema gives (a string
        where a number belongs, NaN or a negative size is refused, not coerced)."""
        where = f"manifest entry for device {device!r}"
        if not isinstance(d, Mapping):
            raise RtfqError(f"{where} is malformed: not an object")
        try:
            budgets = d.get("budgets", ())
            if not isinstance(budgets, (list, tuple)) or not all(isinstance(b, str) for b in budgets):
                raise ValueError("'budgets' must be a list of strings")
            accuracy = d.get("accuracy")
            runtime = d.get("runtime", DEFAULT_RUNTIME)
            if runtime not in RUNTIMES:
                raise ValueError(f"'runtime' must be one of {', '.join(RUNTIMES)}")
            stable = d.get("stable")
            if stable is not None and not isinstance(stable, bool):
                raise TypeError("'stable' must be true or false")
            source = d.get("accuracy_source")
            if source not in (None, "measured", "table"):
                raise ValueError("'accuracy_source' must be 'measured' or 'table'")
            agreement = None if d.get("agreement") is None else _real(d, "agreement")
            if agreement is not None and agreement > 1:
                raise ValueError("'agreement' is a fraction, at most 1")
            entry = cls(subnet=_text(d, "subnet"), path=_text(d, "path"), sha256=_text(d, "sha256"),
                        size_bytes=_count(d, "size_bytes"), latency_p50_ms=_real(d, "latency_p50_ms"),
                        latency_p90_ms=_real(d, "latency_p90_ms"), peak_memory_bytes=_count(d, "peak_memory_bytes"),
                        macs=_count(d, "macs"), bitops=_count(d, "bitops"),
                        accuracy=None if accuracy is None else _real(d, "accuracy"), budgets=tuple(budgets),
                        runtime=runtime, stable=stable, accuracy_source=source, agreement=agreement)
        except (KeyError, TypeError, ValueError) as e:
            raise RtfqError(f"{where} is malformed: {e}") from None
        device_dir, _, file_name = entry.path.partition("/")
        if device_dir != device or not file_name.endswith(".onnx"):
            raise RtfqError(f"manifest entry path {entry.path!r} is not {device}/<name>.onnx")
        check_name(file_name, "file name")
        if not _SHA_RE.fullmatch(entry.sha256):
            raise RtfqError(f"manifest entry {entry.path!r} has a malformed sha256")
        return entry


def _text(d: Mapping[str, Any], key: str) -> str:
    value = d[key]
    if not isinstance(value, str):
        raise TypeError(f"{key!r} must be a string")
    return value


def _count(d: Mapping[str, Any], key: str) -> int:
    value = d[key]
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        value = int(value)
    if not is_number(value) or not isinstance(value, int) or not 0 <= value < 2**63:
        raise ValueError(f"{key!r} must be a non-negative integer")
    return value


def _real(d: Mapping[str, Any], key: str) -> float:
    value = d[key]
    if not is_number(value) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{key!r} must be a finite, non-negative number")
    return float(value)


@dataclass(frozen=True)
class Device:
    fingerprint: Mapping[str, Any]
    files: tuple[Entry, ...]
    updated: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {"fingerprint": dict(self.fingerprint), "updated": self.updated,
                "files": [e.as_dict() for e in self.files]}

    @property
    def runtimes(self) -> list[str]:
        """The runtimes this device has entries for, in the toolkit's order."""
        have = {e.runtime for e in self.files}
        return [r for r in RUNTIMES if r in have]


@dataclass(frozen=True)
class Manifest:
    devices: Mapping[str, Device] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        version = self.version
        devices = {name: self.devices[name].as_dict() for name in sorted(self.devices)}
        if version == 1:  # exactly the version 1 layout: no runtime key
            for d in devices.values():
                for e in d["files"]:
                    del e["runtime"]
        return {"format": FORMAT, "version": version, "devices": devices}

    @property
    def version(self) -> int:
        """1 while every entry is onnxruntime's (older toolkits read it), else 2."""
        other = any(e.runtime != DEFAULT_RUNTIME for d in self.devices.values() for e in d.files)
        return VERSION if other else 1


def parse_manifest(data: Any, where: str = MANIFEST) -> Manifest:
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise RtfqError(f"{where}: not an rtfq manifest")
    if not is_int(data.get("version")) or data.get("version") not in READABLE_VERSIONS:
        raise RtfqError(f"{where}: manifest version {data.get('version')!r} is not supported "
                        f"(this toolkit reads {', '.join(map(str, READABLE_VERSIONS))})")
    devices = data.get("devices")
    if not isinstance(devices, dict):
        raise RtfqError(f"{where}: 'devices' must be an object")
    out = {}
    for name, d in devices.items():
        check_name(name)
        if not isinstance(d, dict) or not isinstance(d.get("files"), list):
            raise RtfqError(f"{where}: device {name!r} has no 'files' list")
        if not isinstance(d.get("fingerprint") or {}, dict) or not isinstance(d.get("updated", ""), str):
            raise RtfqError(f"{where}: device {name!r} has a malformed 'fingerprint' or 'updated'")
        files = tuple(Entry.from_dict(e, name) for e in d["files"])
        if data["version"] == 1 and any(e.runtime != DEFAULT_RUNTIME for e in files):
            raise RtfqError(f"{where}: device {name!r} has {', '.join(sorted({e.runtime for e in files} - {DEFAULT_RUNTIME}))} "
                            "entries in a version 1 manifest (only onnxruntime's belong there)")
        seen: set[tuple[str, str]] = set()
        for entry in files:
            if (entry.runtime, entry.subnet) in seen:
                raise RtfqError(f"{where}: device {name!r} lists {entry.subnet} on {entry.runtime} twice")
            seen.add((entry.runtime, entry.subnet))
        out[name] = Device(fingerprint=dict(d.get("fingerprint") or {}), updated=d.get("updated", ""), files=files)
    return Manifest(out)


def read_manifest(dist_dir: str | os.PathLike) -> Manifest:
    """The manifest of ``dist_dir``; an empty one if the directory has none yet."""
    path = Path(dist_dir) / MANIFEST
    if not path.exists():
        return Manifest({})
    return parse_manifest(read_json(path, "manifest", expect=dict), str(path))


def write_manifest(dist_dir: str | os.PathLike, manifest: Manifest) -> Path:
    """Replace ``manifest.json`` atomically (a reader sees the old or the new file, whole)."""
    path = Path(dist_dir) / MANIFEST
    with atomic_write(path, overwrite=True) as f:
        f.write((json.dumps(manifest.as_dict(), indent=2) + "\n").encode())
    return path


@contextlib.contextmanager
def locked(dist_dir: str | os.PathLike) -> Iterator[None]:
    """Serialise read-modify-write of the manifest between processes (advisory lock)."""
    Path(dist_dir).mkdir(parents=True, exist_ok=True)
    with open(Path(dist_dir) / ".manifest.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def set_device(dist_dir: str | os.PathLike, name: str, device: Device) -> Manifest:
    """Put ``device`` into the manifest, leaving every other device as it was."""
    return replace_device(dist_dir, name, device)[0]


def replace_device(dist_dir: str | os.PathLike, name: str, device: Device) -> tuple[Manifest, Device | None]:
    """:func:`set_device`, also returning the entry it replaced (read under the same lock,
    so the caller knows exactly which files the old entry served)."""
    check_name(name)
    with locked(dist_dir):
        current = read_manifest(dist_dir)
        devices = dict(current.devices)
        previous = devices.get(name)
        devices[name] = Device(device.fingerprint, device.files,
                               device.updated or time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        manifest = Manifest(devices)
        write_manifest(dist_dir, manifest)
    return manifest, previous
