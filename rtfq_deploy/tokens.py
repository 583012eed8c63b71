"""Bearer tokens for ``rtfq-serve --token-file`` and ``rtfq fetch --token-file``.

Standard library only: the device-side client imports it. A token file holds one token
per line; blank lines and lines starting with ``#`` are ignored. A token is an RFC 6750
``b64token`` (letters, digits, ``-._~+/``, then optional ``=``), so it goes into an
``Authorization: Bearer`` header unchanged; e.g. ``python -c "import secrets;
print(secrets.token_urlsafe(32))"``.
"""

from __future__ import annotations

import os
import re

from rtfq_deploy.errors import RtfqError

_TOKEN_RE = re.compile(r"[A-Za-z0-9\-._~+/]+=*")
MAX_TOKEN_FILE_BYTES = 1 << 20
MAX_TOKEN_CHARS = 4096


def check_token(token: str, where: str) -> str:
    """``token`` if it can be sent as a bearer token, else one RtfqError line (never echoing it)."""
    if not isinstance(token, str) or len(token) > MAX_TOKEN_CHARS or not _TOKEN_RE.fullmatch(token):
        raise RtfqError(f"{where} is not a token (letters, digits and -._~+/ only, at most {MAX_TOKEN_CHARS} "
                        "characters)")
    return token


def parse_tokens(text: str, where: str) -> tuple[str, ...]:
    """The tokens of a token file's text; RtfqError if it has none or a malformed one."""
    tokens = []
    for number, line in enumerate(text.splitlines(), 1):
        token = line.strip()
        if token and not token.startswith("#"):
            tokens.append(check_token(token, f"{where}: line {number}"))
    if not tokens:
        raise RtfqError(f"{where}: no token in the file (one token per line; '#' starts a comment)")
    return tuple(tokens)


def read_token_file(path: str | os.PathLike) -> tuple[str, ...]:
    """Read and parse a token file; one RtfqError line for every way it can be unusable."""
    return parse_token_bytes(read_token_bytes(path), path)


def read_token_bytes(path: str | os.PathLike) -> bytes:
    """A token file's bytes: a regular file (a FIFO or a device is refused at once, never
    waited on) of at most MAX_TOKEN_FILE_BYTES."""
    from rtfq_deploy.fileio import open_regular

    where = f"token file {os.fspath(path)}"
    try:
        with open_regular(path, "token file") as f:
            data = f.read(MAX_TOKEN_FILE_BYTES + 1)
    except RtfqError as e:
        raise RtfqError(f"cannot read {where}: {str(e).rpartition('cannot read token file: ')[2]}") from None
    except OSError as e:
        raise RtfqError(f"cannot read {where}: {e.strerror or e}") from None
    if len(data) > MAX_TOKEN_FILE_BYTES:
        raise RtfqError(f"{where} is larger than {MAX_TOKEN_FILE_BYTES} bytes")
    return data


def parse_token_bytes(data: bytes, path: str | os.PathLike) -> tuple[str, ...]:
    """:func:`parse_tokens` of a token file's bytes (ASCII only)."""
    where = f"token file {os.fspath(path)}"
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError:
        raise RtfqError(f"{where}: not ASCII text") from None
    return parse_tokens(text, where)
