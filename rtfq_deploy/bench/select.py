"""Choose one model per budget and runtime from a device's benchmark results and publish them in DIST_DIR.

For each budget and each runtime the results measured: the most accurate measured subnet
that meets every limit on that device and runtime (:func:`rtfq_deploy.budget.choose`); an
unmeetable budget is reported with its cheapest option and serves no file. Accuracy is
the runtime's own top-1 where ``rtfq-bench run --images`` measured one (OpenVINO's
results differ from the exact integer semantics), else the ``rtfq eval`` table's. The
chosen files are copied to ``DIST_DIR/<device>/<subnet>.onnx`` (atomically, sha256
checked against the file that was measured; both runtimes share the file when they
measured the same one), then the device's entries for the measured runtimes are replaced
in ``manifest.json`` atomically, leaving its other runtimes and the other devices as
they were.

Files the device's previous entry served and the new one does not are removed only after
the new manifest is in place (``prune=True``, the default): a download already in progress
keeps its open file (POSIX), and a client holding the old manifest gets "not found" and
reads the manifest again. With ``prune=False`` they stay until a later run prunes them.
Only files the old entry named are ever removed.

Nothing in the results is taken on trust where it can be checked: every measured row
whose file is at hand must have that file's size and sha256 (:func:`verify_rows`), and an
accuracy table measured on another checkpoint than the files were exported from is
refused unless ``--force`` (:func:`check_table`).
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
from rtfq_deploy.formats import DEFAULT_RUNTIME, META_CHECKPOINT_SHA256, RUNTIMES

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
    kept: tuple[mf.Entry, ...] = ()  # the device's entries on runtimes these results did not measure

    @property
    def unmet(self) -> list[Choice]:
        return [c for c in self.choices if not c.met]

    @property
    def runtimes(self) -> list[str]:
        have = {str(e.get("runtime", DEFAULT_RUNTIME)) for e in self.candidates}
        return [r for r in RUNTIMES if r in have]

    def unstable(self) -> list[Choice]:
        """Met choices whose latency p50 did not settle when it was measured."""
        return [c for c in self.choices if c.met and c.entry.get("stable") is False]


def verify_rows(results: Mapping[str, Any]) -> None:
    """Each measured row against its file, where the file is at hand: the size and the
    sha256 the manifest will state must be the file's (a row that says 5 bytes for a
    142,540-byte file would have the server exclude the entry and the device get 422).
    A file that is gone is left to :func:`publish`, which refuses it if it is chosen."""
    import os
    import stat

    for i, row in enumerate(results["models"]):
        if not row.get("ok"):
            continue
        path = Path(row["path"])
        try:
            info = os.stat(path)
        except OSError:
            continue
        what = f"results row {i} ({str(row.get('subnet'))[:80]})"
        if not stat.S_ISREG(info.st_mode):
            raise RtfqError(f"{what}: {path} is not a regular file")
        if info.st_size != row["size_bytes"]:
            raise RtfqError(f"{what} states size_bytes {row['size_bytes']!r}, but {path} has {info.st_size} bytes "
                            "(the row is wrong, or the file changed since it was benchmarked); benchmark it again")
        if mf.sha256_file(path) != row["sha256"]:
            raise RtfqError(f"{what}: the sha256 it states is not that of {path} (changed since it was benchmarked?); "
                            "benchmark it again")


def check_table(results: Mapping[str, Any], table: Any, force: bool = False) -> None:
    """The accuracy table (an :class:`rtfq_deploy.accuracy.AccuracyTable`) must have been
    measured on the checkpoint every row it gives an accuracy to was exported from (the
    file's ``rtfq.checkpoint_sha256`` metadata); RtfqError unless ``force``."""
    for row in results["models"]:
        if not row.get("ok") or row.get("top1") is not None or row.get("subnet") not in table.top1:
            continue
        sha = (row.get("metadata") or {}).get(META_CHECKPOINT_SHA256)
        if isinstance(sha, str):
            table.check_checkpoint(sha, f"{row['subnet']} ({row['path']}) was exported from", force)


def candidates(results: Mapping[str, Any], accuracy: Mapping[str, float],
               memory: str = "arena") -> tuple[list[dict[str, Any]], list[str]]:
    """The measured rows as budget entries (manifest keys plus ``accuracy``, its source
    and the source ``path``), and a line per row left out. A row's own measured top-1
    (``rtfq-bench run --images``) wins over the table's."""
    if memory not in ("arena", "no-arena"):
        raise RtfqError(f"memory must be 'arena' or 'no-arena', not {memory!r}")
    entries: dict[tuple[str, str], dict[str, Any]] = {}
    skipped = []
    for row in results["models"]:
        runtime = str(row.get("runtime") or DEFAULT_RUNTIME)
        if not row["ok"]:
            skipped.append(f"{row['path']}: failed on {runtime} ({row.get('error')})")
            continue
        subnet = str(row["subnet"])
        if not isinstance(row.get("macs"), int) or not isinstance(row.get("bitops"), int):
            skipped.append(f"{row['path']}: no rtfq.macs/rtfq.bitops metadata (not written by rtfq-export)")
            continue
        mf.check_name(f"{subnet}.onnx", "file name")
        if (subnet, runtime) in entries:
            raise RtfqError(f"subnet {subnet} was measured twice on {runtime} ({entries[subnet, runtime]['path']} and "
                            f"{row['path']}); keep one in the results")
        peak = row["peak_memory_bytes"]
        if memory == "no-arena" and row.get("peak_memory_no_arena_bytes") is not None:
            peak = row["peak_memory_no_arena_bytes"]  # runtimes without an arena switch have one figure
        measured = row.get("top1")
        entries[subnet, runtime] = {
            "subnet": subnet, "runtime": runtime, "path": row["path"], "sha256": row["sha256"],
            "size_bytes": row["size_bytes"], "latency_p50_ms": row["latency_p50_ms"],
            "latency_p90_ms": row["latency_p90_ms"], "peak_memory_bytes": peak, "macs": row["macs"],
            "bitops": row["bitops"], "stable": row.get("stable"),
            "accuracy": measured if measured is not None else accuracy.get(subnet),
            "accuracy_source": "measured" if measured is not None else ("table" if subnet in accuracy else None),
            "agreement": row.get("agreement"),
            "latency_p50_ci_ms": row.get("latency_p50_ci_ms"),  # rtfq_deploy.bench.confidence.CI_KEY
        }
    missing = sorted(f"{s} ({r})" if len({r for _, r in entries}) > 1 else s
                     for (s, r), e in entries.items() if e["accuracy"] is None)
    if missing:
        skipped.append(f"no accuracy for {', '.join(missing)}: chosen only where nothing with an accuracy meets a budget")
    if not entries:
        raise RtfqError("the results hold no successfully measured model")
    return list(entries.values()), skipped


def fronts(entries: Sequence[Mapping[str, Any]]) -> dict[str, list[Mapping[str, Any]]]:
    return {key: pareto_front(entries, key) for key in FRONT_KEYS}


def plan(results: Mapping[str, Any], accuracy: Mapping[str, float], budgets: Sequence[Budget], device: str,
         options: SelectOptions = SelectOptions(), previous: "Previous | None" = None) -> Selection:
    """The choices without touching DIST_DIR. ``previous``: what the device was served
    last time, whose choices are kept while a new measurement is in doubt
    (:func:`rtfq_deploy.budget.choose`)."""
    mf.check_name(device)
    if not budgets:
        raise RtfqError("give at least one budget")
    verify_rows(results)
    entries, skipped = candidates(results, accuracy, options.memory)
    runtimes = [r for r in RUNTIMES if any(e["runtime"] == r for e in entries)]
    previous = previous or Previous({}, {})
    moved = {r: previous.drift(r, entries) for r in runtimes}
    choices = tuple(choose([e for e in entries if e["runtime"] == r], b, previous=previous.chosen.get((str(b), r)),
                           drift=moved[r]) for b in budgets for r in runtimes)
    return Selection(device, choices, tuple(entries), fronts(entries), skipped=tuple(skipped))


@dataclass(frozen=True)
class Previous:
    """What a device was served before it measured itself again: (budget text, runtime)
    -> subnet, and (subnet, runtime) -> the p50 it was measured at then."""

    chosen: Mapping[tuple[str, str], str]
    p50: Mapping[tuple[str, str], float]

    def drift(self, runtime: str, entries: Sequence[Mapping[str, Any]]) -> float:
        """How much the device's speed on ``runtime`` moved since (bench.confidence.drift)."""
        from rtfq_deploy.bench.confidence import drift

        before = {s: v for (s, r), v in self.p50.items() if r == runtime}
        now = {str(e["subnet"]): e["latency_p50_ms"] for e in entries if e["runtime"] == runtime}
        return drift(before, now)


def previous_choices(dist_dir: Path, device: str) -> Previous:
    """What DIST_DIR's manifest serves ``device`` now."""
    current = mf.read_manifest(dist_dir)
    served = current.devices.get(device)
    files = served.files if served is not None else ()
    return Previous({(b, e.runtime): e.subnet for e in files for b in e.budgets},
                    {(e.subnet, e.runtime): e.latency_p50_ms for e in files})


def publish(selection: Selection, results: Mapping[str, Any], dist_dir: Path,
            options: SelectOptions = SelectOptions()) -> Selection:
    """Copy the chosen files and replace the device's entries for the measured runtimes.
    Everything that can fail on input is checked before the first byte is written."""
    device = selection.device
    served: dict[tuple[str, str], list[str]] = {}
    chosen: dict[tuple[str, str], Mapping[str, Any]] = {}
    for c in selection.choices:
        if c.met:
            key = (str(c.entry["subnet"]), str(c.entry.get("runtime", DEFAULT_RUNTIME)))
            served.setdefault(key, []).append(str(c.budget))
            chosen[key] = c.entry
    if not served:
        return selection
    current = mf.read_manifest(dist_dir)  # a damaged manifest fails here, before any model file is copied
    previous = current.devices.get(device)
    measured = set(selection.runtimes)
    kept = tuple(e for e in previous.files if e.runtime not in measured) if previous is not None else ()
    fingerprint = _merged_fingerprint(device, previous, kept, results["fingerprint"], options)
    # One file per distinct content: runtimes that measured the same file share it; a
    # different file for the same subnet gets the runtime in its name.
    names: dict[str, str] = {e.path.split("/", 1)[1]: e.sha256 for e in kept}
    dest_of: dict[tuple[str, str], str] = {}
    for (subnet, runtime), entry in sorted(chosen.items(), key=lambda kv: RUNTIMES.index(kv[0][1])):
        for name in (f"{subnet}.onnx", f"{subnet}.{runtime}.onnx"):
            if names.setdefault(name, entry["sha256"]) == entry["sha256"]:
                dest_of[subnet, runtime] = name
                break
        else:
            raise RtfqError(f"{subnet}: two different files measured for {runtime}; keep one in the results")
    device_dir = dist_dir / device
    for folder in (dist_dir, device_dir):  # what a killed select left, whichever files it was writing
        sweep_temporaries(folder)
    to_copy, planned = [], set()
    for key, entry in chosen.items():
        src, dest = Path(entry["path"]), device_dir / dest_of[key]
        if not src.is_file():
            raise RtfqError(f"{src}: the measured model file is gone")
        if mf.sha256_file(src) != entry["sha256"]:
            raise RtfqError(f"{src} changed since it was benchmarked (sha256 differs); benchmark it again")
        if dest in planned:
            continue
        planned.add(dest)
        if dest.exists():
            if mf.sha256_file(dest) == entry["sha256"]:
                continue  # already in place: not rewritten under a server that may be sending it
            if not options.force:
                raise RtfqError(f"{dest} exists with different content (use --force to replace it)")
        to_copy.append((dest_of[key].removesuffix(".onnx"), src, dest, entry["sha256"]))
    for name, src, dest, sha in to_copy:
        _copy_checked(src, dest, sha)
    files = tuple(mf.Entry(
        subnet=subnet, path=f"{device}/{dest_of[subnet, runtime]}", sha256=e["sha256"], size_bytes=int(e["size_bytes"]),
        latency_p50_ms=float(e["latency_p50_ms"]), latency_p90_ms=float(e["latency_p90_ms"]),
        peak_memory_bytes=int(e["peak_memory_bytes"]), macs=int(e["macs"]), bitops=int(e["bitops"]),
        accuracy=e["accuracy"], budgets=tuple(served[subnet, runtime]), runtime=runtime,
        stable=e.get("stable") if isinstance(e.get("stable"), bool) else None,
        accuracy_source=e.get("accuracy_source"), agreement=e.get("agreement"))
        for (subnet, runtime), e in chosen.items())
    _, replaced = mf.replace_device(dist_dir, device, mf.Device(fingerprint, kept + files))
    removed = []
    if options.prune and replaced is not None:
        keep = {f.path for f in kept + files}
        for old in replaced.files:
            if old.path not in keep:
                path = dist_dir / old.path  # Entry.from_dict checked it is <device>/<name>.onnx
                try:
                    path.unlink()
                    removed.append(old.path)
                except FileNotFoundError:
                    pass
    return Selection(device, selection.choices, selection.candidates, selection.fronts, written=files,
                     copied=tuple(n for n, *_ in to_copy), removed=tuple(dict.fromkeys(removed)),
                     skipped=selection.skipped, kept=kept)


# The settings every runtime of one device entry must share: latency per run of one batch
# on so many threads means the same for each runtime only then.
_SHARED = ("cpu_model", "threads", "batch_size")


def _merged_fingerprint(device: str, previous: mf.Device | None, kept: tuple[mf.Entry, ...],
                        new: Mapping[str, Any], options: SelectOptions) -> dict[str, Any]:
    """The new fingerprint, with the ``runtimes`` the kept entries were measured on; kept
    entries measured under other settings are an error (one device, one set of settings)."""
    fingerprint = dict(new) | {"memory": options.memory}
    if previous is None or not kept:
        return fingerprint
    old = previous.fingerprint
    differ = [k for k in _SHARED if k in old and old.get(k) != new.get(k)]
    if differ:
        kept_runtimes = ", ".join(sorted({e.runtime for e in kept}))
        raise RtfqError(f"device {device!r} also serves {kept_runtimes}, measured with another "
                        f"{', '.join(differ)} ({', '.join(f'{k}={old.get(k)!r}' for k in differ)}); measure every "
                        "runtime with the same settings or publish under another --device")
    runtimes = dict(old.get("runtimes") or {DEFAULT_RUNTIME: {}})
    runtimes = {r: v for r, v in runtimes.items() if r in {e.runtime for e in kept}}
    fingerprint["runtimes"] = runtimes | dict(new.get("runtimes") or {DEFAULT_RUNTIME: {}})
    return fingerprint


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
