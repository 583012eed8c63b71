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

from rtfq_deploy.cli.common import SEED, BoundedInt, FiniteFloat, Group, emit_table

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
@click.option("--threads", type=BoundedInt(1, 1024), default=1, show_default=True, help="onnxruntime intra-op threads.")
@click.option("--provider", default="cpu", show_default=True,
              help="Execution provider, e.g. cpu, cuda, CoreMLExecutionProvider (any that onnxruntime offers here).")
@click.option("--graph-optimization", type=click.Choice(["disable", "basic", "extended", "all"]), default="all",
              show_default=True, help="onnxruntime graph optimisation level.")
@click.option("--batch-size", type=BoundedInt(1, 4096), default=1, show_default=True,
              help="Images per run (latency is per run).")
@click.option("--warmup", type=BoundedInt(0, 10**6), default=5, show_default=True, help="Untimed runs first.")
@click.option("--min-runs", type=BoundedInt(1, 10**7), default=30, show_default=True,
              help="Timed runs before the stability test may stop.")
@click.option("--max-runs", type=BoundedInt(1, 10**7), default=2000, show_default=True, help="At most this many timed runs.")
@click.option("--min-time", type=FiniteFloat(0.0, 86400.0), default=2.0, show_default=True,
              help="Seconds of timed runs before the stability test may stop.")
@click.option("--max-time", type=FiniteFloat(0.0, 86400.0, low_open=True), default=10.0, show_default=True,
              help="At most this many seconds of timed runs per model.")
@click.option("--cv", "cv_target", type=FiniteFloat(0.0, 10.0, low_open=True), default=0.01, show_default=True,
              help="Stop when the p50's coefficient of variation (batch medians) is at most this.")
@click.option("--timeout", type=FiniteFloat(1.0, 7 * 86400.0), default=300.0, show_default=True,
              help="Seconds before a model's measuring process is killed and the model reported as failed.")
@click.option("--seed", type=SEED, default=0, show_default=True, help="Seed of the random inputs.")
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
        def advance(path: Path, row: dict | None) -> None:
            if row is None:
                bar.update(0, path.name)  # show the model being measured
            elif not row["ok"]:
                bar.update(1, f"{path.name}: FAILED")
            else:
                bar.update(1, path.name)

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
                           f"(cv {'n/a' if row['p50_cv'] is None else format(row['p50_cv'], '.3f')}, "
                           f"drift {'n/a' if row['p50_drift'] is None else format(row['p50_drift'], '.3f')})")
    fp = results["fingerprint"]
    busy = [r for r in rows if r["ok"] and (r.get("cpu_per_wall") or threads) < 0.8 * min(threads, fp["usable_cores"])]
    if busy and not as_json:
        click.echo(f"note: {len(busy)} model(s) got less than 80% of {threads} core(s) while timed (other work on this "
                   "machine); their latency is not this device's own")
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


@bench.command(context_settings=_SETTINGS)
@click.option("--results", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="Results file of rtfq-bench run on the device.")
@click.option("--accuracy", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="Accuracy table (rtfq eval): top-1 per subnet.")
@click.option("--budget", "budgets", multiple=True, required=True,
              help="A budget, repeatable: 20ms, latency-p90=5ms, memory=64MB, size=8MB, 0.8G (MACs), bitops=50G; "
                   "several limits at once joined by commas.")
@click.option("-o", "--output", "dist_dir", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="DIST_DIR: model files per device and manifest.json.")
@click.option("--device", help="Device name in DIST_DIR (default: from the results' fingerprint).")
@click.option("--memory", type=click.Choice(["arena", "no-arena"]), default="arena", show_default=True,
              help="Which measured peak memory a memory budget limits (onnxruntime's arena on or off).")
@click.option("--prune/--keep-old", default=True, show_default=True,
              help="Remove files this device no longer uses, after the new manifest is in place.")
@click.option("--report/--no-report", default=True, show_default=True,
              help="Write DIST_DIR/<device>/pareto.png and report.html (needs matplotlib).")
@click.option("--dry-run", is_flag=True, help="Print the choices; write nothing.")
@click.option("--force", is_flag=True, help="Replace a model file of the same name whose content differs.")
@click.option("--json", "as_json", is_flag=True, help="Print the choices and fronts as JSON.")
def select(results: Path, accuracy: Path, budgets: tuple[str, ...], dist_dir: Path, device: str | None, memory: str,
           prune: bool, report: bool, dry_run: bool, force: bool, as_json: bool) -> None:
    """Choose, for each --budget, the most accurate subnet that meets it on the measured
    device, copy the chosen files to DIST_DIR/<device>/<subnet>.onnx and record them in
    DIST_DIR/manifest.json (other devices are left as they are). An unmeetable budget is
    reported with its cheapest option and serves no file; the exit status is then 1."""
    from rtfq_deploy.accuracy import read_accuracy
    from rtfq_deploy.bench.fingerprint import device_slug
    from rtfq_deploy.bench.run import read_results
    from rtfq_deploy.bench.select import FRONT_KEYS, SelectOptions, plan, publish
    from rtfq_deploy.budget import parse_budget

    parsed = [parse_budget(b) for b in budgets]
    if report and not dry_run:
        import importlib.util

        if importlib.util.find_spec("matplotlib") is None:
            raise click.UsageError("the report needs matplotlib (pip install matplotlib), or pass --no-report")
    data = read_results(results)
    table = read_accuracy(accuracy)
    name = device or device_slug(data["fingerprint"])
    options = SelectOptions(memory=memory, prune=prune, force=force)
    selection = plan(data, table, parsed, name, options)
    if not dry_run:
        selection = publish(selection, data, dist_dir, options)
    from rtfq_deploy.bench.report import choice_rows

    rows = choice_rows(selection)
    if as_json:
        click.echo(json.dumps({"device": name, "choices": rows, "fronts": {k: [e["subnet"] for e in v] for k, v in
                                                                           selection.fronts.items()},
                               "copied": list(selection.copied), "removed": list(selection.removed),
                               "skipped": list(selection.skipped)}, indent=2))
    else:
        click.echo(f"device {name}")
        emit_table(rows, [("budget", "budget", str), ("met", "met", lambda m: "yes" if m else "NO"),
                          ("subnet", "subnet", str), ("accuracy", "top-1", _acc), ("latency_p50_ms", "p50 ms", _ms),
                          ("latency_p90_ms", "p90 ms", _ms), ("peak_memory_bytes", "mem MB", _mb),
                          ("size_bytes", "size MB", _mb), ("macs", "GMACs", _g)], as_json=False)
        for key, label in FRONT_KEYS.items():
            fmt = _ms if key.startswith("latency") else _mb
            front = ", ".join(f"{e['subnet']} ({_acc(e['accuracy'])} @ {fmt(e[key])})" for e in selection.fronts[key])
            click.echo(f"Pareto front, accuracy vs {label}: {front or '-'}")
        for line in selection.skipped:
            click.echo(f"left out: {line}")
    for choice in selection.unmet:
        click.echo(f"UNMET {choice.budget}: {choice.reason}", err=True)
    if dry_run:
        return
    if not selection.written:
        click.echo(f"no budget can be met on {name}: nothing written", err=True)
        sys.exit(1)
    if report:
        from rtfq_deploy.bench.report import html_report, pareto_png
        from rtfq_deploy.fileio import atomic_write

        png = pareto_png(selection)
        for file_name, content in (("pareto.png", png), ("report.html", html_report(selection, data["fingerprint"],
                                                                                    png).encode())):
            with atomic_write(dist_dir / name / file_name, overwrite=True) as f:
                f.write(content)
    click.echo(f"wrote {dist_dir / 'manifest.json'}: {name} serves {len(selection.written)} file(s)"
               f" ({len(selection.copied)} copied, {len(selection.removed)} removed)"
               + (f"; report in {dist_dir / name}/report.html" if report else ""), err=as_json)
    if selection.unmet:
        sys.exit(1)


def _acc(v):  # noqa: ANN001, ANN202
    return "-" if v is None else f"{v:.4f}"
