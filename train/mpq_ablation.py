"""Per-layer mixed precision (OneShot-MPQ) on the built-in strong-shift benchmark, over seeds.

For every seed: one data set (`rtfq data synth --shift strong`), one tiny_resnet supernet
at 64 px, full width, candidates 6,5,4,3,2 bits (first and last layer at 8), trained
with the strong shift's CPU recipe and `--rule mixed --n-random 3`. Rows:

  mixed          scheduler + IDM (the method)
  mixed-none     neither scheduler nor IDM            (Table 6's first row)
  mixed-no2      the method with candidates 6,5,4,3   (Table 1: what adding 2 bits costs)
  mixed-noidm    scheduler only                       (Table 6's middle row)

Every run is evaluated on the seed's held-out target images at each uniform bit-width.
On the `mixed` run, for each budget (BitOPs halfway between two uniform levels) the
script searches a plan with `rtfq search` (label-free score on the unlabeled target
images), draws --random-plans random plans within +-2% of its BitOPs, calibrates them
all on target images and evaluates them; it reports the searched plan against the
median random plan and the best uniform subnet at or below its BitOPs, and the rank
correlation between the search's label-free score and held-out top-1 over those plans.

    python train/mpq_ablation.py --out /tmp/mpq                   # seeds 1,2,3, every row
    python train/mpq_ablation.py --out /tmp/mpq --runs mixed --seeds 1

Finished steps are reused when the script runs again; `--out train/ablation/mpq` reports
the tables kept in the repository.
"""

from __future__ import annotations

import json
import os
import random
import statistics
import time
from pathlib import Path

from rtfq_deploy import ablation
from rtfq_deploy.ablation import mean_std, sh, tool, train_and_eval

BITS = (6, 5, 4, 3, 2)
SPACE = ["--resolutions", "64", "--widths", "1.0"]
RUNS: dict[str, tuple[list[str], tuple[int, ...]]] = {
    "mixed": ([], BITS),
    "mixed-none": (["--no-idm", "--no-scheduler"], BITS),
    "mixed-no2": ([], (6, 5, 4, 3)),
    "mixed-noidm": (["--no-idm"], BITS),
}
BUDGETS = ((4, 3), (3, 2))  # halfway between these uniform levels' BitOPs
RECIPE = "synth_strong_paper_cpu"


def init_path(out: Path, bits: tuple[int, ...]) -> Path:
    return out / f"init-{''.join(map(str, bits))}.pt"


def prepare(out: Path, seed: int, names: list[str]) -> None:
    """The seed's data and the initial weights of each candidate set ``names`` train with."""
    ablation.make_data(out, seed, "strong")
    for bits in dict.fromkeys(RUNS[name][1] for name in names):
        if not init_path(out, bits).exists():
            sh(tool("rtfq"), "init", "--arch", "tiny_resnet", "--num-classes", "16", *SPACE,
               "--bits", ",".join(map(str, bits)), "--seed", str(seed), "-o", str(init_path(out, bits)))


def train_one(out: Path, seed: int, name: str, threads: int) -> dict:
    options, bits = RUNS[name]
    table = train_and_eval(out, seed, name, lambda: [
        "--checkpoint", str(init_path(out, bits)), "--recipe", RECIPE, "--rule", "mixed", "--n-random", "3",
        *options], threads)
    return {"top1": {r["subnet"]: r["top1"] for r in table["subnets"]}, "train_seconds": table["train_seconds"],
            "bitops": {r["subnet"]: r["bitops"] for r in table["subnets"]}}


def random_plans(model, resolution: int, width: float, target: int, count: int, seed: int) -> list:
    """``count`` distinct random plans within +-2% of ``target`` BitOPs: uniform random
    bits per free quantizer, then random one-step moves towards the window."""
    from rtfq_deploy.costs import plan_costs, walk
    from rtfq_deploy.space import MixedBits, SubnetConfig
    from rtfq_deploy.planfile import free_quantizers

    rng = random.Random(seed)
    shape = walk(model, resolution, width)
    free = free_quantizers(model)
    fixed = {k: v for k, v in model.plan(SubnetConfig(resolution, width, BITS[0])).as_dict().items() if k not in free}
    candidates = sorted(model.config.space.bits)
    plans: dict[str, object] = {}
    attempts = 0
    while len(plans) < count and attempts < 100 * count:
        attempts += 1
        bits = {**fixed, **{n: rng.choice(candidates) for n in free}}
        for _ in range(10 * len(free)):
            cost = plan_costs(model, shape, model.plan(SubnetConfig(resolution, width, MixedBits.of(bits)))).bitops
            if abs(cost - target) <= 0.02 * target:
                cfg = model.subnet(resolution, width, bits)
                plans.setdefault(str(cfg), cfg)
                break
            down = cost > target
            movable = [n for n in free if (bits[n] > candidates[0] if down else bits[n] < candidates[-1])]
            name = rng.choice(movable)
            bits[name] = candidates[candidates.index(bits[name]) + (-1 if down else 1)]
    return list(plans.values())


def plans_one(out: Path, seed: int, count: int, search_images: int, threads: int) -> dict:
    """Search, random plans and their evaluation on the seed's `mixed` run."""
    result_path = out / "plans.json"
    if result_path.exists():
        return json.loads(result_path.read_text())
    import torch

    from rtfq_deploy.checkpoint import load_checkpoint
    from rtfq_deploy.costs import subnet_costs
    from rtfq_deploy.planfile import plan_document, write_plan
    from rtfq_deploy.search import make_scorer

    torch.set_num_threads(threads)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    ckpt_path = out / "mixed" / "supernet.pt"
    ckpt = load_checkpoint(ckpt_path)
    model = ckpt.model.eval()
    uniform = {q: subnet_costs(model, model.config.space.parse(f"r64-w1.00-q{q}")).bitops for q in BITS}
    budgets = []
    folder = out / "plans"
    folder.mkdir(exist_ok=True)
    for hi, lo in BUDGETS:
        budget = (uniform[hi] + uniform[lo]) // 2
        searched, lazy = folder / f"bgs-{hi}{lo}.json", folder / f"lazy-{hi}{lo}.json"
        started = time.monotonic()
        for path, rescore in ((searched, 0), (lazy, 8)):  # Eq. 9 exactly, and the lazy default
            if not path.exists():
                sh(tool("rtfq"), "search", "--checkpoint", str(ckpt_path), "--budget", f"bitops={budget}", "--data",
                   str(out / "data/target"), "--search-images", str(search_images), "--rescore", str(rescore),
                   "-o", str(path), env=env, log=out / "search.log")
        doc, lazy_doc = json.loads(searched.read_text()), json.loads(lazy.read_text())
        randoms = random_plans(model, 64, 1.0, doc["costs"]["bitops"], count, seed * 100 + hi)
        names = []
        for i, cfg in enumerate(randoms):
            path = folder / f"random-{hi}{lo}-{i:02d}.json"
            write_plan(path, plan_document(model, cfg, subnet_costs(model, cfg).to_dict()), overwrite=True)
            names.append(str(cfg))
        budgets.append({"between": [hi, lo], "budget": budget, "bgs": doc["subnet"], "random": names,
                        "bgs_bitops": doc["costs"]["bitops"], "search_seconds": doc["search"]["seconds"],
                        "plans_scored": doc["search"]["plans_scored"], "lazy": lazy_doc["subnet"],
                        "lazy_plans_scored": lazy_doc["search"]["plans_scored"],
                        "lazy_seconds": lazy_doc["search"]["seconds"], "wall_seconds": time.monotonic() - started})
    calibrated = out / "mixed-plans.pt"
    if not calibrated.exists():
        sh(tool("rtfq"), "calibrate", "--checkpoint", str(ckpt_path), "--data", str(out / "data/target"),
           "--plans", str(folder), "--images", "256", "-o", str(calibrated), env=env)
    acc = out / "plans.acc.json"
    if not acc.exists():
        sh(tool("rtfq"), "eval", "--checkpoint", str(calibrated), "--data", str(out / "data/target_test"),
           "--plans", str(folder), "-o", str(acc), env=env)
    top1 = {r["subnet"]: r["top1"] for r in json.loads(acc.read_text())["subnets"]}
    bitops = {r["subnet"]: r["bitops"] for r in json.loads(acc.read_text())["subnets"]}
    ckpt = load_checkpoint(calibrated)
    for b in budgets:  # the search's own score of every plan, to see how it ranks them
        scorer = make_scorer(ckpt, out / "data/target", 64, labeled=False, images=search_images, seed=0)
        b["score"] = {name: scorer(ckpt.resolve(name)) for name in dict.fromkeys([b["bgs"], b["lazy"], *b["random"]])}
        b["top1"] = {name: top1[name] for name in b["score"]}
        b["bitops"] = {name: bitops[name] for name in b["score"]}
    result = {"budgets": budgets}
    ablation.write_json(result_path, result)
    return result


def spearman(xs: list[float], ys: list[float]) -> float:
    def ranks(v: list[float]) -> list[float]:
        order = sorted(range(len(v)), key=lambda i: v[i])
        r = [0.0] * len(v)
        i = 0
        while i < len(v):
            j = i
            while j + 1 < len(v) and v[order[j + 1]] == v[order[i]]:
                j += 1
            for k in range(i, j + 1):
                r[order[k]] = (i + j) / 2
            i = j + 1
        return r
    rx, ry = ranks(xs), ranks(ys)
    mx, my = statistics.fmean(rx), statistics.fmean(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    sx = sum((a - mx) ** 2 for a in rx) ** 0.5
    sy = sum((b - my) ** 2 for b in ry) ** 0.5
    return cov / (sx * sy) if sx and sy else float("nan")


def report(trained: dict[str, dict[int, dict]], plans: dict[int, dict], seeds: list[int], wall: float,
           out: Path) -> None:
    from tabulate import tabulate

    print(f"\nHeld-out target top-1 of the uniform subnets, mean ± std over seeds {','.join(map(str, seeds))}")
    rows = []
    for name, per_seed in trained.items():
        bits = RUNS[name][1]
        figures = {s: {f"q{q}": r["top1"][f"r64-w1.00-q{q}"] for q in bits} for s, r in per_seed.items()}
        cells = ablation.mean_std_cells(figures, [f"q{q}" for q in BITS])
        seconds = statistics.fmean(r["train_seconds"] for r in per_seed.values())
        rows.append([name, *cells, f"{seconds:.0f}"])
    print(tabulate(rows, headers=["run", *(f"q{q}" for q in BITS), "train s"], disable_numparse=True))
    summary: dict = {"uniform": {n: {s: r["top1"] for s, r in v.items()} for n, v in trained.items()}}
    if plans:
        print("\nSearched plan (BGS, label-free score) against random plans within ±2% of its BitOPs and the best "
              "uniform subnet at or below its BitOPs (held-out target top-1)")
        rows, per_budget = [], {}
        for seed, result in sorted(plans.items()):
            uniform = trained["mixed"][seed]
            for b in result["budgets"]:
                key = f"{b['between'][0]}/{b['between'][1]}"
                bgs = b["top1"][b["bgs"]]
                rand = [b["top1"][n] for n in b["random"]]
                fits = [q for q in BITS if uniform["bitops"][f"r64-w1.00-q{q}"] <= b["bgs_bitops"]]
                best_uniform = max(uniform["top1"][f"r64-w1.00-q{q}"] for q in fits)
                names = [b["bgs"], *b["random"]]
                rho = spearman([-b["score"][n] for n in names], [b["top1"][n] for n in names])
                per_budget.setdefault(key, []).append((bgs, statistics.median(rand), best_uniform, rho,
                                                       b["search_seconds"]))
                lazy = "same plan" if b["lazy"] == b["bgs"] else f"{b['top1'][b['lazy']]:.3f}"
                rows.append([seed, key, f"{b['bgs_bitops'] / 1e9:.4f}", f"{bgs:.3f}", f"{statistics.median(rand):.3f}",
                             f"{max(rand):.3f}", f"{best_uniform:.3f}", f"{rho:+.2f}",
                             f"{b['plans_scored']} / {b['search_seconds']:.0f}",
                             f"{lazy}, {b['lazy_plans_scored']} / {b['lazy_seconds']:.0f}"])
        print(tabulate(rows, headers=["seed", "between q", "GBitOPs", "BGS", "random median", "random best",
                                      "best uniform ≤", "rank corr", "BGS plans / s", "lazy (M=8) plans / s"],
                       disable_numparse=True))
        rows = []
        for key, values in per_budget.items():
            bgs, med, uni, rho, _ = zip(*values)
            rows.append([key, mean_std(list(bgs)), mean_std(list(med)), mean_std(list(uni)),
                         mean_std([a - b for a, b in zip(bgs, med)]), mean_std([a - b for a, b in zip(bgs, uni)]),
                         mean_std(list(rho))])
        print(tabulate(rows, headers=["between q", "BGS", "random median", "best uniform ≤", "BGS - random",
                                      "BGS - uniform", "rank corr"], disable_numparse=True))
        summary["plans"] = {str(s): p for s, p in plans.items()}
    print(f"\nwall time: {wall:.0f} s")
    ablation.write_json(out / "mpq.json", {"seeds": seeds, **summary, "wall_seconds": wall})


def main() -> None:
    ap = ablation.parser(__doc__, RUNS)
    ap.add_argument("--random-plans", type=ablation.positive, default=20, help="random plans per budget")
    ap.add_argument("--search-images", type=ablation.positive, default=128, help="images each plan is scored on")
    ap.add_argument("--no-plans", action="store_true", help="train and evaluate only (no search, no random plans)")
    args = ap.parse_args()
    names = ablation.run_names(ap, args.runs, RUNS)
    started = time.monotonic()
    trained = ablation.run_table(args.out, args.seeds, names, train_one, jobs=args.jobs, prepare=prepare)
    plans = {}
    if "mixed" in names and not args.no_plans:
        threads = max(1, ablation.CPUS // args.jobs)
        found = ablation.parallel(lambda s: plans_one(args.out / f"seed{s}", s, args.random_plans, args.search_images,
                                                      threads), args.seeds, args.jobs)
        plans = dict(zip(args.seeds, found))
    report(trained, plans, args.seeds, time.monotonic() - started, args.out)


if __name__ == "__main__":
    main()
