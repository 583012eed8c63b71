"""Hostile requests over real HTTP: only verified manifest files, by hash, ever leave the server."""

from __future__ import annotations

import hashlib
import os
import re
import socket
import urllib.parse

import pytest

from rtfq_deploy import manifest as mf
from tests.fixtures.dist import entry_for, request, serving

SECRET = b"TOP-SECRET outside DIST_DIR"


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("sec")
    dist, outside = root / "dist", root / "outside"
    outside.mkdir()
    (outside / "secret.onnx").write_bytes(SECRET)
    model = entry_for(dist, "pi", "model", b"the model bytes", 5.0)
    # A forged manifest: a symlink inside DIST_DIR to a file outside, with its right hash,
    # and a device directory that is itself a symlink out.
    os.symlink(outside / "secret.onnx", dist / "pi" / "leak.onnx")
    os.symlink(outside, dist / "evil")
    leak = entry_for(dist, "pi", "leak", SECRET, 1.0, write=False)
    evil = entry_for(dist, "evil", "secret", SECRET, 1.0, write=False)
    mf.write_manifest(dist, mf.Manifest({"pi": mf.Device({}, (model, leak)), "evil": mf.Device({}, (evil,))}))
    with serving(dist) as url:
        yield url, dist, model


def _raw(url: str, payload: bytes) -> bytes:
    """Send bytes as they are and return everything the server answers."""
    parts = urllib.parse.urlsplit(url)
    chunks = []
    with socket.create_connection((parts.hostname, parts.port), timeout=10) as s:
        try:
            s.sendall(payload)
            while chunk := s.recv(65536):
                chunks.append(chunk)
        except (ConnectionResetError, BrokenPipeError):  # refused while we were still sending
            pass
    return b"".join(chunks)


def _assert_nothing_leaks(reply) -> None:
    assert SECRET not in reply.body and b'"format": "rtfq-manifest"' not in reply.body
    assert b"pi/model.onnx" not in reply.body and b"the model bytes" not in reply.body


SECRET_SHA = hashlib.sha256(SECRET).hexdigest()
TRAVERSALS = [
    "/v1/files/../manifest.json", "/v1/files/..%2fmanifest.json", "/v1/files/%2e%2e%2fmanifest.json",
    "/v1/files/%2e%2e/%2e%2e/etc/passwd", "/v1/files/%252e%252e%252fmanifest.json", "/v1/files/%252e%252e/manifest.json",
    "/v1/files/..%5c..%5cmanifest.json", "/v1/files/%2fetc%2fpasswd", "/v1/files//etc/passwd", "//etc/passwd",
    "/etc/passwd", "/manifest.json", "/pi/model.onnx", "/v1/pi/model.onnx", "/v1/files/pi/model.onnx",
    "/v1/files/pi%2fmodel.onnx", "/v1/files/" + "%00" * 3, f"/v1/files/{SECRET_SHA}", f"/v1/files/{SECRET_SHA.upper()}",
    f"/v1/files/{SECRET_SHA}/../manifest.json", "/v1/files/" + "a" * 63, "/v1/files/" + "a" * 65,
    "/v1/devices/..%2f..%2fetc", "/v1/devices/%2e%2e", "/v1/devices/.hidden/resolve?budget=1ms",
]


@pytest.mark.parametrize("target", TRAVERSALS)
def test_traversal_and_unlisted_targets_get_404(served, target):
    url, dist, _ = served
    reply = request(url, target)
    assert reply.status == 404, (target, reply.status, reply.body)
    assert reply.headers["content-type"] == "application/json"
    _assert_nothing_leaks(reply)


@pytest.mark.parametrize("target", ["/", "/v1", "/v1/", "/v1/files", "/v1/files/", "/pi/", "/v1/devices/", "/evil/"])
def test_no_directory_listing(served, target):
    url, dist, _ = served
    reply = request(url, target)
    assert reply.status == 404 and reply.json() == {"error": "not found"}, target
    _assert_nothing_leaks(reply)


def test_symlinks_out_of_dist_dir_are_not_served_even_with_the_right_hash(served):
    url, _, model = served
    excluded = {(x["device"], x["path"]): x["reason"] for x in request(url, "/v1/health").json()["excluded"]}
    assert excluded == {("pi", "pi/leak.onnx"): "resolves outside DIST_DIR",
                        ("evil", "evil/secret.onnx"): "resolves outside DIST_DIR"}
    assert request(url, f"/v1/files/{SECRET_SHA}").status == 404
    assert request(url, "/v1/devices/evil").json()["files"] == []
    assert request(url, "/v1/devices/pi/resolve?budget=100ms").json()["entry"]["sha256"] == model.sha256


def test_absolute_form_and_odd_request_targets(served):
    url, _, model = served
    for target in [b"http://127.0.0.1/etc/passwd", b"file:///etc/passwd", b"*",
                   f"http://example.org/v1/files/{SECRET_SHA}".encode()]:
        answer = _raw(url, b"GET " + target + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        status = int(answer.split(b" ", 2)[1])
        assert status in (400, 404), (target, answer[:200])
        assert SECRET not in answer
    # The real file is reachable by its hash, and only so.
    assert request(url, f"/v1/files/{model.sha256}").body == b"the model bytes"


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE", "PROPFIND"])
def test_only_get_and_head_are_allowed(served, method):
    url, _, model = served
    reply = request(url, f"/v1/files/{model.sha256}", method=method)
    assert reply.status == 405 and reply.headers["allow"] == "GET, HEAD"
    assert b"the model bytes" not in reply.body


def test_request_bodies_are_refused(served):
    url, _, model = served
    reply = request(url, f"/v1/files/{model.sha256}", body=b"x" * 10, headers={"Content-Length": "10"})
    assert reply.status == 413 and reply.headers["connection"] == "close"
    chunked = _raw(url, b"GET /v1/health HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n")
    assert chunked.startswith(b"HTTP/1.1 413 ")


def test_oversize_requests_are_refused_and_the_server_keeps_serving(served):
    url, _, model = served
    for size in (17_000, 40_000, 60_000, 2_000_000):  # under and over what h11 buffers whole
        big_header = _raw(url, b"GET /v1/health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * size + b"\r\n\r\n")
        assert re.match(rb"HTTP/1.1 (400|431) ", big_header) or big_header == b"", (size, big_header[:100])
    many_headers = _raw(url, b"GET /v1/health HTTP/1.1\r\nHost: x\r\n" + b"X-A: b\r\n" * 150 + b"\r\n")
    assert many_headers.startswith(b"HTTP/1.1 431 ")
    fine = _raw(url, b"GET /v1/health HTTP/1.1\r\nHost: x\r\nConnection: close\r\nX-Ok: " + b"a" * 8000 + b"\r\n\r\n")
    assert fine.startswith(b"HTTP/1.1 200 ")
    long_query = request(url, "/v1/devices/pi/resolve?budget=" + "1" * 3000 + "ms")
    assert long_query.status == 414
    long_path = request(url, "/v1/files/" + "a" * 5000)
    assert long_path.status == 414
    garbage = _raw(url, b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + os.urandom(64) + b"\r\n\r\n")
    assert garbage.startswith(b"HTTP/1.1 400 ") or garbage == b""
    assert request(url, f"/v1/files/{model.sha256}").body == b"the model bytes"


def test_dist_dir_is_never_written(served):
    url, dist, model = served
    before = sorted((p.relative_to(dist), p.lstat().st_mtime_ns) for p in dist.rglob("*"))
    for target in [f"/v1/files/{model.sha256}", "/v1/health", "/v1/devices/pi/resolve?budget=1ms"]:
        request(url, target)
    for method in ("PUT", "POST", "DELETE"):
        request(url, "/pi/model.onnx", method=method, body=b"overwrite", headers={"Content-Length": "9"})
    assert sorted((p.relative_to(dist), p.lstat().st_mtime_ns) for p in dist.rglob("*")) == before
