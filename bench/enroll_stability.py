"""Do two `rtfq enroll` runs of one device choose alike? (issue 22's stability goal)

Exports the demo's 48 subnets (tiny_resnet, 16 classes, resolutions 64/56/48/40, widths
1.0/0.86/0.73/0.6, bits 8/6/4) from a freshly initialised supernet, or takes --models and
--accuracy from a real run, starts `rtfq-serve --candidates` on loopback, runs
`rtfq enroll` twice (one device, two caches, so nothing is reused), and prints:

- choices: for 20 latency budgets spread geometrically over the measured p50 range, the
  share for which both runs choose the same subnet (goal: at least 95%), as the server
  chooses for a device that enrolls again (run 1's choice is kept while run 2's
  measurement cannot tell it from the new one, the intervals widened by how much the
  host's speed moved between the runs: rtfq_deploy.budget.choose's previous and drift),
  and without that rule (each run chosen alone);
- ratios: the median over every pair of subnets of |ratio in run 2 / ratio in run 1 - 1|,
  where ratio is one subnet's p50 over the other's (goal: within 3%);
- the choices whose p50 interval straddled their budget, per run.

Without --accuracy the table is synthetic: top-1 grows with resolution, width and bits,
plus a fixed pseudo-random jitter of up to 1 point (so neighbours are not ordered by MACs
alone, as in a trained table). Usage (about 10 minutes on 2 busy cores):

    python bench/enroll_stability.py --work /tmp/stability [--processes 3] [--max-time 30]
    python bench/enroll_stability.py --subnets 12   # a quicker look at fewer subnets
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import math
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from rtfq_deploy.scriptargs import Parser, out_dir, positive, positive_float

BIN = Path(sys.executable).parent
TOKEN = "stability-" + "5" * 24


def export_demo_space(work: Path) -> Path:
    import torch

    from rtfq_deploy.checkpoint import save_checkpoint
    from rtfq_deploy.models import SupernetConfig, build_supernet
    from rtfq_deploy.space import SearchSpace

    models = work / "models"
    if models.is_dir() and len(list(models.glob("*.onnx"))) == 48:
        return models
    torch.manual_seed(0)
    space = SearchSpace(resolutions=(64, 56, 48, 40), widths=(1.0, 0.86, 0.73, 0.6), bits=(8, 6, 4))
    save_checkpoint(work / "init.pt", build_supernet(SupernetConfig("tiny_resnet", num_classes=16, space=space)))
    subprocess.run([str(BIN / "rtfq-export"), "--checkpoint", str(work / "init.pt"), "--all", "--no-verify",
                    "-o", str(models)], check=True, capture_output=True)
    return models


def synthetic_table(models: Path, out: Path) -> Path:
    rows = []
    for path in sorted(models.glob("*.onnx")):
        match = re.fullmatch(r"r(\d+)-w([\d.]+)-q(\d+)", path.stem)
        r, w, q = int(match[1]), float(match[2]), int(match[3])
        jitter = int(hashlib.sha256(path.stem.encode()).hexdigest()[:8], 16) / 2**32 * 0.01
        rows.append({"subnet": path.stem, "top1": round(0.40 + 0.003 * r + 0.15 * w + 0.01 * q + jitter, 4)})
    out.write_text(json.dumps({"subnets": rows}))
    return out


def enroll_once(url: str, work: Path, name: str, args: argparse.Namespace) -> dict:
    cache = work / f"cache-{name}"
    command = [str(BIN / "rtfq"), "enroll", "--server", url, "--device", "stability", "--cache", str(cache),
               "--token-file", str(work / "token.txt"), "--remeasure", "--processes", str(args.processes),
               "--min-time", str(args.min_time), "--max-time", str(args.max_time), "--ci", str(args.ci),
               "--budget", "latency=1000s", "--json"]
    start = time.monotonic()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    print(f"enroll {name}: {time.monotonic() - start:.0f} s", file=sys.stderr)
    return json.loads((cache / "results.json").read_text())


def choose(rows: list[dict], table: dict[str, float], limit_ms: float, previous: str | None = None,
           drift: float = 0.0) -> str | None:
    """The choice rtfq-bench select and rtfq-serve make (rtfq_deploy.budget.choose);
    with ``previous``, the server's for a device that chose it last time."""
    from rtfq_deploy.budget import choose as budget_choose
    from rtfq_deploy.budget import parse_budget

    entries = [dict(r, accuracy=table.get(r["subnet"])) for r in rows]
    choice = budget_choose(entries, parse_budget(f"latency={limit_ms!r}ms"), previous=previous, drift=drift)
    return str(choice.entry["subnet"]) if choice.met else None


def doubtful(rows: list[dict], table: dict[str, float], limit_ms: float) -> bool:
    """Whether rtfq-serve would name this choice as one that may differ when measured again."""
    from rtfq_deploy.bench.confidence import doubt
    from rtfq_deploy.budget import choose as budget_choose
    from rtfq_deploy.budget import parse_budget

    entries = [dict(r, accuracy=table.get(r["subnet"])) for r in rows]
    return doubt(budget_choose(entries, parse_budget(f"latency={limit_ms!r}ms")), entries) is not None


def main() -> None:
    parser = Parser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", type=out_dir, default=Path("/tmp/rtfq-enroll-stability"))
    parser.add_argument("--models", type=Path, help="rtfq-export --all output (default: the demo space, exported)")
    parser.add_argument("--accuracy", type=Path, help="its rtfq eval table (default: synthetic)")
    parser.add_argument("--subnets", type=positive, default=48, help="offer only the first N (sorted by name)")
    parser.add_argument("--processes", type=positive, default=3)
    parser.add_argument("--min-time", type=positive_float, default=3.0)
    parser.add_argument("--max-time", type=positive_float, default=30.0)
    parser.add_argument("--ci", type=positive_float, default=0.01)
    parser.add_argument("--budgets", type=positive, default=20)
    parser.add_argument("--reuse", action="store_true",
                        help="analyse the two enrolls kept in --work (cache-1, cache-2) again, measuring nothing")
    args = parser.parse_args()
    kept = [args.work / f"cache-{name}" / "results.json" for name in ("1", "2")]
    if args.reuse and not all(p.is_file() for p in kept):
        parser.error(f"--reuse: {args.work} holds no two kept enrolls (cache-1/results.json, cache-2/results.json)")
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    models = args.models or export_demo_space(work)
    offered = work / f"offered-{args.subnets}"
    offered.mkdir(exist_ok=True)
    for path in sorted(models.glob("*.onnx"))[:args.subnets]:
        target = offered / path.name
        if not target.exists():
            target.write_bytes(path.read_bytes())
    table_path = args.accuracy or synthetic_table(models, work / "acc.json")
    table = {r["subnet"]: r["top1"] for r in json.loads(table_path.read_text())["subnets"]}
    (work / "devices.txt").write_text(f"stability {TOKEN}\n")
    (work / "token.txt").write_text(TOKEN + "\n")
    if args.reuse:
        runs = [json.loads(p.read_text()) for p in kept]
    else:
        server = subprocess.Popen([str(BIN / "rtfq-serve"), str(work / "dist"), "--port", "0", "--candidates",
                                   str(offered), "--accuracy", str(table_path), "--device-token-file",
                                   str(work / "devices.txt"), "--upload-interval", "0"],
                                  stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        try:
            url = re.search(r" on (http://\S+) ", server.stdout.readline())[1]
            runs = [enroll_once(url, work, name, args) for name in ("1", "2")]
        finally:
            server.send_signal(signal.SIGINT)
            server.wait(15)
    ok = [{r["subnet"]: r for r in run["models"] if r["ok"] and r["runtime"] == "onnxruntime"} for run in runs]
    subnets = sorted(set(ok[0]) & set(ok[1]))
    rows = [[ok[k][s] for s in subnets] for k in (0, 1)]
    p50s = [r["latency_p50_ms"] for k in (0, 1) for r in rows[k]]
    low, high = min(p50s), max(p50s)
    budgets = [low * (high / low) ** ((i + 0.5) / args.budgets) for i in range(args.budgets)]
    first = [choose(rows[0], table, b) for b in budgets]
    alone = sum(c == choose(rows[1], table, b) for c, b in zip(first, budgets))
    from rtfq_deploy.bench.confidence import drift

    # the server's figures of a device enrolling again: the p50s it was served at, then
    # how much its speed moved (rtfq_deploy.bench.select.Previous.drift)
    moved = drift({c: ok[0][c]["latency_p50_ms"] for c in first if c}, {s: ok[1][s]["latency_p50_ms"] for s in subnets})
    again = [choose(rows[1], table, b, previous=c, drift=moved) for c, b in zip(first, budgets)]
    same = sum(c == d for c, d in zip(first, again))
    kept = sum(c == d != choose(rows[1], table, b) for c, d, b in zip(first, again, budgets))
    diffs = sorted(abs((ok[1][a]["latency_p50_ms"] / ok[1][b]["latency_p50_ms"])
                       / (ok[0][a]["latency_p50_ms"] / ok[0][b]["latency_p50_ms"]) - 1)
                   for a, b in itertools.combinations(subnets, 2))
    median_diff = diffs[len(diffs) // 2]
    flagged = [{i for i, b in enumerate(budgets) if doubtful(rows[k], table, b)} for k in (0, 1)]
    differ = {i for i, b in enumerate(budgets) if choose(rows[0], table, b) != choose(rows[1], table, b)}
    level = sorted(ok[1][s]["latency_p50_ms"] / ok[0][s]["latency_p50_ms"] for s in subnets)[len(subnets) // 2]
    widths = sorted((r["latency_p50_ci_ms"][1] - r["latency_p50_ci_ms"][0]) / 2 / r["latency_p50_ms"]
                    for k in (0, 1) for r in rows[k])
    cpu = runs[0]["fingerprint"]["cpu_model"]
    print(f"{len(subnets)} subnets on {cpu}, p50 {low:.4f}-{high:.4f} ms, processes {args.processes}, "
          f"max-time {args.max_time:g} s")
    print(f"choices: {same}/{len(budgets)} budgets choose the same subnet in both runs ({same / len(budgets):.0%}; "
          f"goal >= 95%), as the server chooses for a device enrolling again ({kept} kept while in doubt, "
          f"drift {moved:.1%}); "
          f"each run chosen alone: {alone}/{len(budgets)}")
    print(f"ratios: median |pairwise latency ratio difference| {median_diff:.2%} over {len(diffs)} pairs "
          f"(goal <= 3%); 90th percentile {diffs[int(0.9 * len(diffs))]:.2%}")
    print(f"intervals: median half-width {widths[len(widths) // 2]:.2%} of the p50; choices named as in doubt: "
          f"{len(flagged[0])} and {len(flagged[1])} of {len(budgets)}; of the {len(differ)} that differ, "
          f"{len(differ & (flagged[0] | flagged[1]))} were named by at least one run")
    corrected = [dict(r, latency_p50_ms=r["latency_p50_ms"] / level) for r in rows[1]]
    alike = sum(choose(rows[0], table, b) == choose(corrected, table, b) for b in budgets)
    print(f"level: run 2's p50s are {level:.3f}x run 1's (median over subnets); corrected for it, "
          f"{alike}/{len(budgets)} choose alike")
    if not (same / len(budgets) >= 0.95 and median_diff <= 0.03 and math.isfinite(median_diff)):
        sys.exit(1)


if __name__ == "__main__":
    main()
