"""Precision and throughput of ``rtfq-bench run`` itself.

(a) Repeatability: each model is benchmarked twice in a row (two fresh measuring
    processes each time, exactly as ``rtfq-bench run M M`` does) and the ratio of the two
    p50 latencies is printed; the issue asks for it within 5%.

        python bench/bench_precision.py                         # exports one tiny_resnet subnet
        python bench/bench_precision.py --arch resnet50 --subnet r224-w1.00-q8
        python bench/bench_precision.py --models a.onnx b.onnx

(b) Throughput: with ``--all-resnet50``, a ResNet-50 supernet is initialised, all 48
    subnets are exported (``rtfq-export --all --no-verify``) and ``rtfq-bench run`` measures
    them at 1 thread; the wall time of the benchmark (not of the export) is printed. The
    issue asks for it within 15 minutes.

        python bench/bench_precision.py --all-resnet50 --workdir /tmp/r50

Uses the console scripts next to this Python (the same installation).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BIN = Path(sys.executable).parent


def sh(*args: str) -> subprocess.CompletedProcess:
    """Run a console script of this installation; stop with its message if it fails."""
    result = subprocess.run([str(BIN / args[0]), *args[1:]], capture_output=True, text=True)
    if result.returncode not in (0, 1) or (result.returncode == 1 and args[0] != "rtfq-bench"):
        sys.exit(f"{' '.join(args)} failed ({result.returncode}):\n{result.stderr}")
    return result


def export_one(workdir: Path, arch: str, subnet: str | None) -> list[Path]:
    ckpt = workdir / f"{arch}.pt"
    extra = ["--resolutions", "96", "--widths", "1.0", "--bits", "8"] if arch == "tiny_resnet" and not subnet else []
    if not ckpt.exists():
        sh("rtfq", "init", "--arch", arch, *extra, "-o", str(ckpt))
    subnet = subnet or "r96-w1.00-q8"
    out = workdir / f"{arch}-{subnet}.onnx"
    if not out.exists():
        sh("rtfq-export", "--checkpoint", str(ckpt), "--subnet", subnet, "--no-verify", "-o", str(out))
    return [out]


def bench(models: list[Path], output: Path, bench_args: list[str]) -> tuple[dict, float]:
    start = time.perf_counter()
    result = sh("rtfq-bench", "run", *map(str, models), "-o", str(output), "--force", *bench_args)
    wall = time.perf_counter() - start
    if result.returncode != 0:
        print(result.stdout, result.stderr, sep="\n")
    return json.loads(output.read_text()), wall


def repeatability(models: list[Path], workdir: Path, bench_args: list[str]) -> None:
    doubled = [m for m in models for _ in range(2)]
    results, wall = bench(doubled, workdir / "repeat.json", bench_args)
    rows = results["models"]
    fp = results["fingerprint"]
    print(f"device: {fp['cpu_model']}, {fp['usable_cores']} usable cores, onnxruntime {fp['onnxruntime']}, "
          f"{fp['threads']} thread(s)")
    print(f"{'model':<28} {'p50 #1 ms':>10} {'p50 #2 ms':>10} {'ratio':>7} {'runs':>11} {'stable':>8} {'cpu/wall':>11}")
    worst = 0.0
    for first, second in zip(rows[::2], rows[1::2]):
        if not (first["ok"] and second["ok"]):
            print(f"{first['subnet']:<28} failed: {first.get('error') or second.get('error')}")
            continue
        ratio = second["latency_p50_ms"] / first["latency_p50_ms"]
        worst = max(worst, abs(ratio - 1))
        print(f"{first['subnet']:<28} {first['latency_p50_ms']:>10.3f} {second['latency_p50_ms']:>10.3f} {ratio:>7.3f} "
              f"{first['runs']:>5}/{second['runs']:<5} {str(first['stable'])[0] + '/' + str(second['stable'])[0]:>8} "
              f"{_ratio(first['cpu_per_wall']):>5}/{_ratio(second['cpu_per_wall']):<5}")
    print(f"largest p50 difference between the two runs: {worst:.1%} (target: within 5%); wall {wall:.1f} s")
    print("cpu/wall: CPU time per wall time of the measuring process; well below the thread count means other "
          "work shared the cores, and the figures then say little about the device")


def all_resnet50(workdir: Path, bench_args: list[str]) -> None:
    ckpt, models = workdir / "resnet50.pt", workdir / "resnet50-all"
    if not ckpt.exists():
        sh("rtfq", "init", "--arch", "resnet50", "-o", str(ckpt))
    if not models.exists():
        t0 = time.perf_counter()
        sh("rtfq-export", "--checkpoint", str(ckpt), "--all", "--no-verify", "-o", str(models))
        print(f"exported 48 subnets in {time.perf_counter() - t0:.0f} s (not counted below)")
    files = sorted(models.glob("*.onnx"))
    results, wall = bench(files, workdir / "resnet50-all.json", ["--threads", "1", *bench_args])
    rows = results["models"]
    ok = [r for r in rows if r["ok"]]
    print(f"benchmarked {len(rows)} ResNet-50 subnets at 1 thread in {wall / 60:.1f} min "
          f"(target: within 15 min); {len(ok)} ok, {sum(r['stable'] for r in ok)} stable")
    if ok:
        fastest, slowest = min(ok, key=lambda r: r["latency_p50_ms"]), max(ok, key=lambda r: r["latency_p50_ms"])
        print(f"p50 from {fastest['latency_p50_ms']:.1f} ms ({fastest['subnet']}) to {slowest['latency_p50_ms']:.1f} ms "
              f"({slowest['subnet']}); results in {workdir / 'resnet50-all.json'}")


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", type=Path, help="Models to benchmark twice (default: export one).")
    parser.add_argument("--arch", default="tiny_resnet", help="Architecture of the exported model for (a).")
    parser.add_argument("--subnet", help="Subnet to export for (a), e.g. r224-w1.00-q8 (resnet50's default space).")
    parser.add_argument("--all-resnet50", action="store_true", help="(b): benchmark all 48 ResNet-50 subnets.")
    parser.add_argument("--workdir", type=Path, help="Where models and results go (default: a temporary folder).")
    parser.add_argument("bench_args", nargs=argparse.REMAINDER,
                        help="After '--': options for rtfq-bench run, e.g. -- --threads 2 --max-time 5")
    args = parser.parse_args()
    bench_args = [a for a in args.bench_args if a != "--"]
    with tempfile.TemporaryDirectory() as tmp:
        workdir = args.workdir or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        if args.all_resnet50:
            all_resnet50(workdir, bench_args)
        else:
            repeatability(args.models or export_one(workdir, args.arch, args.subnet), workdir, bench_args)


if __name__ == "__main__":
    main()
