"""Choose one model per budget from a device's benchmark results and publish them in DIST_DIR.

For each budget: the most accurate measured subnet that meets every limit on that device
(:func:`rtfq_deploy.budget.choose`); an unmeetable budget is reported with its cheapest
option and serves no file. The chosen files are copied to ``DIST_DIR/<device>/<subnet>.onnx``
(atomically, sha256 checked against the file that was measured), then the device's entry
in ``manifest.json`` is replaced atomically, leaving the other devices as they were.

Files the device's previous entry served and the new one does not are removed only after
the new manifest is in place (``prune=True``, the default): a download already in progress
keeps its open file (POSIX), and a client holding the old manifest gets "not found" and
reads the manifest again. With ``prune=False`` they stay until a later run prunes them.
Only files the old entry named are ever removed.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from rtfq_deploy import manifest as mf
from rtfq_deploy.budget import Budget, Choice, choose, pareto_front
from rtfq_deploy.errors import RtfqError
from rtfq_deploy.fileio import atomic_write, sweep_temporaries

log = logging.getLogger(__name__)

# Costs the Pareto fronts are drawn against (accuracy is the other axis).
FRONT_KEYS = {"latency_p50_ms": "latency p50 (ms)", "peak_memory_bytes": "peak memory (MB)",
              "size_bytes": "file size (MB)"}


@dataclass(frozen=True)
class SelectOptions:
    memory: str = "arena"  # which peak memory the memory budget limits: "arena" or "no-arena"
    prune: bool = True
    force: bool = False  # replace a file of the same name whose content differs


@dataclass(frozen=True)
class Selection:
    device: str
    choices: tuple[Choice, ...]
    candidates: tuple[Mapping[str, Any], ...]
    fronts: Mapping[str, list[Mapping[str, Any]]]
    written: tuple[mf.Entry, ...] = ()
    copied: tuple[str, ...] = ()  # subnets whose file was (re)written; others were already in place
    removed: tuple[str, ...] = ()
    skipped: tuple[str, ...] = field(default=())  # measured rows that cannot be chosen, with why

    @property
    def unmet(self) -> list[Choice]:
        return [c for c in self.choices if not c.met]


def candidates(results: Mapping[str, Any], accuracy: Mapping[str, float],
               memory: str = "arena") -> tuple[list[dict[str, Any]], list[str]]:
    """The measured models as budget entries (manifest keys plus ``accuracy`` and the
    source ``path``), and a line per row left out."""
    if memory not in ("arena", "no-arena"):
        raise RtfqError(f"memory must be 'arena' or 'no-arena', not {memory!r}")
    entries: dict[str, dict[str, Any]] = {}
    skipped = []
    for row in results["models"]:
        if not row["ok"]:
            skipped.append(f"{row['path']}: failed ({row.get('error')})")
            continue
        subnet = str(row["subnet"])
        if not isinstance(row.get("macs"), int) or not isinstance(row.get("bitops"), int):
            skipped.append(f"{row['path']}: no rtfq.macs/rtfq.bitops metadata (not written by rtfq-export)")
            continue
        mf.check_name(f"{subnet}.onnx", "file name")
        if subnet in entries:
            raise RtfqError(f"subnet {subnet} was measured twice ({entries[subnet]['path']} and {row['path']}); "
                            "keep one in the results")
        peak = row["peak_memory_bytes"] if memory == "arena" else row.get("peak_memory_no_arena_bytes")
        entries[subnet] = {
            "subnet": subnet, "path": row["path"], "sha256": row["sha256"], "size_bytes": row["size_bytes"],
            "latency_p50_ms": row["latency_p50_ms"], "latency_p90_ms": row["latency_p90_ms"],
            "peak_memory_bytes": peak, "macs": row["macs"], "bitops": row["bitops"],
            "accuracy": accuracy.get(subnet),
        }
    missing = sorted(s for s, e in entries.items() if e["accuracy"] is None)
    if missing:
        skipped.append(f"no accuracy for {', '.join(missing)}: chosen only where nothing with an accuracy meets a budget")
    if not entries:
        raise RtfqError("the results hold no successfully measured model")
    return list(entries.values()), skipped


def fronts(entries: Sequence[Mapping[str, Any]]) -> dict[str, list[Mapping[str, Any]]]:
    return {key: pareto_front(entries, key) for key in FRONT_KEYS}


def plan(results: Mapping[str, Any], accuracy: Mapping[str, float], budgets: Sequence[Budget], device: str,
         options: SelectOptions = SelectOptions()) -> Selection:
    """The choices without touching DIST_DIR."""
    mf.check_name(device)
    if not budgets:
        raise RtfqError("give at least one budget")
    entries, skipped = candidates(results, accuracy, options.memory)
    choices = tuple(choose(entries, b) for b in budgets)
    return Selection(device, choices, tuple(entries), fronts(entries), skipped=tuple(skipped))


def publish(selection: Selection, results: Mapping[str, Any], dist_dir: Path,
            options: SelectOptions = SelectOptions()) -> Selection:
    """Copy the chosen files and replace the device's manifest entry. Everything that can
    fail on input is checked before the first byte is written."""
    device = selection.device
    served: dict[str, list[str]] = {}
    by_subnet: dict[str, Mapping[str, Any]] = {}
    for c in selection.choices:
        if c.met:
            name = str(c.entry["subnet"])
            served.setdefault(name, []).append(str(c.budget))
            by_subnet[name] = c.entry
    if not served:
        return selection
    mf.read_manifest(dist_dir)  # a damaged manifest fails here, before any model file is copied
    device_dir = dist_dir / device
    for folder in (dist_dir, device_dir):  # what a killed select left, whichever files it was writing
        sweep_temporaries(folder)
    to_copy = []
    for name, entry in by_subnet.items():
        src = Path(entry["path"])
        if not src.is_file():
            raise RtfqError(f"{src}: the measured model file is gone")
        if mf.sha256_file(src) != entry["sha256"]:
            raise RtfqError(f"{src} changed since it was benchmarked (sha256 differs); benchmark it again")
        dest = device_dir / f"{name}.onnx"
        if dest.exists():
            if mf.sha256_file(dest) == entry["sha256"]:
                continue  # already in place: not rewritten under a server that may be sending it
            if not options.force:
                raise RtfqError(f"{dest} exists with different content (use --force to replace it)")
        to_copy.append((name, src, dest, entry["sha256"]))
    for name, src, dest, sha in to_copy:
        _copy_checked(src, dest, sha)
    files = tuple(mf.Entry(
        subnet=name, path=f"{device}/{name}.onnx", sha256=e["sha256"], size_bytes=int(e["size_bytes"]),
        latency_p50_ms=float(e["latency_p50_ms"]), latency_p90_ms=float(e["latency_p90_ms"]),
        peak_memory_bytes=int(e["peak_memory_bytes"]), macs=int(e["macs"]), bitops=int(e["bitops"]),
        accuracy=e["accuracy"], budgets=tuple(served[name])) for name, e in by_subnet.items())
    fingerprint = dict(results["fingerprint"]) | {"memory": options.memory}
    _, previous = mf.replace_device(dist_dir, device, mf.Device(fingerprint, files))
    removed = []
    if options.prune and previous is not None:
        keep = {f.path for f in files}
        for old in previous.files:
            if old.path not in keep:
                path = dist_dir / old.path  # Entry.from_dict checked it is <device>/<name>.onnx
                try:
                    path.unlink()
                    removed.append(old.path)
                except FileNotFoundError:
                    pass
    return Selection(device, selection.choices, selection.candidates, selection.fronts, written=files,
                     copied=tuple(n for n, *_ in to_copy), removed=tuple(removed), skipped=selection.skipped)


def _copy_checked(src: Path, dest: Path, sha256: str) -> None:
    """Copy atomically; the destination must hash to what was measured."""
    import hashlib

    digest = hashlib.sha256()
    with open(src, "rb") as f, atomic_write(dest, overwrite=True) as out:
        while block := f.read(1 << 20):
            digest.update(block)
            out.write(block)
        if digest.hexdigest() != sha256:
            raise RtfqError(f"{src} changed while it was copied; nothing replaced")
    if mf.sha256_file(dest) != sha256:
        raise RtfqError(f"{dest}: the written copy does not match sha256 {sha256}")
