"""The device client against a real server on loopback, with real interruptions."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import anyio
import pytest

import rtfq_deploy
from rtfq_deploy.errors import RtfqError
from rtfq_deploy.fetch import FetchConfig, fetch
from tests.fixtures.dist import entry_for, file_size, publish, random_bytes, serving, sha, wait_for

SIZE = 600_000


@pytest.fixture
def dist(tmp_path):
    dist = tmp_path / "dist"
    fast = entry_for(dist, "pi", "fast", random_bytes(SIZE, 1), 4.0, accuracy=0.6)
    slow = entry_for(dist, "pi", "slow", random_bytes(SIZE + 1, 2), 30.0, accuracy=0.9)
    publish(dist, "pi", [fast, slow])
    return dist, fast


def _config(url: str, out: Path, **kw) -> FetchConfig:
    return FetchConfig(**{"server": url, "device": "pi", "budget": "20ms", "out": out, "retries": 0, **kw})


def _parts(out: Path) -> list[Path]:
    return sorted(out.parent.glob(f"{out.name}.*.part"))


class Recorder:
    """Records the Range/If-Range of each file request; optionally cuts the first
    download after ``cut_after`` bytes (the server drops the connection) or flips a
    byte of every body (a lying server), or slows the body down."""

    def __init__(self, app, cut_after: int | None = None, corrupt: bool = False, delay_s: float = 0.0) -> None:
        self.app, self.cut_after, self.corrupt, self.delay_s = app, cut_after, corrupt, delay_s
        self.ranges: list[tuple[str | None, str | None]] = []

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not scope["path"].startswith("/v1/files/"):
            return await self.app(scope, receive, send)
        headers = {k.decode(): v.decode() for k, v in scope["headers"]}
        self.ranges.append((headers.get("range"), headers.get("if-range")))
        cut, sent = self.cut_after if len(self.ranges) == 1 else None, 0

        async def wrapped(message):
            nonlocal sent
            if message["type"] == "http.response.body" and message.get("body"):
                body = message["body"]
                if self.corrupt and sent == 0:
                    body = bytes([body[0] ^ 1]) + body[1:]
                if cut is not None and sent + len(body) > cut:
                    await send({**message, "body": body[:cut - sent], "more_body": True})
                    raise ConnectionAbortedError("test: connection dropped mid-download")
                sent += len(body)
                message = {**message, "body": body}
                if self.delay_s:
                    await anyio.sleep(self.delay_s)
            await send(message)

        await self.app(scope, receive, wrapped)


def test_fetch_resolves_downloads_verifies_and_publishes(dist, tmp_path):
    root, fast = dist
    out = tmp_path / "dev" / "model.onnx"
    with serving(root) as url:
        result = fetch(_config(url, out, budget="latency=10ms"))
        assert out.read_bytes() == (root / fast.path).read_bytes()
        assert result.entry["subnet"] == "fast" and result.downloaded == SIZE and not result.up_to_date
        assert _parts(out) == []
        again = fetch(_config(url, out, budget="latency=10ms"))
        assert again.up_to_date and again.downloaded == 0
        with pytest.raises(FileExistsError, match="use --force"):
            fetch(_config(url, out, budget="50ms"))  # the slow, more accurate one: another file
        assert sha(out.read_bytes()) == fast.sha256
        replaced = fetch(_config(url, out, budget="50ms", force=True))
        assert replaced.entry["subnet"] == "slow" and len(out.read_bytes()) == SIZE + 1


def test_a_dropped_connection_is_resumed_within_one_call(dist, tmp_path):
    root, fast = dist
    out = tmp_path / "model.onnx"
    holder = {}
    with serving(root, app_wrapper=lambda app: holder.setdefault("r", Recorder(app, cut_after=200_000))) as url:
        result = fetch(_config(url, out, budget="10ms", retries=2))
    assert sha(out.read_bytes()) == fast.sha256
    assert holder["r"].ranges == [(None, None), ("bytes=200000-", f'"{fast.sha256}"')]
    assert result.downloaded == SIZE


def test_an_interrupted_fetch_leaves_a_part_file_that_the_next_run_resumes(dist, tmp_path):
    root, fast = dist
    out = tmp_path / "model.onnx"
    holder = {}
    with serving(root, app_wrapper=lambda app: holder.setdefault("r", Recorder(app, cut_after=250_000))) as url:
        with pytest.raises(RtfqError, match="run again to resume"):
            fetch(_config(url, out, budget="10ms"))
        assert not out.exists()
        [part] = _parts(out)
        assert part.name == f"model.onnx.{fast.sha256}.part"
        assert part.read_bytes() == (root / fast.path).read_bytes()[:250_000]
        result = fetch(_config(url, out, budget="10ms"))
    assert sha(out.read_bytes()) == fast.sha256 and _parts(out) == []
    assert (result.resumed_from, result.downloaded) == (250_000, SIZE - 250_000)
    assert holder["r"].ranges[-1] == ("bytes=250000-", f'"{fast.sha256}"')


def test_a_killed_fetch_process_resumes(dist, tmp_path):
    """``rtfq fetch`` is SIGKILLed mid-download from a slowed-down server; rerun, it
    continues from the partial file and ends with the right bytes."""
    root, fast = dist
    out = tmp_path / "model.onnx"
    exe = str(Path(sys.executable).parent / "rtfq")
    holder = {}
    with serving(root, chunk_bytes=16384,
                 app_wrapper=lambda app: holder.setdefault("r", Recorder(app, delay_s=0.02))) as url:
        args = [exe, "fetch", "--server", url, "--device", "pi", "--budget", "10ms", "-o", str(out)]
        proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        part = out.with_name(f"model.onnx.{fast.sha256}.part")
        try:
            wait_for(lambda: file_size(part) >= 100_000 or proc.poll() is not None)
            proc.send_signal(signal.SIGKILL)
        finally:
            proc.wait(30)
        assert proc.returncode == -signal.SIGKILL
        kept = file_size(part)
        assert 100_000 <= kept < SIZE and not out.exists()
        holder["r"].delay_s = 0.0
        rerun = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert rerun.returncode == 0, rerun.stderr
    assert f"resumed after {kept} bytes" in rerun.stdout
    assert sha(out.read_bytes()) == fast.sha256 and not part.exists()
    assert holder["r"].ranges[-1] == (f"bytes={kept}-", f'"{fast.sha256}"')


def test_a_body_that_does_not_match_its_hash_is_never_published(dist, tmp_path):
    root, fast = dist
    out = tmp_path / "model.onnx"
    with serving(root, app_wrapper=lambda app: Recorder(app, corrupt=True)) as url:
        with pytest.raises(RtfqError, match="is not"):
            fetch(_config(url, out, budget="10ms"))
    assert not out.exists() and _parts(out) == []


def test_stale_and_oversized_part_files(dist, tmp_path):
    root, fast = dist
    out = tmp_path / "model.onnx"
    stale = out.with_name(f"model.onnx.{'0' * 64}.part")
    stale.write_bytes(b"an older version")
    unrelated = tmp_path / "notes.part"
    unrelated.write_bytes(b"not ours")
    too_long = out.with_name(f"model.onnx.{fast.sha256}.part")
    too_long.write_bytes(b"x" * (SIZE + 10))
    with serving(root) as url:
        fetch(_config(url, out, budget="10ms"))
    assert sha(out.read_bytes()) == fast.sha256
    assert not stale.exists() and not too_long.exists() and unrelated.read_bytes() == b"not ours"


def test_fetch_errors(dist, tmp_path):
    root, _ = dist
    out = tmp_path / "m.onnx"
    with pytest.raises(RtfqError, match="unknown unit"):
        fetch(_config("http://127.0.0.1:1", out, budget="20xs"))  # checked before any traffic
    with pytest.raises(RtfqError, match="Connection refused"):
        fetch(_config("http://127.0.0.1:1", out))
    with pytest.raises(RtfqError, match="http:// or https://"):
        fetch(_config("ftp://127.0.0.1:1", out))
    with serving(root) as url:
        with pytest.raises(RtfqError, match="unknown device 'toaster'"):
            fetch(_config(url, out, device="toaster"))
        with pytest.raises(RtfqError, match="nothing meets latency=1ms; the cheapest option is fast"):
            fetch(_config(url, out, budget="1ms"))
        with pytest.raises(RtfqError, match="could be peak memory or file size"):
            fetch(_config(url, out, budget="64MB"))
    assert list(tmp_path.glob("m.onnx*")) == []


def test_fetch_runs_with_the_standard_library_only(dist, tmp_path):
    """On a device with nothing installed: ``python -S`` (no site-packages) imports the
    client from the source tree and downloads."""
    root, fast = dist
    out = tmp_path / "m.onnx"
    src = Path(rtfq_deploy.__file__).resolve().parents[1]
    with serving(root) as url:
        code = ("import sys; from pathlib import Path; from rtfq_deploy.fetch import fetch, FetchConfig; "
                f"r = fetch(FetchConfig({url!r}, 'pi', '10ms', Path({str(out)!r}))); "
                "heavy = {'torch', 'numpy', 'onnx', 'click', 'starlette', 'uvicorn'} & set(sys.modules); "
                "assert not heavy, heavy; print(r.entry['subnet'])")
        done = subprocess.run([sys.executable, "-S", "-c", code], cwd=src, capture_output=True, text=True, timeout=60,
                              env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "fast" and sha(out.read_bytes()) == fast.sha256


def test_fetch_cli_one_line_errors(dist, tmp_path):
    from tests.test_cli import _one_line_error, _run

    root, _ = dist
    out = tmp_path / "m.onnx"
    with serving(root) as url:
        _one_line_error(_run("rtfq", "fetch", "--server", url, "--device", "toaster", "--budget", "1ms", "-o", str(out)),
                        "unknown device 'toaster'")
        _one_line_error(_run("rtfq", "fetch", "--server", url, "--device", "pi", "--budget", "1ms", "-o", str(out)),
                        "nothing meets latency=1ms")
        ok = _run("rtfq", "fetch", "--server", url, "--device", "pi", "--budget", "10ms", "-o", str(out))
        assert ok.returncode == 0 and ok.stdout.startswith(f"{out}: most accurate meeting latency=10ms: fast")
        _one_line_error(_run("rtfq", "fetch", "--server", url, "--device", "pi", "--budget", "50ms", "-o", str(out)),
                        "use --force")
    _one_line_error(_run("rtfq", "fetch", "--server", "http://127.0.0.1:1", "--device", "pi", "--budget", "5xx",
                         "-o", str(out)), "unknown unit")
    _one_line_error(_run("rtfq", "fetch", "--device", "pi", "--budget", "5ms", "-o", str(out)), "--server")


class RawServer:
    """A raw HTTP server on 127.0.0.1 in a thread: ``_answer(conn)`` answers each
    connection (a client hanging up ends that answer). Bounded: it stops when its context
    exits, or ``lifetime_s`` after it started."""

    conn_timeout = 10.0

    def __init__(self, lifetime_s: float = 600.0) -> None:
        self.lifetime_s = lifetime_s
        self.end = 0.0  # monotonic time at which it stops, set when it starts
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.1)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)

    def __enter__(self) -> str:
        self.end = time.monotonic() + self.lifetime_s
        self.thread.start()
        return f"http://127.0.0.1:{self.listener.getsockname()[1]}"

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join(30)
        self.listener.close()

    def _serve(self) -> None:
        while not self.stop.is_set() and time.monotonic() < self.end:
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(self.conn_timeout)
                try:
                    self._answer(conn)
                except (OSError, IndexError):  # the client hung up, or sent no request line
                    pass

    def _answer(self, conn: socket.socket) -> None:
        raise NotImplementedError


class LyingServer(RawServer):
    """A raw HTTP server on 127.0.0.1 that resolves to an entry of ``size`` bytes and then
    sends more: with no length (until it is stopped), announcing a larger length, or
    chunked. Bounded: it stops after ``limit`` bytes or when the client goes away."""

    def __init__(self, size: int, mode: str, limit: int = 64 << 20, url: str | None = None,
                 resolution: tuple[int, bytes] | None = None) -> None:
        super().__init__()
        self.size, self.mode, self.limit, self.resolution = size, mode, limit, resolution
        self.data = random_bytes(size, 3)
        self.sha = sha(self.data)
        self.entry_url = url or f"/v1/files/{self.sha}"
        self.sent = 0  # body bytes of file answers handed to the kernel

    def _answer(self, conn: socket.socket) -> None:
        head = b""
        while b"\r\n\r\n" not in head and len(head) < 65536:
            chunk = conn.recv(4096)
            if not chunk:
                return
            head += chunk
        if b"/resolve?" in head.split(b"\r\n", 1)[0] and self.resolution is not None:
            status, body = self.resolution
            conn.sendall(b"HTTP/1.1 %d X\r\nConnection: close\r\nContent-Length: %d\r\n\r\n%s"
                         % (status, len(body), body))
            return
        if b"/resolve?" in head.split(b"\r\n", 1)[0]:
            body = json.dumps({"device": "pi", "budget": "latency=10ms", "reason": "the only one",
                               "entry": {"subnet": "m", "sha256": self.sha, "size_bytes": self.size,
                                         "url": self.entry_url}}).encode()
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n"
                         b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
            return
        framing = {"no-length": b"", "long-length": b"Content-Length: %d\r\n" % self.limit,
                   "chunked": b"Transfer-Encoding: chunked\r\n"}[self.mode]
        conn.sendall(b"HTTP/1.1 200 OK\r\nConnection: close\r\n" + framing + b"\r\n")
        block = (self.data * (1 + (1 << 16) // self.size))[: 1 << 16]
        stream = self.data + block * (self.limit // len(block))
        for start in range(0, min(len(stream), self.limit), len(block)):
            piece = stream[start:start + len(block)]
            conn.sendall(b"%x\r\n%s\r\n" % (len(piece), piece) if self.mode == "chunked" else piece)
            self.sent += len(piece)


@pytest.mark.parametrize("mode", ["no-length", "long-length", "chunked"])
def test_a_server_sending_more_than_the_entry_is_refused_and_nothing_is_kept(tmp_path, mode):
    out = tmp_path / "m.onnx"
    liar = LyingServer(100_000, mode)
    with liar as url:
        with pytest.raises(RtfqError, match="more than the 100000 bytes|announced 67108864 bytes where 100000"):
            fetch(_config(url, out, retries=2))
    assert not out.exists() and _parts(out) == []
    assert liar.sent < 16 << 20, liar.sent  # the client stopped reading; it did not drain 64 MB


def test_fetch_never_writes_past_the_entry_size(tmp_path):
    """``rtfq fetch`` runs with RLIMIT_FSIZE at the entry's size: one byte written past it
    would fail with EFBIG ("File too large"; Python ignores SIGXFSZ). It ends instead with
    the refusal of the lying server, one line and exit 2."""
    import resource

    out = tmp_path / "m.onnx"
    size = 100_000

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (size, size))

    with LyingServer(size, "no-length") as url:
        exe = str(Path(sys.executable).parent / "rtfq")
        done = subprocess.run([exe, "fetch", "--server", url, "--device", "pi", "--budget", "10ms", "-o", str(out)],
                              capture_output=True, text=True, timeout=120, preexec_fn=limit,
                              env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2 and len(lines) == 1 and "more than the 100000 bytes" in lines[0], done.stderr
    assert not out.exists() and _parts(out) == []


@pytest.mark.parametrize("url", ["//127.0.0.2:1/v1/files/x", "http://127.0.0.2:1/v1/files/x", "https://x/y"])
def test_a_download_url_on_another_server_is_refused(tmp_path, url):
    with LyingServer(1000, "no-length", url=url) as base:
        with pytest.raises(RtfqError, match="another server"):
            fetch(_config(base, tmp_path / "m.onnx", token="tok-1234567890abcdef"))
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("args,needle", [
    (["--timeout", "nan"], "--timeout"), (["--timeout", "inf"], "--timeout"), (["--timeout", "-1"], "--timeout"),
    (["--timeout", "1e999"], "--timeout"), (["--retries", "-1"], "--retries"), (["--retries", "9" * 60], "--retries"),
    (["--server", "http://[::1"], "malformed"), (["--server", "http://"], "no host"),
    (["--server", "http://127.0.0.1:99999"], "malformed"), (["--server", "http://127.0.0.1:x"], "malformed"),
    (["--server", "http://u:p@127.0.0.1:1"], "credentials"), (["--server", "ftp://127.0.0.1"], "http:// or https://"),
    (["--server", ""], "not a URL"), (["--server", "http://a b"], "not a URL"),
    (["--server", "http://h/?q=1"], "query"), (["--server", "http://h:0"], "port 0"),
    (["--server", "http://127.0.0.1:1", "--cafile", "ca.pem"], "https:// server only"),
    (["--server", "https://127.0.0.1:1", "--cafile", "absent.pem"], "no such file"),
    (["--server", "https://127.0.0.1:1", "--cafile", "garbage.pem"], "no usable PEM"),
    (["--token-file", "absent.txt"], "cannot read token file"), (["--token-file", "empty.txt"], "no token"),
    (["--token-file", "garbage.pem"], "is not a token"),
    (["--env", "bad token"], "RTFQ_TOKEN environment variable is not a token"),
])
def test_fetch_options_are_checked_with_one_line(tmp_path, monkeypatch, args, needle):
    from click.testing import CliRunner

    from rtfq_deploy.cli.fetch import fetch as fetch_command

    monkeypatch.chdir(tmp_path)
    (tmp_path / "garbage.pem").write_text("-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n")
    (tmp_path / "ca.pem").write_text("")
    (tmp_path / "empty.txt").write_text("\n# nothing\n")
    env = {"RTFQ_TOKEN": args[1]} if args[0] == "--env" else {}
    args = [] if env else args
    if "--server" not in args:
        args = [*args, "--server", "http://127.0.0.1:1"]
    result = CliRunner().invoke(fetch_command, [*args, "--device", "pi", "--budget", "5ms", "-o", "m.onnx"], env=env)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code == 2 and result.stdout == "", (result.exit_code, result.output)
    assert len(lines) == 1 and lines[0].startswith("Error: ") and needle in lines[0], lines
    assert "bad token" not in lines[0]  # a token is never echoed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ca.pem", "empty.txt", "garbage.pem"]


@pytest.mark.parametrize("status,body,needle", [
    (200, b"[" * 100_000, "other than JSON"), (200, b"\xff\xfe", "other than JSON"),
    (200, b'{"entry": {"sha256": "00", "size_bytes": 1}}', "malformed entry"),
    (200, json.dumps({"entry": {"sha256": "0" * 64, "size_bytes": True}}).encode(), "malformed entry"),
    (200, json.dumps({"entry": {"sha256": "0" * 64, "size_bytes": 10**30}}).encode(), "malformed entry"),
    (404, json.dumps({"error": "two\nlines " + "x" * 5000}).encode(), "server: two lines xxx"),
    (418, b"[" * 100_000, "HTTP 418"),
])
def test_hostile_resolutions_are_one_line_errors(tmp_path, status, body, needle):
    with LyingServer(1000, "no-length", resolution=(status, body)) as url:
        with pytest.raises(RtfqError, match=needle) as caught:
            fetch(_config(url, tmp_path / "m.onnx"))
    message = str(caught.value)
    assert "\n" not in message and len(message) < 600
    assert not list(tmp_path.iterdir())


# -- integrity: planted links, special outputs, trickling servers, redirects ------------------------------------

def _part_of(out: Path, sha256: str) -> Path:
    return out.with_name(f"{out.name}.{sha256}.part")


@pytest.mark.parametrize("plant", ["symlink", "hardlink", "fifo", "directory"])
def test_a_planted_partial_download_is_never_written_through(dist, tmp_path, plant):
    """The partial file's name is predictable: a link (or anything but a regular file of
    one link) put there is refused; the file it points to keeps its bytes."""
    root, fast = dist
    out = tmp_path / "dev" / "model.onnx"
    out.parent.mkdir()
    victim = tmp_path / "victim.db"
    victim.write_bytes(b"precious data " * 100)
    part = _part_of(out, fast.sha256)
    {"symlink": lambda: part.symlink_to(victim), "hardlink": lambda: os.link(victim, part),
     "fifo": lambda: os.mkfifo(part), "directory": lambda: part.mkdir()}[plant]()
    with serving(root) as url:
        with pytest.raises(RtfqError, match="partial download.*refusing to write through it"):
            fetch(_config(url, out, budget="latency=10ms"))
    assert victim.read_bytes() == b"precious data " * 100
    assert not out.exists() and not out.is_symlink()


def test_the_symlink_attack_through_the_cli_is_one_line(dist, tmp_path):
    from tests.test_cli import _one_line_error, _run

    root, fast = dist
    out = tmp_path / "model.onnx"
    victim = tmp_path / "victim.db"
    victim.write_bytes(b"v" * 520_000)
    _part_of(out, fast.sha256).symlink_to(victim)
    with serving(root) as url:
        _one_line_error(_run("rtfq", "fetch", "--server", url, "--device", "pi", "--budget", "10ms", "-o", str(out),
                             "--retries", "0"), "is a symbolic link")
    assert victim.read_bytes() == b"v" * 520_000 and not out.exists()


@pytest.mark.parametrize("kind", ["fifo", "directory", "link-to-fifo"])
def test_an_output_that_is_not_a_regular_file_is_refused_even_with_force(dist, tmp_path, kind):
    root, _ = dist
    out = tmp_path / "model.onnx"
    if kind == "directory":
        out.mkdir()
    elif kind == "fifo":
        os.mkfifo(out)
    else:
        os.mkfifo(tmp_path / "pipe")
        out.symlink_to(tmp_path / "pipe")
    with serving(root) as url:
        exe = str(Path(sys.executable).parent / "rtfq")
        done = subprocess.run([exe, "fetch", "--server", url, "--device", "pi", "--budget", "10ms", "-o", str(out),
                               "--force", "--retries", "0"], capture_output=True, text=True, timeout=60)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2 and len(lines) == 1, done.stderr
    assert ("is a directory" if kind == "directory" else "not a regular file") in lines[0], lines
    assert (out.is_dir() if kind == "directory" else (tmp_path / "pipe" if kind == "link-to-fifo" else out).is_fifo())
    assert _parts(out) == []


class TricklingServer(RawServer):
    """A raw HTTP server on 127.0.0.1 that answers the resolve at once and then sends
    either the file answer's headers (``phase="headers"``) or its body (``"body"``) one
    byte every ``gap_s``; or trickles the resolve answer itself (``"resolve"``). It stops
    by itself after ``lifetime_s`` (bounded), or when the client hangs up."""

    conn_timeout = 2.0

    def __init__(self, phase: str, gap_s: float = 0.2, lifetime_s: float = 8.0) -> None:
        super().__init__(lifetime_s)
        self.phase, self.gap_s = phase, gap_s
        self.data = random_bytes(5000, 4)

    def _trickle(self, conn: socket.socket, data: bytes) -> None:
        for i in range(len(data)):
            if self.stop.is_set() or time.monotonic() > self.end:
                return
            conn.sendall(data[i:i + 1])
            time.sleep(self.gap_s)

    def _answer(self, conn: socket.socket) -> None:
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = conn.recv(4096)
            if not chunk:
                return
            head += chunk
        if b"/resolve?" in head.split(b"\r\n", 1)[0]:
            body = json.dumps({"device": "pi", "budget": "latency=10ms", "reason": "r", "entry": {
                "subnet": "m", "sha256": sha(self.data), "size_bytes": len(self.data)}}).encode()
            answer = b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
            if self.phase == "resolve":
                self._trickle(conn, answer)
            else:
                conn.sendall(answer)
            return
        head = b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: %d\r\n\r\n" % len(self.data)
        if self.phase == "headers":
            self._trickle(conn, head + self.data)
        else:
            conn.sendall(head)
            self._trickle(conn, self.data)


@pytest.mark.parametrize("phase", ["resolve", "headers", "body"])
def test_a_trickling_server_cannot_hold_a_fetch_past_its_deadline(tmp_path, phase):
    """One byte every 0.2 s never trips the 5 s per-read timeout; the 1 s deadline of the
    attempt ends it anyway (with a part file kept for the body, to be resumed)."""
    out = tmp_path / "m.onnx"
    with TricklingServer(phase) as url:
        start = time.monotonic()
        with pytest.raises(RtfqError, match="deadline of 1 s"):
            fetch(_config(url, out, timeout_s=5.0, deadline_s=1.0))
        took = time.monotonic() - start
    assert took < 4.0, took
    assert not out.exists()


def test_the_deadline_option_through_the_cli(tmp_path):
    from tests.test_cli import _one_line_error, _run

    with TricklingServer("body", lifetime_s=10) as url:
        start = time.monotonic()
        _one_line_error(_run("rtfq", "fetch", "--server", url, "--device", "pi", "--budget", "10ms", "-o",
                             str(tmp_path / "m.onnx"), "--timeout", "3", "--deadline", "1", "--retries", "0"),
                        "deadline of 1 s")
        assert time.monotonic() - start < 8
    help_text = _run("rtfq", "fetch", "--help").stdout
    assert "--deadline" in help_text and "each read" in help_text


class Redirector(RawServer):
    """A raw HTTP server on 127.0.0.1 answering every request with a 302 to ``target``
    (another origin) plus the same path."""

    conn_timeout = 2.0

    def __init__(self, target: str) -> None:
        super().__init__()
        self.target = target

    def _answer(self, conn: socket.socket) -> None:
        path = conn.recv(65536).split(b" ", 2)[1]
        conn.sendall(b"HTTP/1.1 302 Found\r\nLocation: " + self.target.encode() + path
                     + b"\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")


def test_a_resolve_answered_through_a_redirect_to_another_origin_is_refused(dist, tmp_path):
    root, _ = dist
    out = tmp_path / "m.onnx"
    with serving(root) as real, Redirector(real) as url:
        with pytest.raises(RtfqError, match="redirected to another server"):
            fetch(_config(url, out, budget="latency=10ms"))
    assert not out.exists() and _parts(out) == []


@pytest.mark.parametrize("option", ["--token-file", "--cafile"])
def test_a_fifo_token_file_or_cafile_is_refused_at_once(tmp_path, option):
    from tests.test_cli import _one_line_error, _run

    os.mkfifo(tmp_path / "pipe")
    server = "https://127.0.0.1:1" if option == "--cafile" else "http://127.0.0.1:1"
    _one_line_error(_run("rtfq", "fetch", "--server", server, "--device", "pi", "--budget", "10ms", "-o",
                         str(tmp_path / "m.onnx"), option, str(tmp_path / "pipe")), "not a regular file")
