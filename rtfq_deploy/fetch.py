"""The device-side client of ``rtfq-serve``: resolve a budget, download, resume, verify.

Standard library only (plus this package's torch-free modules), so it runs on a device
that has nothing else. A download goes to ``<out>.<sha256>.part`` beside the output;
an interrupted one (a dropped connection, a killed process) resumes from that file's
size with ``Range`` and ``If-Range``, and since the partial file is named after the
hash it is only ever continued with the same bytes. The whole file's sha256 is checked
before it is renamed into place; an existing output is replaced only with ``force``.
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import re
import socket
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
from rtfq_deploy.manifest import check_name, sha256_file

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


def fetch(config: FetchConfig) -> FetchResult:
    """Resolve ``config.budget`` for ``config.device`` and make ``config.out`` that file."""
    check_name(config.device)
    parse_budget(config.budget)  # a typo fails here, before any network traffic
    resolution = _retrying(config, lambda: resolve(config.server, config.device, config.budget, config.timeout_s,
                                                   config.user_agent))
    entry = resolution["entry"]
    sha, size = str(entry.get("sha256", "")), entry.get("size_bytes")
    if not _SHA_RE.fullmatch(sha) or not isinstance(size, int) or size < 0:
        raise RtfqError(f"server answered a malformed entry for {config.device!r}")
    out = Path(config.out)
    if out.is_dir():
        raise RtfqError(f"{out} is a directory")
    if out.exists():
        if sha256_file(out) == sha:
            return FetchResult(out, entry, resolution.get("reason", ""), 0, 0, True)
        if not config.force:
            raise FileExistsError(f"{out} exists and holds another file (use --force to overwrite)")
    out.parent.mkdir(parents=True, exist_ok=True)
    part = out.with_name(f"{out.name}.{sha}.part")
    _remove_stale_parts(out, keep=part)
    url = urllib.parse.urljoin(config.server.rstrip("/") + "/", str(entry.get("url", f"/v1/files/{sha}")))
    received = [0]  # over every attempt of this call
    _retrying(config, lambda: _download(url, part, sha, size, config, received))
    digest = sha256_file(part)
    if digest != sha:
        part.unlink()
        raise RtfqError(f"downloaded file's sha256 {digest[:12]}... is not {sha[:12]}...; removed it, run again")
    publish(part, out, overwrite=config.force)
    return FetchResult(out, entry, resolution.get("reason", ""), max(0, size - received[0]), received[0], False)


def resolve(server: str, device: str, budget: str, timeout_s: float = 30.0,
            user_agent: str = "rtfq-fetch") -> dict[str, Any]:
    """The server's choice for ``device`` under ``budget``: {device, budget, reason, entry}."""
    query = urllib.parse.urlencode({"budget": budget})
    url = urllib.parse.urljoin(server.rstrip("/") + "/",
                               f"v1/devices/{urllib.parse.quote(device, safe='')}/resolve?{query}")
    with _open(url, {"Accept": "application/json", "User-Agent": user_agent}, timeout_s) as response:
        try:
            body = json.loads(response.read(1 << 20))
        except ValueError:
            raise RtfqError(f"{server} answered something other than JSON; is it an rtfq-serve?") from None
    if not isinstance(body, dict) or not isinstance(body.get("entry"), dict):
        raise RtfqError(f"{server} answered an unexpected resolution")
    return body


def _download(url: str, part: Path, sha: str, size: int, config: FetchConfig, received: list[int]) -> None:
    """Append the missing bytes to ``part``, counting them in ``received[0]``."""
    have = part.stat().st_size if part.exists() else 0
    if have > size:
        have = 0  # cannot be a prefix of this file
    if have == size and have > 0:
        return
    headers = {"User-Agent": config.user_agent, "Accept-Encoding": "identity"}
    if have:
        headers.update({"Range": f"bytes={have}-", "If-Range": f'"{sha}"'})
    with _open(url, headers, config.timeout_s) as response:
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
            raise RtfqError(f"server sent ETag {response.headers.get('ETag')} for file {sha[:12]}...")
        got = 0
        with open(part, mode) as f:
            f.truncate(have)
            f.seek(have)
            try:
                while block := _read(response):
                    f.write(block)
                    got += len(block)
                    received[0] += len(block)
            finally:
                f.flush()
                os.fsync(f.fileno())
    if have + got != size:
        raise _Retry(f"connection closed after {have + got} of {size} bytes")


def _read(response: http.client.HTTPResponse) -> bytes:
    try:
        return response.read1(_CHUNK)
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


def _open(url: str, headers: dict[str, str], timeout_s: float):  # type: ignore[no-untyped-def]
    scheme = urllib.parse.urlsplit(url).scheme
    if scheme not in ("http", "https"):
        raise RtfqError(f"server URL must be http:// or https://, got {url!r}")
    try:
        return urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout_s)
    except urllib.error.HTTPError as e:
        message = _error_message(e)
        if e.code == 503:
            raise _Retry(f"server busy: {message}", min(float(_int(e.headers.get("Retry-After"), 1)), 10.0)) from None
        raise RtfqError(f"server: {message}") from None
    except urllib.error.URLError as e:
        reason = getattr(e.reason, "strerror", None) or e.reason
        if isinstance(e.reason, (ConnectionRefusedError, socket.gaierror)) or not isinstance(e.reason, OSError):
            raise RtfqError(f"cannot reach {url}: {reason}") from None
        raise _Retry(f"cannot reach {url}: {reason}") from None
    except (OSError, http.client.HTTPException) as e:  # timeout or reset while reading the headers
        raise _Retry(f"connection lost: {_describe(e)}") from None


def _error_message(e: urllib.error.HTTPError) -> str:
    try:
        body = json.loads(e.read(1 << 16))
        message = body["error"] if isinstance(body, dict) else None
    except (ValueError, KeyError, OSError):
        message = None
    return str(message) if message else f"HTTP {e.code} {e.reason}"


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
