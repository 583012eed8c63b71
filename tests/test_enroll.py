"""Devices that fit themselves: candidates on a real server on loopback, ``rtfq enroll`` measuring
real exported models in real onnxruntime/OpenVINO processes, uploads checked and published."""

from __future__ import annotations

import hashlib
import json
import shutil
import socket
import time
import urllib.parse
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from rtfq_deploy import manifest as mf
from rtfq_deploy.checkpoint import save_checkpoint
from rtfq_deploy.cli.main import rtfq
from rtfq_deploy.enroll import EnrollConfig, MeasureOptions, enroll
from rtfq_deploy.errors import RtfqError
from rtfq_deploy.models import SupernetConfig, build_supernet
from rtfq_deploy.serve.devices import UploadConfig
from rtfq_deploy.space import SearchSpace
from tests.fixtures.dist import request, serving, wait_for
from tests.test_cli import _one_line_error, _run

SPACE = SearchSpace(resolutions=(64, 32), widths=(1.0, 0.5), bits=(8, 4))
OFFERED = ("r32-w0.50-q4", "r32-w1.00-q8", "r64-w1.00-q8")  # small, middle, large (and most accurate)
ACCURACY = {"r32-w0.50-q4": 0.5, "r32-w1.00-q8": 0.6, "r64-w1.00-q8": 0.7, "r64-w0.50-q4": 0.55}
TOKENS = {"pi-a": "tok-a-" + "1" * 20, "pi-b": "tok-b-" + "2" * 20, "pi-c": "tok-c-" + "3" * 20}
QUICK = MeasureOptions(min_time_s=0.2, max_time_s=0.6, warmup=2, timeout_s=120, processes=1)


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    """Every subnet of a tiny space, exported by rtfq-export --all (without verification: quick)."""
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("enroll")
    save_checkpoint(root / "tiny.pt", build_supernet(SupernetConfig("tiny_resnet", num_classes=5, space=SPACE)))
    result = _run("rtfq-export", "--checkpoint", str(root / "tiny.pt"), "--all", "--no-verify", "-o", str(root / "all"))
    assert result.returncode == 0, result.stderr
    return root / "all"


@pytest.fixture
def site(exported, tmp_path):
    """A candidates folder (three subnets), their accuracy table, device tokens, an empty DIST_DIR."""
    candidates = tmp_path / "candidates"
    candidates.mkdir()
    for subnet in OFFERED:
        shutil.copy(exported / f"{subnet}.onnx", candidates)
    table = tmp_path / "acc.json"
    table.write_text(json.dumps({"subnets": [{"subnet": s, "top1": a} for s, a in ACCURACY.items()]}))
    device_tokens = tmp_path / "devices.txt"
    device_tokens.write_text("# lab devices\n" + "".join(f"{d} {t}\n" for d, t in TOKENS.items()))
    dist = tmp_path / "dist"
    dist.mkdir()
    return {"candidates": candidates, "table": table, "tokens": device_tokens, "dist": dist, "root": tmp_path,
            "exported": exported}


def _serve(site, budgets=("size=200KB",), interval=0.0, **extra):
    return serving(site["dist"], candidates_dir=site["candidates"], accuracy_file=site["table"],
                   device_token_file=site["tokens"],
                   upload=UploadConfig(budgets=budgets, min_interval_s=interval, **extra))


def _config(url: str, site, device: str, **kw) -> EnrollConfig:
    return EnrollConfig(**{"server": url, "device": device, "cache_dir": site["root"] / f"cache-{device}",
                           "token": TOKENS[device], "measure": QUICK, **kw})


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_candidates_are_listed_and_served_like_model_files(site):
    with _serve(site) as url:
        listing = request(url, "/v1/candidates?runtime=openvino").json()
        assert listing["runtime"] == "openvino"
        got = {c["subnet"]: c for c in listing["candidates"]}
        assert sorted(got) == sorted(OFFERED)
        for subnet, c in got.items():
            path = site["candidates"] / f"{subnet}.onnx"
            assert c["file"] == path.name and c["sha256"] == _sha(path) and c["size_bytes"] == path.stat().st_size
            assert c["accuracy"] == ACCURACY[subnet] and c["macs"] > 0 and c["bitops"] > c["macs"]
            assert isinstance(c["bits"], dict) and c["url"] == f"/v1/candidates/{path.name}"
        c = got["r64-w1.00-q8"]
        data = (site["candidates"] / c["file"]).read_bytes()
        whole = request(url, c["url"])
        assert whole.status == 200 and whole.body == data and whole.headers["etag"] == f'"{c["sha256"]}"'
        part = request(url, c["url"], {"Range": "bytes=100-", "If-Range": f'"{c["sha256"]}"'})
        assert part.status == 206 and part.body == data[100:]
        assert request(url, c["url"], {"If-None-Match": f'"{c["sha256"]}"'}).status == 304
        assert request(url, "/v1/candidates/nope.onnx").status == 404
        assert request(url, "/v1/candidates/..%2fdevices.txt").status == 404
        assert request(url, "/v1/candidates?runtime=tvm").status == 400
        assert request(url, "/v1/health").json()["candidates"] == 3
    with serving(site["dist"]) as plain:  # no --candidates: nothing offered, no uploads taken
        assert request(plain, "/v1/candidates").status == 404
        refused = request(plain, "/v1/devices/pi-a/results", method="POST", body=b"{}",
                          headers={"Content-Length": "2", "Authorization": f"Bearer {TOKENS['pi-a']}"})
        assert refused.status == 403 and "takes no uploads" in refused.json()["error"]


def test_two_devices_enroll_with_their_own_budgets_and_runtimes(site, tmp_path):
    """Each device measures, uploads and gets its own choice; budgets of size and MACs
    make the expected choices certain whatever the latencies are on a busy machine."""
    macs = {c["subnet"]: c["macs"] for c in _listing(site)}
    with _serve(site, budgets=("size=200KB",)) as url:
        a = enroll(_config(url, site, "pi-a", budgets=("latency=100s",), out=tmp_path / "a.onnx"))
        b_budget = f"macs={macs['r32-w1.00-q8']}"
        b = enroll(_config(url, site, "pi-b", runtimes=("openvino",), budgets=(b_budget,), out=tmp_path / "b.onnx"))
        # a: onnxruntime; the server's size budget picks the smallest file, its own the most accurate one
        assert {(c["budget"], c["subnet"]) for c in a.answer["choices"]} == {
            ("size=0.2MB", "r32-w0.50-q4"), ("latency=100000ms", "r64-w1.00-q8")}
        assert {c["runtime"] for c in a.answer["choices"]} == {"onnxruntime"}
        assert a.fetched.entry["subnet"] == "r64-w1.00-q8"
        assert _sha(tmp_path / "a.onnx") == _sha(site["candidates"] / "r64-w1.00-q8.onnx")
        # b: OpenVINO, a MAC budget that admits the two r32 subnets: the more accurate of them
        assert {(c["runtime"], c["subnet"]) for c in b.answer["choices"]} == {
            ("openvino", "r32-w0.50-q4"), ("openvino", "r32-w1.00-q8")}
        assert _sha(tmp_path / "b.onnx") == _sha(site["candidates"] / "r32-w1.00-q8.onnx")
        assert a.measured == 3 and b.measured == 3 and len(a.downloaded) == len(b.downloaded) == 3
        manifest = mf.read_manifest(site["dist"])
        assert sorted(manifest.devices) == ["pi-a", "pi-b"]
        assert {e.subnet for e in manifest.devices["pi-a"].files} == {"r32-w0.50-q4", "r64-w1.00-q8"}
        assert {e.runtime for e in manifest.devices["pi-b"].files} == {"openvino"}
        rows = json.loads(a.results_path.read_text())["models"]
        for row in rows:
            low, high = row["latency_p50_ci_ms"]
            assert row["ok"] and row["harness"] == "interleaved" and low <= row["latency_p50_ms"] <= high
        resolved = request(url, "/v1/devices/pi-b/resolve?budget=" + urllib.parse.quote(b_budget)).json()
        assert resolved["entry"]["subnet"] == "r32-w1.00-q8" and resolved["entry"]["runtime"] == "openvino"
        # a rerun measures nothing new and changes nothing; a new candidate is the only one measured
        again = enroll(_config(url, site, "pi-a", budgets=("latency=100s",)))
        assert again.measured == 0 and again.downloaded == ()
        shutil.copy(site["exported"] / "r64-w0.50-q4.onnx", site["candidates"])
        wait_for(lambda: request(url, "/v1/health").json()["candidates"] == 4)
        grown = enroll(_config(url, site, "pi-a", budgets=("latency=100s",)))
        assert grown.measured == 1 and grown.downloaded == ("r64-w0.50-q4.onnx",) and grown.candidates == 4
        assert mf.read_manifest(site["dist"]).devices["pi-b"] == manifest.devices["pi-b"]  # untouched


def _listing(site) -> list[dict]:
    with _serve(site) as url:
        return request(url, "/v1/candidates").json()["candidates"]


def _results_for(site, url: str, device: str) -> bytes:
    """A valid upload: enroll's own results file for ``device`` (measured once)."""
    result = enroll(_config(url, site, device, budgets=("latency=100s",)))
    return result.results_path.read_bytes()


def _post(url: str, device: str, body: bytes, token: str | None, query: str = "") -> object:
    headers = {"Content-Length": str(len(body)), "Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    return request(url, f"/v1/devices/{device}/results{query}", headers, method="POST", body=body)


def test_forged_bad_and_killed_uploads_change_nothing(site):
    with _serve(site, interval=0.0) as url:
        good = _results_for(site, url, "pi-a")
        before = (site["dist"] / mf.MANIFEST).read_bytes()
        # the third device's forged upload with the first device's token, and other refusals
        forged = _post(url, "pi-c", good, TOKENS["pi-a"])
        assert forged.status == 403 and forged.json() == {"error": "this token is not device 'pi-c''s"}
        assert _post(url, "pi-c", good, None).status == 401
        assert _post(url, "pi-c", good, "tok-unknown-123").status == 401
        data = json.loads(good)
        foreign = json.loads(good)
        foreign["models"][0]["sha256"] = "0" * 64
        renamed = json.loads(good)
        renamed["models"][0]["subnet"] = "r64-w0.50-q4"  # not offered, so not in the rows either
        no_fp = dict(data, fingerprint={"cpu_model": 5})
        many = dict(data, models=[{"path": "x", "ok": False, "error": "e"}] * 20_000)
        for body, status, needle in [
            (b"not json", 422, "not JSON"),
            (b"[1, 2]", 422, "must be a JSON object"),
            (b"[" * 10_000, 422, "nested deeper"),
            (b"\xff\xfe{}", 422, "not UTF-8"),
            (good.replace(b'"latency_p50_ms": ', b'"latency_p50_ms": NaN, "x": ', 1), 422, "NaN"),
            (json.dumps(dict(data, format="other")).encode(), 422, "not an rtfq-bench results file"),
            (json.dumps(foreign).encode(), 422, "not a candidate of this server"),
            (json.dumps(renamed).encode(), 422, "but its sha256 is candidate"),
            (json.dumps(no_fp).encode(), 422, "fingerprint"),
            (json.dumps(many).encode(), 413, "at most"),
        ]:
            reply = _post(url, "pi-c", body, TOKENS["pi-c"])
            assert reply.status == status and needle in reply.json()["error"], (status, reply.body[:300])
        assert _post(url, "pi-c", good, TOKENS["pi-c"], "?budget=20xs").status == 400
        host, port = urllib.parse.urlsplit(url).hostname, urllib.parse.urlsplit(url).port
        with socket.create_connection((host, port)) as sock:  # refused on its Content-Length, before any byte
            sock.sendall(f"POST /v1/devices/pi-c/results HTTP/1.1\r\nHost: x\r\nContent-Length: {5 << 20}\r\n"
                         f"Authorization: Bearer {TOKENS['pi-c']}\r\n\r\n".encode())
            assert sock.recv(100).startswith(b"HTTP/1.1 413 ")
        assert request(url, "/v1/devices/pi-c/results", method="PUT").status == 405
        # a killed upload: the headers and half of the body, then the connection is gone
        with socket.create_connection((host, port)) as sock:
            sock.sendall(f"POST /v1/devices/pi-c/results HTTP/1.1\r\nHost: x\r\nContent-Length: {len(good)}\r\n"
                         f"Authorization: Bearer {TOKENS['pi-c']}\r\n\r\n".encode() + good[:len(good) // 2])
        time.sleep(0.5)
        assert (site["dist"] / mf.MANIFEST).read_bytes() == before
        assert sorted(mf.read_manifest(site["dist"]).devices) == ["pi-a"]
        # the same results, uploaded whole by their own device, are taken
        taken = _post(url, "pi-c", good, TOKENS["pi-c"])
        assert taken.status == 200, taken.body
        assert sorted(mf.read_manifest(site["dist"]).devices) == ["pi-a", "pi-c"]
        assert [d["name"] for d in request(url, "/v1/devices").json()["devices"]] == ["pi-a", "pi-c"]


def _timed(results: bytes, timings: dict[str, tuple[float, float, float]]) -> bytes:
    """The results with each subnet's onnxruntime p50 and its interval set to (p50, low, high) ms."""
    data = json.loads(results)
    for row in data["models"]:
        if row.get("ok") and row["subnet"] in timings:
            p50, low, high = timings[row["subnet"]]
            row.update(latency_p50_ms=p50, latency_p90_ms=high * 1.1, latency_p50_ci_ms=[low, high])
    return json.dumps(data).encode()


def test_a_device_enrolling_again_keeps_its_choice_while_the_new_figures_are_in_doubt(site):
    """Hysteresis on the server: a re-measurement that cannot tell the old choice from the
    new one (an interval holds the budget) keeps the old; a clear change replaces it."""
    large, middle = "r64-w1.00-q8", "r32-w1.00-q8"  # top-1 0.7 and 0.6
    small = (0.5, 0.45, 0.55)
    steps = [  # (large's and middle's (p50, low, high) ms, the choice for latency=10ms, kept?)
        ((12.0, 11.5, 12.5), (8.0, 7.8, 8.2), middle, False),  # large is clearly over
        ((9.9, 9.5, 10.4), (8.0, 7.8, 8.2), middle, True),  # large meets, but its interval holds 10 ms
        ((9.0, 8.8, 9.2), (8.0, 7.8, 8.2), large, False),  # large clearly meets: the better choice wins
        ((10.2, 9.9, 10.5), (8.0, 7.8, 8.2), large, True),  # just over, in doubt: large stays
        ((11.0, 10.8, 11.3), (8.0, 7.8, 8.2), middle, False),  # clearly over: replaced
    ]
    with _serve(site, interval=0.0) as url:
        results = _results_for(site, url, "pi-a")
        for timed_large, timed_middle, chosen, kept in steps:
            body = _timed(results, {large: timed_large, middle: timed_middle, "r32-w0.50-q4": small})
            reply = _post(url, "pi-a", body, TOKENS["pi-a"], "?budget=latency=10ms")
            assert reply.status == 200, reply.body
            (choice,) = [c for c in reply.json()["choices"] if c["budget"] == "latency=10ms"]
            assert (choice["subnet"], choice["kept"]) == (chosen, kept), (timed_large, choice)
            served = mf.read_manifest(site["dist"]).devices["pi-a"].files
            assert [e.subnet for e in served if "latency=10ms" in e.budgets] == [chosen]
        # the host got 14% slower: large is just over the budget with a narrow interval, but
        # the drift of the models served before widens it, so large stays
        body = _timed(results, {large: (9.0, 8.95, 9.05), middle: (8.0, 7.8, 8.2), "r32-w0.50-q4": small})
        assert _post(url, "pi-a", body, TOKENS["pi-a"], "?budget=latency=10ms").status == 200
        slower = {s: tuple(v * 1.144 for v in t) for s, t in ((large, (9.0, 8.95, 9.05)), (middle, (8.0, 7.8, 8.2)),
                                                               ("r32-w0.50-q4", small))}
        reply = _post(url, "pi-a", _timed(results, slower), TOKENS["pi-a"], "?budget=latency=10ms").json()
        (choice,) = [c for c in reply["choices"] if c["budget"] == "latency=10ms"]
        assert (choice["subnet"], choice["kept"]) == (large, True) and "14.4%" in choice["reason"], choice
        # another device starts afresh: its first upload is chosen on its own figures
        body = _timed(results, {large: (9.9, 9.5, 10.4), middle: (8.0, 7.8, 8.2), "r32-w0.50-q4": small})
        choices = _post(url, "pi-b", body, TOKENS["pi-b"], "?budget=latency=10ms").json()["choices"]
        (choice,) = [c for c in choices if c["budget"] == "latency=10ms"]
        assert (choice["subnet"], choice["kept"], choice["straddles"]) == (large, False, True)


def test_uploads_are_rate_limited_per_device(site):
    with _serve(site, interval=60.0) as url:
        good = _results_for(site, url, "pi-a")  # the one upload pi-a may make now
        again = _post(url, "pi-a", good, TOKENS["pi-a"])
        assert again.status == 429 and int(again.headers["retry-after"]) > 50
        assert _post(url, "pi-b", good, TOKENS["pi-b"]).status == 200  # another device is not held back
        refused = _post(url, "pi-c", b"nonsense", TOKENS["pi-c"])
        assert refused.status == 422
        assert _post(url, "pi-c", good, TOKENS["pi-c"]).status == 200  # a refused upload does not count


def test_the_device_token_file_is_followed_and_checked(site):
    with _serve(site) as url:
        good = _results_for(site, url, "pi-a")
        site["tokens"].write_text(f"pi-a {TOKENS['pi-b']}\n")  # pi-b's token now belongs to pi-a
        assert _post(url, "pi-b", good, TOKENS["pi-b"]).status == 403
        assert _post(url, "pi-a", good, TOKENS["pi-a"]).status == 401  # revoked
    for text, needle in [("pi-a\n", "is not '<device> <token>'"), ("../x tok-12345\n", "invalid device name"),
                         (f"pi-a {TOKENS['pi-a']}\npi-b {TOKENS['pi-a']}\n", "given to two devices"),
                         ("# only a comment\n", "no '<device> <token>' line")]:
        site["tokens"].write_text(text)
        with pytest.raises(RtfqError, match=needle):
            with _serve(site):
                pass


def test_enroll_cli_help_and_one_line_errors(site):
    result = _run("rtfq", "enroll", "--help")
    assert result.returncode == 0 and "--budget" in result.stdout and "--cache" in result.stdout
    runner = CliRunner()
    for args, needle in [
        (["--server", "ftp://x", "--device", "pi-a"], "http:// or https://"),
        (["--server", "http://127.0.0.1:1", "--device", "../x"], "invalid device name"),
        (["--server", "http://127.0.0.1:1", "--device", "pi-a", "--budget", "20xs"], "unknown unit"),
        (["--server", "http://127.0.0.1:1", "--device", "pi-a", "-o", "m.onnx"], "-o needs a --budget"),
        (["--server", "http://127.0.0.1:1", "--device", "pi-a", "--min-time", "9", "--max-time", "2"], "--min-time"),
    ]:
        got = _run("rtfq", "enroll", *args)
        _one_line_error(got, needle)
    unreachable = _run("rtfq", "enroll", "--server", "http://127.0.0.1:1", "--device", "pi-a",
                       "--cache", str(site["root"] / "c"))
    _one_line_error(unreachable, "cannot reach")
    mine = site["root"] / "mine"
    mine.mkdir()
    (mine / "keep.onnx").write_bytes(b"a user's own model")
    _one_line_error(_run("rtfq", "enroll", "--server", "http://127.0.0.1:1", "--device", "pi-a", "--cache", str(mine)),
                    "not an rtfq enroll cache")
    assert (mine / "keep.onnx").exists()
    with _serve(site) as url:
        token = site["root"] / "token.txt"
        token.write_text(TOKENS["pi-b"] + "\n")
        quick = ["--min-time", "0.1", "--max-time", "0.3", "--processes", "1"]
        forged = runner.invoke(rtfq, ["enroll", "--server", url, "--device", "pi-a", "--token-file", str(token),
                                      "--cache", str(site["root"] / "cb"), *quick])
        assert forged.exit_code == 2 and "this token is not device 'pi-a''s" in forged.output, forged.output
        token.write_text(TOKENS["pi-a"] + "\n")
        out = site["root"] / "model.onnx"
        ok = runner.invoke(rtfq, ["enroll", "--server", url, "--device", "pi-a", "--token-file", str(token),
                                  "--cache", str(site["root"] / "cb"), *quick, "--budget", "size=200KB",
                                  "-o", str(out)])
        assert ok.exit_code == 0, ok.output
        assert "size=0.2MB on onnxruntime: r32-w0.50-q4" in ok.output
        assert "downloading 1/3" in forged.output  # progress; what the refused run measured is kept:
        assert "3 candidates measured before" in ok.output and "0 rows measured now" in ok.output
        assert _sha(out) == _sha(site["candidates"] / "r32-w0.50-q4.onnx")


def test_serve_cli_refuses_enroll_options_without_candidates(site):
    _one_line_error(_run("rtfq-serve", str(site["dist"]), "--budget", "20ms"), "go with --candidates")
    _one_line_error(_run("rtfq-serve", str(site["dist"]), "--candidates", str(site["candidates"]), "--budget", "2x"),
                    "unknown unit")
    empty = site["root"] / "empty"
    empty.mkdir()
    _one_line_error(_run("rtfq-serve", str(site["dist"]), "--candidates", str(empty)), "no usable rtfq-export")


def test_the_device_side_imports_neither_torch_nor_onnx():
    import subprocess
    import sys

    code = ("import sys, rtfq_deploy.enroll, rtfq_deploy.cli.enroll, rtfq_deploy.bench.interleave, "
            "rtfq_deploy.serve.app, rtfq_deploy.serve.devices, rtfq_deploy.serve.candidates; "
            "bad = [m for m in ('torch', 'onnx', 'rtfq_deploy.train', 'rtfq_deploy.models') if m in sys.modules]; "
            "assert not bad, bad")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
