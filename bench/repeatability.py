"""Repeatability of ``rtfq-bench run``'s p50: the same models benchmarked by two whole runs in a row.

For every model x runtime, the relative difference of the two p50 latencies,
``|a - b| / min(a, b)``, and whether each run called the row stable. With
``--compare-unbatched`` the same pair of runs is made with ``--sample-time 0`` too (every
run timed alone, as before batching), the four runs alternated (batched, unbatched,
batched, unbatched) so that machine drift touches both alike.

    python bench/repeatability.py MODELS_DIR [--runtime onnxruntime --runtime openvino]
        [--every 1] [--compare-unbatched] [--goal 0.03] [-- extra rtfq-bench run options]

The default timing options are ``rtfq demo``'s (``--threads 1 --min-time 1 --max-time 4``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from rtfq_deploy.formats import DEFAULT_RUNTIME, RUNTIMES

BIN = Path(sys.executable).parent
DEMO = ["--threads", "1", "--min-time", "1", "--max-time", "4"]


def bench(models: list[Path], runtimes: list[str], extra: list[str], out: Path) -> dict[tuple[str, str], dict]:
    args = [str(BIN / "rtfq-bench"), "run", *map(str, models), "-o", str(out), "--force", "--json"]
    for r in runtimes:
        args += ["--runtime", r]
    done = subprocess.run(args + extra, capture_output=True, text=True)
    if done.returncode not in (0, 1):
        sys.exit(f"rtfq-bench run failed ({done.returncode}): {done.stderr.strip()[-500:]}")
    rows = json.loads(out.read_text())["models"]
    return {(r["subnet"], r["runtime"]): r for r in rows if r["ok"]}


def report(label: str, a: dict, b: dict, goal: float) -> list[str]:
    from tabulate import tabulate

    lines = []
    for runtime in sorted({k[1] for k in a}):
        keys = sorted(k for k in a if k[1] == runtime and k in b)
        diffs = {k: abs(a[k]["latency_p50_ms"] - b[k]["latency_p50_ms"]) / min(a[k]["latency_p50_ms"],
                                                                             b[k]["latency_p50_ms"]) for k in keys}
        worst = max(diffs, key=diffs.get)
        stable = sum(a[k]["stable"] for k in keys) + sum(b[k]["stable"] for k in keys)
        lines.append([label, runtime, len(keys), f"{sum(d <= goal for d in diffs.values())}",
                      f"{statistics.median(diffs.values()):.2%}", f"{diffs[worst]:.2%} ({worst[0]})",
                      f"{stable} of {2 * len(keys)}",
                      f"{min(a[k]['latency_p50_ms'] for k in keys):.3f}-{max(a[k]['latency_p50_ms'] for k in keys):.3f}"])
    return [tabulate(lines, headers=["timing", "runtime", "models", f"within {goal:.0%}", "median diff", "worst diff",
                                     "stable rows", "p50 ms"], disable_numparse=True)]


def main() -> None:
    argv = sys.argv[1:]
    extra = argv[argv.index("--") + 1:] if "--" in argv else DEMO
    argv = argv[:argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("models", type=Path)
    p.add_argument("--runtime", action="append", choices=list(RUNTIMES))
    p.add_argument("--every", type=int, default=1, help="only every n-th model (sorted by name)")
    p.add_argument("--compare-unbatched", action="store_true")
    p.add_argument("--goal", type=float, default=0.03)
    args = p.parse_args(argv)
    models = sorted(args.models.glob("*.onnx"))[::max(1, args.every)]
    if not models:
        sys.exit(f"no .onnx files in {args.models}")
    runtimes = args.runtime or [DEFAULT_RUNTIME]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "r.json"
        settings = [("batched", [])] + ([("unbatched", ["--sample-time", "0"])] if args.compare_unbatched else [])
        first = {label: bench(models, runtimes, extra + more, out) for label, more in settings}
        second = {label: bench(models, runtimes, extra + more, out) for label, more in settings}
    print(f"{len(models)} models from {args.models}, rtfq-bench run {' '.join(extra)}, two whole runs each")
    for label, _ in settings:
        print("\n".join(report(label, first[label], second[label], args.goal)))


if __name__ == "__main__":
    main()
