"""Running the app on uvicorn: from the CLI (main thread, signals) or in a thread (tests)."""

from __future__ import annotations

import contextlib
import signal
import socket
import ssl
import threading
import time
from pathlib import Path
from types import FrameType
from typing import Iterator

import uvicorn
from starlette.types import ASGIApp

from rtfq_deploy.errors import RtfqError
from rtfq_deploy.serve.app import ServeConfig
from rtfq_deploy.serve.protocol import guarded_h11

BACKLOG = 2048


def uvicorn_config(config: ServeConfig, app: ASGIApp) -> uvicorn.Config:
    """Pinned protocol choices (h11 with the connection limits of
    :mod:`~rtfq_deploy.serve.protocol`, asyncio) so limits behave the same on every install."""
    tls = {"ssl_certfile": str(config.certfile), "ssl_keyfile": str(config.keyfile)} if config.tls else {}
    protocol = guarded_h11(config.header_timeout_s, config.max_client_connections, config.limit_concurrency)
    return uvicorn.Config(
        app, http=protocol, loop="asyncio", ws="none", lifespan="on", interface="asgi3",
        log_config=None, access_log=config.access_log, server_header=False,
        limit_concurrency=config.limit_concurrency, backlog=BACKLOG,
        h11_max_incomplete_event_size=config.max_header_bytes,
        timeout_keep_alive=5, timeout_graceful_shutdown=5, **tls,
    )


class Server(uvicorn.Server):
    """uvicorn re-raises the SIGINT it stopped on, but that is lost where the process
    started with SIGINT ignored (``nohup rtfq-serve ... &``) or where asyncio's runner
    takes it as a cancellation of a task that has already finished: the process then
    exits 0. Recording it here lets the CLI exit 130 on every Ctrl-C."""

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.interrupted = False

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self.interrupted = self.interrupted or sig == signal.SIGINT
        super().handle_exit(sig, frame)


def check_tls(certfile: Path, keyfile: Path) -> None:
    """Load the certificate and key once before binding, so a wrong path, a bad PEM or a
    key that does not match is one RtfqError line rather than a traceback from uvicorn."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(certfile, keyfile)
    except FileNotFoundError as e:
        raise RtfqError(f"cannot read {e.filename or certfile}: no such file") from None
    except ssl.SSLError as e:
        raise RtfqError(f"cannot use --certfile {certfile} with --keyfile {keyfile}: {e.reason or e}") from None
    except OSError as e:
        raise RtfqError(f"cannot read {e.filename or certfile}: {e.strerror or e}") from None


def bind(host: str, port: int) -> socket.socket:
    """A listening socket (port 0: any free port), bound before the server starts so the
    caller can announce the real address."""
    if not host or len(host) > 253:
        raise RtfqError(f"--host {host!r} is not a host name or address")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise RtfqError(f"cannot resolve host {host!r}: {e.strerror}") from None
    except (UnicodeError, ValueError, OverflowError):  # a NUL, a label over 63 characters, a bad port
        raise RtfqError(f"--host {host!r} is not a host name or address") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(BACKLOG)
    except OSError as e:
        sock.close()
        raise RtfqError(f"cannot listen on {host}:{port}: {e.strerror}") from None
    return sock


def base_url(sock: socket.socket, tls: bool = False) -> str:
    scheme = "https" if tls else "http"
    host, port = sock.getsockname()[:2]
    return f"{scheme}://[{host}]:{port}" if ":" in host else f"{scheme}://{host}:{port}"


@contextlib.contextmanager
def running_in_thread(config: ServeConfig, app: ASGIApp, timeout_s: float = 30.0) -> Iterator[str]:
    """Serve ``app`` on ``config.host`` (any free port) in a daemon thread; yields the base URL."""
    sock = bind(config.host, 0)
    server = uvicorn.Server(uvicorn_config(config, app))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + timeout_s
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("server thread did not start")
            time.sleep(0.01)
        yield base_url(sock, config.tls)
    finally:
        server.should_exit = True
        thread.join(timeout_s)
        sock.close()
