"""``rtfq enroll``: a device measures the server's candidates itself, uploads the results, gets its choice.

Torch-free (the device side): the HTTP client of :mod:`rtfq_deploy.fetch` and the
interleaved harness of :mod:`rtfq_deploy.bench.interleave`.

1. ``GET /v1/candidates``: the subnets on offer, with their sha256.
2. Each candidate the cache folder does not hold yet is downloaded, resumably (a partial
   file named after the hash, continued with ``Range``/``If-Range``), checked against its
   sha256 and renamed into place; files of candidates no longer offered are removed.
3. The candidates not measured yet with these settings on this device are measured round
   robin (:func:`rtfq_deploy.bench.interleave.interleaved_rows`); earlier rows are kept in
   ``<cache>/measured.json``, keyed by sha256, runtime and settings, so a rerun measures
   only what changed (``remeasure`` measures everything again).
4. The results file (``rtfq-bench run``'s format) goes to
   ``POST /v1/devices/<device>/results?budget=...`` with the device's token; the server
   chooses and publishes the device's entries and answers its choices.
5. With ``out``, the file the server now chooses for the first budget is fetched.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from rtfq_deploy import fetch as fx
from rtfq_deploy.budget import parse_budget
from rtfq_deploy.errors import RtfqError
from rtfq_deploy.fileio import atomic_write, parse_json, publish, read_json, sha256_file, sha256_fileobj
from rtfq_deploy.formats import ONNXRUNTIME, RUNTIMES
from rtfq_deploy.manifest import check_name

log = logging.getLogger(__name__)

STATE = "measured.json"
MARKER = ".rtfq-enroll-cache"  # a folder holding it is ours: files of withdrawn candidates may be removed
STATE_FORMAT = "rtfq-enroll-cache"
MAX_LIST_BYTES = 8 << 20
MAX_ANSWER_BYTES = 8 << 20
_SHA_RE = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class MeasureOptions:
    """How the candidates are measured (the harness's options)."""

    threads: int = 1
    provider: str = "CPUExecutionProvider"
    openvino_device: str = "CPU"
    processes: int = 3
    ci_target: float = 0.01
    min_time_s: float = 3.0
    max_time_s: float = 30.0
    sample_time_s: float = 0.002
    warmup: int = 5
    timeout_s: float = 300.0


@dataclass(frozen=True)
class EnrollConfig:
    server: str
    device: str
    cache_dir: Path
    runtimes: tuple[str, ...] = (ONNXRUNTIME,)
    budgets: tuple[str, ...] = ()
    out: Path | None = None
    force: bool = False
    remeasure: bool = False
    token: str | None = None
    cafile: Path | None = None
    timeout_s: float = 30.0
    deadline_s: float = 600.0
    retries: int = 3
    measure: MeasureOptions = field(default_factory=MeasureOptions)


@dataclass(frozen=True)
class EnrollResult:
    candidates: int
    downloaded: tuple[str, ...]
    measured: int  # rows measured in this run (the others came from the cache)
    results_path: Path
    answer: dict[str, Any]  # the server's answer to the upload
    fetched: Any = None  # a rtfq_deploy.fetch.FetchResult with ``out``


def enroll(config: EnrollConfig, progress: Callable[[str], None] | None = None) -> EnrollResult:
    """Run the whole loop; RtfqError (one line) for everything a user or server can cause."""
    say = progress or (lambda message: None)
    check_name(config.device)
    for runtime in config.runtimes:
        if runtime not in RUNTIMES:
            raise RtfqError(f"unknown runtime {runtime!r}: expected one of {', '.join(RUNTIMES)}")
    for text in config.budgets:
        parse_budget(text)
    if config.out is not None and not config.budgets:
        raise RtfqError("-o needs a --budget: the file fetched is the server's choice for the first one")
    fetch_config = fx.FetchConfig(config.server, config.device, config.budgets[0] if config.budgets else "1ms",
                                  config.out or Path("."), force=config.force, timeout_s=config.timeout_s,
                                  retries=config.retries, user_agent="rtfq-enroll", token=config.token,
                                  cafile=config.cafile, deadline_s=config.deadline_s,
                                  runtime=config.runtimes[0] if len(config.runtimes) == 1 else None)
    client = fx.make_client(fetch_config)
    cache = claim_cache(Path(config.cache_dir))
    listed = fx.retrying(fetch_config, lambda: _list(client, config.server, config.runtimes[0]))
    say(f"{len(listed)} candidates on {config.server}")
    downloaded = sync_cache(client, fetch_config, listed, cache, say)
    results, measured = measure_cached(listed, cache, config, say)
    results_path = cache / "results.json"
    with atomic_write(results_path, overwrite=True) as f:
        f.write((json.dumps(results, indent=2) + "\n").encode())
    say(f"uploading {len(results['models'])} rows for {config.device}")
    answer = upload(client, config.server, config.device, results, config.budgets)
    fetched = None
    if config.out is not None:
        fetched = fx.fetch(fetch_config)
    return EnrollResult(len(listed), tuple(downloaded), measured, results_path, answer, fetched)


def claim_cache(cache: Path) -> Path:
    """The cache folder, created and marked as enroll's; a folder that holds other files
    and no marker is refused, since files of withdrawn candidates are removed from it."""
    from rtfq_deploy.fileio import check_output

    check_output(cache / MARKER)
    if cache.exists() and not cache.is_dir():
        raise RtfqError(f"--cache {cache} is not a folder")
    if cache.is_dir() and not (cache / MARKER).exists() and any(cache.iterdir()):
        raise RtfqError(f"--cache {cache} holds other files and is not an rtfq enroll cache; give an empty or new "
                        "folder (enroll removes the files of candidates the server no longer offers)")
    cache.mkdir(parents=True, exist_ok=True)
    (cache / MARKER).touch()
    return cache


def _url(server: str, path: str) -> str:
    return urllib.parse.urljoin(server.rstrip("/") + "/", path.lstrip("/"))


def _list(client: fx.Client, server: str, runtime: str) -> list[dict[str, Any]]:
    """The server's candidates, each checked: a plain file name, a sha256, a size."""
    url = _url(server, f"v1/candidates?{urllib.parse.urlencode({'runtime': runtime})}")
    with fx.attempt(client) as watch, fx.open_url(client, url, {"Accept": "application/json"}, watch) as response:
        body = fx.read_all(response, MAX_LIST_BYTES + 1, watch)
    if len(body) > MAX_LIST_BYTES:
        raise RtfqError(f"{server}: the candidate list is larger than {MAX_LIST_BYTES} bytes")
    data = parse_json(body, server, "candidate list", max_bytes=MAX_LIST_BYTES, max_depth=8, expect=dict)
    items = data.get("candidates")
    if not isinstance(items, list) or not items:
        raise RtfqError(f"{server} offers no candidates")
    out, names = [], set()
    for item in items:
        if not isinstance(item, dict):
            raise RtfqError(f"{server} answered a malformed candidate")
        name, sha, size = item.get("file"), item.get("sha256"), item.get("size_bytes")
        try:
            check_name(name, "candidate file name")
        except RtfqError:
            raise RtfqError(f"{server} offers a candidate with a malformed file name") from None
        if (not name.endswith(".onnx") or not isinstance(sha, str) or not _SHA_RE.fullmatch(sha)
                or isinstance(size, bool) or not isinstance(size, int) or not 0 < size < 2**40 or name in names):
            raise RtfqError(f"{server} answered a malformed candidate ({fx.short(name)})")
        names.add(name)
        out.append({"file": name, "sha256": sha, "size_bytes": size, "subnet": str(item.get("subnet"))[:200]})
    return out


def sync_cache(client: fx.Client, config: fx.FetchConfig, listed: list[dict[str, Any]], cache: Path,
               say: Callable[[str], None]) -> list[str]:
    """Make ``cache`` hold exactly the listed files (verified); the names downloaded now."""
    wanted = {c["file"]: c for c in listed}
    for path in cache.glob("*.onnx"):
        if path.name not in wanted:
            path.unlink(missing_ok=True)  # no longer offered
    for path in cache.glob(".*.part"):
        match = re.fullmatch(r"\.(.+)\.([0-9a-f]{64})\.part", path.name)
        if match is None or wanted.get(match[1], {}).get("sha256") != match[2]:
            path.unlink(missing_ok=True)  # of a version that is no longer offered
    downloaded = []
    for i, c in enumerate(listed):
        dest = cache / c["file"]
        if dest.exists() and sha256_file(dest) == c["sha256"]:
            continue
        say(f"downloading {i + 1}/{len(listed)}: {c['file']} ({c['size_bytes']} bytes)")
        part = cache / f".{c['file']}.{c['sha256']}.part"
        url = _url(config.server, f"v1/candidates/{urllib.parse.quote(c['file'])}")
        received = [0]
        fx.retrying(config, lambda: fx.download(client, url, part, c["sha256"], c["size_bytes"], received))
        with fx.open_part(part, create=False) as f:
            digest = sha256_fileobj(f)
        if digest != c["sha256"]:
            part.unlink()
            raise RtfqError(f"{c['file']}: the downloaded file's sha256 is not the listed one; removed it, run again")
        publish(part, dest, overwrite=True)
        downloaded.append(c["file"])
    return downloaded


def _settings_key(config: EnrollConfig) -> str:
    """What a cached row depends on besides the file: the measuring options, this
    device's CPU and the runtimes' versions."""
    from rtfq_deploy.bench.fingerprint import cpu_info
    from rtfq_deploy.bench.runtimes import version

    m = config.measure
    key = {"measure": {k: v for k, v in vars(m).items() if k != "timeout_s"}, "cpu": cpu_info()["cpu_model"],
           "versions": {r: version(r) for r in RUNTIMES}, "format": 1}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def _load_state(cache: Path, key: str) -> dict[str, dict[str, Any]]:
    """Cached rows of ``key`` by "<sha256> <runtime>"; an unreadable state is no state."""
    path = cache / STATE
    if not path.exists():
        return {}
    try:
        data = read_json(path, "enroll cache", max_bytes=64 << 20, expect=dict)
    except RtfqError as e:
        log.warning("ignoring %s: %s", path, e)
        return {}
    if data.get("format") != STATE_FORMAT or data.get("settings") != key or not isinstance(data.get("rows"), dict):
        return {}
    return {k: v for k, v in data["rows"].items() if isinstance(v, dict) and v.get("ok") is True}


def measure_cached(listed: list[dict[str, Any]], cache: Path, config: EnrollConfig,
                   say: Callable[[str], None]) -> tuple[dict[str, Any], int]:
    """The results file for every listed candidate, measuring only rows not cached."""
    from rtfq_deploy.bench.interleave import InterleaveSettings, RoundsConfig, interleaved_results
    from rtfq_deploy.bench.measure import MeasureConfig
    from rtfq_deploy.bench.run import BenchSettings

    key = _settings_key(config)
    state = {} if config.remeasure else _load_state(cache, key)
    todo = [c for c in listed if any(f"{c['sha256']} {r}" not in state for r in config.runtimes)]
    m = config.measure
    measure = MeasureConfig(model="", threads=m.threads, provider=m.provider, openvino_device=m.openvino_device,
                            warmup=m.warmup, sample_time_s=m.sample_time_s)
    bench = BenchSettings(measure=measure, timeout_s=m.timeout_s, runtimes=config.runtimes, processes=m.processes)
    rounds = RoundsConfig(MeasureConfig(model=""), ci_target=m.ci_target, min_time_s=m.min_time_s,
                          max_time_s=m.max_time_s)
    settings = InterleaveSettings(bench, rounds)
    say(f"{len(listed) - len(todo)} candidates measured before with these settings; measuring {len(todo)}")
    results = interleaved_results([cache / c["file"] for c in todo], settings, say)
    for row in results["models"]:
        if row.get("ok"):
            state[f"{row['sha256']} {row['runtime']}"] = row
    with atomic_write(cache / STATE, overwrite=True) as f:
        f.write((json.dumps({"format": STATE_FORMAT, "settings": key, "rows": state}) + "\n").encode())
    rows = []
    fresh = {(r["path"], r["runtime"]): r for r in results["models"]}
    for c in listed:
        for runtime in config.runtimes:
            path = str((cache / c["file"]).resolve())
            row = fresh.get((path, runtime)) or state.get(f"{c['sha256']} {runtime}")
            if row is not None:
                rows.append(dict(row, path=path))
    results["models"] = rows
    return results, sum(1 for r in fresh.values())


def upload(client: fx.Client, server: str, device: str, results: dict[str, Any],
           budgets: tuple[str, ...]) -> dict[str, Any]:
    """POST the results; the server's answer (its choices), or one RtfqError line."""
    query = urllib.parse.urlencode([("budget", b) for b in budgets])
    url = _url(server, f"v1/devices/{urllib.parse.quote(device, safe='')}/results" + (f"?{query}" if query else ""))
    body = json.dumps(results).encode()
    headers = {"Content-Type": "application/json", "Accept": "application/json"}
    try:
        with fx.attempt(client) as watch, fx.open_url(client, url, headers, watch, data=body) as response:
            raw = fx.read_all(response, MAX_ANSWER_BYTES + 1, watch)
    except fx.Retry as e:
        raise RtfqError(f"upload failed: {e} (run again: what was measured is kept)") from None
    answer = parse_json(raw, server, "upload answer", max_bytes=MAX_ANSWER_BYTES, expect=dict)
    if not isinstance(answer.get("choices"), list):
        raise RtfqError(f"{server} answered the upload with something unexpected")
    return answer


def read_token(path: Path) -> str:
    """The first token of a token file (as ``rtfq fetch --token-file``)."""
    from rtfq_deploy.tokens import read_token_file

    return read_token_file(path)[0]
