"""``rtfq demo``: the whole pipeline on built-in synthetic data, on this machine.

synth (the strong shift) -> init -> train (RTF-Q, and a source-only baseline) -> eval
both -> export every subnet -> bench (onnxruntime, and OpenVINO when it is installed, with
top-1 and agreement on the held-out target images) -> select -> DIST_DIR; it prints what
adaptation gained on held-out target images.
Each stage runs the real command in its own process and is skipped when its output is
already there (outputs are written atomically, so an existing one is complete); an
interrupted training run is resumed.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import click

from rtfq_deploy.cli.common import Command
from rtfq_deploy.formats import ONNXRUNTIME, OPENVINO


@dataclass(frozen=True)
class DemoSettings:
    synth: tuple[str, ...]
    init: tuple[str, ...]
    train: tuple[str, ...]
    bench: tuple[str, ...]


FULL = DemoSettings(
    synth=("--shift", "strong", "--classes", "16", "--per-class", "60", "--test-per-class", "30", "--size", "64"),
    init=("--arch", "tiny_resnet", "--num-classes", "16", "--resolutions", "64,56,48,40",
          "--widths", "1.0,0.86,0.73,0.6", "--bits", "8,6,4"),
    train=("--recipe", "synth_strong_cpu"),
    # three timing processes per row: a sub-millisecond model's p50 varies between fresh
    # processes more than within one (bench/README.md, repeatability.py)
    bench=("--threads", "1", "--min-time", "1", "--max-time", "4", "--processes", "3"),
)
QUICK = DemoSettings(  # a smoke test of every stage in about a minute
    synth=("--shift", "strong", "--classes", "3", "--per-class", "8", "--test-per-class", "4", "--size", "32"),
    init=("--arch", "tiny_resnet", "--num-classes", "3", "--resolutions", "32,24", "--widths", "1.0,0.5",
          "--bits", "8,4"),
    train=("--steps", "4", "--batch-size", "16", "--calib-images", "16", "--log-every", "2", "--workers", "0"),
    bench=("--threads", "1", "--warmup", "2", "--min-runs", "5", "--min-time", "0.05", "--max-time", "0.3"),
)


ARCHS = {"tiny_resnet": "synth_strong_cpu", "tiny_mobilenet": "synth_strong_cpu_mobilenet"}  # arch -> full recipe


def settings_for(quick: bool, arch: str) -> DemoSettings:
    """The demo's settings with ``arch`` as the supernet (and its recipe of the strong shift)."""
    base = QUICK if quick else FULL
    train = base.train if quick else ("--recipe", ARCHS[arch])
    return replace(base, init=("--arch", arch, *base.init[2:]), train=train)


def _claim(out: Path, arch: str) -> None:
    """Record which supernet OUT holds, so that its reused stages never mix two archs."""
    from rtfq_deploy.errors import RtfqError
    from rtfq_deploy.fileio import atomic_write, read_json

    marker = out / "demo.json"
    if marker.exists() or marker.is_symlink():
        try:  # bounded: a FIFO, a huge, deep or non-UTF-8 file is an unknown supernet, never a hang
            held = read_json(marker, "demo record", max_bytes=1 << 16, expect=dict).get("arch")
        except RtfqError:
            held = None
        if held != arch:
            raise click.UsageError(f"{out} holds a demo of {held if isinstance(held, str) else 'an unknown supernet'}, "
                                   f"not {arch} (use --fresh, or another --out)")
    else:
        with atomic_write(marker) as f:
            f.write((json.dumps({"arch": arch}) + "\n").encode())


def _tool(name: str) -> str:
    return str(Path(sys.executable).parent / name)


class _Stages:
    def __init__(self, total: int) -> None:
        self.n, self.total, self.started = 0, total, time.monotonic()
        self.last_stdout = ""

    def run(self, title: str, done: Path, *cmd: str, ok_codes: tuple[int, ...] = (0,)) -> None:
        self.n += 1
        head = f"[{self.n}/{self.total}] {title}"
        if done.exists():
            click.echo(f"{head}: reused {done}")
            return
        click.echo(f"{head} ...")
        t0 = time.monotonic()
        result = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
        if result.returncode not in ok_codes:
            sys.stdout.write(result.stdout)
            raise click.ClickException(f"stage '{title}' failed (exit {result.returncode}): {' '.join(cmd)}")
        click.echo(f"{head}: {time.monotonic() - t0:.0f} s -> {done}")
        self.last_stdout = result.stdout


def _budgets(results: Path) -> list[str]:
    """A few budgets spread over what was measured here: the fastest quarter, the median
    latency, the median file size together with the median latency, and MACs."""
    from rtfq_deploy.fileio import read_json

    rows = [r for r in read_json(results, "benchmark results", expect=dict)["models"] if r.get("ok")]
    lat = sorted(r["latency_p50_ms"] for r in rows)
    size = sorted(r["size_bytes"] for r in rows)
    macs = sorted(r["macs"] for r in rows if r.get("macs"))

    def q(values: list, f: float) -> float:
        return values[min(len(values) - 1, int(f * (len(values) - 1) + 0.5))]

    out = [f"latency={q(lat, 0.25):.4g}ms", f"latency={q(lat, 0.5):.4g}ms",
           f"latency={q(lat, 0.5):.4g}ms,size={q(size, 0.5) / 1e6:.4g}MB", f"latency-p90={q(lat, 1.0) * 1.2:.4g}ms"]
    if macs:
        out.append(f"macs={q(macs, 0.5) / 1e6:.4g}M")
    return out


def _bits(table: Path) -> dict[str, int]:
    """Each subnet's bit-width where the accuracy table's row gives one as a plain integer
    (subnet ids are opaque: mixed-precision subnets have no single bit-width)."""
    from rtfq_deploy.fileio import read_json

    rows = read_json(table, "accuracy", expect=dict).get("subnets") or []
    return {str(r["subnet"]): r["bits"] for r in rows if isinstance(r, dict) and "subnet" in r
            and isinstance(r.get("bits"), int) and not isinstance(r.get("bits"), bool)}


def _runtimes() -> tuple[str, ...]:
    """onnxruntime, and OpenVINO where it is installed (pip install 'rtfq_deploy[openvino]')."""
    import importlib.util

    return (ONNXRUNTIME, OPENVINO) if importlib.util.find_spec("openvino") is not None else (ONNXRUNTIME,)


def _adaptation(source_only: Path, adapted: Path) -> str:
    """Source-only against RTF-Q: mean target top-1 over all subnets and per bit-width."""
    from tabulate import tabulate

    from rtfq_deploy.accuracy import read_accuracy

    before, after = read_accuracy(source_only), read_accuracy(adapted)
    bits = _bits(adapted)
    groups: dict[str, list[str]] = {"all subnets": sorted(after)}
    for name in sorted((n for n in after if n in bits), key=lambda n: -bits[n]):
        groups.setdefault(f"{bits[name]}-bit", []).append(name)
    rows = []
    for label, names in groups.items():
        b = sum(before[n] for n in names) / len(names)
        a = sum(after[n] for n in names) / len(names)
        rows.append([label, len(names), f"{b:.3f}", f"{a:.3f}", f"{a - b:+.3f}"])
    return ("Mean target top-1 on held-out target images, source-only training against RTF-Q adaptation:\n"
            + tabulate(rows, headers=["subnets", "n", "source-only", "RTF-Q", "gain"], disable_numparse=True))


@click.command(cls=Command)
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("rtfq-demo"), show_default=True,
              help="Working directory; finished stages found there are reused.")
@click.option("--quick", is_flag=True, help="Tiny settings (3 classes, 8 subnets, 4 steps): a smoke test of every stage.")
@click.option("--fresh", is_flag=True, help="Delete OUT first and redo every stage.")
@click.option("--arch", type=click.Choice(sorted(ARCHS)), default="tiny_resnet", show_default=True,
              help="The supernet: a small ResNet, or a small MobileNetV2 (depthwise convolutions, ReLU6).")
def demo(out: Path, quick: bool, fresh: bool, arch: str) -> None:
    """Run the whole pipeline on built-in synthetic data, from data to a served DIST_DIR.

    Stages: synth (the strong shift), init, train (RTF-Q and a source-only baseline),
    eval both, export every subnet, bench on this machine, select per budget, and write a
    DIST_DIR with manifest.json and report.html (serve it with `rtfq-serve OUT/dist`)."""
    settings = settings_for(quick, arch)
    if fresh and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    _claim(out, arch)
    data, init, run, acc = out / "data", out / "init.pt", out / "run", out / "acc.json"
    baseline, baseline_acc = out / "source-only", out / "source-only.acc.json"
    models, results, dist = out / "models", out / "results.json", out / "dist"
    stages = _Stages(9)
    stages.run("synthetic data (strong domain shift)", data, _tool("rtfq"), "data", "synth", str(data), *settings.synth)
    stages.run("supernet", init, _tool("rtfq"), "init", *settings.init, "-o", str(init))

    def train(title: str, run: Path, *extra: str) -> None:
        cmd = [_tool("rtfq-train"), "--resume", str(run)] if (run / "run.json").exists() else [
            _tool("rtfq-train"), "--checkpoint", str(init), "--source", str(data / "source"), "--target",
            str(data / "target"), "--out", str(run), *settings.train, *extra]
        stages.run(title, run / "supernet.pt", *cmd)

    train("source-only baseline training (progress on stderr)", baseline, "--source-only")
    stages.run("its accuracy on held-out target images", baseline_acc, _tool("rtfq"), "eval", "--checkpoint",
               str(baseline / "supernet.pt"), "--data", str(data / "target_test"), "-o", str(baseline_acc))
    train("RTF-Q training (progress on stderr)", run)
    stages.run("accuracy of every subnet on held-out target images", acc, _tool("rtfq"), "eval", "--checkpoint",
               str(run / "supernet.pt"), "--data", str(data / "target_test"), "-o", str(acc))
    click.echo(_adaptation(baseline_acc, acc))
    if not models.exists():  # export into a temporary folder, then rename: all or nothing
        tmp = out / ".models.partial"
        shutil.rmtree(tmp, ignore_errors=True)
        stages.run("export every subnet to ONNX (verified on target images)", models, _tool("rtfq-export"),
                   "--checkpoint", str(run / "supernet.pt"), "--all", "--verify-images", str(data / "target_test"),
                   "-o", str(tmp), ok_codes=(0, 1))
        tmp.rename(models)
    else:
        stages.run("export every subnet", models)
    runtimes = _runtimes()
    stages.run(f"benchmark every model on this machine ({' and '.join(runtimes)}; top-1 on held-out target images)",
               results, _tool("rtfq-bench"), "run", str(models), "-o", str(results), *settings.bench,
               *(a for r in runtimes for a in ("--runtime", r)), "--images", str(data / "target_test"),
               ok_codes=(0, 1))
    budgets = _budgets(results)
    select = [_tool("rtfq-bench"), "select", "--results", str(results), "--accuracy", str(acc), "-o", str(dist),
              "--force"]
    for b in budgets:
        select += ["--budget", b]
    stages.run("choose per budget, write the per-device DIST_DIR", dist / "manifest.json", *select, ok_codes=(0, 1))
    if stages.last_stdout and (dist / "manifest.json").exists():
        click.echo(stages.last_stdout.rstrip())
    click.echo(f"\ndone in {time.monotonic() - stages.started:.0f} s. Where everything went:\n"
               f"  data            {data}\n  supernet        {run / 'supernet.pt'} (metrics {run / 'metrics.jsonl'})\n"
               f"  accuracy table  {acc} (source-only baseline: {baseline_acc})\n  ONNX models     {models}\n  measurements    {results}\n"
               f"  DIST_DIR        {dist} (manifest.json; report.html and pareto.png per device)\n"
               f"serve it: rtfq-serve {dist} --port 8080")
