"""Evidence for issue #3 on the synthetic benchmark with the CPU recipe.

Trains, from one initial checkpoint, on the same data and steps:
  source-only   the recipe with only the source cross-entropy
  rtfq          the recipe as is (SandwichQ, teacher, pseudo-labels, IM)
  sandwich      standard Sandwich applied per bit-width (paper Table II)
  max6min       max + 6 random + min (paper Table II)
  single-qN     one run per bit-width, trained at that bit-width only (paper Fig. 3)
then evaluates every subnet on held-out target images and prints target top-1 of the
maxnet and minnet at each bit-width, the mean over all subnets, and wall time per run.

    python train/uda_ablation.py --out /tmp/uda            # everything
    python train/uda_ablation.py --out /tmp/uda --runs source-only,rtfq
Finished runs are reused when the script is run again (an interrupted one is resumed).
The recipe's loss weights were tuned on seed-0 data; the default seed here is 1.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

INIT = ["--arch", "tiny_resnet", "--num-classes", "10", "--resolutions", "64,56,48,40",
        "--widths", "1.0,0.86,0.73,0.6", "--bits", "8,6,4"]
RUNS = {
    "source-only": ["--source-only"],
    "rtfq": [],
    "sandwich": ["--rule", "sandwich"],
    "max6min": ["--rule", "max6min"],
    "single-q8": ["--rule", "single", "--single-bits", "8"],
    "single-q6": ["--rule", "single", "--single-bits", "6"],
    "single-q4": ["--rule", "single", "--single-bits", "4"],
}


def tool(name: str) -> str:
    return str(Path(sys.executable).parent / name)


def sh(*args: str, env: dict | None = None) -> None:
    subprocess.run(args, check=True, stdout=subprocess.DEVNULL, env=env)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--runs", default=",".join(RUNS), help="comma-separated subset of: " + ", ".join(RUNS))
    ap.add_argument("--steps", type=int, help="override the recipe's steps")
    ap.add_argument("--seed", type=int, default=1, help="seed of the data, the initial weights and training")
    ap.add_argument("--jobs", type=int, default=2, help="runs at a time (each with 2 // jobs threads)")
    args = ap.parse_args()
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    data, init = out / "data", out / "init.pt"
    if not data.exists():
        sh(tool("rtfq"), "data", "synth", str(data), "--seed", str(args.seed))
    if not init.exists():
        sh(tool("rtfq"), "init", *INIT, "--seed", str(args.seed), "-o", str(init))
    def one(name: str) -> None:
        run, acc = out / name, out / f"{name}.acc.json"
        if acc.exists():
            return
        env = {**os.environ, "OMP_NUM_THREADS": str(max(1, 2 // args.jobs))}
        started = time.monotonic()
        extra = RUNS[name] + (["--steps", str(args.steps)] if args.steps else [])
        resume = ["--resume", str(run)] if (run / "run.json").exists() else [
            "--checkpoint", str(init), "--source", str(data / "source"), "--target", str(data / "target"),
            "--out", str(run), "--recipe", "synth_cpu", "--seed", str(args.seed), *extra]
        sh(tool("rtfq-train"), *resume, env=env)
        train_s = time.monotonic() - started
        sh(tool("rtfq"), "eval", "--checkpoint", str(run / "supernet.pt"), "--data", str(data / "target_test"),
           "-o", str(acc), env=env)
        table = json.loads(acc.read_text())
        table["train_seconds"] = train_s
        acc.write_text(json.dumps(table, indent=2))
        print(f"{name}: trained in {train_s:.0f} s", flush=True)

    names = args.runs.split(",")
    started = time.monotonic()
    with ThreadPoolExecutor(args.jobs) as pool:
        list(pool.map(one, names))
    print(f"all runs: {time.monotonic() - started:.0f} s wall with {args.jobs} at a time")
    results = {}
    for name in names:
        table = json.loads((out / f"{name}.acc.json").read_text())
        results[name] = ({r["subnet"]: r["top1"] for r in table["subnets"]}, table["train_seconds"])
    report(results)


def report(results: dict) -> None:
    from tabulate import tabulate

    bits = (8, 6, 4)
    rows = []
    for name, (acc, seconds) in results.items():
        maxs = [acc.get(f"r64-w1.00-q{q}") for q in bits]
        mins = [acc.get(f"r40-w0.60-q{q}") for q in bits]
        rows.append([name, *(f"{v:.3f}" for v in maxs + mins), f"{sum(acc.values()) / len(acc):.3f}", f"{seconds:.0f}"])
    print("Target top-1 (held-out target_test) by run; maxnet r64-w1.00 and minnet r40-w0.60 at each bit-width")
    print(tabulate(rows, headers=["run", *(f"max q{q}" for q in bits), *(f"min q{q}" for q in bits),
                                  "mean 48", "train s"]))
    singles = {q: results.get(f"single-q{q}") for q in bits}
    joint = results.get("rtfq")
    if joint and all(singles.values()):
        print("\nJoint multi-bit (rtfq) vs single-bit training, mean target top-1 over the 16 subnets of each bit-width")
        table = []
        for q in bits:
            def mean_at(acc: dict) -> float:
                vals = [v for k, v in acc.items() if k.endswith(f"-q{q}")]
                return sum(vals) / len(vals)
            j, s = mean_at(joint[0]), mean_at(singles[q][0])
            table.append([f"q{q}", f"{j:.3f}", f"{s:.3f}", f"{j - s:+.3f}"])
        print(tabulate(table, headers=["bits", "joint", "single", "joint - single"]))


if __name__ == "__main__":
    main()
