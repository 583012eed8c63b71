"""The server under hostile clients and hostile manifests, over real sockets on loopback.

The attacks come from other loopback addresses (127.0.0.2, 127.0.0.3; all of 127/8 is
loopback on Linux) so that the per-client cap can be told apart from the real client
on 127.0.0.1. The server listens on 127.0.0.1 only.
"""

from __future__ import annotations

import json
import logging
import os
import selectors
import socket
import time
import urllib.parse

import pytest
from click.testing import CliRunner

from rtfq_deploy import manifest as mf
from rtfq_deploy.cli.serve import serve
from tests.fixtures.dist import entry_for, publish, random_bytes, request, serving, sha, wait_for

ATTACKER, TRICKLER = "127.0.0.2", "127.0.0.3"


def _connect_from(source: str, address: tuple[str, int]) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.bind((source, 0))
        sock.settimeout(5)
        sock.connect(address)
    except OSError:
        sock.close()
        raise
    sock.setblocking(False)
    return sock


@pytest.fixture(scope="module")
def second_loopback_address():
    try:
        _connect_from(ATTACKER, ("127.0.0.1", 9)).close()  # port 9: refused is fine, the bind is what counts
    except ConnectionRefusedError:
        pass
    except OSError as e:
        pytest.skip(f"cannot send from {ATTACKER} on this machine: {e}")


def test_idle_and_trickling_connections_cannot_lock_out_real_requests(tmp_path, second_loopback_address):
    """300 connections that send nothing and 20 that trickle their headers one byte per
    0.1 s, all held open, against a server that answers 503 beyond 100 connections:
    real requests still get 200 promptly; the cap refuses what one address opens beyond
    32 at once, and the header deadline closes the rest."""
    data = random_bytes(200_000, 7)
    entry = entry_for(tmp_path, "pi", "m", data, 5.0)
    publish(tmp_path, "pi", [entry])
    idle_n, trickle_n, cap, deadline_s = 300, 20, 32, 2.0
    header = b"GET /v1/health HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 200 + b"\r\n\r\n"  # 20 s at 10 B/s
    with serving(tmp_path, header_timeout_s=deadline_s, max_client_connections=cap, limit_concurrency=100) as url:
        address = (urllib.parse.urlsplit(url).hostname, urllib.parse.urlsplit(url).port)

        def download() -> float:
            start = time.monotonic()
            reply = request(url, f"/v1/files/{entry.sha256}")
            assert reply.status == 200 and sha(reply.body) == entry.sha256, (reply.status, reply.body[:200])
            return time.monotonic() - start

        quiet = [download() for _ in range(5)]
        selector = selectors.DefaultSelector()
        opened: dict[socket.socket, tuple[str, float]] = {}
        closed: dict[socket.socket, float] = {}
        answered: list[bytes] = []
        try:
            t0 = time.monotonic()
            for kind, source, n in (("idle", ATTACKER, idle_n), ("trickle", TRICKLER, trickle_n)):
                for _ in range(n):
                    sock = _connect_from(source, address)
                    opened[sock] = (kind, time.monotonic())
                    selector.register(sock, selectors.EVENT_READ)
            attack_open_s = time.monotonic() - t0
            under_attack = [download() for _ in range(10)]  # while every attacking socket is still open
            sent, next_byte = 0, time.monotonic()
            end = time.monotonic() + deadline_s + 8.0  # bounded: the test stops by itself
            while len(closed) < len(opened) and time.monotonic() < end:
                now = time.monotonic()
                if now >= next_byte and sent < len(header):
                    for sock, (kind, _) in opened.items():
                        if kind == "trickle" and sock not in closed:
                            try:
                                sock.send(header[sent:sent + 1])
                            except OSError:
                                closed[sock] = now
                                selector.unregister(sock)
                    sent, next_byte = sent + 1, now + 0.1
                for key, _ in selector.select(timeout=0.05):
                    sock = key.fileobj
                    try:
                        got = sock.recv(4096)
                    except OSError:
                        got = b""
                    if got:
                        answered.append(got)
                        continue
                    closed[sock] = time.monotonic()
                    selector.unregister(sock)
            after = download()
        finally:
            selector.close()
            for sock in opened:
                sock.close()
    lifetimes = {kind: sorted(closed[s] - t for s, (k, t) in opened.items() if k == kind and s in closed)
                 for kind in ("idle", "trickle")}
    refused = sum(life < deadline_s / 2 for life in lifetimes["idle"])
    held = [life for life in lifetimes["idle"] if life >= deadline_s / 2]
    print(f"\nslow-client figures: {idle_n} idle connections from {ATTACKER} (opened in {attack_open_s:.2f} s) + "
          f"{trickle_n} trickling from {TRICKLER}; per-client cap {cap}, header deadline {deadline_s} s, "
          f"503 beyond 100 connections\n"
          f"  refused at once: {refused}; held then closed by the deadline: {len(held)} "
          f"(after {min(held, default=0):.2f}-{max(held, default=0):.2f} s); "
          f"trickling clients closed after {min(lifetimes['trickle'], default=0):.2f}-"
          f"{max(lifetimes['trickle'], default=0):.2f} s having sent {sent} header bytes\n"
          f"  real 200 KB download latency: quiet median {sorted(quiet)[2] * 1000:.1f} ms, under attack "
          f"median {sorted(under_attack)[5] * 1000:.1f} ms / max {max(under_attack) * 1000:.1f} ms, "
          f"after {after * 1000:.1f} ms")
    assert answered == []  # nobody who never finished its headers got an answer
    assert len(closed) == len(opened), "some attacking connection was never closed"
    assert refused == idle_n - cap and len(held) == cap
    assert all(deadline_s * 0.9 <= life <= deadline_s + 5 for life in held + lifetimes["trickle"])
    assert len(lifetimes["trickle"]) == trickle_n and sent < len(header)
    assert max(under_attack) < 3.0


def _is_closed(sock: socket.socket) -> bool:
    try:
        return sock.recv(1) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


def test_idle_connections_from_many_addresses_make_room_for_real_requests(tmp_path, second_loopback_address):
    """150 idle connections from 10 addresses (15 each, under the per-client cap) against
    a server that answers 503 from 100 connections on, with a header deadline too far
    away to help: the oldest idle connections are closed to make room, so real requests
    get 200 at once and the server never holds 100."""
    entry = entry_for(tmp_path, "pi", "m", random_bytes(50_000, 8), 5.0)
    publish(tmp_path, "pi", [entry])
    limit, per_source, sources = 100, 15, [f"127.0.0.{10 + i}" for i in range(10)]
    socks: list[socket.socket] = []
    with serving(tmp_path, header_timeout_s=60.0, limit_concurrency=limit) as url:
        address = (urllib.parse.urlsplit(url).hostname, urllib.parse.urlsplit(url).port)
        try:
            for _ in range(per_source):
                for source in sources:
                    socks.append(_connect_from(source, address))
            latencies = []
            for _ in range(10):
                start = time.monotonic()
                reply = request(url, f"/v1/files/{entry.sha256}")
                latencies.append(time.monotonic() - start)
                assert reply.status == 200 and sha(reply.body) == entry.sha256, reply.status
            wait_for(lambda: sum(map(_is_closed, socks)) >= len(socks) - (limit - 1), timeout_s=10)
            closed = [i for i, sock in enumerate(socks) if _is_closed(sock)]
        finally:
            for sock in socks:
                sock.close()
    print(f"\nmany-address figures: {len(socks)} idle connections from {len(sources)} addresses, limit {limit}: "
          f"{len(closed)} oldest closed to make room; real 50 KB downloads: max {max(latencies) * 1000:.1f} ms")
    assert len(socks) - len(closed) <= limit - 1
    assert closed == list(range(len(closed)))  # the oldest ones, in order
    assert max(latencies) < 3.0


def test_the_header_deadline_also_covers_the_next_request_on_a_kept_alive_connection(tmp_path):
    publish(tmp_path, "pi", [entry_for(tmp_path, "pi", "m", b"bytes", 1.0)])
    with serving(tmp_path, header_timeout_s=1.0) as url:
        address = (urllib.parse.urlsplit(url).hostname, urllib.parse.urlsplit(url).port)
        with socket.create_connection(address, timeout=10) as sock:
            for _ in range(3):  # an honest keep-alive client: several requests on one connection
                sock.sendall(b"GET /v1/health HTTP/1.1\r\nHost: x\r\n\r\n")
                reply = b""
                while b"}" not in reply:
                    reply += sock.recv(65536)
                assert reply.startswith(b"HTTP/1.1 200 ")
                start = time.monotonic()  # the next request's deadline runs from here
                time.sleep(0.3)
            got = b""
            for byte in b"GET /v1/health HTTP/1.1\r\nHost: x\r\nX: " + b"a" * 100:  # then a slow one
                try:
                    sock.sendall(bytes([byte]))
                    sock.settimeout(0.2)
                    got = sock.recv(100)
                    if got == b"":
                        break
                except TimeoutError:
                    continue
                except OSError:
                    break
            lasted = time.monotonic() - start
    assert got == b"" and 0.9 <= lasted < 4.0, (got, lasted)


def test_every_reload_failure_is_reported_in_health_and_logged_once(tmp_path, caplog, monkeypatch):
    good = entry_for(tmp_path, "pi", "m", b"model", 1.0)
    manifest_sha = publish(tmp_path, "pi", [good])
    parse = mf.parse_manifest

    def parser_with_a_bug(data, where=mf.MANIFEST):  # stands for any failure nobody foresaw
        if isinstance(data, dict) and "trigger" in data:
            raise ZeroDivisionError("an unforeseen parser failure")
        return parse(data, where)

    monkeypatch.setattr(mf, "parse_manifest", parser_with_a_bug)
    broken = {
        "ZeroDivisionError: an unforeseen parser failure": json.dumps({"trigger": 1}),
        "nested deeper than 64 levels": "[" * 100_000 + "]" * 100_000,
        "not JSON": "{",
        "version 99": json.dumps({"format": "rtfq-manifest", "version": 99, "devices": {}}),
    }
    caplog.set_level(logging.ERROR, logger="rtfq_deploy")
    with serving(tmp_path) as url:  # polls every 0.05 s
        for needle, text in broken.items():
            (tmp_path / "next.json").write_text(text)
            os.replace(tmp_path / "next.json", tmp_path / mf.MANIFEST)  # as a publisher does: whole
            wait_for(lambda: needle in (request(url, "/v1/health").json()["reload_error"] or ""))
            time.sleep(0.5)  # ten more polls of the same broken file
            health = request(url, "/v1/health").json()
            assert health["status"] == "degraded" and health["manifest_sha256"] == manifest_sha, health
            assert request(url, "/v1/devices/pi/resolve?budget=5ms").status == 200  # the old one still serves
            logged = [r for r in caplog.records if needle in r.getMessage()]
            assert len(logged) == 1, [r.getMessage()[:200] for r in logged]
        mf.write_manifest(tmp_path, mf.Manifest({"pi": mf.Device({}, (good,))}))
        fixed = sha((tmp_path / mf.MANIFEST).read_bytes())
        wait_for(lambda: request(url, "/v1/health").json()["manifest_sha256"] == fixed)
        health = request(url, "/v1/health").json()
        assert health["status"] == "ok" and health["reload_error"] is None


@pytest.mark.parametrize("args,needle", [
    (["--poll", "nan"], "--poll"), (["--poll", "inf"], "--poll"), (["--poll", "-1"], "--poll"),
    (["--poll", "0"], "--poll"), (["--header-timeout", "nan"], "--header-timeout"),
    (["--header-timeout", "1e400"], "--header-timeout"), (["--port", "-1"], "--port"),
    (["--port", "9" * 50], "--port"), (["--max-connections", "0"], "--max-connections"),
    (["--max-client-connections", "0"], "--max-client-connections"),
    (["--max-client-connections", "1e9"], "--max-client-connections"),
    (["--max-header-bytes", "nan"], "--max-header-bytes"), (["--host", ""], "--host"),
    (["--host", "a" * 300], "--host"), (["--host", "a\x00b"], "host"), (["--host", "x" * 64 + ".lan"], "host"),
    (["--certfile", "cert.pem"], "--certfile and --keyfile"), (["--keyfile", "key.pem"], "--certfile and --keyfile"),
    (["--certfile", "absent.pem", "--keyfile", "absent.key"], "absent.pem"),
    (["--certfile", "garbage.pem", "--keyfile", "garbage.pem"], "cannot use --certfile"),
    (["--token-file", "absent.txt"], "cannot read token file"),
    (["--token-file", "empty.txt"], "no token in the file"),
    (["--token-file", "bad.txt"], "line 2 is not a token"),
])
def test_every_option_value_is_checked_with_one_line(tmp_path, monkeypatch, args, needle):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "dist").mkdir()
    (tmp_path / "garbage.pem").write_text("-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n")
    (tmp_path / "empty.txt").write_text("# only a comment\n\n")
    (tmp_path / "bad.txt").write_text("good-token\nbad token with spaces\n")
    result = CliRunner().invoke(serve, ["dist", *args, "--port", "0"] if "--port" not in args else ["dist", *args])
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code == 2 and result.stdout == "", (result.exit_code, result.output)
    assert len(lines) == 1 and lines[0].startswith("Error: ") and needle in lines[0], lines
    assert "Traceback" not in result.output


def test_library_config_refuses_nan_too(tmp_path):
    from rtfq_deploy.serve.app import ServeConfig

    for bad in ({"poll_interval_s": float("nan")}, {"header_timeout_s": float("inf")}, {"poll_interval_s": 0},
                {"max_client_connections": 0}, {"limit_concurrency": True}, {"certfile": tmp_path}):
        with pytest.raises(ValueError):
            ServeConfig(dist_dir=tmp_path, **bad)


@pytest.mark.parametrize("content,needle", [
    (b"[" * 100_000 + b"]" * 100_000, "manifest"), (b"\xff\xfe{}", "manifest"), (b"{", "not JSON"),
    (json.dumps({"format": "rtfq-manifest", "version": 1, "devices": {"pi": {"fingerprint": [1], "files": [
        {"subnet": "m", "path": "pi/m.onnx", "sha256": "0" * 64, "size_bytes": 1e400, "latency_p50_ms": 1,
         "latency_p90_ms": 1, "peak_memory_bytes": 1, "macs": 1, "bitops": 1}]}}}).encode(), "manifest"),
])
def test_a_hostile_manifest_at_start_is_one_line(tmp_path, content, needle):
    (tmp_path / mf.MANIFEST).write_bytes(content)
    result = CliRunner().invoke(serve, [str(tmp_path), "--port", "0"])
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code == 2 and result.stdout == "", (result.exit_code, result.output[-500:])
    assert len(lines) == 1 and lines[0].startswith("Error: ") and needle in lines[0], lines


# -- integrity: special files in place of the token file or the manifest, token content, ranges -----------------

_TOKEN, _OTHER = "tok-" + "a1" * 16, "tok-" + "b2" * 16


def _auth(url: str, target: str, token: str):
    return request(url, target, {"Authorization": f"Bearer {token}"})


def _health_within(url: str, seconds: float):
    """/v1/health, failing the test if it takes longer than ``seconds`` (a stalled server)."""
    start = time.monotonic()
    reply = request(url, "/v1/health")
    assert time.monotonic() - start < seconds, "health stalled"
    return reply.json()


def test_a_fifo_token_file_at_start_is_one_line(tmp_path):
    (tmp_path / "dist").mkdir()
    os.mkfifo(tmp_path / "tokens")
    from tests.test_cli import _one_line_error, _run

    _one_line_error(_run("rtfq-serve", str(tmp_path / "dist"), "--port", "0", "--token-file", str(tmp_path / "tokens")),
                    "not a regular file")


def test_a_token_file_swapped_for_a_fifo_while_serving_stalls_nothing(tmp_path):
    entry = entry_for(tmp_path / "dist", "pi", "m", b"model" * 100, 1.0)
    publish(tmp_path / "dist", "pi", [entry])
    tokens = tmp_path / "tokens"
    tokens.write_text(f"{_TOKEN}\n")
    with serving(tmp_path / "dist", token_file=tokens) as url:
        assert _auth(url, "/v1/devices", _TOKEN).status == 200
        tokens.unlink()
        os.mkfifo(tokens)  # a writer never comes: reading it would block for ever
        start = time.monotonic()
        assert _auth(url, "/v1/devices", _TOKEN).status == 401  # answered at once, failing closed
        health = _health_within(url, 5)
        assert health["status"] == "degraded" and "token file" in health["auth_error"]
        assert time.monotonic() - start < 5
        tokens.unlink()
        tokens.write_text(f"{_TOKEN}\n")
        assert _auth(url, "/v1/devices", _TOKEN).status == 200 and _health_within(url, 5)["status"] == "ok"


def test_a_manifest_swapped_for_a_fifo_turns_health_degraded_and_the_old_one_serves(tmp_path):
    entry = entry_for(tmp_path, "pi", "m", b"model" * 100, 1.0)
    manifest_sha = publish(tmp_path, "pi", [entry])
    with serving(tmp_path) as url:  # polls every 0.05 s
        os.unlink(tmp_path / mf.MANIFEST)
        os.mkfifo(tmp_path / mf.MANIFEST)
        wait_for(lambda: "not a regular file" in (_health_within(url, 5)["reload_error"] or ""), timeout_s=10)
        health = _health_within(url, 5)
        assert health["status"] == "degraded" and health["manifest_sha256"] == manifest_sha
        assert request(url, "/v1/devices/pi/resolve?budget=5ms").status == 200  # the watcher is alive, the old serves
        os.unlink(tmp_path / mf.MANIFEST)
        publish(tmp_path, "pi", [entry])
        wait_for(lambda: _health_within(url, 5)["status"] == "ok", timeout_s=10)


def test_a_manifest_or_token_file_that_is_a_fifo_at_start_is_one_line(tmp_path):
    os.mkfifo(tmp_path / mf.MANIFEST)
    from tests.test_cli import _one_line_error, _run

    _one_line_error(_run("rtfq-serve", str(tmp_path), "--port", "0"), "not a regular file")


def test_a_token_rewritten_in_place_at_the_same_size_and_mtime_is_revoked(tmp_path):
    """As ``cp -p`` does: same inode, same size, modification time set back."""
    entry = entry_for(tmp_path / "dist", "pi", "m", b"model" * 100, 1.0)
    publish(tmp_path / "dist", "pi", [entry])
    tokens = tmp_path / "tokens"
    tokens.write_text(f"{_TOKEN}\n")
    new = "tok-" + "c3" * 16
    assert len(new) == len(_TOKEN)
    with serving(tmp_path / "dist", token_file=tokens) as url:
        assert _auth(url, "/v1/devices", _TOKEN).status == 200
        before = os.stat(tokens)
        with open(tokens, "r+b") as f:
            f.write(f"{new}\n".encode())
        os.utime(tokens, ns=(before.st_atime_ns, before.st_mtime_ns))
        after = os.stat(tokens)
        assert (after.st_ino, after.st_size, after.st_mtime_ns) == (before.st_ino, before.st_size, before.st_mtime_ns)
        wait_for(lambda: _auth(url, "/v1/devices", _TOKEN).status == 401, timeout_s=5)
        assert _auth(url, "/v1/devices", new).status == 200


@pytest.mark.parametrize("header,status,span", [
    ("bytes=0-" + "9" * 30, 206, (0, 999)),  # RFC 9110 14.1.1: a last position past the end is clipped
    ("bytes=10-18446744073709551616", 206, (10, 999)),
    ("bytes=" + "9" * 30 + "-", 416, None),  # a first position past the end: unsatisfiable
    ("bytes=18446744073709551616-", 416, None),
    ("bytes=-" + "9" * 30, 206, (0, 999)),
])
def test_ranges_with_huge_positions_follow_rfc_9110(tmp_path, header, status, span):
    data = random_bytes(1000, 9)
    entry = entry_for(tmp_path, "pi", "m", data, 1.0)
    publish(tmp_path, "pi", [entry])
    with serving(tmp_path) as url:
        reply = request(url, f"/v1/files/{entry.sha256}", {"Range": header})
    assert reply.status == status, (reply.status, reply.headers)
    if span is None:
        assert reply.headers["content-range"] == "bytes */1000"
    else:
        assert reply.headers["content-range"] == f"bytes {span[0]}-{span[1]}/1000"
        assert reply.body == data[span[0]:span[1] + 1]
