"""Atomic file writes: a reader (or a crash) never sees a half-written destination."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Iterator


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, *, overwrite: bool = False) -> Iterator[BinaryIO]:
    """Open a temporary file beside ``path``; on success fsync it and rename it over
    ``path``. On any error the temporary file is removed and ``path`` is untouched.

    ``overwrite=False`` raises FileExistsError if ``path`` exists (checked before writing
    and again, atomically, at the rename for the no-overwrite case).
    """
    dest = Path(path)
    if not overwrite and dest.exists():
        raise FileExistsError(f"{dest} exists (use --force to overwrite)")
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    except OSError as e:
        raise OSError(e.errno, f"cannot write {dest}: {e.strerror}") from None
    try:
        os.chmod(tmp, _mode_for(dest))  # mkstemp makes 0600; give what a plain open() would
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        if overwrite:
            os.replace(tmp, dest)
        else:
            _link_new(tmp, dest)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(dest.parent)


def _mode_for(dest: Path) -> int:
    """The replaced file's mode, else 0666 less the umask."""
    try:
        return dest.stat().st_mode & 0o777
    except FileNotFoundError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


def _link_new(tmp: str, dest: Path) -> None:
    """Publish ``tmp`` at ``dest`` only if ``dest`` does not exist (hard link when the
    file system has them, which fails atomically if ``dest`` appeared meanwhile)."""
    try:
        os.link(tmp, dest)
    except FileExistsError:
        raise FileExistsError(f"{dest} exists (use --force to overwrite)") from None
    except OSError:
        if dest.exists():
            raise FileExistsError(f"{dest} exists (use --force to overwrite)") from None
        os.replace(tmp, dest)
        return
    os.unlink(tmp)


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def publish(tmp: str | os.PathLike, path: str | os.PathLike, *, overwrite: bool = False) -> None:
    """Move a finished, fsynced file ``tmp`` to ``path`` in one step (same directory);
    without ``overwrite`` an existing ``path`` is kept and FileExistsError raised."""
    dest = Path(path)
    if overwrite:
        os.replace(tmp, dest)
    else:
        _link_new(str(tmp), dest)
    _fsync_dir(dest.parent)


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def read_json(path: str | os.PathLike, what: str) -> Any:
    """The JSON in ``path``; an unreadable or malformed file is one RtfqError naming ``what``."""
    from rtfq_deploy.errors import RtfqError

    try:
        return json.loads(Path(path).read_text())
    except OSError as e:
        raise RtfqError(f"{path}: cannot read {what}: {e.strerror}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        detail = f"{e.msg} (line {e.lineno})" if isinstance(e, json.JSONDecodeError) else "not UTF-8 text"
        raise RtfqError(f"{path}: not JSON: {detail}") from None

