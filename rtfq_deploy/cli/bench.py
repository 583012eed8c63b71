"""``rtfq-bench``: measure model files on this device (``run``) and choose one per budget (``select``).

Imports neither torch nor onnx, so it runs on a device with only numpy, click, tabulate
and the runtime it measures (onnxruntime or openvino, each imported only by the
processes that use it; a test asserts it); ``--images`` needs Pillow; ``select`` draws
with matplotlib only when asked for its report.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import click

from rtfq_deploy.cli.common import SEED, BoundedInt, FiniteFloat, Group, emit_table
from rtfq_deploy.formats import DEFAULT_RUNTIME, ONNXRUNTIME, OPENVINO, RUNTIMES

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
              help="Results file (JSON), rewritten after each row.")
@click.option("--runtime", "runtimes", multiple=True, type=click.Choice(RUNTIMES),
              help="Runtime to measure on, repeatable (default onnxruntime): each model x runtime is a row, "
                   "the runtimes alternated model by model. OpenVINO needs pip install 'rtfq_deploy[openvino]'.")
@click.option("--threads", type=BoundedInt(1, 1024), default=1, show_default=True,
              help="Inference threads (onnxruntime intra-op threads, OpenVINO INFERENCE_NUM_THREADS).")
@click.option("--provider", default="cpu", show_default=True,
              help="onnxruntime execution provider, e.g. cpu, cuda, CoreMLExecutionProvider (any it offers here).")
@click.option("--openvino-device", default="CPU", show_default=True, metavar="PLUGIN",
              help="OpenVINO plugin to compile for (CPU, GPU, NPU: any that OpenVINO offers here).")
@click.option("--graph-optimization", type=click.Choice(["disable", "basic", "extended", "all"]), default="all",
              show_default=True, help="onnxruntime graph optimisation level.")
@click.option("--batch-size", type=BoundedInt(1, 4096), default=1, show_default=True,
              help="Images per run (latency is per run).")
@click.option("--images", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Labeled held-out images (one sub-folder per class, as for rtfq eval): measure top-1 on each "
                   "runtime and its agreement with onnxruntime's exact integer results (needs Pillow).")
@click.option("--warmup", type=BoundedInt(0, 10**6), default=5, show_default=True, help="Untimed runs first.")
@click.option("--sample-time", type=FiniteFloat(0.0, 10.0), default=0.002, show_default=True,
              help="Seconds one timed sample lasts at least: a model faster than this is timed in batches of runs "
                   "(per-run mean of each batch), so small models get stable figures; 0 times every run alone.")
@click.option("--processes", type=BoundedInt(1, 50), default=1, show_default=True,
              help="Time each row in N fresh processes and report the one with the median p50 (a small model's "
                   "p50 varies between processes more than within one).")
@click.option("--interleave", is_flag=True,
              help="Time every model round robin in one process per runtime (repeated in --processes N), so a slow "
                   "period of the host hits them alike; each p50 comes with a 95%% interval (latency_p50_ci_ms), "
                   "--cv is the interval's target half-width, --min-runs/--max-runs count rounds.")
@click.option("--min-runs", type=BoundedInt(1, 10**7), default=30, show_default=True,
              help="Timed samples before the stability test may stop.")
@click.option("--max-runs", type=BoundedInt(1, 10**7), default=2000, show_default=True,
              help="At most this many timed samples.")
@click.option("--min-time", type=FiniteFloat(0.0, 86400.0), default=2.0, show_default=True,
              help="Seconds of timed runs before the stability test may stop.")
@click.option("--max-time", type=FiniteFloat(0.0, 86400.0, low_open=True), default=10.0, show_default=True,
              help="At most this many seconds of timed runs per row.")
@click.option("--cv", "cv_target", type=FiniteFloat(0.0, 10.0, low_open=True), default=0.01, show_default=True,
              help="Stop when the p50's coefficient of variation (batch medians) is at most this.")
@click.option("--timeout", type=FiniteFloat(1.0, 7 * 86400.0), default=300.0, show_default=True,
              help="Seconds before a measuring process is killed and the row reported as failed.")
@click.option("--seed", type=SEED, default=0, show_default=True, help="Seed of the random inputs.")
@click.option("--force", is_flag=True, help="Overwrite an existing results file.")
@click.option("--json", "as_json", is_flag=True, help="Print the model rows as JSON instead of a table.")
def run(models: tuple[Path, ...], output: Path, runtimes: tuple[str, ...], threads: int, provider: str,
        openvino_device: str, graph_optimization: str, batch_size: int, images: Path | None, warmup: int,
        sample_time: float, processes: int, interleave: bool, min_runs: int, max_runs: int, min_time: float,
        max_time: float, cv_target: float,
        timeout: float, seed: int, force: bool, as_json: bool) -> None:
    """Measure MODELS (.onnx files or directories of them) on each --runtime, each in
    fresh processes: session creation (compile) time, latency after warm-up
    (p50/p90/p99, mean, std) until the p50 is stable, peak resident memory above a
    runtime-loaded baseline (on onnxruntime with and without its memory arena), file
    size, and with --images top-1 and agreement with onnxruntime. A row that fails is a
    failed row; the others still run. Exits with status 1 if any row failed."""
    from rtfq_deploy.bench.measure import MeasureConfig
    from rtfq_deploy.bench.run import BenchSettings, collect_models, resolve_provider
    from rtfq_deploy.bench.runtimes import require

    runtimes = tuple(dict.fromkeys(runtimes or (DEFAULT_RUNTIME,)))
    if min_runs > max_runs:
        raise click.UsageError(f"--min-runs {min_runs} is above --max-runs {max_runs}")
    if interleave and images is not None:
        raise click.UsageError("--interleave times latency only; measure --images in a run without it")
    from rtfq_deploy.fileio import check_output

    check_output(output)  # a FIFO or device is refused even with --force
    if output.exists() and not force:
        raise click.UsageError(f"{output} exists (use --force to overwrite)")
    if not re.fullmatch(r"[A-Za-z0-9_.:()-]{1,64}", openvino_device):
        raise click.BadParameter(f"{openvino_device[:64]!r} is not an OpenVINO device name", param_hint="--openvino-device")
    for runtime in runtimes:
        require(runtime)  # one line naming the missing package, before anything is measured
    if OPENVINO in runtimes:
        from rtfq_deploy.bench.runtimes import check_openvino_device

        check_openvino_device(openvino_device)
    if images is not None:
        import importlib.util

        if importlib.util.find_spec("PIL") is None:
            raise click.UsageError("--images needs Pillow (pip install pillow)")
    paths = collect_models(models)
    image_set = None
    if images is not None:
        from rtfq_deploy.bench.images import check_models, scan

        image_set = scan(images)
        check_models(image_set, paths)
    measure = MeasureConfig(model="", threads=threads,
                            provider=resolve_provider(provider) if ONNXRUNTIME in runtimes else provider,
                            openvino_device=openvino_device, graph_optimization=graph_optimization,
                            batch_size=batch_size, warmup=warmup, min_runs=min_runs, max_runs=max_runs,
                            min_time_s=min_time, max_time_s=max_time, sample_time_s=sample_time,
                            cv_target=cv_target, seed=seed)
    settings = BenchSettings(measure=measure, timeout_s=timeout, runtimes=runtimes, images=image_set,
                             processes=processes)
    if interleave:
        from rtfq_deploy.bench.interleave import InterleaveSettings, RoundsConfig, interleaved_results
        from rtfq_deploy.bench.run import write_results

        rounds = RoundsConfig(MeasureConfig(model=""), ci_target=cv_target, min_rounds=min_runs, max_rounds=max_runs,
                              min_time_s=min_time, max_time_s=max_time, seed=seed)
        results = interleaved_results(paths, InterleaveSettings(settings, rounds),
                                      progress=lambda line: click.echo(f"rtfq-bench run: {line}", err=True))
        write_results(output, results)
    else:
        results = _run_each(paths, settings, output)
    rows = results["models"]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
    else:
        columns = _RUN_COLUMNS + (_ACCURACY_COLUMNS if image_set is not None else [])
        emit_table([_with_defaults(r, columns) for r in rows], columns, as_json=False)
        for row in rows:
            if not row["ok"]:
                click.echo(f"FAILED {row['path']} on {row['runtime']}: {row['error']}")
            elif not row.get("stable"):
                click.echo(f"note: {unstable_line(row)}")
            if row["ok"] and row.get("accuracy_error"):
                click.echo(f"note: {row['subnet']} on {row['runtime']}: no accuracy: {row['accuracy_error']}")
    fp = results["fingerprint"]
    busy = [r for r in rows if r["ok"] and (r.get("cpu_per_wall") or threads) < 0.8 * min(threads, fp["usable_cores"])]
    if busy and not as_json:
        click.echo(f"note: {len(busy)} row(s) got less than 80% of {threads} core(s) while timed (other work on this "
                   "machine); their latency is not this device's own")
    unstable = sum(1 for r in rows if r["ok"] and not r.get("stable"))
    if unstable and as_json:
        click.echo(f"note: {unstable} row(s) have an unstable p50 (\"stable\": false)", err=True)
    versions = ", ".join(f"{name} {info.get('version')}" for name, info in fp["runtimes"].items())
    click.echo(f"wrote {output}: {len(paths)} models x {len(runtimes)} runtime(s) ({versions}) on {fp['cpu_model']}, "
               f"{fp['threads']} thread(s)", err=as_json)
    failed = sum(not r["ok"] for r in rows)
    if failed:
        click.echo(f"{failed} of {len(rows)} rows failed", err=True)
        sys.exit(1)


def _run_each(paths: list[Path], settings, output: Path) -> dict:  # noqa: ANN001
    """Each model in its own fresh processes (rtfq_deploy.bench.run), a progress bar on stderr."""
    from rtfq_deploy.bench.run import bench_models

    runtimes = settings.runtimes
    with click.progressbar(length=len(paths) * len(runtimes), label="benchmarking", file=sys.stderr,
                           item_show_func=lambda p: p, show_pos=True) as bar:
        def advance(path: Path, row: dict | None) -> None:
            if row is None:
                bar.update(0, path.name)  # show the model being measured
            elif not row["ok"]:
                bar.update(1, f"{path.name} ({row['runtime']}): FAILED")
            else:
                bar.update(1, f"{path.name} ({row['runtime']})")

        results = bench_models(paths, settings, output=output, progress=advance)
    return results


def unstable_line(row: dict) -> str:
    """What an unstable row's figures rest on, in one line."""
    cv, drift = row.get("p50_cv"), row.get("p50_drift")
    return (f"{row['subnet']} on {row.get('runtime') or 'onnxruntime'}: p50 not stable within the run/time caps "
            f"(cv {'n/a' if cv is None else format(cv, '.3f')}, drift {'n/a' if drift is None else format(drift, '.3f')}"
            f", {row.get('samples', row.get('runs'))} samples); its latency is a rough figure")


_RUN_COLUMNS = [
    ("subnet", "model", str), ("runtime", "runtime", str), ("status", "status", str),
    ("latency_p50_ms", "p50 ms", _ms), ("latency_p90_ms", "p90 ms", _ms), ("latency_p99_ms", "p99 ms", _ms),
    ("latency_std_ms", "std ms", _ms), ("runs", "runs", lambda v: "-" if v is None else str(v)),
    ("session_create_s", "create s", lambda v: "-" if v is None else f"{v:.2f}"),
    ("peak_memory_bytes", "mem MB", _mb), ("peak_memory_no_arena_bytes", "mem MB no arena", _mb),
    ("size_bytes", "size MB", _mb), ("macs", "GMACs", _g),
]


_ACCURACY_COLUMNS = [
    ("top1", "top-1", lambda v: "-" if v is None else f"{v:.4f}"),
    ("agreement", "agrees", lambda v: "-" if v is None else f"{v:.4f}"),
    ("max_logit_diff", "max logit diff", lambda v: "-" if v is None else f"{v:.3g}"),
]


def _with_defaults(row: dict, columns: list = _RUN_COLUMNS) -> dict:
    status = "FAILED" if not row["ok"] else ("ok" if row.get("stable", True) else "unstable")
    return {key: row.get(key) for key, _, _ in columns} | {"status": status, "runtime": row.get("runtime") or DEFAULT_RUNTIME}


@bench.command(context_settings=_SETTINGS)
@click.option("--results", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="Results file of rtfq-bench run on the device.")
@click.option("--accuracy", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Accuracy table (rtfq eval): top-1 per subnet. A row measured with rtfq-bench run --images uses "
                   "its runtime's own top-1 instead; needed unless every row has one.")
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
@click.option("--force", is_flag=True, help="Replace a model file of the same name whose content differs, and use "
                                        "an accuracy table measured on another checkpoint than the files were "
                                        "exported from (refused otherwise).")
@click.option("--json", "as_json", is_flag=True, help="Print the choices and fronts as JSON.")
def select(results: Path, accuracy: Path, budgets: tuple[str, ...], dist_dir: Path, device: str | None, memory: str,
           prune: bool, report: bool, dry_run: bool, force: bool, as_json: bool) -> None:
    """Choose, for each --budget and each measured runtime, the most accurate subnet that
    meets it on the measured device, copy the chosen files to DIST_DIR/<device>/<subnet>.onnx
    and record them in DIST_DIR/manifest.json (the device's other runtimes and the other
    devices are left as they are). An unmeetable budget is reported with its cheapest
    option and serves no file; the exit status is then 1. Choices that rest on a latency
    whose p50 did not settle when measured are named."""
    from rtfq_deploy.accuracy import read_accuracy_table
    from rtfq_deploy.bench.fingerprint import device_slug
    from rtfq_deploy.bench.run import read_results
    from rtfq_deploy.bench.select import FRONT_KEYS, SelectOptions, check_table, plan, publish
    from rtfq_deploy.budget import parse_budget

    parsed = [parse_budget(b) for b in budgets]
    if report and not dry_run:
        import importlib.util

        if importlib.util.find_spec("matplotlib") is None:
            raise click.UsageError("the report needs matplotlib (pip install matplotlib), or pass --no-report")
    data = read_results(results)
    measured = [r for r in data["models"] if r["ok"] and r.get("top1") is not None]
    if accuracy is None and len(measured) < sum(r["ok"] for r in data["models"]):
        raise click.UsageError("give --accuracy (the rtfq eval table), or measure every model with "
                               "rtfq-bench run --images")
    table = {}
    if accuracy is not None:
        read = read_accuracy_table(accuracy)
        check_table(data, read, force)  # a table of another checkpoint: refused unless --force
        table = read.top1
    name = device or device_slug(data["fingerprint"])
    options = SelectOptions(memory=memory, prune=prune, force=force)
    selection = plan(data, table, parsed, name, options)
    if not dry_run:
        selection = publish(selection, data, dist_dir, options)
    from rtfq_deploy.bench.report import choice_rows

    rows = choice_rows(selection)
    several = len(selection.runtimes) > 1
    notes = _select_notes(selection, data, accuracy)
    if as_json:
        click.echo(json.dumps({"device": name, "choices": rows, "fronts": {k: [e["subnet"] for e in v] for k, v in
                                                                           selection.fronts.items()},
                               "copied": list(selection.copied), "removed": list(selection.removed),
                               "skipped": list(selection.skipped), "notes": notes}, indent=2))
    else:
        click.echo(f"device {name}")
        emit_table(rows, [("budget", "budget", str), ("runtime", "runtime", str),
                          ("met", "met", lambda m: "yes" if m else "NO"), ("subnet", "subnet", str),
                          ("accuracy", "top-1", _acc), ("accuracy_source", "top-1 from", lambda v: v or "-"),
                          ("latency_p50_ms", "p50 ms", _ms),
                          ("latency_p90_ms", "p90 ms", _ms), ("peak_memory_bytes", "mem MB", _mb),
                          ("size_bytes", "size MB", _mb), ("macs", "GMACs", _g)], as_json=False)
        for key, label in FRONT_KEYS.items():
            fmt = _ms if key.startswith("latency") else _mb
            front = ", ".join(f"{e['subnet']}{' on ' + e['runtime'] if several else ''} ({_acc(e['accuracy'])} @ "
                              f"{fmt(e[key])})" for e in selection.fronts[key])
            click.echo(f"Pareto front, accuracy vs {label}: {front or '-'}")
        for line in selection.skipped:
            click.echo(f"left out: {line}")
        for line in notes:
            click.echo(f"note: {line}")
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


def _select_notes(selection, data: dict, accuracy: Path | None) -> list[str]:  # noqa: ANN001
    """Where the accuracies came from, and every choice that rests on an unstable latency."""
    notes = []
    by_source: dict[str, list[str]] = {}
    for e in selection.candidates:
        by_source.setdefault(e.get("accuracy_source") or "none", []).append(e["runtime"])
    if "measured" in by_source:
        runtimes = ", ".join(sorted(set(by_source["measured"])))
        images = (data.get("settings") or {}).get("images") or {}
        notes.append(f"top-1 measured on the device's own runtime ({runtimes}) for {len(by_source['measured'])} "
                     f"row(s){', on ' + str(images.get('images')) + ' images' if images.get('images') else ''}; "
                     + (f"the others from {accuracy}" if "table" in by_source else "no row uses the accuracy table"))
    for runtime in selection.runtimes:
        agree = sorted((e["agreement"], e["subnet"]) for e in selection.candidates
                       if e["runtime"] == runtime and e.get("agreement") is not None)
        if runtime != ONNXRUNTIME and agree:
            notes.append(f"on {runtime}, top-1 agrees with onnxruntime's exact integer results on {agree[0][0]:.1%} "
                         f"({agree[0][1]}) to {agree[-1][0]:.1%} of the images")
    for c in selection.unstable():
        notes.append(f"budget {c.budget} on {c.entry['runtime']}: the choice {c.entry['subnet']} rests on an unstable "
                     f"latency figure (its p50 did not settle within rtfq-bench run's caps; measure again, longer)")
    from rtfq_deploy.bench.confidence import doubt

    for c in selection.choices:
        why = doubt(c, selection.candidates)
        if why:
            notes.append(f"budget {c.budget} on {c.entry['runtime']}: the choice {c.entry['subnet']} may differ when "
                         f"measured again: {why}")
    unstable = sum(1 for e in selection.candidates if e.get("stable") is False)
    if unstable:
        notes.append(f"{unstable} of {len(selection.candidates)} measured rows have an unstable latency p50")
    return notes


def _acc(v):  # noqa: ANN001, ANN202
    return "-" if v is None else f"{v:.4f}"
