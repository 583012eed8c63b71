"""Bearer tokens and TLS, end to end over loopback: the server, ``rtfq fetch``, and both
commands as real processes with a certificate made at test time."""

from __future__ import annotations

import json
import os
import ssl
import subprocess
import sys
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from rtfq_deploy.errors import RtfqError
from rtfq_deploy.fetch import FetchConfig, fetch
from tests.fixtures.dist import entry_for, publish, request, serving, sha
from tests.fixtures.tls import make_tls
from tests.test_cli import _one_line_error, _run
from tests.test_cli_serve import rtfq_serve

TOKEN, OTHER = "tok-" + "a1" * 16, "tok-" + "b2" * 16


@pytest.fixture
def dist(tmp_path):
    dist = tmp_path / "dist"
    entry = entry_for(dist, "pi", "m", b"the model bytes" * 1000, 5.0)
    publish(dist, "pi", [entry])
    tokens = tmp_path / "tokens.txt"
    tokens.write_text(f"# devices of the lab\n\n  {TOKEN}  \n{OTHER}\n")
    return dist, entry, tokens


def _replace(path, text: str) -> None:
    """Rewrite a file as an editor that saves by rename does (a new inode)."""
    tmp = path.with_name(path.name + ".new")
    tmp.write_text(text)
    os.replace(tmp, path)


def _get(url: str, target: str, token: str | None = None):
    return request(url, target, {"Authorization": f"Bearer {token}"} if token else None)


def test_protected_routes_need_a_listed_token_and_follow_the_file(dist, tmp_path):
    root, entry, tokens = dist
    out = tmp_path / "m.onnx"
    with serving(root, token_file=tokens) as url:
        assert _get(url, "/v1/health").json()["status"] == "ok"
        assert _get(url, "/v1/openapi.json").status == 200
        protected = ["/v1/devices", "/v1/devices/pi", "/v1/devices/pi/resolve?budget=10ms",
                     f"/v1/files/{entry.sha256}", "/v1/files/" + "0" * 64, "/v1/unknown", "/"]
        for target in protected:
            missing, wrong = _get(url, target), _get(url, target, "tok-" + "a1" * 15 + "a2")
            assert missing.status == wrong.status == 401, target
            assert missing.headers["www-authenticate"] == 'Bearer realm="rtfq-serve"'
            assert wrong.headers["www-authenticate"] == 'Bearer realm="rtfq-serve", error="invalid_token"'
            assert "error" in missing.json() and missing.headers["x-content-type-options"] == "nosniff"
            assert b"the model bytes" not in missing.body + wrong.body
        assert _get(url, "/v1/devices", TOKEN).status == _get(url, "/v1/devices", OTHER).status == 200
        assert _get(url, f"/v1/files/{entry.sha256}", OTHER).body == b"the model bytes" * 1000
        assert request(url, "/v1/devices", {"Authorization": f"bearer {TOKEN}"}).status == 200  # scheme: any case
        for header in (TOKEN, f"Basic {TOKEN}", f"Bearer {TOKEN} extra", "Bearer"):
            assert request(url, "/v1/devices", {"Authorization": header}).status == 401, header

        with pytest.raises(RtfqError, match="needs Authorization: Bearer.*--token-file or RTFQ_TOKEN"):
            fetch(FetchConfig(url, "pi", "10ms", out, retries=0))
        assert fetch(FetchConfig(url, "pi", "10ms", out, retries=0, token=TOKEN)).entry["sha256"] == entry.sha256

        _replace(tokens, f"{OTHER}\n")  # TOKEN revoked, without a restart
        assert _get(url, "/v1/devices", TOKEN).status == 401 and _get(url, "/v1/devices", OTHER).status == 200
        with pytest.raises(RtfqError, match="the token was refused"):
            fetch(FetchConfig(url, "pi", "10ms", out, retries=0, token=TOKEN, force=True))
        tokens.unlink()  # fails closed, and says so
        assert _get(url, "/v1/devices", OTHER).status == 401
        health = _get(url, "/v1/health").json()
        assert health["status"] == "degraded" and "token file" in health["auth_error"] and str(tokens) not in health[
            "auth_error"]
        tokens.write_text(f"{TOKEN}\n")
        assert _get(url, "/v1/devices", TOKEN).status == 200 and _get(url, "/v1/health").json()["status"] == "ok"


def test_https_with_a_private_ca(dist, tmp_path):
    root, entry, _ = dist
    tls = make_tls(tmp_path / "tls")
    out = tmp_path / "m.onnx"
    with serving(root, certfile=tls.cert, keyfile=tls.key) as url:
        assert url.startswith("https://127.0.0.1:")
        result = fetch(FetchConfig(url, "pi", "10ms", out, retries=0, cafile=tls.ca))
        assert sha(out.read_bytes()) == entry.sha256 and result.downloaded == entry.size_bytes
        out.unlink()
        for cafile in (None, tls.other_ca):  # the system's CAs, or the wrong private CA, do not vouch for it
            with pytest.raises(RtfqError, match="cannot trust 127.0.0.1:.*certificate.*--cafile"):
                fetch(FetchConfig(url, "pi", "10ms", out, retries=0, cafile=cafile))
        with pytest.raises(RtfqError, match="applies to an https:// server only"):
            fetch(FetchConfig(url.replace("https", "http"), "pi", "10ms", out, retries=0, cafile=tls.ca))
        plain = urllib.parse.urlsplit(url)
        with pytest.raises(RtfqError):  # plain http to the TLS port: refused, one line
            fetch(FetchConfig(f"http://{plain.netloc}", "pi", "10ms", out, retries=0))
    assert not out.exists() and not list(tmp_path.glob("m.onnx.*.part"))


def test_serve_and_fetch_commands_with_tls_and_tokens(dist, tmp_path):
    """``rtfq-serve --token-file --certfile --keyfile`` and ``rtfq fetch --cafile`` with
    ``--token-file`` or ``RTFQ_TOKEN``, as real processes."""
    root, entry, tokens = dist
    tls = make_tls(tmp_path / "tls")
    out = tmp_path / "device" / "m.onnx"
    client_token = tmp_path / "client-token"
    client_token.write_text(f"{TOKEN}\n")
    with rtfq_serve(str(root), "--token-file", str(tokens), "--certfile", str(tls.cert), "--keyfile",
                    str(tls.key)) as (url, _):
        assert url.startswith("https://127.0.0.1:")
        base = ["rtfq", "fetch", "--server", url, "--device", "pi", "--budget", "10ms", "-o", str(out)]
        _one_line_error(_run(*base, "--cafile", str(tls.ca)), "--token-file or RTFQ_TOKEN")
        _one_line_error(_run(*base, "--token-file", str(client_token)), "--cafile")
        ok = _run(*base, "--cafile", str(tls.ca), "--token-file", str(client_token))
        assert ok.returncode == 0, ok.stderr
        assert sha(out.read_bytes()) == entry.sha256
        _replace(tokens, f"{OTHER}\n")  # the running server picks the change up
        _one_line_error(_run(*base, "--cafile", str(tls.ca), "--token-file", str(client_token), "--force"),
                        "the token was refused")
        env_run = _run_env({"RTFQ_TOKEN": OTHER}, *base, "--cafile", str(tls.ca))
        assert env_run.returncode == 0 and "up to date" in env_run.stdout, env_run.stderr


def _run_env(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).parent / args[0]
    return subprocess.run([str(exe), *args[1:]], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **env})


def test_tls_start_errors_are_one_line_and_health_is_https(tmp_path):
    tls = make_tls(tmp_path / "tls")
    (tmp_path / "dist").mkdir()
    other_key = make_tls(tmp_path / "other").key
    _one_line_error(_run("rtfq-serve", str(tmp_path / "dist"), "--certfile", str(tls.cert), "--keyfile",
                         str(other_key), "--port", "0"), "cannot use --certfile")
    with rtfq_serve(str(tmp_path / "dist"), "--certfile", str(tls.cert), "--keyfile", str(tls.key)) as (url, _):
        context = ssl.create_default_context(cafile=str(tls.ca))
        with urllib.request.urlopen(f"{url}/v1/health", context=context, timeout=30) as reply:
            assert json.loads(reply.read())["status"] == "ok"


def test_fetch_warns_before_a_token_crosses_plain_http_to_another_host():
    """Only the decision is tested (no traffic leaves loopback): https and this machine are fine."""
    from rtfq_deploy.cli.fetch import _plain_http_off_host

    assert _plain_http_off_host("http://models.example:8080") and _plain_http_off_host("http://192.0.2.7")
    for quiet in ("https://models.example", "http://127.0.0.1:8080", "http://localhost:1", "http://[::1]:80"):
        assert not _plain_http_off_host(quiet), quiet
