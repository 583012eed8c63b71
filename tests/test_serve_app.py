"""The API over real HTTP on loopback (uvicorn in a thread, http.client as the device)."""

from __future__ import annotations

import http.client
import os
import re
import socket
import threading
import urllib.parse

import pytest
from openapi_spec_validator import validate

from rtfq_deploy.serve.app import ServeConfig, build_app
from rtfq_deploy.serve.openapi import document
from rtfq_deploy.serve.store import Store
from tests.fixtures.dist import (entry_for, publish, random_bytes, request, serving, sha, wait_for,
                                 wait_for_manifest)


@pytest.fixture(scope="module")
def dist(tmp_path_factory):
    dist = tmp_path_factory.mktemp("dist")
    big = entry_for(dist, "pi4", "r96-w1.00-q8", random_bytes(300_000, 1), 12.0, accuracy=0.80, memory=60_000_000)
    small = entry_for(dist, "pi4", "r64-w0.50-q4", random_bytes(100_000, 2), 4.0, accuracy=0.70, memory=20_000_000)
    nano = entry_for(dist, "nano", "r64-w0.50-q4", random_bytes(50_000, 3), 2.0, accuracy=None)
    publish(dist, "pi4", [big, small])
    publish(dist, "nano", [nano])
    return dist, {"big": big, "small": small, "nano": nano}


@pytest.fixture(scope="module")
def server(dist):
    with serving(dist[0]) as url:
        yield url, dist[1]


def test_health_and_device_listing(server):
    url, e = server
    health = request(url, "/v1/health").json()
    assert health["status"] == "ok" and health["devices"] == 2 and health["files"] == 3 and health["excluded"] == []
    devices = request(url, "/v1/devices").json()["devices"]
    assert [(d["name"], d["files"]) for d in devices] == [("nano", 1), ("pi4", 2)]
    pi4 = request(url, "/v1/devices/pi4").json()
    assert {f["subnet"]: f["url"] for f in pi4["files"]} == {
        "r96-w1.00-q8": f"/v1/files/{e['big'].sha256}", "r64-w0.50-q4": f"/v1/files/{e['small'].sha256}"}


@pytest.mark.parametrize("budget,subnet", [
    ("20ms", "r96-w1.00-q8"),  # both fit: the more accurate
    ("latency=5ms", "r64-w0.50-q4"),
    ("latency=20ms,memory=30MB", "r64-w0.50-q4"),
    ("size=200KB", "r64-w0.50-q4"),
    ("latency-p90=14ms", "r96-w1.00-q8"),
])
def test_resolve_chooses_by_the_budget_rules(server, budget, subnet):
    url, e = server
    reply = request(url, f"/v1/devices/pi4/resolve?budget={urllib.parse.quote(budget)}")
    assert reply.status == 200, reply.body
    body = reply.json()
    entry = body["entry"]
    assert entry["subnet"] == subnet and body["device"] == "pi4"
    expected = e["big"] if subnet == "r96-w1.00-q8" else e["small"]
    assert entry["sha256"] == expected.sha256 and entry["url"] == f"/v1/files/{expected.sha256}"


def test_resolve_errors(server):
    url, e = server
    unmet = request(url, "/v1/devices/pi4/resolve?budget=1ms")
    assert unmet.status == 422
    assert unmet.json()["cheapest"]["subnet"] == "r64-w0.50-q4" and "nothing meets latency=1ms" in unmet.json()["error"]
    for query, needle in [("budget=20xs", "unknown unit"), ("budget=64MB", "memory or file size"), ("", "exactly one"),
                          ("budget=1ms&budget=2ms", "exactly one"), ("budget=", "empty budget")]:
        reply = request(url, f"/v1/devices/pi4/resolve?{query}")
        assert reply.status == 400 and needle in reply.json()["error"], (query, reply.body)
    unknown = request(url, "/v1/devices/toaster/resolve?budget=1ms")
    assert unknown.status == 404 and unknown.json() == {"error": "unknown device 'toaster'", "devices": ["nano", "pi4"]}
    assert request(url, "/v1/devices/toaster").status == 404
    assert request(url, "/v1/devices/..%2f..%2fetc/resolve?budget=1ms").status == 404


def test_download_whole_file_with_validators(server, dist):
    url, e = server
    data = (dist[0] / e["big"].path).read_bytes()
    reply = request(url, f"/v1/files/{e['big'].sha256}")
    assert reply.status == 200 and reply.body == data
    h = reply.headers
    assert h["etag"] == f'"{e["big"].sha256}"' and h["content-length"] == str(len(data))
    assert h["accept-ranges"] == "bytes" and "immutable" in h["cache-control"]
    assert h["content-type"] == "application/octet-stream" and h["x-content-type-options"] == "nosniff"
    assert h["content-disposition"] == 'attachment; filename="r96-w1.00-q8.onnx"'
    head = request(url, f"/v1/files/{e['big'].sha256}", method="HEAD")
    assert head.status == 200 and head.body == b"" and head.headers["content-length"] == str(len(data))


@pytest.mark.parametrize("if_none_match", ['"{sha}"', 'W/"{sha}"', '"other", "{sha}"', "*"])
def test_if_none_match_gives_304(server, if_none_match):
    url, e = server
    s = e["small"].sha256
    reply = request(url, f"/v1/files/{s}", {"If-None-Match": if_none_match.format(sha=s)})
    assert reply.status == 304 and reply.body == b"" and reply.headers["etag"] == f'"{s}"'
    changed = request(url, f"/v1/files/{s}", {"If-None-Match": f'"{e["big"].sha256}"'})
    assert changed.status == 200 and sha(changed.body) == s


def test_range_requests_resume_exactly(server, dist):
    url, e = server
    s = e["big"].sha256
    data = (dist[0] / e["big"].path).read_bytes()
    n = len(data)
    for header, first, last in [("bytes=0-0", 0, 0), ("bytes=1000-1999", 1000, 1999), (f"bytes={n - 10}-", n - 10, n - 1),
                                ("bytes=-7", n - 7, n - 1), (f"bytes=100-{10 * n}", 100, n - 1)]:
        reply = request(url, f"/v1/files/{s}", {"Range": header})
        assert reply.status == 206, header
        assert reply.body == data[first:last + 1]
        assert reply.headers["content-range"] == f"bytes {first}-{last}/{n}"
        assert reply.headers["content-length"] == str(last - first + 1)
    pieces = [request(url, f"/v1/files/{s}", {"Range": f"bytes={a}-{a + 65535}", "If-Range": f'"{s}"'}).body
              for a in range(0, n, 65536)]
    assert sha(b"".join(pieces)) == s
    unsatisfiable = request(url, f"/v1/files/{s}", {"Range": f"bytes={n}-"})
    assert unsatisfiable.status == 416 and unsatisfiable.headers["content-range"] == f"bytes */{n}"
    # A stale If-Range (another file's tag) or several ranges: the whole file, 200.
    stale = request(url, f"/v1/files/{s}", {"Range": "bytes=10-", "If-Range": f'"{e["small"].sha256}"'})
    multi = request(url, f"/v1/files/{s}", {"Range": "bytes=0-1,5-6"})
    assert stale.status == multi.status == 200 and stale.body == multi.body == data


def test_openapi_document_is_valid_and_matches_the_routes(server, tmp_path):
    url, _ = server
    served = request(url, "/v1/openapi.json").json()
    assert served == document()
    validate(served)  # raises on an invalid OpenAPI 3.1 document
    app = build_app(ServeConfig(dist_dir=tmp_path), Store(tmp_path))
    routes = {(r.path, m.lower()) for r in app.routes for m in r.methods}
    documented = {(p, m) for p, ops in served["paths"].items() for m in ops}
    assert {x for x in documented if x[1] == "get"} == {x for x in routes if x[1] == "get"}
    assert documented - routes == set()  # every documented HEAD is answered
    for path, ops in served["paths"].items():
        for op in ops.values():
            declared = {p["name"] for p in op.get("parameters", []) if p["in"] == "path"}
            assert declared == set(re.findall(r"{(\w+)}", path)), path


def test_a_download_in_progress_is_unaffected_by_a_republish(tmp_path):
    """The file is replaced (same path, new bytes) and the manifest republished while a
    client is in the middle of a 16 MB download: it still gets exactly the old file."""
    old, new = random_bytes(16 << 20, 10), random_bytes(16 << 20, 11)
    e_old = entry_for(tmp_path, "pi", "m", old, 5.0)
    publish(tmp_path, "pi", [e_old])
    with serving(tmp_path) as url:
        host, port = urllib.parse.urlsplit(url).hostname, urllib.parse.urlsplit(url).port
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)  # keep the server from running far ahead
        sock.connect((host, port))
        conn = http.client.HTTPConnection(host, port, timeout=30)
        conn.sock = sock
        conn.request("GET", f"/v1/files/{e_old.sha256}")
        resp = conn.getresponse()
        head = resp.read(1 << 20)
        e_new = entry_for(tmp_path, "pi", "m", new, 5.0)  # os.replace over the file being sent
        wait_for_manifest(url, publish(tmp_path, "pi", [e_new]))
        assert request(url, f"/v1/files/{e_old.sha256}").status == 404
        assert request(url, "/v1/devices/pi/resolve?budget=10ms").json()["entry"]["sha256"] == e_new.sha256
        body = head + resp.read()
        conn.close()
    assert len(body) == len(old) and sha(body) == e_old.sha256


def test_downloads_during_repeated_publishing_are_never_torn(tmp_path):
    """A publisher keeps replacing files and manifests while clients resolve and download;
    every 200 body must be exactly the entry resolved (hash = ETag = entry's sha256)."""
    sizes = (700_000, 400_000)

    def version(k: int):
        return [entry_for(tmp_path, "pi", f"m{i}", random_bytes(sizes[i], 100 * k + i), 3.0 + 5 * i, 0.5 + 0.1 * i)
                for i in range(2)]

    publish(tmp_path, "pi", version(0))
    stop = threading.Event()
    outcomes: list[tuple[str, int]] = []
    bad: list[str] = []

    def client(budget: str) -> None:
        while not stop.is_set():
            resolved = request(url, f"/v1/devices/pi/resolve?budget={budget}")
            if resolved.status != 200:  # 503/422 while files are replaced ahead of their manifest
                outcomes.append((budget, resolved.status))
                if resolved.status not in (422, 503):
                    bad.append(f"resolve: status {resolved.status}")
                continue
            entry = resolved.json()["entry"]
            reply = request(url, entry["url"])
            outcomes.append((budget, reply.status))
            if reply.status == 200:
                if not (sha(reply.body) == entry["sha256"] == reply.headers["etag"].strip('"')
                        and len(reply.body) == entry["size_bytes"]):
                    bad.append(f"{entry['subnet']}: body {sha(reply.body)[:12]} for {entry['sha256'][:12]}")
            elif reply.status not in (404, 503):  # republished between resolve and download
                bad.append(f"status {reply.status}: {reply.body[:200]!r}")

    with serving(tmp_path) as url:
        threads = [threading.Thread(target=client, args=(b,)) for b in ("5ms", "20ms", "5ms", "20ms")]
        for t in threads:
            t.start()
        last = None
        for k in range(1, 13):
            last = publish(tmp_path, "pi", version(k))
            wait_for(lambda: sum(status == 200 for _, status in outcomes) >= 2 * k)
        wait_for_manifest(url, last)
        stop.set()
        for t in threads:
            t.join(30)
        final = request(url, "/v1/devices/pi").json()["files"]
    assert bad == []
    assert sum(status == 200 for _, status in outcomes) >= 20, outcomes
    assert {f["sha256"] for f in final} == {e.sha256 for e in version(12)}


def test_unverified_entries_are_never_offered(tmp_path):
    good = entry_for(tmp_path, "pi", "good", b"fine", 9.0, accuracy=0.5)
    bad = entry_for(tmp_path, "pi", "bad", b"published", 1.0, accuracy=0.9)
    (tmp_path / bad.path).write_bytes(b"tampered")
    publish(tmp_path, "pi", [good, bad])
    with serving(tmp_path) as url:
        assert request(url, "/v1/devices/pi/resolve?budget=20ms").json()["entry"]["subnet"] == "good"
        assert request(url, f"/v1/files/{bad.sha256}").status == 404
        health = request(url, "/v1/health").json()
        assert [x["path"] for x in health["excluded"]] == ["pi/bad.onnx"]
        assert [f["subnet"] for f in request(url, "/v1/devices/pi").json()["files"]] == ["good"]
        (tmp_path / bad.path).write_bytes(b"published")  # the real file arrives: served without a new manifest
        wait_for(lambda: request(url, "/v1/health").json()["excluded"] == [])
        assert request(url, "/v1/devices/pi/resolve?budget=20ms").json()["entry"]["subnet"] == "bad"
        assert request(url, f"/v1/files/{bad.sha256}").body == b"published"
        (tmp_path / good.path).unlink()
        (tmp_path / bad.path).unlink()
        wait_for(lambda: request(url, "/v1/health").json()["files"] == 0)
        empty = request(url, "/v1/devices/pi/resolve?budget=20ms")
        assert empty.status == 503 and empty.headers["retry-after"] == "1"


def test_every_answer_releases_its_file_descriptor(tmp_path):
    """304, HEAD, 416, ranges, whole files and downloads abandoned half-way by the client
    all close the file they opened (the server runs in this process: count our fds)."""
    e = entry_for(tmp_path, "pi", "m", random_bytes(8 << 20, 5), 5.0)
    publish(tmp_path, "pi", [e])
    target = f"/v1/files/{e.sha256}"

    def open_fds() -> int:
        return len(os.listdir("/proc/self/fd"))

    with serving(tmp_path) as url:
        host, port = urllib.parse.urlsplit(url).hostname, urllib.parse.urlsplit(url).port
        assert request(url, target).status == 200  # warm up thread pools and connections
        baseline = open_fds()
        for _ in range(5):
            assert request(url, target, {"If-None-Match": f'"{e.sha256}"'}).status == 304
            assert request(url, target, method="HEAD").status == 200
            assert request(url, target, {"Range": f"bytes={8 << 20}-"}).status == 416
            assert request(url, target, {"Range": "bytes=5-9"}).status == 206
            assert request(url, target).status == 200
        for _ in range(5):  # abandoned downloads
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
            sock.connect((host, port))
            conn = http.client.HTTPConnection(host, port, timeout=30)
            conn.sock = sock
            conn.request("GET", target)
            assert len(conn.getresponse().read(100_000)) == 100_000
            conn.close()
        wait_for(lambda: open_fds() <= baseline)
        assert request(url, target).status == 200
