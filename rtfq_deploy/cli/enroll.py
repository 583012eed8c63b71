"""``rtfq enroll``: measure the server's candidate subnets on this device, upload, get this device's choice."""

from __future__ import annotations

import json
import os
from pathlib import Path

import click

from rtfq_deploy.cli.common import BoundedInt, Command, FiniteFloat, cafile_option
from rtfq_deploy.cli.fetch import TOKEN_ENV, _plain_http_off_host, _server_url
from rtfq_deploy.formats import ONNXRUNTIME, RUNTIMES


@click.command(cls=Command, short_help="Measure a server's candidate subnets on this device and get its choice.")
@click.option("--server", required=True, metavar="URL", callback=_server_url,
              help="Base URL of an rtfq-serve run with --candidates, e.g. http://10.0.0.2:8080.")
@click.option("--device", required=True, metavar="NAME", help="This device's name (its token must be bound to it).")
@click.option("--runtime", "runtimes", multiple=True, type=click.Choice(list(RUNTIMES)),
              help="Runtime to measure on, repeatable (default onnxruntime).")
@click.option("--budget", "budgets", multiple=True, metavar="BUDGET",
              help="This device's own budget, repeatable, added to the server's (as for rtfq-bench select: 20ms, "
                   "latency=20ms,memory=64MB). With -o the first one decides the file fetched.")
@click.option("-o", "--output", "out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Fetch the file the server then chooses for the first --budget to this path.")
@click.option("--cache", "cache_dir", type=click.Path(file_okay=False, path_type=Path), default=Path("rtfq-enroll"),
              show_default=True, help="Folder for the downloaded candidates and the measurements kept between runs.")
@click.option("--remeasure", is_flag=True, help="Measure every candidate again, not only new or changed ones.")
@click.option("--threads", type=BoundedInt(1, 1024), default=1, show_default=True,
              help="Inference threads (onnxruntime intra-op threads, OpenVINO INFERENCE_NUM_THREADS).")
@click.option("--processes", type=BoundedInt(1, 20), default=3, show_default=True,
              help="Repeat the round-robin timing in N fresh processes, one after the other, and pool their quietest "
                   "rounds (a slow period of the host then spoils fewer of them).")
@click.option("--ci", "ci_target", type=FiniteFloat(0.0, 1.0, low_open=True), default=0.01, show_default=True,
              help="Stop timing once every p50's 95%% interval is within this fraction of it.")
@click.option("--min-time", type=FiniteFloat(0.0, 86400.0), default=3.0, show_default=True,
              help="Seconds of round-robin timing at least, per process.")
@click.option("--max-time", type=FiniteFloat(0.0, 86400.0, low_open=True), default=30.0, show_default=True,
              help="Seconds of round-robin timing at most, per process.")
@click.option("--force", is_flag=True, help="Replace OUTPUT if it holds a different file.")
@click.option("--timeout", "timeout_s", type=FiniteFloat(0.1, 3600), default=30.0, show_default=True,
              help="Seconds any one network step may wait.")
@click.option("--token-file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help=f"File holding this device's token (its first token line; the server's --device-token-file "
                   f"binds it to --device); without it, {TOKEN_ENV} is used if set.")
@cafile_option
@click.option("--json", "as_json", is_flag=True, help="Print the server's answer as JSON.")
def enroll(server: str, device: str, runtimes: tuple[str, ...], budgets: tuple[str, ...], out: Path | None,
           cache_dir: Path, remeasure: bool, threads: int, processes: int, ci_target: float, min_time: float,
           max_time: float, force: bool, timeout_s: float, token_file: Path | None, cafile: Path | None,
           as_json: bool) -> None:
    """Download the candidate subnets the server offers (only those not in --cache yet,
    verified, resumable), measure them here round robin (each p50 with a 95% interval;
    a rerun measures only what changed), upload the results, and print the choices the
    server made for this device. With -o, fetch the chosen file. Progress goes to stderr."""
    from rtfq_deploy.budget import parse_budget
    from rtfq_deploy.enroll import EnrollConfig, MeasureOptions, read_token
    from rtfq_deploy.enroll import enroll as run_enroll
    from rtfq_deploy.manifest import check_name
    from rtfq_deploy.tokens import check_token

    check_name(device)
    for text in budgets:
        parse_budget(text)
    if out is not None and not budgets:
        raise click.UsageError("-o needs a --budget: the file fetched is the server's choice for the first one")
    if min_time > max_time:
        raise click.UsageError(f"--min-time {min_time:g} is above --max-time {max_time:g}")
    runtimes = tuple(dict.fromkeys(runtimes or (ONNXRUNTIME,)))
    from rtfq_deploy.bench.runtimes import require

    for runtime in runtimes:
        require(runtime)
    if token_file is not None:
        token: str | None = read_token(token_file)
    elif os.environ.get(TOKEN_ENV):
        token = check_token(os.environ[TOKEN_ENV].strip(), f"the {TOKEN_ENV} environment variable")
    else:
        token = None
    if token is not None and _plain_http_off_host(server):
        click.echo("Warning: sending the device token over plain http to another host", err=True)
    config = EnrollConfig(server=server, device=device, cache_dir=cache_dir, runtimes=runtimes, budgets=budgets,
                          out=out, force=force, remeasure=remeasure, token=token, cafile=cafile, timeout_s=timeout_s,
                          measure=MeasureOptions(threads=threads, processes=processes, ci_target=ci_target,
                                                 min_time_s=min_time, max_time_s=max_time))
    result = run_enroll(config, progress=lambda line: click.echo(f"rtfq enroll: {line}", err=True))
    answer = result.answer
    if as_json:
        click.echo(json.dumps(answer, indent=2))
    else:
        click.echo(f"{device}: {result.candidates} candidates, {len(result.downloaded)} downloaded, "
                   f"{result.measured} rows measured now; the server published {len(answer.get('written') or [])} "
                   "entries")
        for c in answer["choices"]:
            if not isinstance(c, dict):
                continue
            state = "" if c.get("met") else "UNMET "
            note = f" (may differ when measured again: {str(c.get('doubt'))[:200]})" if c.get("straddles") else ""
            click.echo(f"  {state}{c.get('budget')} on {c.get('runtime')}: {c.get('subnet')}{note}")
    if result.fetched is not None:
        f = result.fetched
        click.echo(f"{out}: {'up to date' if f.up_to_date else 'fetched'}: {f.entry.get('subnet')} "
                   f"({f.reason})", err=as_json)
