"""``rtfq-serve DIST_DIR``: serve the per-device model files that ``rtfq-bench select`` wrote."""

from __future__ import annotations

import logging
from pathlib import Path

import click

from rtfq_deploy.cli.common import BoundedInt, Command, FiniteFloat


@click.command(cls=Command, context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("dist_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", type=BoundedInt(0, 65535), default=8080, show_default=True,
              help="Port to listen on; 0 picks a free one (printed at start).")
@click.option("--poll", "poll_s", type=FiniteFloat(0.05, 60), default=0.5, show_default=True,
              help="Seconds between checks for a republished manifest.json.")
@click.option("--max-connections", type=BoundedInt(1, 65535), default=1024, show_default=True,
              help="Open connections; at the limit a new one closes the oldest idle one, and requests "
                   "beyond it that all wait for answers get 503.")
@click.option("--max-client-connections", type=BoundedInt(1, 65535), default=64, show_default=True,
              help="Open connections per client address; more are closed at once (raise it when many "
                   "devices share one address, e.g. behind NAT).")
@click.option("--header-timeout", "header_timeout_s", type=FiniteFloat(0.5, 300), default=10.0, show_default=True,
              help="Seconds a connection has to send its complete request headers; then it is closed.")
@click.option("--max-header-bytes", type=BoundedInt(1024, 1 << 20), default=16 * 1024, show_default=True,
              help="Most bytes of request headers; larger requests are refused (431, or 400 from h11).")
@click.option("--token-file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Require 'Authorization: Bearer <token>' for everything but /v1/health and /v1/openapi.json; "
                   "one token per line ('#' comments), re-read when the file changes.")
@click.option("--certfile", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="TLS certificate chain (PEM): serve https. Needs --keyfile.")
@click.option("--keyfile", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="TLS private key (PEM) of --certfile.")
@click.option("--candidates", "candidates_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Offer this folder of exported subnets (rtfq-export --all) to devices for measuring "
                   "(GET /v1/candidates); devices upload their results and get their own choices (rtfq enroll).")
@click.option("--accuracy", "accuracy_file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="The candidates' accuracy table (rtfq eval); choices rank by its top-1.")
@click.option("--budget", "budgets", multiple=True, metavar="BUDGET",
              help="A budget every enrolled device gets a choice for, repeatable (as for rtfq-bench select); "
                   "a device adds its own with rtfq enroll --budget.")
@click.option("--device-token-file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Lines of '<device> <token>': who may upload results for which device (POST "
                   "/v1/devices/NAME/results); re-read when the file changes.")
@click.option("--max-upload-bytes", type=BoundedInt(1024, 1 << 30), default=4 << 20, show_default=True,
              help="Largest results upload accepted.")
@click.option("--upload-interval", "upload_interval_s", type=FiniteFloat(0, 86400), default=10.0, show_default=True,
              help="Seconds a device must wait between two accepted uploads (per server process).")
@click.option("--access-log", is_flag=True, help="Log every request.")
@click.option("-v", "--verbose", is_flag=True, help="Log manifest reloads and details.")
def serve(dist_dir: Path, host: str, port: int, poll_s: float, max_connections: int, max_client_connections: int,
          header_timeout_s: float, max_header_bytes: int, token_file: Path | None, certfile: Path | None,
          keyfile: Path | None, candidates_dir: Path | None, accuracy_file: Path | None, budgets: tuple[str, ...],
          device_token_file: Path | None, max_upload_bytes: int, upload_interval_s: float, access_log: bool,
          verbose: bool) -> None:
    """Serve DIST_DIR over HTTP: devices resolve a budget to a model file and download it
    by its sha256 (ETag, Range resume). A republished manifest.json is picked up without
    a restart; only manifest entries whose file matches its sha256 are served.

    With --candidates, devices measure the offered subnets themselves (rtfq enroll) and
    upload the results; the server chooses for each device and publishes its entries.

    API: GET /v1/health, /v1/devices, /v1/devices/NAME, /v1/devices/NAME/resolve?budget=20ms,
    /v1/files/SHA256, /v1/candidates, /v1/candidates/FILE, POST /v1/devices/NAME/results,
    /v1/openapi.json.
    """
    if (certfile is None) != (keyfile is None):
        raise click.UsageError("--certfile and --keyfile go together: give both for https, or neither")
    if candidates_dir is None and (accuracy_file or budgets or device_token_file):
        raise click.UsageError("--accuracy, --budget and --device-token-file go with --candidates")
    from rtfq_deploy.budget import parse_budget

    for text in budgets:
        parse_budget(text)  # a typo is one line now, not a refused upload later
    if candidates_dir is not None:
        dist_dir.mkdir(parents=True, exist_ok=True)  # DIST_DIR may start empty: uploads fill it

    from rtfq_deploy.serve.app import ServeConfig, build_app
    from rtfq_deploy.serve.devices import UploadConfig
    from rtfq_deploy.serve.runner import Server, base_url, bind, check_tls, uvicorn_config
    from rtfq_deploy.serve.store import Store

    logging.basicConfig(level=logging.INFO if (verbose or access_log) else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    max_connections = _fit_open_file_limit(max_connections)
    config = ServeConfig(dist_dir=dist_dir, host=host, port=port, poll_interval_s=poll_s,
                         limit_concurrency=max_connections, max_client_connections=max_client_connections,
                         header_timeout_s=header_timeout_s, max_header_bytes=max_header_bytes,
                         token_file=token_file, certfile=certfile, keyfile=keyfile, access_log=access_log,
                         candidates_dir=candidates_dir, accuracy_file=accuracy_file,
                         device_token_file=device_token_file,
                         upload=UploadConfig(budgets=budgets, max_bytes=max_upload_bytes,
                                             min_interval_s=upload_interval_s))
    store = Store(dist_dir)  # a missing directory or malformed manifest stops here, with one line
    app = build_app(config, store)  # so does an empty or unreadable token file
    if certfile is not None and keyfile is not None:
        check_tls(certfile, keyfile)
    snap = store.snapshot
    sock = bind(host, port)
    extras = ", bearer tokens required" if token_file is not None else ""
    if candidates_dir is not None:
        extras += f", candidates from {candidates_dir}" + (", uploads on" if device_token_file else "")
    click.echo(f"rtfq-serve: {store.root} on {base_url(sock, config.tls)} ({len(snap.devices)} devices, "
               f"{len(snap.files)} files, {len(snap.excluded)} entries excluded{extras})", nl=True)
    for ex in snap.excluded:
        click.echo(f"  not serving {ex.path} ({ex.device}): {ex.reason}", err=True)
    server = Server(uvicorn_config(config, app))
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
    if server.interrupted:  # Command turns it into "Aborted." and exit 130
        raise KeyboardInterrupt


def _fit_open_file_limit(max_connections: int) -> int:
    """Each connection holds a socket and, while downloading, a file: if the process may
    not open that many, accept() fails before any limit of ours applies and nobody gets
    in. Raise the soft limit as far as the hard one allows, else lower the connection
    limit (with a warning) so that it, not the open-file limit, is what a flood meets."""
    try:
        import resource
    except ImportError:  # not Unix
        return max_connections
    need = 2 * max_connections + 64
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < need:
        target = need if hard == resource.RLIM_INFINITY else min(need, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    if soft != resource.RLIM_INFINITY and soft < need:
        fitted = max(1, (soft - 64) // 2)
        click.echo(f"rtfq-serve: --max-connections lowered from {max_connections} to {fitted} to fit the "
                   f"open-file limit ({soft}; raise it with ulimit -n)", err=True)
        return fitted
    return max_connections
