"""Atomic file writes: a reader (or a crash) never sees a half-written destination."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import re
import secrets
import stat
import time
from pathlib import Path
from typing import Any, BinaryIO, Iterator

log = logging.getLogger(__name__)

# A temporary file whose writer is alive is never removed; one whose name carries no pid
# (or a pid that is alive but has not touched it for this long) is taken as abandoned.
STALE_TMP_AGE_S = 6 * 3600.0


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, *, overwrite: bool = False) -> Iterator[BinaryIO]:
    """Open a temporary file beside ``path``; on success fsync it and rename it over
    ``path``. On any error the temporary file is removed and ``path`` is untouched.

    ``overwrite=False`` raises FileExistsError if ``path`` exists (checked before writing
    and again, atomically, at the rename for the no-overwrite case).

    The temporary file is ``.<name>.<pid>.<random>.tmp``; temporaries of the same
    destination left by a killed writer (its pid is gone) are removed first, so a
    ``kill -9`` costs disk space only until the next write of that file.
    """
    dest = Path(path)
    check_output(dest)  # a device node, FIFO or folder is never replaced, --force or not
    if not overwrite and dest.exists():
        raise FileExistsError(f"{dest} exists (use --force to overwrite)")
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(dest)
        tmp = str(dest.parent / f".{dest.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
        fd = os.open(tmp, _EXCL_WRITE, 0o600)
    except OSError as e:
        raise OSError(e.errno, f"cannot write {dest}: {e.strerror}") from None
    try:
        os.fchmod(fd, _mode_for(dest))  # created 0600; give what a plain open() would (on the fd: no path race)
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


# A new file that is ours alone: created here (never an existing file, never through a
# planted symlink), closed on exec.
_EXCL_WRITE = (os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0))


def check_output(path: str | os.PathLike) -> None:
    """Refuse (RtfqError) an output path that exists and is not a regular file, or a link
    to one: replacing a device node, FIFO or folder by a rename is never what ``--force``
    means. A missing path, or a dangling link (the rename replaces the link), passes."""
    from rtfq_deploy.errors import RtfqError

    p = Path(path)
    try:
        info = os.stat(p)  # follows a link: what a reader of the name would get
    except OSError:
        return  # missing, or unreachable (a parent that is a file...): the write itself says why
    if not stat.S_ISREG(info.st_mode):
        raise RtfqError(f"{p} exists and is {_kind(info.st_mode)}, not a regular file; refusing to replace it "
                        "(--force replaces files only)")


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"), (stat.S_ISLNK, "a symbolic link")):
        if test(mode):
            return name
    return "a special file"


def _cannot_read(path: str | os.PathLike, what: str, e: OSError) -> Exception:
    from rtfq_deploy.errors import RtfqError

    return RtfqError(f"{path}: cannot read {what}: {e.strerror or e}")


def open_regular(path: str | os.PathLike, what: str, *, follow: bool = True) -> BinaryIO:
    """``path`` opened for reading, once it is known to be a regular file.

    Opened with O_NONBLOCK (a FIFO or a device must not hang the open), checked with
    fstat on the open descriptor (no race with a swap of the name), then made blocking
    again. ``follow=False`` refuses a symlink too. Every failure is one RtfqError naming
    ``what``: "no such file", "not a regular file (a FIFO)", the OS's reason.
    """
    import fcntl

    from rtfq_deploy.errors import RtfqError

    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    if not follow:
        flags |= getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise RtfqError(f"{path}: cannot read {what}: no such file") from None
    except OSError as e:
        if not follow and os.path.islink(path):
            raise RtfqError(f"{path}: cannot read {what}: a symbolic link, not a regular file") from None
        raise _cannot_read(path, what, e) from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise RtfqError(f"{path}: cannot read {what}: not a regular file ({_kind(mode)})")
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~getattr(os, "O_NONBLOCK", 0))
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_bounded(path: str | os.PathLike, what: str, max_bytes: int) -> bytes:
    """A regular file's bytes (:func:`open_regular`), refused beyond ``max_bytes``."""
    from rtfq_deploy.errors import RtfqError

    with open_regular(path, what) as f:
        try:
            data = f.read(max_bytes + 1)
        except OSError as e:
            raise _cannot_read(path, what, e) from None
    if len(data) > max_bytes:
        raise RtfqError(f"{path}: the {what} is larger than {_size(max_bytes)}")
    return data


def _size(n: int) -> str:
    return f"{n / 2**20:g} MiB" if n >= 2**20 else f"{n} bytes"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return pid > 0  # another user's live process (or a pid no kill can name)
    return True


def remove_stale_temporaries(dest: str | os.PathLike, max_age_s: float = STALE_TMP_AGE_S) -> list[Path]:
    """Remove ``.<name>.*.tmp`` files beside ``dest`` that no live writer owns.

    A temporary is stale when the pid in its name is not running, or when it has not been
    modified for ``max_age_s`` (a name without a pid, from an older version, or a reused
    pid). Concurrent writers are safe: each only ever removes files whose writer is gone,
    and removal races are ignored. Returns the removed paths.
    """
    dest = Path(dest)
    return _sweep(dest.parent, f".{dest.name}.", max_age_s)


def sweep_temporaries(directory: str | os.PathLike, max_age_s: float = STALE_TMP_AGE_S) -> list[Path]:
    """:func:`remove_stale_temporaries` for every destination in ``directory``: a killed
    export or select of a file that is never written again leaves nothing for ever."""
    return _sweep(Path(directory), ".", max_age_s)


def _sweep(directory: Path, prefix: str, max_age_s: float) -> list[Path]:
    removed: list[Path] = []
    try:
        candidates = [p for p in directory.iterdir() if p.name.startswith(prefix) and p.name.endswith(".tmp")]
    except OSError:
        return removed
    now = time.time()
    for tmp in candidates:
        owner = _TMP_RE.fullmatch(tmp.name)
        try:
            info = tmp.lstat()
        except OSError:
            continue
        if not stat.S_ISREG(info.st_mode):
            continue
        dead = owner is not None and not _pid_alive(int(owner[1]))
        if prefix == "." and owner is None:
            continue  # a hidden .tmp file this module did not name: not ours to judge
        if dead or now - info.st_mtime > max_age_s:
            with contextlib.suppress(OSError):
                tmp.unlink()
                removed.append(tmp)
                log.info("removed %s, left by a writer that is gone", tmp)
    return removed


_TMP_RE = re.compile(r"\..+\.(\d{1,10})\.[0-9a-f]{8}\.tmp")


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
    without ``overwrite`` an existing ``path`` is kept and FileExistsError raised; a
    ``path`` that is not a regular file is never replaced (:func:`check_output`)."""
    dest = Path(path)
    check_output(dest)
    if overwrite:
        os.replace(tmp, dest)
    else:
        _link_new(str(tmp), dest)
    _fsync_dir(dest.parent)


def is_int(value: Any) -> bool:
    """A JSON integer, never true/false (``True == 1`` would let "version": true pass)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    """A JSON number as json.loads gives it: an int or a float, never a bool (which
    Python counts as an int, so true would pass an isinstance check as 1)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20, what: str = "file") -> str:
    """The sha256 of a regular file (RtfqError for a FIFO, a device or a folder: hashing
    /dev/zero would never end)."""
    with open_regular(path, what) as f:
        return sha256_fileobj(f, chunk)


def sha256_fileobj(f: BinaryIO, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    while block := f.read(chunk):
        digest.update(block)
    return digest.hexdigest()


# Caps of read_json: one default for every JSON file the toolkit reads, and a depth no
# honest file reaches (accuracy tables, results, manifests and run.json nest at most 5).
JSON_MAX_BYTES = 64 * 2**20
JSON_MAX_DEPTH = 64
_MAX_INT_DIGITS = 40


class _BadNumber(ValueError):
    pass


def _parse_int(text: str) -> int:
    if len(text.lstrip("-")) > _MAX_INT_DIGITS:
        raise _BadNumber(f"an integer of {len(text)} digits")
    return int(text)


def _parse_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _BadNumber(f"{text[:20]}{'...' if len(text) > 20 else ''}, not a finite number")
    return value


def _parse_constant(text: str) -> float:
    raise _BadNumber(f"{text}, not a finite number")


class _DuplicateKey(ValueError):
    pass


def _unique_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """An object whose keys are all distinct: with a repeated key json.loads keeps the last
    silently, so a file could say one thing to a person and another to the toolkit."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


def _depth(value: Any, limit: int) -> int:
    """Nesting depth of parsed JSON, iteratively (no recursion limit to hit)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            deepest = max(deepest, depth)
            if deepest > limit:
                return deepest
            stack.extend((v, depth + 1) for v in (item.values() if isinstance(item, dict) else item))
    return deepest


def read_json(path: str | os.PathLike, what: str, *, max_bytes: int = JSON_MAX_BYTES, max_depth: int = JSON_MAX_DEPTH,
              expect: type | tuple[type, ...] | None = None) -> Any:
    """The JSON in ``path``, bounded so that a hostile file is one RtfqError naming ``what``.

    Refused: files over ``max_bytes``, nesting deeper than ``max_depth``, non-UTF-8 text,
    NaN/Infinity, numbers that overflow a float, integers of more than 40 digits, an object
    with a key given twice, and (with ``expect``) a top-level value of another type.
    Callers still check the fields they use.
    """
    raw = read_bounded(path, what, max_bytes)  # a FIFO or device: refused at once, never waited on
    return parse_json(raw, f"{path}", what, max_bytes=max_bytes, max_depth=max_depth, expect=expect)


JSON_LINE_MAX_BYTES = 1 << 20
JSON_LINES_MAX_BYTES = 256 * 2**20


def read_json_lines(path: str | os.PathLike, what: str, *, max_line: int = JSON_LINE_MAX_BYTES,
                    max_bytes: int = JSON_LINES_MAX_BYTES, max_depth: int = JSON_MAX_DEPTH
                    ) -> Iterator[tuple[int, bytes, Any]]:
    """Each non-blank line of a JSON-lines file as (line number, its bytes without the
    line break, the parsed value or the RtfqError that refused it), with :func:`read_json`'s
    bounds per line (``max_line`` bytes, ``max_depth``, finite numbers) and ``max_bytes``
    for the whole file, which must be a regular file. A damaged line is yielded, not
    raised, so the caller decides (a line cut by a kill is usually the last one)."""
    from rtfq_deploy.errors import RtfqError

    with open_regular(path, what) as f:
        if os.fstat(f.fileno()).st_size > max_bytes:
            raise RtfqError(f"{path}: the {what} is larger than {max_bytes / 2**20:g} MiB")
        number, total = 0, 0
        while True:
            try:
                line = f.readline(max_line + 1)
            except OSError as e:
                raise _cannot_read(path, what, e) from None
            if not line:
                return
            number += 1
            total += len(line)
            if total > max_bytes:
                raise RtfqError(f"{path}: the {what} is larger than {max_bytes / 2**20:g} MiB")
            if len(line) > max_line and not line.endswith(b"\n"):
                while (rest := f.readline(1 << 16)) and not rest.endswith(b"\n"):  # skip the rest of the line
                    total += len(rest)
                total += len(rest)
                yield number, b"", RtfqError(f"{path}: line {number} of the {what} is longer than {max_line} bytes")
                continue
            text = line.rstrip(b"\r\n")
            if not text.strip():
                continue
            try:
                value: Any = parse_json(text, f"{path}: line {number}", what, max_bytes=max_line, max_depth=max_depth)
            except RtfqError as e:
                value = e
            yield number, text, value


def parse_json(raw: bytes | str, where: str, what: str, *, max_bytes: int = JSON_MAX_BYTES,
               max_depth: int = JSON_MAX_DEPTH, expect: type | tuple[type, ...] | None = None) -> Any:
    """:func:`read_json` for bytes already in hand (a body, a file read elsewhere)."""
    from rtfq_deploy.errors import RtfqError

    if len(raw) > max_bytes:
        raise RtfqError(f"{where}: the {what} is larger than {max_bytes / 2**20:g} MiB")
    try:
        text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
    except UnicodeDecodeError:
        raise RtfqError(f"{where}: not JSON: not UTF-8 text") from None
    try:
        data = json.loads(text, parse_int=_parse_int, parse_float=_parse_float, parse_constant=_parse_constant,
                          object_pairs_hook=_unique_pairs)
    except _BadNumber as e:
        raise RtfqError(f"{where}: the {what} holds {e}") from None
    except _DuplicateKey as e:
        key = str(e)
        raise RtfqError(f"{where}: the {what} has the key {key[:60]!r}{'...' if len(key) > 60 else ''} twice") from None
    except json.JSONDecodeError as e:
        raise RtfqError(f"{where}: not JSON: {e.msg} (line {e.lineno})") from None
    except RecursionError:
        raise RtfqError(f"{where}: the {what} is nested deeper than {max_depth} levels") from None
    if _depth(data, max_depth) > max_depth:
        raise RtfqError(f"{where}: the {what} is nested deeper than {max_depth} levels")
    if expect is not None and not isinstance(data, expect):
        names = " or ".join(t.__name__ for t in (expect if isinstance(expect, tuple) else (expect,)))
        kind = {"dict": "a JSON object", "list": "a JSON array"}
        raise RtfqError(f"{where}: the {what} must be {kind.get(names, names)}, not {_json_type(data)}")
    return data


def _json_type(value: Any) -> str:
    for kind, name in ((bool, "true/false"), (dict, "an object"), (list, "an array"), (str, "a string"),
                       (int, "a number"), (float, "a number")):
        if isinstance(value, kind):
            return name
    return "null"
