"""The device-side client of ``rtfq-serve``: resolve a budget, download, resume, verify.

Standard library only (plus this package's torch-free modules), so it runs on a device
that has nothing else. A download goes to ``<out>.<sha256>.part`` beside the output;
an interrupted one (a dropped connection, a killed process) resumes from that file's
size with ``Range`` and ``If-Range``, and since the partial file is named after the
hash it is only ever continued with the same bytes. The whole file's sha256 is checked
before it is renamed into place; an existing output is replaced only with ``force``.

The client never writes more than the entry's size: a response that announces another
length, or keeps sending past it, is refused (and its partial file removed). A bearer
``token`` goes only to the server's own origin (never along a redirect), and ``cafile``
makes https trust a private CA.
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import re
import socket
import ssl
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rtfq_deploy.budget import parse_budget
from rtfq_deploy.errors import RtfqError
from rtfq_deploy.fileio import publish
from rtfq_deploy.manifest import RUNTIMES, check_name, sha256_file
from rtfq_deploy.tokens import check_token

log = logging.getLogger(__name__)
_CHUNK = 1 << 20
_SHA_RE = re.compile(r"[0-9a-f]{64}")
_CONTENT_RANGE_RE = re.compile(r"bytes (\d+)-(\d+)/(\d+)")


@dataclass(frozen=True)
class FetchConfig:
    server: str  # base URL, e.g. http://10.0.0.2:8080
    device: str
    budget: str
    out: Path
    force: bool = False
    timeout_s: float = 30.0  # per socket operation
    retries: int = 3  # resumptions after a dropped connection within one call
    user_agent: str = "rtfq-fetch"
    token: str | None = None  # sent as "Authorization: Bearer <token>" (rtfq-serve --token-file)
    cafile: Path | None = None  # PEM certificates to trust for https instead of the system's
    runtime: str | None = None  # only entries for this runtime; None: the best over the device's runtimes


@dataclass(frozen=True)
class FetchResult:
    path: Path
    entry: dict[str, Any]  # the manifest entry the server chose
    reason: str
    resumed_from: int  # bytes of an earlier partial download that were kept
    downloaded: int  # bytes received in this call
    up_to_date: bool  # the output already held this file; nothing was downloaded


class _Retry(Exception):
    """A failure worth retrying: a dropped connection, a timeout, a 503."""

    def __init__(self, message: str, wait_s: float | None = None) -> None:
        super().__init__(message)
        self.wait_s = wait_s  # None: exponential backoff


@dataclass(frozen=True)
class _Client:
    """How every request of one fetch is made."""

    timeout_s: float
    user_agent: str
    token: str | None
    context: ssl.SSLContext | None  # None: http, or https with the system's CAs


def check_server_url(url: str) -> str:
    """``url`` if it is an http(s) base URL this client can use, else one RtfqError line."""
    if not isinstance(url, str) or not url or len(url) > 2048 or any(c.isspace() or ord(c) < 32 for c in url):
        raise RtfqError(f"server URL {_short(url)!r} is not a URL (e.g. http://10.0.0.2:8080)")
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port
    except ValueError as e:
        raise RtfqError(f"server URL {_short(url)!r} is malformed: {e}") from None
    if parts.scheme not in ("http", "https"):
        raise RtfqError(f"server URL must be http:// or https://, got {_short(url)!r}")
    if not parts.hostname:
        raise RtfqError(f"server URL {_short(url)!r} has no host")
    if parts.username is not None or parts.password is not None:
        raise RtfqError("server URL must not hold credentials; use --token-file or RTFQ_TOKEN")
    if parts.query or parts.fragment:
        raise RtfqError(f"server URL {_short(url)!r} must not have a query or fragment")
    if port == 0:
        raise RtfqError(f"server URL {_short(url)!r} has port 0")
    return url


def _client(config: FetchConfig) -> _Client:
    """Check the connection settings once, before any traffic."""
    check_server_url(config.server)
    if not (isinstance(config.timeout_s, (int, float)) and 0 < config.timeout_s < float("inf")):
        raise RtfqError(f"timeout must be a finite number of seconds > 0, got {config.timeout_s!r}")
    if config.token is not None:
        check_token(config.token, "the bearer token")
    context = None
    if config.cafile is not None:
        if urllib.parse.urlsplit(config.server).scheme != "https":
            raise RtfqError("--cafile applies to an https:// server only")
        try:
            context = ssl.create_default_context(cafile=os.fspath(config.cafile))
        except FileNotFoundError:
            raise RtfqError(f"cannot read CA file {config.cafile}: no such file") from None
        except ssl.SSLError as e:
            raise RtfqError(f"CA file {config.cafile} holds no usable PEM certificate: {e.reason or e}") from None
        except OSError as e:
            raise RtfqError(f"cannot read CA file {config.cafile}: {e.strerror or e}") from None
    return _Client(float(config.timeout_s), config.user_agent, config.token, context)


def fetch(config: FetchConfig) -> FetchResult:
    """Resolve ``config.budget`` for ``config.device`` and make ``config.out`` that file."""
    check_name(config.device)
    parse_budget(config.budget)  # a typo fails here, before any network traffic
    check_runtime(config.runtime)
    client = _client(config)
    resolution = _retrying(config, lambda: _resolve(client, config.server, config.device, config.budget,
                                                    config.runtime))
    entry = resolution["entry"]
    reason = _short(resolution.get("reason", ""), 300)  # printed: one bounded line whatever the server sent
    sha, size = str(entry.get("sha256", "")), entry.get("size_bytes")
    if not _SHA_RE.fullmatch(sha) or isinstance(size, bool) or not isinstance(size, int) or not 0 <= size < 2**63:
        raise RtfqError(f"server answered a malformed entry for {config.device!r}")
    got = entry.get("runtime", RUNTIMES[0])  # servers from before runtimes serve onnxruntime entries
    if got not in RUNTIMES or (config.runtime is not None and got != config.runtime):
        raise RtfqError(f"server answered an entry for runtime {_short(got)!r} where {config.runtime} was asked for")
    out = Path(config.out)
    if out.is_dir():
        raise RtfqError(f"{out} is a directory")
    if out.exists():
        if sha256_file(out) == sha:
            return FetchResult(out, entry, reason, 0, 0, True)
        if not config.force:
            raise FileExistsError(f"{out} exists and holds another file (use --force to overwrite)")
    out.parent.mkdir(parents=True, exist_ok=True)
    part = out.with_name(f"{out.name}.{sha}.part")
    _remove_stale_parts(out, keep=part)
    url = urllib.parse.urljoin(config.server.rstrip("/") + "/", str(entry.get("url", f"/v1/files/{sha}")))
    if _origin(url) != _origin(config.server):  # the token and the trust go to this server only
        raise RtfqError(f"server pointed the download at another server: {_short(url)!r}")
    received = [0]  # over every attempt of this call
    _retrying(config, lambda: _download(client, url, part, sha, size, received))
    digest = sha256_file(part)
    if digest != sha:
        part.unlink()
        raise RtfqError(f"downloaded file's sha256 {digest[:12]}... is not {sha[:12]}...; removed it, run again")
    publish(part, out, overwrite=config.force)
    return FetchResult(out, entry, reason, max(0, size - received[0]), received[0], False)


def check_runtime(runtime: str | None) -> str | None:
    if runtime is not None and runtime not in RUNTIMES:
        raise RtfqError(f"unknown runtime {_short(runtime)!r}: expected one of {', '.join(RUNTIMES)}")
    return runtime


def resolve(server: str, device: str, budget: str, timeout_s: float = 30.0, user_agent: str = "rtfq-fetch", *,
            token: str | None = None, cafile: Path | None = None, runtime: str | None = None) -> dict[str, Any]:
    """The server's choice for ``device`` under ``budget`` (on ``runtime``, or the best over
    the device's runtimes): {device, budget, reason, entry}."""
    config = FetchConfig(server, device, budget, Path("."), timeout_s=timeout_s, user_agent=user_agent,
                         token=token, cafile=cafile, runtime=check_runtime(runtime))
    return _resolve(_client(config), server, device, budget, runtime)


def _resolve(client: _Client, server: str, device: str, budget: str, runtime: str | None = None) -> dict[str, Any]:
    query = urllib.parse.urlencode({"budget": budget} | ({"runtime": runtime} if runtime else {}))
    url = urllib.parse.urljoin(server.rstrip("/") + "/",
                               f"v1/devices/{urllib.parse.quote(device, safe='')}/resolve?{query}")
    with _open(client, url, {"Accept": "application/json"}) as response:
        try:
            body = json.loads(response.read(1 << 20))
        except (ValueError, RecursionError):
            raise RtfqError(f"{server} answered something other than JSON; is it an rtfq-serve?") from None
    if not isinstance(body, dict) or not isinstance(body.get("entry"), dict):
        raise RtfqError(f"{server} answered an unexpected resolution")
    return body


def _download(client: _Client, url: str, part: Path, sha: str, size: int, received: list[int]) -> None:
    """Append the missing bytes to ``part`` (never past ``size``), counting them in ``received[0]``."""
    have = part.stat().st_size if part.exists() else 0
    if have > size:
        have = 0  # cannot be a prefix of this file
    if have == size and have > 0:
        return
    headers = {"Accept-Encoding": "identity"}
    if have:
        headers.update({"Range": f"bytes={have}-", "If-Range": f'"{sha}"'})
    with _open(client, url, headers) as response:
        if response.status == 206:
            match = _CONTENT_RANGE_RE.fullmatch(response.headers.get("Content-Range", ""))
            if match is None or int(match[1]) != have or int(match[3]) != size:
                raise RtfqError(f"server answered a range that does not continue the download: "
                                f"{response.headers.get('Content-Range')!r}")
            log.info("resuming at byte %d of %d", have, size)
            mode = "ab"
        elif response.status == 200:
            have, mode = 0, "wb"
        else:
            raise RtfqError(f"unexpected HTTP {response.status} for {url}")
        if response.headers.get("ETag") not in (None, f'"{sha}"'):
            raise RtfqError(f"server sent ETag {_short(response.headers.get('ETag'))} for file {sha[:12]}...")
        expected = size - have
        announced = response.headers.get("Content-Length")
        if announced is not None and announced.strip() != str(expected):
            raise RtfqError(f"server announced {_short(announced)} bytes where {expected} were expected for file "
                            f"{sha[:12]}...; refusing it")
        got, overflow = 0, False
        with open(part, mode) as f:
            f.truncate(have)
            f.seek(have)
            try:
                while got < expected and (block := _read(response, min(_CHUNK, expected - got))):
                    f.write(block)
                    got += len(block)
                    received[0] += len(block)
                overflow = got == expected and bool(_read(response, 1))  # one byte more is a lie
            finally:
                f.flush()
                os.fsync(f.fileno())
    if overflow:
        part.unlink(missing_ok=True)
        raise RtfqError(f"server sent more than the {size} bytes of file {sha[:12]}...; stopped reading and "
                        "removed the partial download")
    if have + got != size:
        raise _Retry(f"connection closed after {have + got} of {size} bytes")


def _read(response: http.client.HTTPResponse, limit: int) -> bytes:
    try:
        return response.read1(limit)
    except (OSError, http.client.HTTPException) as e:
        raise _Retry(f"connection lost: {_describe(e)}") from None


def _retrying(config: FetchConfig, step):  # type: ignore[no-untyped-def]
    """Run ``step``; on a dropped connection or a 503, wait and run it again (it resumes)."""
    for attempt in range(config.retries + 1):
        try:
            return step()
        except _Retry as e:
            if attempt == config.retries:
                raise RtfqError(f"{e} (gave up after {config.retries} retries; run again to resume)") from None
            wait = min(0.5 * 2**attempt, 8.0) if e.wait_s is None else e.wait_s
            log.warning("%s; retrying in %.1f s", e, wait)
        time.sleep(wait)
    raise AssertionError("unreachable")


def _open(client: _Client, url: str, headers: dict[str, str]):  # type: ignore[no-untyped-def]
    scheme = urllib.parse.urlsplit(url).scheme
    if scheme not in ("http", "https"):
        raise RtfqError(f"server URL must be http:// or https://, got {_short(url)!r}")
    request = urllib.request.Request(url, headers={**headers, "User-Agent": client.user_agent})
    if client.token is not None:
        request.add_unredirected_header("Authorization", f"Bearer {client.token}")  # not sent along a redirect
    try:
        return urllib.request.urlopen(request, timeout=client.timeout_s, context=client.context)
    except urllib.error.HTTPError as e:
        message = _error_message(e)
        if e.code == 503:
            raise _Retry(f"server busy: {message}", min(float(_int(e.headers.get("Retry-After"), 1)), 10.0)) from None
        if e.code == 401:
            hint = "give a token with --token-file or RTFQ_TOKEN" if client.token is None else "the token was refused"
            raise RtfqError(f"server: {message} ({hint})") from None
        raise RtfqError(f"server: {message}") from None
    except urllib.error.URLError as e:
        if isinstance(e.reason, ssl.SSLCertVerificationError):
            why = _short(e.reason.verify_message or e.reason.reason or str(e.reason))
            raise RtfqError(f"cannot trust {_origin(url)[1]}: TLS certificate {why} "
                            "(a private CA needs --cafile)") from None
        reason = getattr(e.reason, "strerror", None) or e.reason
        if isinstance(e.reason, ssl.SSLError):  # a handshake failure is no dropped connection
            raise RtfqError(f"cannot reach {_short(url)}: TLS: {_short(getattr(e.reason, 'reason', None) or e.reason)}"
                            ) from None
        if isinstance(e.reason, (ConnectionRefusedError, socket.gaierror)) or not isinstance(e.reason, OSError):
            raise RtfqError(f"cannot reach {_short(url)}: {_short(reason)}") from None
        raise _Retry(f"cannot reach {_short(url)}: {_short(reason)}") from None
    except (http.client.InvalidURL, ValueError) as e:
        raise RtfqError(f"server URL {_short(url)!r} is malformed: {_short(e)}") from None
    except (OSError, http.client.HTTPException) as e:  # timeout or reset while reading the headers
        raise _Retry(f"connection lost: {_describe(e)}") from None


def _error_message(e: urllib.error.HTTPError) -> str:
    try:
        body = json.loads(e.read(1 << 16))
        message = body["error"] if isinstance(body, dict) else None
    except (ValueError, KeyError, OSError, RecursionError):
        message = None
    return _short(message, 300) if message else f"HTTP {e.code} {_short(e.reason)}"


def _origin(url: str) -> tuple[str, str]:
    parts = urllib.parse.urlsplit(url)
    return parts.scheme, parts.netloc.lower()


def _short(text: object, limit: int = 120) -> str:
    """What a server or user sent, as one bounded line for an error message."""
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[:limit] + "..."


def _remove_stale_parts(out: Path, keep: Path) -> None:
    """Partial downloads of other versions of ``out`` will never be resumed."""
    pattern = re.compile(re.escape(out.name) + r"\.[0-9a-f]{64}\.part")
    for p in out.parent.glob(f"{out.name}.*.part") if out.parent.is_dir() else ():
        if p != keep and pattern.fullmatch(p.name):
            p.unlink(missing_ok=True)


def _describe(e: BaseException) -> str:
    if isinstance(e, http.client.IncompleteRead):
        return "connection closed early"
    return getattr(e, "strerror", None) or type(e).__name__


def _int(text: str | None, default: int) -> int:
    try:
        return max(0, int(text)) if text is not None else default
    except ValueError:
        return default
