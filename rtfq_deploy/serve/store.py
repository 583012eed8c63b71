"""The verified view of a DIST_DIR that the server answers from.

A :class:`Snapshot` holds only the manifest entries whose file exists inside DIST_DIR
(after resolving symlinks), is a regular file and has the size and sha256 the manifest
states. It is immutable; :class:`Store` builds a new one when ``manifest.json`` or one
of the listed files changes and swaps it in with one reference assignment, so a request
sees one whole snapshot, never a mix. Hashes are cached by the file's identity
(device, inode, size, mtime), so re-checking after a publish only hashes files that
changed.

Nothing here can block on a special file: the manifest and every listed file are opened
with O_NONBLOCK and used only once fstat says they are regular files, so a manifest
swapped for a FIFO is a reload error (health turns "degraded"), not a stuck watcher.
"""

from __future__ import annotations

import hashlib
import logging
import os
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

from rtfq_deploy import manifest as mf
from rtfq_deploy.errors import RtfqError
from rtfq_deploy.fileio import JSON_MAX_BYTES, parse_json, read_bounded

log = logging.getLogger(__name__)

# (st_dev, st_ino, st_size, st_mtime_ns): a file replaced by rename or rewritten gets a new one.
Identity = tuple[int, int, int, int]


def identity(st: os.stat_result) -> Identity:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


@dataclass(frozen=True)
class ServedFile:
    """A verified file: what the download route opens, and what it must still be."""

    sha256: str
    real_path: str
    identity: Identity
    name: str  # a download file name, e.g. r160-w0.73-q4.onnx

    @property
    def size(self) -> int:
        return self.identity[2]


@dataclass(frozen=True)
class Excluded:
    device: str
    path: str
    reason: str


@dataclass(frozen=True)
class Snapshot:
    """One consistent, verified state of DIST_DIR."""

    devices: Mapping[str, mf.Device] = field(default_factory=dict)  # only verified entries
    files: Mapping[str, ServedFile] = field(default_factory=dict)  # by sha256
    excluded: tuple[Excluded, ...] = ()
    manifest_sha256: str | None = None  # None: DIST_DIR has no manifest yet
    generation: int = 0
    loaded_at: float = 0.0


class Store:
    """Owns the current snapshot of one DIST_DIR; one thread calls :meth:`refresh`."""

    def __init__(self, dist_dir: str | os.PathLike) -> None:
        root = Path(dist_dir)
        if not root.is_dir():
            raise RtfqError(f"{root}: not a directory")
        self.root = Path(os.path.realpath(root))
        self._hashes: dict[tuple[str, Identity], str] = {}
        self._world: tuple | None = None
        self._paths: tuple[str, ...] = ()
        self.snapshot = Snapshot()
        self.error: str | None = None  # why the last reload failed (the previous snapshot stays)
        self.refreshing_since: float | None = None  # time.monotonic() of a refresh under way (health's watchdog)
        self._load_or_raise()  # a malformed manifest at start is the caller's error, raised

    def refresh(self) -> bool:
        """Rebuild the snapshot if the manifest or a listed file changed; True if it did.

        A manifest that cannot be read or parsed keeps the previous snapshot in service
        and is reported in :attr:`error`.
        """
        self.refreshing_since = time.monotonic()
        try:
            if self._world_stamp() == self._world:
                return False
            try:
                self._load_or_raise()
            except RtfqError as e:
                if str(e) != self.error:  # once per distinct failure, not once per poll
                    log.error("keeping the previous manifest: %s", e)
                self.error = str(e)
                return False
            return True
        finally:
            self.refreshing_since = None

    def _load_or_raise(self) -> None:
        """:meth:`_load`, with every failure one RtfqError: a manifest that breaks the
        parser in a way nobody foresaw (a wrong type deep inside, a huge number) must be
        reported like any other bad manifest, not kill the watcher or pass as "ok"."""
        try:
            self._load()
        except RtfqError:
            raise
        except OSError as e:
            raise RtfqError(f"{self.root / mf.MANIFEST}: {e.strerror or e}") from None
        except RecursionError:
            raise RtfqError(f"{self.root / mf.MANIFEST}: nested too deeply") from None
        except Exception as e:
            raise RtfqError(f"{self.root / mf.MANIFEST}: cannot load: {type(e).__name__}: {_one_line(e)}") from None

    def _world_stamp(self) -> tuple:
        """What decides whether a rebuild is needed: the manifest's and every listed file's stat."""
        return (_stat_identity(self.root / mf.MANIFEST),) + tuple(_stat_identity(self.root / p) for p in self._paths)

    def _load(self) -> None:
        # Each stat is taken before the read or hash it covers: a change after it shows
        # up as a difference on the next poll, which rebuilds.
        manifest_stamp = _stat_identity(self.root / mf.MANIFEST)
        text, manifest_sha = self._read_manifest()
        where = str(self.root / mf.MANIFEST)
        manifest = mf.Manifest({}) if text is None else mf.parse_manifest(
            parse_json(text, where, "manifest", expect=dict), where)
        devices: dict[str, mf.Device] = {}
        files: dict[str, ServedFile] = {}
        excluded: list[Excluded] = []
        hashes: dict[tuple[str, Identity], str] = {}
        paths, stamps = [], []
        for name, device in manifest.devices.items():
            kept = []
            for entry in device.files:
                paths.append(entry.path)
                stamps.append(_stat_identity(self.root / entry.path))
                served, reason = self._verify(entry, hashes)
                if served is None:
                    excluded.append(Excluded(name, entry.path, reason))
                    continue
                kept.append(entry)
                files.setdefault(served.sha256, served)
            devices[name] = mf.Device(device.fingerprint, tuple(kept), device.updated)
        for ex in excluded:
            if ex not in self.snapshot.excluded:
                log.warning("not serving %s for %s: %s", ex.path, ex.device, ex.reason)
        self._hashes = hashes
        self._paths = tuple(paths)
        self._world = (manifest_stamp, *stamps)
        self.snapshot = Snapshot(devices, files, tuple(excluded), manifest_sha,
                                 self.snapshot.generation + 1, time.time())
        self.error = None
        log.info("manifest generation %d: %d devices, %d files, %d excluded", self.snapshot.generation,
                 len(devices), len(files), len(excluded))

    def _read_manifest(self) -> tuple[str | None, str | None]:
        path = self.root / mf.MANIFEST
        if not os.path.lexists(path):
            return None, None
        data = read_bounded(path, "manifest", JSON_MAX_BYTES)  # a FIFO or device: refused at once
        try:
            return data.decode("utf-8"), hashlib.sha256(data).hexdigest()
        except UnicodeDecodeError:
            raise RtfqError(f"{self.root / mf.MANIFEST}: not UTF-8 text") from None

    def _verify(self, entry: mf.Entry, hashes: dict[tuple[str, Identity], str]) -> tuple[ServedFile | None, str]:
        """The entry's file if it is safe and whole, else why not."""
        real = os.path.realpath(self.root / entry.path)
        if not real.startswith(str(self.root) + os.sep):
            return None, "resolves outside DIST_DIR"
        try:
            fd = os.open(real, _READ_FLAGS)
        except FileNotFoundError:
            return None, "file is missing"
        except OSError as e:
            return None, f"cannot open: {e.strerror}"
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                return None, "not a regular file"
            if st.st_size != entry.size_bytes:
                return None, f"size {st.st_size} differs from the manifest's {entry.size_bytes}"
            key = (real, identity(st))
            digest = self._hashes.get(key) or hashes.get(key) or sha256_fd(fd)
        finally:
            os.close(fd)
        hashes[key] = digest
        if digest != entry.sha256:
            return None, f"sha256 {digest[:12]}... differs from the manifest's {entry.sha256[:12]}..."
        return ServedFile(entry.sha256, real, identity(st), os.path.basename(entry.path)), ""


def open_verified(served: ServedFile) -> int | None:
    """An fd on the verified file, or None if the file at its path is no longer the one
    that was hashed (replaced or rewritten since): the caller must not serve it."""
    try:
        fd = os.open(served.real_path, _READ_FLAGS)
    except OSError:
        return None
    try:
        if identity(os.fstat(fd)) == served.identity:
            fd, kept = -1, fd
            return kept
        return None
    finally:
        if fd >= 0:
            os.close(fd)


# O_NONBLOCK: opening a FIFO put where a model file was must not wait for a writer; the
# fstat that follows refuses it (reads of a regular file are unaffected by the flag).
_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK


def sha256_fd(fd: int, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    offset = 0
    while block := os.pread(fd, chunk, offset):
        digest.update(block)
        offset += len(block)
    return digest.hexdigest()


def _stat_identity(path: Path) -> Identity | None:
    try:
        return identity(os.stat(path))
    except OSError:
        return None


def _one_line(e: BaseException, limit: int = 200) -> str:
    text = " ".join(str(e).split())
    return text if len(text) <= limit else text[:limit] + "..."

