"""``rtfq-bench``: measure model files on this device (``run``) and choose one per budget (``select``).

Imports neither torch nor onnx, so it runs on a device with only onnxruntime, numpy,
click and tabulate (a test asserts it); ``select`` draws with matplotlib only when asked
for its report.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from rtfq_deploy.cli.common import Group, emit_table

_SETTINGS = {"help_option_names": ["-h", "--help"]}


def _ms(v):  # noqa: ANN001, ANN202
    return "-" if v is None else f"{v:.3f}"


def _mb(v):  # noqa: ANN001, ANN202
    return "-" if v is None else f"{v / 1e6:.2f}"


def _g(v):  # noqa: ANN001, ANN202
    return "-" if v is None else f"{v / 1e9:.3f}"


@click.group(cls=Group, context_settings=_SETTINGS)
def bench() -> None:
    """Benchmark exported subnets on this device and choose the best one per budget."""


@bench.command(context_settings=_SETTINGS)
@click.argument("models", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="Results file (JSON), rewritten after each model.")
@click.option("--threads", type=click.IntRange(min=1), default=1, show_default=True, help="onnxruntime intra-op threads.")
@click.option("--provider", default="cpu", show_default=True,
              help="Execution provider, e.g. cpu, cuda, CoreMLExecutionProvider (any that onnxruntime offers here).")
@click.option("--graph-optimization", type=click.Choice(["disable", "basic", "extended", "all"]), default="all",
              show_default=True, help="onnxruntime graph optimisation level.")
@click.option("--batch-size", type=click.IntRange(min=1), default=1, show_default=True,
              help="Images per run (latency is per run).")
@click.option("--warmup", type=click.IntRange(min=0), default=5, show_default=True, help="Untimed runs first.")
@click.option("--min-runs", type=click.IntRange(min=1), default=30, show_default=True,
              help="Timed runs before the stability test may stop.")
@click.option("--max-runs", type=click.IntRange(min=1), default=2000, show_default=True, help="At most this many timed runs.")
@click.option("--min-time", type=click.FloatRange(min=0), default=0.5, show_default=True,
              help="Seconds of timed runs before the stability test may stop.")
@click.option("--max-time", type=click.FloatRange(min=0, min_open=True), default=10.0, show_default=True,
              help="At most this many seconds of timed runs per model.")
@click.option("--cv", "cv_target", type=click.FloatRange(min=0, min_open=True), default=0.01, show_default=True,
              help="Stop when the p50's coefficient of variation (batch medians) is at most this.")
@click.option("--timeout", type=click.FloatRange(min=1), default=300.0, show_default=True,
              help="Seconds before a model's measuring process is killed and the model reported as failed.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random inputs.")
@click.option("--force", is_flag=True, help="Overwrite an existing results file.")
@click.option("--json", "as_json", is_flag=True, help="Print the model rows as JSON instead of a table.")
def run(models: tuple[Path, ...], output: Path, threads: int, provider: str, graph_optimization: str, batch_size: int,
        warmup: int, min_runs: int, max_runs: int, min_time: float, max_time: float, cv_target: float, timeout: float,
        seed: int, force: bool, as_json: bool) -> None:
    """Measure MODELS (.onnx files or directories of them), each in fresh processes:
    session creation time, latency after warm-up (p50/p90/p99, mean, std) until the p50
    is stable, peak resident memory above an onnxruntime-loaded baseline with and
    without the memory arena, and file size. A model that fails is a failed row; the
    others still run. Exits with status 1 if any model failed."""
    from rtfq_deploy.bench.measure import MeasureConfig
    from rtfq_deploy.bench.run import BenchSettings, bench_models, collect_models, resolve_provider

    if min_runs > max_runs:
        raise click.UsageError(f"--min-runs {min_runs} is above --max-runs {max_runs}")
    if output.exists() and not force:
        raise click.UsageError(f"{output} exists (use --force to overwrite)")
    paths = collect_models(models)
    measure = MeasureConfig(model="", threads=threads, provider=resolve_provider(provider),
                            graph_optimization=graph_optimization, batch_size=batch_size, warmup=warmup,
                            min_runs=min_runs, max_runs=max_runs, min_time_s=min_time, max_time_s=max_time,
                            cv_target=cv_target, seed=seed)
    settings = BenchSettings(measure=measure, timeout_s=timeout)
    with click.progressbar(length=len(paths), label="benchmarking", file=sys.stderr,
                           item_show_func=lambda p: p, show_pos=True) as bar:
        def advance(path: Path, row: dict) -> None:
            bar.update(1, f"{path.name}: {'ok' if row['ok'] else 'FAILED'}")

        results = bench_models(paths, settings, output=output, progress=advance)
    rows = results["models"]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
    else:
        emit_table([_with_defaults(r) for r in rows], _RUN_COLUMNS, as_json=False)
        for row in rows:
            if not row["ok"]:
                click.echo(f"FAILED {row['path']}: {row['error']}")
            elif not row.get("stable"):
                click.echo(f"note: {row['subnet']}: p50 not stable to --cv {cv_target:g} within the run/time caps "
                           f"(cv {'n/a' if row['p50_cv'] is None else format(row['p50_cv'], '.3f')})")
    fp = results["fingerprint"]
    click.echo(f"wrote {output}: {len(rows)} models on {fp['cpu_model']}, {fp['provider']}, {fp['threads']} thread(s)",
               err=as_json)
    failed = sum(not r["ok"] for r in rows)
    if failed:
        click.echo(f"{failed} of {len(rows)} models failed", err=True)
        sys.exit(1)


_RUN_COLUMNS = [
    ("subnet", "model", str), ("status", "status", str),
    ("latency_p50_ms", "p50 ms", _ms), ("latency_p90_ms", "p90 ms", _ms), ("latency_p99_ms", "p99 ms", _ms),
    ("latency_std_ms", "std ms", _ms), ("runs", "runs", lambda v: "-" if v is None else str(v)),
    ("session_create_s", "create s", lambda v: "-" if v is None else f"{v:.2f}"),
    ("peak_memory_bytes", "mem MB", _mb), ("peak_memory_no_arena_bytes", "mem MB no arena", _mb),
    ("size_bytes", "size MB", _mb), ("macs", "GMACs", _g),
]


def _with_defaults(row: dict) -> dict:
    return {key: row.get(key) for key, _, _ in _RUN_COLUMNS} | {"status": "ok" if row["ok"] else "FAILED"}
