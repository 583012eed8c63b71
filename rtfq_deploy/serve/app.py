"""The HTTP API (Starlette): devices, budget resolution and content-addressed downloads.

Every answer comes from one :class:`~rtfq_deploy.serve.store.Snapshot`, taken once per
request. Files are reachable only by the sha256 of a verified manifest entry; a download
opens the file once, checks it is still the inode that was hashed, and streams from that
fd, so a publish during the download cannot change the bytes it delivers.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator

import anyio
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from rtfq_deploy import __version__
from rtfq_deploy import budget as bg
from rtfq_deploy.errors import RtfqError
from rtfq_deploy.formats import RUNTIMES
from rtfq_deploy.manifest import Entry, check_name
from rtfq_deploy.serve import conditional as cond
from rtfq_deploy.serve.auth import BearerAuth, TokenFile, _bearer
from rtfq_deploy.serve.candidates import Candidates, CandidateSet
from rtfq_deploy.serve.devices import DeviceTokenFile, RateLimit, UploadConfig, UploadError, accept_results
from rtfq_deploy.serve.openapi import document
from rtfq_deploy.serve.store import ServedFile, Snapshot, Store, open_verified

log = logging.getLogger(__name__)
_SHA_RE = re.compile(r"[0-9a-f]{64}")
_UPLOAD_RE = re.compile(r"/v1/devices/[^/]+/results")
API = "/v1"


@dataclass(frozen=True)
class ServeConfig:
    """How the server runs; the CLI builds it from its options."""

    dist_dir: Path
    host: str = "127.0.0.1"
    port: int = 8080
    poll_interval_s: float = 0.5  # how often manifest.json and the listed files are stat'ed
    chunk_bytes: int = 256 * 1024  # one read from the file per chunk sent
    max_target_bytes: int = 2048  # request path + query string
    max_header_bytes: int = 16 * 1024  # request line + headers (h11's incomplete-event limit)
    limit_concurrency: int = 1024  # connections; beyond it uvicorn answers 503
    header_timeout_s: float = 10.0  # a connection must complete its request headers within this
    max_client_connections: int = 64  # open connections per client address; more are closed at once
    token_file: Path | None = None  # bearer tokens, one per line (None: no access control)
    certfile: Path | None = None  # TLS certificate chain (PEM); with keyfile, serve https
    keyfile: Path | None = None
    access_log: bool = False
    candidates_dir: Path | None = None  # rtfq-export --all output offered to devices for measuring
    accuracy_file: Path | None = None  # rtfq eval's table for the candidates
    device_token_file: Path | None = None  # "<device> <token>" lines: who may upload results for which device
    upload: UploadConfig = UploadConfig()

    def __post_init__(self) -> None:
        """The CLI validates its options; this catches a library caller's NaN or zero,
        which would otherwise kill the reload task or disable a limit silently."""
        for name in ("poll_interval_s", "header_timeout_s"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"ServeConfig.{name} must be a finite number > 0, got {value!r}")
        for name in ("chunk_bytes", "max_target_bytes", "max_header_bytes", "limit_concurrency",
                     "max_client_connections"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"ServeConfig.{name} must be an integer >= 1, got {value!r}")
        if (self.certfile is None) != (self.keyfile is None):
            raise ValueError("ServeConfig.certfile and keyfile go together")

    @property
    def tls(self) -> bool:
        return self.certfile is not None


class ApiError(Exception):
    """An error answered as ``{"error": message, ...extra}`` with ``status``."""

    def __init__(self, status: int, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.status, self.message, self.extra = status, message, extra


def build_app(config: ServeConfig, store: Store) -> Starlette:
    """The app; reads ``config.token_file``, the device token file and the candidates now
    (RtfqError if one is unusable)."""
    tokens = TokenFile(config.token_file) if config.token_file is not None else None
    device_tokens = DeviceTokenFile(config.device_token_file) if config.device_token_file is not None else None
    candidates = Candidates(config.candidates_dir, config.accuracy_file) if config.candidates_dir is not None else None
    api = _Api(config, store, tokens, candidates, device_tokens)
    # With --token-file a device token also opens the read-only routes (enroll sends one token).
    readers = _EitherTokens(tokens, device_tokens) if tokens is not None else None
    routes = [
        Route(f"{API}/health", api.health, methods=["GET"]),
        Route(f"{API}/devices", api.devices, methods=["GET"]),
        Route(f"{API}/devices/{{device}}", api.device, methods=["GET"]),
        Route(f"{API}/devices/{{device}}/resolve", api.resolve, methods=["GET"]),
        Route(f"{API}/devices/{{device}}/results", api.upload, methods=["POST"]),
        Route(f"{API}/candidates", api.candidates, methods=["GET"]),
        Route(f"{API}/candidates/{{file}}", api.candidate_file, methods=["GET"]),
        Route(f"{API}/files/{{sha256}}", api.file, methods=["GET"]),  # HEAD comes with GET
        Route(f"{API}/openapi.json", api.openapi, methods=["GET"]),
    ]

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(_poll, store, config.poll_interval_s, tokens, candidates, device_tokens)
            yield
            tasks.cancel_scope.cancel()

    app = Starlette(routes=routes, lifespan=lifespan,
                    middleware=[Middleware(_Guard, max_target_bytes=config.max_target_bytes,
                                           max_header_bytes=config.max_header_bytes,
                                           max_upload_bytes=config.upload.max_bytes),
                                Middleware(BearerAuth, tokens=readers)],
                    exception_handlers={ApiError: _api_error, HTTPException: _http_error, Exception: _server_error})
    app.router.redirect_slashes = False  # a redirect would echo the Host header back
    return app


async def _poll(store: Store, interval: float, tokens: TokenFile | None = None, candidates: Candidates | None = None,
                device_tokens: DeviceTokenFile | None = None) -> None:
    """Pick up a republished manifest (or a changed file) and a changed token file's
    content without a restart, in a worker thread: the event loop never reads them.

    ``Store.refresh`` records every failure to load in ``store.error`` (shown by
    /v1/health) and logs each distinct one once; this guard only keeps the watcher alive
    should the refresh itself fail (e.g. no worker thread), logging each distinct failure once.
    A refresh that does not return (storage that hangs) is reported by /v1/health as
    degraded after :func:`stuck_after_s`.
    """
    last: str | None = None
    while True:
        await anyio.sleep(interval)
        try:
            await anyio.to_thread.run_sync(store.refresh)
            for watched in (tokens, device_tokens):
                if watched is not None:
                    await anyio.to_thread.run_sync(watched.recheck)
            if candidates is not None:
                await anyio.to_thread.run_sync(candidates.refresh)
            last = None
        except Exception as e:  # never let the watcher die; the old snapshot keeps serving
            message = f"manifest refresh failed: {type(e).__name__}: {e}"
            if message != last:
                log.error("%s", message)
            last = message


def stuck_after_s(config: ServeConfig) -> float:
    """How long a reload may run before health calls the server degraded (hashing a large
    new model file takes a while; a read that hangs takes for ever)."""
    return max(30.0, 20 * config.poll_interval_s)


class _EitherTokens:
    """What opens the read-only routes: a token of --token-file or of --device-token-file."""

    def __init__(self, tokens: TokenFile, device_tokens: DeviceTokenFile | None) -> None:
        self.tokens, self.device_tokens = tokens, device_tokens

    def accepts(self, token: bytes) -> bool:
        general = self.tokens.accepts(token)
        device = self.device_tokens.accepts(token) if self.device_tokens is not None else False
        return general or device


class _Api:
    def __init__(self, config: ServeConfig, store: Store, tokens: TokenFile | None = None,
                 candidates: Candidates | None = None, device_tokens: DeviceTokenFile | None = None) -> None:
        self.config, self.store, self.tokens = config, store, tokens
        self.candidates_, self.device_tokens = candidates, device_tokens
        self.rate = RateLimit(config.upload.min_interval_s)

    async def health(self, request: Request) -> Response:
        snap = self.store.snapshot
        if self.tokens is not None:
            self.tokens.tokens()  # notice a broken token file even when no request uses it
        auth_error = None
        if self.tokens is not None and self.tokens.error is not None:  # the file's path is not for everyone
            auth_error = "the token file is unusable; every token is refused until it is fixed"
        if self.device_tokens is not None:
            self.device_tokens.tokens()
            if self.device_tokens.error is not None:
                auth_error = "the device token file is unusable; every upload is refused until it is fixed"
        reload_error = self.store.error
        started = self.store.refreshing_since
        if reload_error is None and started is not None and time.monotonic() - started > stuck_after_s(self.config):
            reload_error = f"a manifest reload has not finished for {time.monotonic() - started:.0f} s"
        return JSONResponse({
            "status": "ok" if reload_error is None and auth_error is None else "degraded",
            "version": __version__, "generation": snap.generation,
            "manifest_sha256": snap.manifest_sha256, "loaded_at": snap.loaded_at,
            "devices": len(snap.devices), "files": len(snap.files),
            "excluded": [{"device": e.device, "path": e.path, "reason": e.reason} for e in snap.excluded],
            "reload_error": reload_error,
            "auth_error": auth_error,
            "candidates": len(self.candidates_.current.by_file) if self.candidates_ is not None else None,
        })

    async def devices(self, request: Request) -> Response:
        snap = self.store.snapshot
        return JSONResponse({"devices": [
            {"name": name, "updated": d.updated, "files": len(d.files), "runtimes": d.runtimes,
             "fingerprint": dict(d.fingerprint)}
            for name, d in sorted(snap.devices.items())]})

    async def device(self, request: Request) -> Response:
        snap = self.store.snapshot
        name = _device_name(request, snap)
        d = snap.devices[name]
        return JSONResponse({"name": name, "updated": d.updated, "fingerprint": dict(d.fingerprint),
                             "files": [_entry_json(e) for e in d.files]})

    async def resolve(self, request: Request) -> Response:
        snap = self.store.snapshot
        name = _device_name(request, snap)
        texts = request.query_params.getlist("budget")
        if len(texts) != 1:
            raise ApiError(400, "give exactly one budget, e.g. ?budget=latency=20ms,memory=64MB")
        try:
            budget = bg.parse_budget(texts[0])
        except RtfqError as e:
            raise ApiError(400, str(e)) from None
        runtimes = request.query_params.getlist("runtime")
        if len(runtimes) > 1 or (runtimes and runtimes[0] not in RUNTIMES):
            raise ApiError(400, f"give at most one runtime, one of {', '.join(RUNTIMES)}")
        runtime = runtimes[0] if runtimes else None
        device = snap.devices[name]
        entries = [e for e in device.files if runtime is None or e.runtime == runtime]
        if runtime is not None and not entries and not any(e.device == name for e in snap.excluded):
            raise ApiError(404, f"device {name!r} has no {runtime} entries", runtimes=device.runtimes)
        if not entries:
            raise ApiError(503, f"device {name!r} has no verified model file right now", retry_after=1)
        dicts = [e.as_dict() for e in entries]
        choice = bg.choose(dicts, budget)
        chosen = next(e for e, d in zip(entries, dicts) if d is choice.entry)
        entry = _entry_json(chosen)
        if not choice.met:
            raise ApiError(422, choice.reason, device=name, budget=str(budget), cheapest=entry)
        reason = f"{choice.reason} on {chosen.runtime}"
        if chosen.stable is False:
            reason += "; its latency figure is unstable (the p50 did not settle when measured)"
        return JSONResponse({"device": name, "budget": str(budget), "reason": reason, "entry": entry})

    async def file(self, request: Request) -> Response:
        sha = request.path_params["sha256"]
        served = self.store.snapshot.files.get(sha) if _SHA_RE.fullmatch(sha) else None
        if served is None:
            raise ApiError(404, "no such file")
        return await self._send(request, served, "public, max-age=31536000, immutable")

    async def candidates(self, request: Request) -> Response:
        current = self._candidate_set()
        runtimes = request.query_params.getlist("runtime")
        if len(runtimes) > 1 or (runtimes and runtimes[0] not in RUNTIMES):
            raise ApiError(400, f"give at most one runtime, one of {', '.join(RUNTIMES)}")
        return JSONResponse({"runtime": runtimes[0] if runtimes else None,
                             "checkpoint_sha256": current.checkpoint_sha256,
                             "candidates": [c.as_json() for _, c in sorted(current.by_file.items())]})

    async def candidate_file(self, request: Request) -> Response:
        candidate = self._candidate_set().by_file.get(request.path_params["file"])
        if candidate is None:
            raise ApiError(404, "no such candidate")
        # a name may be re-exported with other bytes: revalidate by ETag, never cache blindly
        return await self._send(request, candidate.served, "no-cache")

    def _candidate_set(self) -> CandidateSet:
        if self.candidates_ is None:
            raise ApiError(404, "this server offers no candidates (start it with --candidates DIR)")
        return self.candidates_.current

    async def upload(self, request: Request) -> Response:
        """A device's results: checked, chosen from and published for that device only."""
        name = request.path_params["device"]
        try:
            check_name(name)
        except RtfqError:
            raise ApiError(400, "invalid device name") from None
        if self.candidates_ is None or self.device_tokens is None:
            raise ApiError(403, "this server takes no uploads (start it with --candidates and --device-token-file)")
        token = _bearer(request.scope["headers"])
        owner = self.device_tokens.device_of(token) if token is not None else None
        if owner is None:
            raise ApiError(401, "uploading needs Authorization: Bearer <the device's token>")
        if owner != name:
            raise ApiError(403, f"this token is not device {name!r}'s")
        wait = self.rate.take(name)
        if wait > 0:
            raise ApiError(429, f"device {name!r} uploaded less than {self.config.upload.min_interval_s:g} s ago",
                           retry_after=max(1, math.ceil(wait)))
        try:
            body = await _read_body(request, self.config.upload.max_bytes)
            answer = await anyio.to_thread.run_sync(
                accept_results, self.store.root, name, body, request.query_params.getlist("budget"),
                self.candidates_.current, self.config.upload)
        except UploadError as e:
            self.rate.give_back(name)
            raise ApiError(e.status, e.message, **e.extra) from None
        except BaseException:
            self.rate.give_back(name)
            raise
        digest = answer.get("manifest_sha256")
        deadline = time.monotonic() + self.config.upload.publish_wait_s
        while digest is not None and self.store.snapshot.manifest_sha256 != digest and time.monotonic() < deadline:
            await anyio.sleep(min(0.05, self.config.poll_interval_s))
        return JSONResponse(answer)

    async def _send(self, request: Request, served: ServedFile, cache_control: str) -> Response:
        """A verified file: ETag (its sha256), conditional and single-range requests."""
        sha = served.sha256
        etag = cond.etag_for(sha)
        headers = {"ETag": etag, "Cache-Control": cache_control, "Accept-Ranges": "bytes"}
        if cond.none_match(request.headers.get("if-none-match"), etag):
            return Response(status_code=304, headers=headers)
        fd = await anyio.to_thread.run_sync(open_verified, served)
        if fd is None:  # replaced since it was hashed; the watcher re-verifies within a poll
            raise ApiError(503, "file is being republished; resolve again", retry_after=1)
        handed_over = False  # the streaming response owns and closes the fd once it exists
        try:
            size = served.size
            status, first, last = 200, 0, size - 1
            if cond.range_applies(request.headers.get("if-range"), etag):
                span = cond.byte_range(request.headers.get("range"), size)
                if span is not None:
                    status, (first, last) = 206, span
                    headers["Content-Range"] = f"bytes {first}-{last}/{size}"
            headers["Content-Length"] = str(last - first + 1)
            headers["Content-Disposition"] = f'attachment; filename="{served.name}"'
            if request.method == "HEAD":
                return Response(status_code=status, headers=headers, media_type="application/octet-stream")
            stream = _FileStream(fd, first, last - first + 1, self.config.chunk_bytes, status, headers)
            handed_over = True
            return stream
        except cond.Unsatisfiable:
            return _error_response(416, "range not satisfiable", {"Content-Range": f"bytes */{served.size}"})
        finally:
            if not handed_over:
                os.close(fd)

    async def openapi(self, request: Request) -> Response:
        return JSONResponse(document())


class _FileStream(StreamingResponse):
    """Streams ``length`` bytes of an open fd from ``first``; owns and closes the fd."""

    def __init__(self, fd: int, first: int, length: int, chunk: int, status: int, headers: dict[str, str]) -> None:
        self._fd = fd
        super().__init__(_read_chunks(fd, first, length, chunk), status_code=status, headers=headers,
                         media_type="application/octet-stream")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            os.close(self._fd)


async def _read_body(request: Request, limit: int) -> bytes:
    """The request body, refused (413) beyond ``limit`` bytes whatever Content-Length said."""
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise ApiError(413, f"the upload is larger than {limit} bytes")
    return bytes(body)


async def _read_chunks(fd: int, offset: int, remaining: int, chunk: int) -> AsyncIterator[bytes]:
    while remaining > 0:
        block = await anyio.to_thread.run_sync(os.pread, fd, min(chunk, remaining), offset)
        if not block:  # only an in-place truncation can do this; the client's hash check catches it
            raise OSError("file shrank while being sent")
        offset += len(block)
        remaining -= len(block)
        yield block


class _Guard:
    """Refuse what the API never needs before any routing: methods other than GET/HEAD
    (405) except POST to an upload route, request bodies (413) except an upload's of a
    stated length up to ``max_upload_bytes`` (411 without one), long targets (414), large
    or many headers (431; h11 bounds only what it buffers of an incomplete request); mark
    every answer nosniff."""

    def __init__(self, app: ASGIApp, max_target_bytes: int, max_header_bytes: int, max_headers: int = 100,
                 max_upload_bytes: int = 0) -> None:
        self.app, self.max_target_bytes = app, max_target_bytes
        self.max_header_bytes, self.max_headers = max_header_bytes, max_headers
        self.max_upload_bytes = max_upload_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.lower(): v for k, v in scope["headers"]}
        refusal = None
        upload = scope["method"] == "POST" and _UPLOAD_RE.fullmatch(scope["path"]) is not None
        length = headers.get(b"content-length", b"0")
        if scope["method"] not in ("GET", "HEAD") and not upload:
            allow = "POST" if _UPLOAD_RE.fullmatch(scope["path"]) else "GET, HEAD"
            refusal = _error_response(405, f"method {scope['method']} is not allowed here", {"Allow": allow})
        elif upload and (b"transfer-encoding" in headers or b"content-length" not in headers):
            refusal = _error_response(411, "an upload needs a Content-Length (no chunked bodies)")
        elif upload and not (length.isdigit() and len(length) <= 12 and int(length) <= self.max_upload_bytes):
            refusal = _error_response(413, f"the upload is larger than {self.max_upload_bytes} bytes")
        elif not upload and (length != b"0" or b"transfer-encoding" in headers):
            refusal = _error_response(413, "requests must not have a body")
        elif len(scope.get("raw_path") or b"") + len(scope["query_string"]) > self.max_target_bytes:
            refusal = _error_response(414, f"request target longer than {self.max_target_bytes} bytes")
        elif (len(scope["headers"]) > self.max_headers
              or sum(len(k) + len(v) + 4 for k, v in scope["headers"]) > self.max_header_bytes):
            refusal = _error_response(431, f"request headers over {self.max_headers} fields or "
                                           f"{self.max_header_bytes} bytes")
        if refusal is not None:
            refusal.headers["Connection"] = "close"
            await refusal(scope, receive, _nosniff(send))
            return
        await self.app(scope, receive, _nosniff(send))


def _nosniff(send: Send) -> Send:
    async def wrapped(message: Message) -> None:
        if message["type"] == "http.response.start":
            message = {**message, "headers": [*message.get("headers", []), (b"x-content-type-options", b"nosniff")]}
        await send(message)

    return wrapped


def _device_name(request: Request, snap: Snapshot) -> str:
    name = request.path_params["device"]
    try:
        check_name(name)
    except RtfqError:
        raise ApiError(404, "unknown device") from None
    if name not in snap.devices:
        raise ApiError(404, f"unknown device {name!r}", devices=sorted(snap.devices))
    return name


def _entry_json(entry: Entry) -> dict[str, Any]:
    return {**entry.as_dict(), "url": f"{API}/files/{entry.sha256}"}


def _error_response(status: int, message: str, headers: dict[str, str] | None = None, **extra: Any) -> JSONResponse:
    return JSONResponse({"error": message, **extra}, status_code=status, headers=headers)


async def _api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    extra = dict(exc.extra)
    headers = {"Retry-After": str(extra.pop("retry_after"))} if "retry_after" in extra else None
    return _error_response(exc.status, exc.message, headers, **extra)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    message = "not found" if exc.status_code == 404 else str(exc.detail)
    return _error_response(exc.status_code, message, dict(exc.headers or {}))


async def _server_error(request: Request, exc: Exception) -> Response:
    log.error("internal error on %s: %r", request.url.path, exc)
    return _error_response(500, "internal server error")
