"""Devices that upload their own measurements: tokens bound to a device, and the upload's checks and choice.

``rtfq-serve --device-token-file FILE``: one ``<device> <token>`` per line (blank lines and
``#`` comments ignored; a device may have several tokens, a token belongs to one device).
It follows the file as ``--token-file`` does (:class:`rtfq_deploy.serve.auth.TokenFile`):
re-read on change, and failing closed when it breaks.

An upload (``POST /v1/devices/{device}/results``) is a results file in the format
``rtfq-bench run`` writes. :func:`accept_results` checks it, then runs the choice of
``rtfq-bench select`` for that device with the server's budgets and the device's own,
and publishes the device's entries in DIST_DIR, holding ``DIST_DIR/.enroll.lock`` so that
uploads are serialised across every server process on that folder. Nothing a device
says is taken where the server knows better: each measured row must name a candidate by
its sha256 (and its subnet), and the file, size, MACs, BitOPs and accuracy come from the
server's candidates, never from the upload.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import hmac
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

from rtfq_deploy.errors import RtfqError
from rtfq_deploy.manifest import RUNTIMES, check_name
from rtfq_deploy.serve.auth import TokenFile
from rtfq_deploy.serve.candidates import CandidateSet
from rtfq_deploy.tokens import check_token

log = logging.getLogger(__name__)

LOCK = ".enroll.lock"


@dataclass(frozen=True)
class UploadConfig:
    """Bounds and budgets of uploads (the CLI builds it from its options)."""

    budgets: tuple[str, ...] = ()  # the server's budgets, applied to every device
    max_bytes: int = 4 << 20  # one results file
    max_rows: int = 4 * 4096  # model rows in it
    max_device_budgets: int = 16
    min_interval_s: float = 10.0  # between two accepted uploads of one device (per server process)
    publish_wait_s: float = 10.0  # how long the answer waits for this process to serve the new manifest


class DeviceTokenFile(TokenFile):
    """Tokens bound to devices; :meth:`device_of` names the device a token belongs to."""

    def _parse(self, data: bytes) -> tuple:  # type: ignore[override]
        where = f"device token file {self.path}"
        try:
            text = data.decode("ascii")
        except UnicodeDecodeError:
            raise RtfqError(f"{where}: not ASCII text") from None
        pairs: list[tuple[str, bytes]] = []
        owner: dict[str, str] = {}
        for number, line in enumerate(text.splitlines(), 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            parts = line.split()
            if len(parts) != 2:
                raise RtfqError(f"{where}: line {number} is not '<device> <token>'")
            device, token = parts
            try:
                check_name(device)
            except RtfqError:
                raise RtfqError(f"{where}: line {number}: invalid device name") from None
            check_token(token, f"{where}: line {number}")
            if owner.setdefault(token, device) != device:
                raise RtfqError(f"{where}: line {number}: a token is given to two devices")
            pairs.append((device, token.encode("ascii")))
        if not pairs:
            raise RtfqError(f"{where}: no '<device> <token>' line in the file")
        return tuple(pairs)

    def device_of(self, token: bytes) -> str | None:
        """The device ``token`` belongs to, comparing against every token (no early exit)."""
        found = None
        for device, candidate in self.tokens():
            if hmac.compare_digest(candidate, token):
                found = device
        return found

    def accepts(self, token: bytes) -> bool:
        return self.device_of(token) is not None


class UploadError(Exception):
    """A refused upload: ``status`` and one line (answered as JSON, nothing written)."""

    def __init__(self, status: int, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.status, self.message, self.extra = status, message, extra


class RateLimit:
    """At most one accepted upload per device every ``interval_s`` (in this process)."""

    def __init__(self, interval_s: float) -> None:
        self.interval_s = interval_s
        self._last: dict[str, float] = {}
        self._lock = threading.Lock()

    def take(self, device: str) -> float:
        """0 if ``device`` may upload now (and records it), else the seconds to wait."""
        now = time.monotonic()
        with self._lock:
            wait = self._last.get(device, -float("inf")) + self.interval_s - now
            if wait > 0:
                return wait
            self._last[device] = now
            if len(self._last) > 100_000:  # forget the oldest devices
                for name, _ in sorted(self._last.items(), key=lambda kv: kv[1])[:50_000]:
                    del self._last[name]
            return 0.0

    def give_back(self, device: str) -> None:
        """A refused upload does not count against the device's rate."""
        with self._lock:
            self._last.pop(device, None)


@contextlib.contextmanager
def enroll_lock(dist_dir: Path) -> Iterator[None]:
    """One upload at a time on DIST_DIR, across processes (advisory ``flock``)."""
    with open(Path(dist_dir) / LOCK, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def check_fingerprint(fp: Any) -> dict[str, Any]:
    """The fingerprint of an upload: the keys select and the manifest rely on, of the
    right types, small; UploadError(422) otherwise."""
    import json

    if not isinstance(fp, dict):
        raise UploadError(422, "the results' fingerprint is not an object")
    if len(json.dumps(fp)) > 64 << 10:
        raise UploadError(422, "the results' fingerprint is larger than 64 KiB")
    bad = [k for k, kind in (("cpu_model", str), ("threads", int), ("batch_size", int), ("runtimes", dict))
           if not isinstance(fp.get(k), kind) or isinstance(fp.get(k), bool)]
    if bad:
        raise UploadError(422, f"the results' fingerprint has no valid {', '.join(bad)}")
    if not fp["runtimes"] or any(r not in RUNTIMES for r in fp["runtimes"]):
        raise UploadError(422, f"the results' fingerprint names a runtime other than {', '.join(RUNTIMES)}")
    if not 1 <= fp["threads"] <= 4096 or not 1 <= fp["batch_size"] <= 4096:
        raise UploadError(422, "the results' fingerprint has an implausible threads or batch_size")
    return fp


def check_rows(results: dict[str, Any], candidates: CandidateSet, config: UploadConfig) -> dict[str, Any]:
    """The upload's rows, each ok row bound to the server's candidate of its sha256: its
    path, size, MACs and BitOPs replaced by the server's, any device-reported top-1
    dropped (the server's accuracy table decides)."""
    rows = results["models"]
    if len(rows) > config.max_rows:
        raise UploadError(413, f"the results hold {len(rows)} rows; at most {config.max_rows} are accepted")
    by_sha = candidates.by_sha()
    out = []
    for i, row in enumerate(rows):
        if not row["ok"]:
            out.append({"path": str(row.get("path"))[:200], "ok": False, "runtime": row.get("runtime"),
                        "error": str(row.get("error"))[:300], "subnet": str(row.get("subnet"))[:200]})
            continue
        candidate = by_sha.get(row["sha256"])
        if candidate is None:
            raise UploadError(422, f"model row {i} ({str(row['subnet'])[:80]}) names a file that is not a candidate "
                                   f"of this server (sha256 {row['sha256'][:12]}...)")
        if row["subnet"] != candidate.subnet:
            raise UploadError(422, f"model row {i} says subnet {str(row['subnet'])[:80]}, but its sha256 is "
                                   f"candidate {candidate.subnet}'s")
        clean = {k: v for k, v in row.items() if k not in ("top1", "agreement", "max_logit_diff", "images")}
        clean.update(path=candidate.served.real_path, size_bytes=candidate.size_bytes, macs=candidate.macs,
                     bitops=candidate.bitops)
        out.append(clean)
    return {**results, "models": out}


def device_budgets(texts: Sequence[str], config: UploadConfig) -> list[Any]:
    """The server's budgets and the device's own (``?budget=``), parsed, without repeats."""
    from rtfq_deploy.budget import parse_budget

    if len(texts) > config.max_device_budgets:
        raise UploadError(400, f"at most {config.max_device_budgets} budgets per upload")
    parsed = []
    for text in [*config.budgets, *texts]:
        try:
            budget = parse_budget(text)
        except RtfqError as e:
            raise UploadError(400, str(e)) from None
        if str(budget) not in {str(b) for b in parsed}:
            parsed.append(budget)
    if not parsed:
        raise UploadError(400, "no budget to choose for: give ?budget=... or start the server with --budget")
    return parsed


def accept_results(dist_dir: Path, device: str, body: bytes, budget_texts: Sequence[str],
                   candidates: CandidateSet, config: UploadConfig) -> dict[str, Any]:
    """Check an upload and publish the device's choices; the answer's JSON. Runs in a
    worker thread (it hashes and copies files). UploadError for every refusal, raised
    before anything is written."""
    from rtfq_deploy.bench.confidence import doubt
    from rtfq_deploy.bench.run import check_results
    from rtfq_deploy.bench.select import SelectOptions, plan, previous_choices, publish
    from rtfq_deploy.fileio import parse_json

    check_name(device)
    budgets = device_budgets(budget_texts, config)
    try:
        data = parse_json(body, "the upload", "results", max_bytes=config.max_bytes, expect=dict)
        rows = data.get("models")
        if isinstance(rows, list) and len(rows) > config.max_rows:
            raise UploadError(413, f"the results hold {len(rows)} rows; at most {config.max_rows} are accepted")
        data = check_results(data, "the upload")
    except RtfqError as e:
        raise UploadError(422, str(e)) from None
    check_fingerprint(data["fingerprint"])
    data = check_rows(data, candidates, config)
    table = {c.subnet: c.accuracy for c in candidates.by_file.values() if c.accuracy is not None}
    options = SelectOptions(prune=True, force=True)
    with enroll_lock(dist_dir):
        try:
            # a device measuring itself again keeps its choices while the new figures are in doubt
            selection = plan(data, table, budgets, device, options, previous_choices(dist_dir, device))
            selection = publish(selection, data, dist_dir, options)
        except RtfqError as e:
            raise UploadError(422, str(e)) from None
    choices = []
    for c in selection.choices:
        e = c.entry
        why = doubt(c, selection.candidates)
        choices.append({"budget": str(c.budget), "runtime": e.get("runtime"), "met": c.met, "subnet": e["subnet"],
                        "accuracy": e.get("accuracy"), "latency_p50_ms": e.get("latency_p50_ms"),
                        "latency_p50_ci_ms": e.get("latency_p50_ci_ms"), "reason": c.reason,
                        "straddles": why is not None, "kept": c.kept, **({"doubt": why} if why else {})})
    manifest = dist_dir / "manifest.json"
    digest = hashlib.sha256(manifest.read_bytes()).hexdigest() if selection.written and manifest.exists() else None
    log.info("device %s uploaded %d rows: %d entries published", device, len(data["models"]), len(selection.written))
    return {"device": device, "rows": len(data["models"]), "choices": choices,
            "written": [e.as_dict() for e in selection.written], "removed": list(selection.removed),
            "skipped": list(selection.skipped), "manifest_sha256": digest}
