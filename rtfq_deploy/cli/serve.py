"""``rtfq-serve DIST_DIR``: serve the per-device model files that ``rtfq-bench select`` wrote."""

from __future__ import annotations

import logging
from pathlib import Path

import click

from rtfq_deploy.cli.common import Command


@click.command(cls=Command, context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("dist_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", type=click.IntRange(0, 65535), default=8080, show_default=True,
              help="Port to listen on; 0 picks a free one (printed at start).")
@click.option("--poll", "poll_s", type=click.FloatRange(0.05, 60), default=0.5, show_default=True,
              help="Seconds between checks for a republished manifest.json.")
@click.option("--max-connections", type=click.IntRange(1), default=1024, show_default=True,
              help="Concurrent connections; beyond it requests get 503.")
@click.option("--max-header-bytes", type=click.IntRange(1024, 1 << 20), default=16 * 1024, show_default=True,
              help="Most bytes of request headers; larger requests are refused (431, or 400 from h11).")
@click.option("--access-log", is_flag=True, help="Log every request.")
@click.option("-v", "--verbose", is_flag=True, help="Log manifest reloads and details.")
def serve(dist_dir: Path, host: str, port: int, poll_s: float, max_connections: int, max_header_bytes: int,
          access_log: bool, verbose: bool) -> None:
    """Serve DIST_DIR over HTTP: devices resolve a budget to a model file and download it
    by its sha256 (ETag, Range resume). A republished manifest.json is picked up without
    a restart; only manifest entries whose file matches its sha256 are served.

    API: GET /v1/health, /v1/devices, /v1/devices/NAME, /v1/devices/NAME/resolve?budget=20ms,
    /v1/files/SHA256, /v1/openapi.json.
    """
    import uvicorn

    from rtfq_deploy.serve.app import ServeConfig, build_app
    from rtfq_deploy.serve.runner import base_url, bind, uvicorn_config
    from rtfq_deploy.serve.store import Store

    logging.basicConfig(level=logging.INFO if (verbose or access_log) else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = ServeConfig(dist_dir=dist_dir, host=host, port=port, poll_interval_s=poll_s,
                         limit_concurrency=max_connections, max_header_bytes=max_header_bytes, access_log=access_log)
    store = Store(dist_dir)  # a missing directory or malformed manifest stops here, with one line
    snap = store.snapshot
    sock = bind(host, port)
    click.echo(f"rtfq-serve: {store.root} on {base_url(sock)} ({len(snap.devices)} devices, {len(snap.files)} files, "
               f"{len(snap.excluded)} entries excluded)", nl=True)
    for ex in snap.excluded:
        click.echo(f"  not serving {ex.path} ({ex.device}): {ex.reason}", err=True)
    server = uvicorn.Server(uvicorn_config(config, build_app(config, store)))
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
