"""Conditional and range requests on content-addressed files (RFC 9110 sections 13-14).

The ETag of a file is its sha256, a strong validator: the bytes behind a hash never
change. Only a single byte range is served; a request for several, or a Range header
that does not parse, gets the whole file, which the RFC allows. Positions may have any
number of digits (RFC 9110 sets no limit): a last position beyond the file is clipped to
its end (206), a first one beyond it is unsatisfiable (416), however many digits either has.
"""

from __future__ import annotations

import re

_RANGE_RE = re.compile(r"bytes=(\d*)-(\d*)", re.IGNORECASE)
# A longer header is ignored (the whole file is sent); within it a position has at most
# ~1000 digits, which int() converts at once (its limit is 4300).
_MAX_RANGE_CHARS = 1024


class Unsatisfiable(Exception):
    """A well-formed range that starts beyond the end of the file (answered with 416)."""


def etag_for(sha256: str) -> str:
    return f'"{sha256}"'


def none_match(header: str | None, etag: str) -> bool:
    """True if ``If-None-Match`` matches ``etag`` (weak comparison, as the RFC asks)."""
    if header is None:
        return False
    if header.strip() == "*":
        return True
    tags = (t.strip() for t in header.split(","))
    return any((t[2:] if t.startswith("W/") else t) == etag for t in tags)


def range_applies(if_range: str | None, etag: str) -> bool:
    """``If-Range`` lets a Range through only if it names this strong ETag; a date or
    another tag means "send it all" (we keep no modification dates)."""
    return if_range is None or if_range.strip() == etag


def byte_range(header: str | None, size: int) -> tuple[int, int] | None:
    """The inclusive (first, last) byte of a single range, or None to send everything.

    Raises :class:`Unsatisfiable` for a range that starts at or after ``size``
    (or a suffix range of length 0).
    """
    if header is None or len(header) > _MAX_RANGE_CHARS:
        return None
    match = _RANGE_RE.fullmatch(header.strip().replace(" ", ""))
    if match is None or (not match[1] and not match[2]):
        return None  # malformed or several ranges: ignored
    if not match[1]:  # bytes=-N: the last N bytes
        n = int(match[2])
        if n == 0 or size == 0:
            raise Unsatisfiable
        return max(0, size - n), size - 1
    first = int(match[1])
    if match[2] and int(match[2]) < first:
        return None  # invalid: ignored
    if first >= size:
        raise Unsatisfiable
    return first, min(int(match[2]) if match[2] else size - 1, size - 1)

