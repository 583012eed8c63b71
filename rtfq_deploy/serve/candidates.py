"""The candidate subnets a server offers to devices for measuring (``rtfq-serve --candidates DIR``).

DIR is what ``rtfq-export --all`` wrote: one ``<subnet>.onnx`` per subnet, each with its
``rtfq.*`` metadata (read without onnx, :mod:`rtfq_deploy.bench.onnxmeta`). With the
accuracy table of ``rtfq eval`` (``--accuracy``) every candidate carries its top-1, and
the table must have been measured on the checkpoint the files were exported from.

Like :class:`rtfq_deploy.serve.store.Store`, the set is an immutable snapshot rebuilt
when a file in DIR (or the table) changes; hashes are cached by file identity. A file
that is not a readable rtfq export (no ``rtfq.subnet``/``rtfq.macs``/``rtfq.bitops``, an
INT4-packed one that no device runs as such, a symlink leaving DIR) is left out and
logged, never offered.
"""

from __future__ import annotations

import json
import logging
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from rtfq_deploy.errors import RtfqError
from rtfq_deploy.formats import (META_BITOPS, META_BITS, META_CHECKPOINT_SHA256, META_MACS, META_SUBNET, META_WEIGHTS,
                                  WEIGHTS_INT4_PACKED)
from rtfq_deploy.manifest import check_name
from rtfq_deploy.serve.store import _READ_FLAGS, Identity, ServedFile, identity, sha256_fd

log = logging.getLogger(__name__)

MAX_CANDIDATES = 4096


@dataclass(frozen=True)
class Candidate:
    """One file a device may download and measure."""

    file: str  # <subnet>.onnx, the name in the URL
    subnet: str
    sha256: str
    size_bytes: int
    macs: int
    bitops: int
    bits: Any  # rtfq.bits parsed (an object of quantizer -> bits), or None
    accuracy: float | None
    served: ServedFile

    def as_json(self) -> dict[str, Any]:
        return {"file": self.file, "subnet": self.subnet, "sha256": self.sha256, "size_bytes": self.size_bytes,
                "macs": self.macs, "bitops": self.bitops, "bits": self.bits, "accuracy": self.accuracy,
                "url": f"/v1/candidates/{self.file}"}


@dataclass(frozen=True)
class CandidateSet:
    by_file: Mapping[str, Candidate] = field(default_factory=dict)
    excluded: tuple[tuple[str, str], ...] = ()  # (file, why)
    checkpoint_sha256: str | None = None

    def by_sha(self) -> dict[str, Candidate]:
        return {c.sha256: c for c in self.by_file.values()}


class Candidates:
    """Owns the current :class:`CandidateSet` of one folder; one thread calls :meth:`refresh`."""

    def __init__(self, folder: str | os.PathLike, accuracy: str | os.PathLike | None) -> None:
        root = Path(folder)
        if not root.is_dir():
            raise RtfqError(f"--candidates {root}: not a directory")
        self.root = Path(os.path.realpath(root))
        self.accuracy_path = Path(accuracy) if accuracy is not None else None
        self._hashes: dict[tuple[str, Identity], str] = {}
        self._stamp: tuple | None = None
        self.current = CandidateSet()
        self.refresh(raise_errors=True)
        if not self.current.by_file:
            raise RtfqError(f"--candidates {root}: no usable rtfq-export .onnx file in it"
                            + (f" ({self.current.excluded[0][0]}: {self.current.excluded[0][1]})"
                               if self.current.excluded else ""))

    def _world(self) -> tuple:
        try:
            names = sorted(p.name for p in self.root.iterdir() if p.name.endswith(".onnx"))
        except OSError:
            names = []
        stamps = []
        for name in names[:MAX_CANDIDATES + 1]:
            try:
                stamps.append((name, identity(os.stat(self.root / name))))
            except OSError:
                stamps.append((name, None))
        table = None
        if self.accuracy_path is not None:
            try:
                table = identity(os.stat(self.accuracy_path))
            except OSError:
                pass
        return tuple(stamps), table

    def refresh(self, raise_errors: bool = False) -> bool:
        """Rebuild the set if a file or the table changed; a table that no longer reads
        keeps the previous set (logged)."""
        world = self._world()
        if world == self._stamp:
            return False
        try:
            self.current = self._load(world)
        except RtfqError as e:
            if raise_errors:
                raise
            log.error("keeping the previous candidates: %s", e)
            return False
        self._stamp = world
        log.info("candidates: %d files, %d left out", len(self.current.by_file), len(self.current.excluded))
        return True

    def _load(self, world: tuple) -> CandidateSet:
        from rtfq_deploy.accuracy import read_accuracy_table
        from rtfq_deploy.bench.onnxmeta import read_metadata

        table = read_accuracy_table(self.accuracy_path) if self.accuracy_path is not None else None
        stamps, _ = world
        if len(stamps) > MAX_CANDIDATES:
            raise RtfqError(f"--candidates {self.root}: more than {MAX_CANDIDATES} .onnx files")
        found: dict[str, Candidate] = {}
        excluded: list[tuple[str, str]] = []
        hashes: dict[tuple[str, Identity], str] = {}
        subnets: dict[str, str] = {}
        for name, _ in stamps:
            try:
                check_name(name, "file name")
                candidate = self._candidate(name, table, hashes, read_metadata)
            except (RtfqError, ValueError, OSError) as e:
                excluded.append((name, " ".join(str(e).split())[:300]))
                continue
            if candidate.subnet in subnets:
                excluded.append((name, f"subnet {candidate.subnet} is also {subnets[candidate.subnet]}"))
                continue
            subnets[candidate.subnet] = name
            found[name] = candidate
        for name, why in excluded:
            log.warning("not offering candidate %s: %s", name, why)
        self._hashes = hashes
        return CandidateSet(found, tuple(excluded), table.checkpoint_sha256 if table is not None else None)

    def _candidate(self, name: str, table: Any, hashes: dict, read_metadata: Any) -> Candidate:
        real = os.path.realpath(self.root / name)
        if not real.startswith(str(self.root) + os.sep):
            raise RtfqError("resolves outside the candidates folder")
        fd = os.open(real, _READ_FLAGS)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise RtfqError("not a regular file")
            key = (real, identity(st))
            digest = self._hashes.get(key) or hashes.get(key) or sha256_fd(fd)
        finally:
            os.close(fd)
        hashes[key] = digest
        meta = read_metadata(real)
        subnet = meta.get(META_SUBNET)
        try:
            macs, bitops = int(meta[META_MACS]), int(meta[META_BITOPS])
        except (KeyError, ValueError):
            raise RtfqError("no rtfq.macs/rtfq.bitops metadata (not written by rtfq-export)") from None
        if not isinstance(subnet, str) or f"{subnet}.onnx" != name:
            raise RtfqError(f"its rtfq.subnet {str(subnet)[:80]!r} does not match the file name")
        if meta.get(META_WEIGHTS) == WEIGHTS_INT4_PACKED:
            raise RtfqError("INT4-packed weights run as float convolutions; offer the --pack int8 export")
        accuracy = None
        if table is not None:
            table.check_checkpoint(meta.get(META_CHECKPOINT_SHA256), f"{name} was exported from")
            accuracy = table.top1.get(subnet)
        try:
            bits = json.loads(meta[META_BITS]) if len(meta.get(META_BITS, "")) <= 1 << 16 else None
        except (KeyError, ValueError, RecursionError):
            bits = None
        return Candidate(name, subnet, digest, st.st_size, macs, bitops, bits, accuracy,
                         ServedFile(digest, real, identity(st), name))
