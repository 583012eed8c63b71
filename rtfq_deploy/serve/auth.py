"""Bearer-token access control for ``rtfq-serve --token-file``.

The token file holds one token per line (:mod:`rtfq_deploy.tokens`); blank lines and
lines starting with ``#`` are ignored. Tokens are added or revoked without a restart, and
a change is told by the file's content: every request compares the file's stat (inode,
size, mtime and ctime, which no ``cp -p`` or ``touch`` can set back) and re-reads it when
that differs, and the server's watcher also re-reads it every poll and compares its
sha256, so even a rewrite that keeps every stat field takes effect within a poll. Every request except ``/v1/health`` and
``/v1/openapi.json`` must carry ``Authorization: Bearer <token>``; the token is compared
with every configured token by :func:`hmac.compare_digest` (no early exit), so the
answer's timing does not reveal how much of a token matched or which one.

A token file that becomes unreadable, empty or malformed while serving fails closed:
no token is accepted until it is fixed (logged once, and reported by ``/v1/health``).
It is only ever opened non-blocking and read once fstat says it is a regular file, so a
FIFO or a device swapped in for it is such a failure at once, never a stalled request.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import threading
from pathlib import Path

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from rtfq_deploy.errors import RtfqError
from rtfq_deploy.tokens import parse_token_bytes, read_token_bytes

log = logging.getLogger(__name__)

OPEN_PATHS = frozenset({"/v1/health", "/v1/openapi.json"})


Stamp = tuple[int, int, int, int, int]


def _stamp(path: Path) -> Stamp | None:
    """What makes a request re-read the file; ctime is in it because a rewrite in place
    can keep size and mtime (``cp -p``) but always moves ctime."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


class TokenFile:
    """The accepted tokens, following the file. The first read happens in the constructor
    and raises RtfqError (the CLI turns it into one line and exit 2)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._stamp = _stamp(self.path)
        data = read_token_bytes(self.path)
        self._tokens = self._parse(data)
        self._digest: str | None = hashlib.sha256(data).hexdigest()  # of the content in force
        self.error: str | None = None  # why the file's current content is not in use

    def _parse(self, data: bytes) -> tuple[bytes, ...]:
        return tuple(t.encode("ascii") for t in parse_token_bytes(data, self.path))

    def recheck(self) -> None:
        """Re-read the file and apply it if its content differs from the content in force
        (the watcher calls this off the event loop every poll)."""
        with self._lock:
            self._reload(_stamp(self.path))

    def tokens(self) -> tuple[bytes, ...]:
        """The tokens in force, re-reading the file first if it changed (a stat per call)."""
        stamp = _stamp(self.path)
        if stamp != self._stamp:
            with self._lock:
                if stamp != self._stamp:
                    self._reload(stamp)
        return self._tokens

    def _reload(self, stamp: Stamp | None) -> None:
        self._stamp = stamp
        try:
            data = read_token_bytes(self.path)
            digest = hashlib.sha256(data).hexdigest()
            if digest == self._digest and self.error is None:
                return  # same content: nothing changes (nor is it logged)
            self._tokens = self._parse(data)
            self._digest = digest
        except RtfqError as e:
            self._tokens = ()  # fail closed: a broken or removed file revokes every token
            self._digest = None
            if str(e) != self.error:
                log.error("%s; refusing every token until it is fixed", e)
            self.error = str(e)
            return
        if self.error is not None:
            log.warning("token file %s is usable again", self.path)
        self.error = None
        log.info("token file %s re-read: %d tokens", self.path, len(self._tokens))

    def accepts(self, token: bytes) -> bool:
        """True if ``token`` equals one of the tokens; compares against all of them."""
        match = False
        for candidate in self.tokens():
            match |= hmac.compare_digest(candidate, token)
        return match


class BearerAuth:
    """ASGI middleware: 401 (JSON, ``WWW-Authenticate: Bearer``) for every request outside
    :data:`OPEN_PATHS` without a valid bearer token. Deny by default, so a new route is
    protected without being listed here."""

    def __init__(self, app: ASGIApp, tokens: TokenFile | None) -> None:
        self.app, self.token_file = app, tokens

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.token_file is None or scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        given = _bearer(scope["headers"])
        if given is not None and self.token_file.accepts(given):
            await self.app(scope, receive, send)
            return
        if given is None:
            challenge, message = 'Bearer realm="rtfq-serve"', "this server needs Authorization: Bearer <token>"
        else:
            challenge, message = 'Bearer realm="rtfq-serve", error="invalid_token"', "the bearer token is not accepted"
        reply = JSONResponse({"error": message}, status_code=401,
                             headers={"WWW-Authenticate": challenge, "Cache-Control": "no-store"})
        await reply(scope, receive, send)


def _bearer(headers: list[tuple[bytes, bytes]]) -> bytes | None:
    """The token of the one ``Authorization: Bearer`` header, or None."""
    values = [v for k, v in headers if k.lower() == b"authorization"]
    if len(values) != 1:
        return None
    scheme, _, token = values[0].strip().partition(b" ")
    token = token.strip()
    if scheme.lower() != b"bearer" or not token:
        return None
    return token
