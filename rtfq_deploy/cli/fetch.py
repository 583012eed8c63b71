"""``rtfq fetch``: download the model file a server chooses for this device and budget."""

from __future__ import annotations

import os
from pathlib import Path

import click

from rtfq_deploy.cli.common import BoundedInt, Command, FiniteFloat, cafile_option
from rtfq_deploy.formats import RUNTIMES

TOKEN_ENV = "RTFQ_TOKEN"


def _server_url(ctx: click.Context, param: click.Parameter, value: str) -> str:
    from rtfq_deploy.errors import RtfqError
    from rtfq_deploy.fetch import check_server_url

    try:
        return check_server_url(value)
    except RtfqError as e:
        raise click.BadParameter(str(e)) from None


@click.command(cls=Command, short_help="Download the model file a server chooses for this device and budget.")
@click.option("--server", required=True, metavar="URL", callback=_server_url,
              help="Base URL of an rtfq-serve, e.g. http://10.0.0.2:8080 or https://models.lan:8443.")
@click.option("--device", required=True, metavar="NAME", help="This device's name in the server's manifest.")
@click.option("--budget", required=True, metavar="BUDGET",
              help="Limits that must all hold, as for rtfq-bench select: 20ms, latency=20ms,memory=64MB, size=8MB.")
@click.option("--runtime", type=click.Choice(RUNTIMES), default=None,
              help="The runtime this device runs the model on; without it, the server picks the best entry over "
                   "the runtimes the device has (the output line names it).")
@click.option("-o", "--output", "out", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Where to write the model file.")
@click.option("--force", is_flag=True, help="Replace OUTPUT if it holds a different file.")
@click.option("--timeout", "timeout_s", type=FiniteFloat(0.1, 3600), default=30.0, show_default=True,
              help="Seconds any one network step may wait (connecting, each read) before the attempt is retried.")
@click.option("--deadline", "deadline_s", type=FiniteFloat(1, 86400), default=600.0, show_default=True,
              help="Seconds one attempt (the resolve, or one download) may take in all, however the server trickles "
                   "its bytes; a download cut by it is resumed by the next attempt.")
@click.option("--retries", type=BoundedInt(0, 100), default=3, show_default=True,
              help="Resumptions after a dropped connection before giving up (a later run resumes too).")
@click.option("--token-file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help=f"File holding the bearer token (its first token line) for a server run with --token-file; "
                   f"without it, the {TOKEN_ENV} environment variable is used if set.")
@cafile_option
def fetch(server: str, device: str, budget: str, runtime: str | None, out: Path, force: bool, timeout_s: float,
          deadline_s: float, retries: int, token_file: Path | None, cafile: Path | None) -> None:
    """Resolve BUDGET on the server, download the chosen file (resuming a partial
    download), check its sha256 and move it into place atomically. Nothing is
    downloaded when OUTPUT already holds the chosen file; an OUTPUT that is not a
    regular file (a folder, a device, a FIFO) is refused even with --force."""
    from rtfq_deploy.fetch import FetchConfig
    from rtfq_deploy.fetch import fetch as run_fetch
    from rtfq_deploy.tokens import check_token, read_token_file

    if token_file is not None:
        token: str | None = read_token_file(token_file)[0]
    elif os.environ.get(TOKEN_ENV):
        token = check_token(os.environ[TOKEN_ENV].strip(), f"the {TOKEN_ENV} environment variable")
    else:
        token = None
    if token is not None and _plain_http_off_host(server):
        click.echo("Warning: sending the bearer token over plain http to another host; anyone on the path can "
                   "read it (serve with --certfile/--keyfile and fetch from https://)", err=True)
    result = run_fetch(FetchConfig(server=server, device=device, budget=budget, out=out, force=force,
                                   timeout_s=timeout_s, retries=retries, token=token, cafile=cafile, runtime=runtime,
                                   deadline_s=deadline_s))
    entry = result.entry
    what = (f"{result.reason}; for {entry.get('runtime', 'onnxruntime')}; {entry['size_bytes']} bytes, "
            f"sha256 {entry['sha256'][:16]}")
    if result.up_to_date:
        click.echo(f"{out}: up to date: {what}")
    else:
        resumed = f", resumed after {result.resumed_from} bytes" if result.resumed_from else ""
        click.echo(f"{out}: {what}{resumed}")


def _plain_http_off_host(server: str) -> bool:
    """An http:// server that is not this machine: a token sent there travels in clear text."""
    import ipaddress
    from urllib.parse import urlsplit

    parts = urlsplit(server)
    if parts.scheme != "http":
        return False
    host = parts.hostname or ""
    if host == "localhost":
        return False
    try:
        return not ipaddress.ip_address(host).is_loopback
    except ValueError:
        return True
