"""The device-side client of ``rtfq-serve``: resolve a budget, download, resume, verify.

Standard library only (plus this package's torch-free modules), so it runs on a device
that has nothing else. A download goes to ``<out>.<sha256>.part`` beside the output;
an interrupted one (a dropped connection, a killed process) resumes from that file's
size with ``Range`` and ``If-Range``, and since the partial file is named after the
hash it is only ever continued with the same bytes. The whole file's sha256 is checked
before it is renamed into place; an existing output is replaced only with ``force``, and
never when it is not a regular file (a device node, a FIFO, a folder). The partial file is
opened without following a link and must be a regular file with one link: a symlink or
hard link planted at its predictable name is refused, never written through.

Two clocks bound the network: ``timeout_s`` is each socket operation's (connecting, each
read), ``deadline_s`` one attempt's in all (a resolve, or one download from its first
byte to its last): a server that trickles a byte a second cannot hold a fetch for ever;
an attempt cut by its deadline is resumed by the next one.

The client never writes more than the entry's size: a response that announces another
length, or keeps sending past it, is refused (and its partial file removed). A bearer
``token`` goes only to the server's own origin (never along a redirect), an answer that
came from another origin through a redirect is refused, and ``cafile`` makes https trust
a private CA.

The parts ``rtfq enroll`` (:mod:`rtfq_deploy.enroll`) shares are public: ``make_client``,
``attempt`` (one deadline), ``open_url``, ``read_all``, ``retrying``, ``download``,
``open_part``, ``Retry`` and ``short``.
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import re
import socket
import ssl
import stat
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rtfq_deploy.budget import parse_budget
from rtfq_deploy.errors import RtfqError
from rtfq_deploy.fileio import check_output, publish, read_bounded, sha256_fileobj
from rtfq_deploy.formats import DEFAULT_RUNTIME, RUNTIMES
from rtfq_deploy.manifest import check_name, sha256_file
from rtfq_deploy.tokens import check_token

log = logging.getLogger(__name__)
_CHUNK = 1 << 20
_MAX_CAFILE = 4 << 20  # a system bundle is about 200 kB
_SHA_RE = re.compile(r"[0-9a-f]{64}")
_CONTENT_RANGE_RE = re.compile(r"bytes (\d+)-(\d+)/(\d+)")


@dataclass(frozen=True)
class FetchConfig:
    server: str  # base URL, e.g. http://10.0.0.2:8080
    device: str
    budget: str
    out: Path
    force: bool = False
    timeout_s: float = 30.0  # per socket operation (connect, each read)
    retries: int = 3  # resumptions after a dropped connection within one call
    user_agent: str = "rtfq-fetch"
    token: str | None = None  # sent as "Authorization: Bearer <token>" (rtfq-serve --token-file)
    cafile: Path | None = None  # PEM certificates to trust for https instead of the system's
    runtime: str | None = None  # only entries for this runtime; None: the best over the device's runtimes
    deadline_s: float = 600.0  # one attempt (a resolve, or a download) in all; the next attempt resumes


@dataclass(frozen=True)
class FetchResult:
    path: Path
    entry: dict[str, Any]  # the manifest entry the server chose
    reason: str
    resumed_from: int  # bytes of an earlier partial download that were kept
    downloaded: int  # bytes received in this call
    up_to_date: bool  # the output already held this file; nothing was downloaded


class Retry(Exception):
    """A failure worth retrying: a dropped connection, a timeout, a 503."""

    def __init__(self, message: str, wait_s: float | None = None) -> None:
        super().__init__(message)
        self.wait_s = wait_s  # None: exponential backoff


@dataclass(frozen=True)
class Client:
    """How every request of one fetch is made."""

    timeout_s: float
    user_agent: str
    token: str | None
    context: ssl.SSLContext | None  # None: http, or https with the system's CAs
    deadline_s: float = 600.0


def check_server_url(url: str) -> str:
    """``url`` if it is an http(s) base URL this client can use, else one RtfqError line."""
    if not isinstance(url, str) or not url or len(url) > 2048 or any(c.isspace() or ord(c) < 32 for c in url):
        raise RtfqError(f"server URL {short(url)!r} is not a URL (e.g. http://10.0.0.2:8080)")
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port
    except ValueError as e:
        raise RtfqError(f"server URL {short(url)!r} is malformed: {e}") from None
    if parts.scheme not in ("http", "https"):
        raise RtfqError(f"server URL must be http:// or https://, got {short(url)!r}")
    if not parts.hostname:
        raise RtfqError(f"server URL {short(url)!r} has no host")
    if parts.username is not None or parts.password is not None:
        raise RtfqError("server URL must not hold credentials; use --token-file or RTFQ_TOKEN")
    if parts.query or parts.fragment:
        raise RtfqError(f"server URL {short(url)!r} must not have a query or fragment")
    if port == 0:
        raise RtfqError(f"server URL {short(url)!r} has port 0")
    return url


def make_client(config: FetchConfig) -> Client:
    """Check the connection settings once, before any traffic."""
    check_server_url(config.server)
    for name in ("timeout_s", "deadline_s"):
        value = getattr(config, name)
        if isinstance(value, bool) or not (isinstance(value, (int, float)) and 0 < value < float("inf")):
            raise RtfqError(f"{name.removesuffix('_s')} must be a finite number of seconds > 0, got {value!r}")
    if config.token is not None:
        check_token(config.token, "the bearer token")
    context = None
    if config.cafile is not None:
        if urllib.parse.urlsplit(config.server).scheme != "https":
            raise RtfqError("--cafile applies to an https:// server only")
        # read here, bounded and only if a regular file (ssl would block on a FIFO for ever)
        pem = read_bounded(config.cafile, "CA file", _MAX_CAFILE)
        try:
            context = ssl.create_default_context(cadata=pem.decode("ascii"))
        except UnicodeDecodeError:
            raise RtfqError(f"CA file {config.cafile} is not PEM text") from None
        except ssl.SSLError as e:
            raise RtfqError(f"CA file {config.cafile} holds no usable PEM certificate: {e.reason or e}") from None
        except OSError as e:
            raise RtfqError(f"cannot read CA file {config.cafile}: {e.strerror or e}") from None
    return Client(float(config.timeout_s), config.user_agent, config.token, context, float(config.deadline_s))


def fetch(config: FetchConfig) -> FetchResult:
    """Resolve ``config.budget`` for ``config.device`` and make ``config.out`` that file."""
    check_name(config.device)
    parse_budget(config.budget)  # a typo fails here, before any network traffic
    check_runtime(config.runtime)
    client = make_client(config)
    resolution = retrying(config, lambda: _resolve(client, config.server, config.device, config.budget,
                                                    config.runtime))
    entry = resolution["entry"]
    reason = short(resolution.get("reason", ""), 300)  # printed: one bounded line whatever the server sent
    sha, size = str(entry.get("sha256", "")), entry.get("size_bytes")
    if not _SHA_RE.fullmatch(sha) or isinstance(size, bool) or not isinstance(size, int) or not 0 <= size < 2**63:
        raise RtfqError(f"server answered a malformed entry for {config.device!r}")
    got = entry.get("runtime", DEFAULT_RUNTIME)  # servers from before runtimes serve onnxruntime entries
    if got not in RUNTIMES or (config.runtime is not None and got != config.runtime):
        raise RtfqError(f"server answered an entry for runtime {short(got)!r} where {config.runtime} was asked for")
    out = Path(config.out)
    check_output(out)  # a folder, device node or FIFO is never replaced, --force or not
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
        raise RtfqError(f"server pointed the download at another server: {short(url)!r}")
    received = [0]  # over every attempt of this call
    retrying(config, lambda: download(client, url, part, sha, size, received))
    with open_part(part, create=False) as f:
        digest = sha256_fileobj(f)
    if digest != sha:
        part.unlink()
        raise RtfqError(f"downloaded file's sha256 {digest[:12]}... is not {sha[:12]}...; removed it, run again")
    publish(part, out, overwrite=config.force)
    return FetchResult(out, entry, reason, max(0, size - received[0]), received[0], False)


def check_runtime(runtime: str | None) -> str | None:
    if runtime is not None and runtime not in RUNTIMES:
        raise RtfqError(f"unknown runtime {short(runtime)!r}: expected one of {', '.join(RUNTIMES)}")
    return runtime


def resolve(server: str, device: str, budget: str, timeout_s: float = 30.0, user_agent: str = "rtfq-fetch", *,
            token: str | None = None, cafile: Path | None = None, runtime: str | None = None) -> dict[str, Any]:
    """The server's choice for ``device`` under ``budget`` (on ``runtime``, or the best over
    the device's runtimes): {device, budget, reason, entry}."""
    config = FetchConfig(server, device, budget, Path("."), timeout_s=timeout_s, user_agent=user_agent,
                         token=token, cafile=cafile, runtime=check_runtime(runtime))
    return _resolve(make_client(config), server, device, budget, runtime)


def _resolve(client: Client, server: str, device: str, budget: str, runtime: str | None = None) -> dict[str, Any]:
    query = urllib.parse.urlencode({"budget": budget} | ({"runtime": runtime} if runtime else {}))
    url = urllib.parse.urljoin(server.rstrip("/") + "/",
                               f"v1/devices/{urllib.parse.quote(device, safe='')}/resolve?{query}")
    with attempt(client) as watch, open_url(client, url, {"Accept": "application/json"}, watch) as response:
        try:
            body = json.loads(read_all(response, 1 << 20, watch))
        except (ValueError, RecursionError):
            raise RtfqError(f"{server} answered something other than JSON; is it an rtfq-serve?") from None
    if not isinstance(body, dict) or not isinstance(body.get("entry"), dict):
        raise RtfqError(f"{server} answered an unexpected resolution")
    return body


def download(client: Client, url: str, part: Path, sha: str, size: int, received: list[int]) -> None:
    """Append the missing bytes to ``part`` (never past ``size``), counting them in ``received[0]``."""
    have = _part_size(part)
    if have > size:
        have = 0  # cannot be a prefix of this file
    if have == size and have > 0:
        return
    headers = {"Accept-Encoding": "identity"}
    if have:
        headers.update({"Range": f"bytes={have}-", "If-Range": f'"{sha}"'})
    with attempt(client) as watch, open_url(client, url, headers, watch) as response:
        if response.status == 206:
            match = _CONTENT_RANGE_RE.fullmatch(response.headers.get("Content-Range", ""))
            if match is None or int(match[1]) != have or int(match[3]) != size:
                raise RtfqError(f"server answered a range that does not continue the download: "
                                f"{response.headers.get('Content-Range')!r}")
            log.info("resuming at byte %d of %d", have, size)
        elif response.status == 200:
            have = 0
        else:
            raise RtfqError(f"unexpected HTTP {response.status} for {url}")
        if response.headers.get("ETag") not in (None, f'"{sha}"'):
            raise RtfqError(f"server sent ETag {short(response.headers.get('ETag'))} for file {sha[:12]}...")
        expected = size - have
        announced = response.headers.get("Content-Length")
        if announced is not None and announced.strip() != str(expected):
            raise RtfqError(f"server announced {short(announced)} bytes where {expected} were expected for file "
                            f"{sha[:12]}...; refusing it")
        got, overflow = 0, False
        with open_part(part, create=True) as f:
            f.truncate(have)
            f.seek(have)
            try:
                while got < expected and (block := _read(response, min(_CHUNK, expected - got), watch)):
                    f.write(block)
                    got += len(block)
                    received[0] += len(block)
                overflow = got == expected and bool(_read(response, 1, watch))  # one byte more is a lie
            finally:
                f.flush()
                os.fsync(f.fileno())
    if overflow:
        part.unlink(missing_ok=True)
        raise RtfqError(f"server sent more than the {size} bytes of file {sha[:12]}...; stopped reading and "
                        "removed the partial download")
    if have + got != size:
        raise Retry(f"connection closed after {have + got} of {size} bytes")


def _read(response: http.client.HTTPResponse, limit: int, watch: "Watch") -> bytes:
    watch.check()
    try:
        block = response.read1(limit)
    except (OSError, http.client.HTTPException, ValueError) as e:
        watch.check()  # the watchdog's shutdown shows up here as a reset or an empty read
        raise Retry(f"connection lost: {_describe(e)}") from None
    watch.check()
    return block


def read_all(response: http.client.HTTPResponse, limit: int, watch: "Watch") -> bytes:
    """Up to ``limit`` bytes of a small body, read in pieces so the deadline is checked."""
    body = bytearray()
    while len(body) < limit and (block := _read(response, limit - len(body), watch)):
        body += block
    return bytes(body)


class Watch:
    """One attempt's deadline: a timer shuts the attempt's socket down when it passes, so
    a read that is blocked (or fed a byte at a time) ends; :meth:`check` turns that into a
    retryable failure that names the deadline."""

    def __init__(self, deadline_s: float) -> None:
        self.deadline_s = deadline_s
        self.expired = False
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._timer = threading.Timer(deadline_s, self._expire)
        self._timer.daemon = True

    def watch(self, sock: socket.socket) -> None:
        with self._lock:
            self._sockets.append(sock)
            if self.expired:
                _shutdown(sock)

    def _expire(self) -> None:
        with self._lock:
            self.expired = True
            for sock in self._sockets:
                _shutdown(sock)

    def check(self) -> None:
        if self.expired:
            raise Retry(f"the attempt ran past its deadline of {self.deadline_s:g} s (--deadline)")


def _shutdown(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)  # a closed socket (fd -1) raises: nothing else is touched
    except OSError:
        pass


class attempt:
    """``with attempt(client) as watch``: the deadline of one attempt, always cancelled."""

    def __init__(self, client: Client) -> None:
        self.watch = Watch(client.deadline_s)

    def __enter__(self) -> Watch:
        self.watch._timer.start()
        return self.watch

    def __exit__(self, *exc: object) -> None:
        self.watch._timer.cancel()


def _watched(base: type, watch: Watch) -> type:
    """An HTTP(S)Connection class whose connected socket the watch can shut down."""

    class Connection(base):  # type: ignore[misc, valid-type]
        def connect(self) -> None:
            super().connect()
            watch.watch(self.sock)

    return Connection


class _HTTPHandler(urllib.request.HTTPHandler):
    def __init__(self, watch: Watch) -> None:
        super().__init__()
        self._watch = watch

    def http_open(self, req):  # type: ignore[no-untyped-def]
        return self.do_open(_watched(http.client.HTTPConnection, self._watch), req)


class _HTTPSHandler(urllib.request.HTTPSHandler):
    def __init__(self, watch: Watch, context: ssl.SSLContext | None) -> None:
        super().__init__(context=context)
        self._watch = watch

    def https_open(self, req):  # type: ignore[no-untyped-def]
        return self.do_open(_watched(http.client.HTTPSConnection, self._watch), req, context=self._context)


def _part_size(part: Path) -> int:
    """The size of the partial download (0 if there is none); never through a link."""
    try:
        info = os.lstat(part)
    except FileNotFoundError:
        return 0
    _check_part(part, info)
    return info.st_size


def _check_part(part: Path, info: os.stat_result) -> None:
    if not stat.S_ISREG(info.st_mode) or info.st_nlink != 1:
        why = "a symbolic link" if stat.S_ISLNK(info.st_mode) else (
            f"a file with {info.st_nlink} hard links" if stat.S_ISREG(info.st_mode) else "not a regular file")
        raise RtfqError(f"{part} (the partial download) is {why}; refusing to write through it: remove it and run "
                        "again")


def open_part(part: Path, create: bool):  # type: ignore[no-untyped-def]
    """The partial download opened read-write, never following a link: created exclusively
    if missing (``create``), else it must be a regular file with one link (a planted
    symlink or hard link is refused, so no other file is ever written)."""
    base = os.O_RDWR | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NONBLOCK", 0)
    try:
        fd = os.open(part, base)
    except FileNotFoundError:
        if not create:
            raise RtfqError(f"{part}: the partial download disappeared; run again") from None
        try:
            fd = os.open(part, base | os.O_CREAT | os.O_EXCL, 0o600)
        except OSError as e:
            raise RtfqError(f"cannot write {part}: {e.strerror or e}") from None
    except OSError as e:
        try:
            info = os.lstat(part)
        except OSError:
            raise RtfqError(f"cannot write {part}: {e.strerror or e}") from None
        _check_part(part, info)
        raise RtfqError(f"cannot write {part}: {e.strerror or e}") from None
    try:
        _check_part(part, os.fstat(fd))
        import fcntl

        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
        return os.fdopen(fd, "r+b")
    except BaseException:
        os.close(fd)
        raise


def retrying(config: FetchConfig, step):  # type: ignore[no-untyped-def]
    """Run ``step``; on a dropped connection or a 503, wait and run it again (it resumes)."""
    for attempt in range(config.retries + 1):
        try:
            return step()
        except Retry as e:
            if attempt == config.retries:
                raise RtfqError(f"{e} (gave up after {config.retries} retries; run again to resume)") from None
            wait = min(0.5 * 2**attempt, 8.0) if e.wait_s is None else e.wait_s
            log.warning("%s; retrying in %.1f s", e, wait)
        time.sleep(wait)
    raise AssertionError("unreachable")


def open_url(client: Client, url: str, headers: dict[str, str], watch: Watch,  # type: ignore[no-untyped-def]
          data: bytes | None = None):
    scheme = urllib.parse.urlsplit(url).scheme
    if scheme not in ("http", "https"):
        raise RtfqError(f"server URL must be http:// or https://, got {short(url)!r}")
    request = urllib.request.Request(url, data=data, headers={**headers, "User-Agent": client.user_agent})
    if client.token is not None:
        request.add_unredirected_header("Authorization", f"Bearer {client.token}")  # not sent along a redirect
    opener = urllib.request.build_opener(_HTTPHandler(watch), _HTTPSHandler(watch, client.context))
    try:
        response = opener.open(request, timeout=client.timeout_s)
    except urllib.error.HTTPError as e:
        watch.check()
        if _origin(e.geturl() or url) != _origin(url):
            raise RtfqError(f"{_origin(url)[1]} redirected to another server ({short(e.geturl())}); refusing its "
                            "answer") from None
        message = _error_message(e)
        if e.code == 503:
            raise Retry(f"server busy: {message}", min(float(_int(e.headers.get("Retry-After"), 1)), 10.0)) from None
        if e.code == 401:
            hint = "give a token with --token-file or RTFQ_TOKEN" if client.token is None else "the token was refused"
            raise RtfqError(f"server: {message} ({hint})") from None
        raise RtfqError(f"server: {message}") from None
    except urllib.error.URLError as e:
        watch.check()
        if isinstance(e.reason, ssl.SSLCertVerificationError):
            why = short(e.reason.verify_message or e.reason.reason or str(e.reason))
            raise RtfqError(f"cannot trust {_origin(url)[1]}: TLS certificate {why} "
                            "(a private CA needs --cafile)") from None
        reason = getattr(e.reason, "strerror", None) or e.reason
        if isinstance(e.reason, ssl.SSLError):  # a handshake failure is no dropped connection
            raise RtfqError(f"cannot reach {short(url)}: TLS: {short(getattr(e.reason, 'reason', None) or e.reason)}"
                            ) from None
        if isinstance(e.reason, (ConnectionRefusedError, socket.gaierror)) or not isinstance(e.reason, OSError):
            raise RtfqError(f"cannot reach {short(url)}: {short(reason)}") from None
        raise Retry(f"cannot reach {short(url)}: {short(reason)}") from None
    except (http.client.InvalidURL, ValueError) as e:
        raise RtfqError(f"server URL {short(url)!r} is malformed: {short(e)}") from None
    except (OSError, http.client.HTTPException) as e:  # timeout or reset while reading the headers
        watch.check()
        raise Retry(f"connection lost: {_describe(e)}") from None
    final = response.geturl()
    if _origin(final) != _origin(url):  # the bytes must come from the server that was asked
        response.close()
        raise RtfqError(f"{_origin(url)[1]} redirected to another server ({short(final)}); refusing its answer")
    return response


def _error_message(e: urllib.error.HTTPError) -> str:
    try:
        body = json.loads(e.read(1 << 16))
        message = body["error"] if isinstance(body, dict) else None
    except (ValueError, KeyError, OSError, RecursionError):
        message = None
    return short(message, 300) if message else f"HTTP {e.code} {short(e.reason)}"


def _origin(url: str) -> tuple[str, str]:
    parts = urllib.parse.urlsplit(url)
    return parts.scheme, parts.netloc.lower()


def short(text: object, limit: int = 120) -> str:
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
