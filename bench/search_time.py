"""Where the time of `rtfq search` goes on ResNet-50 at 224 px, and how long one search takes.

A random-weight ResNet-50 supernet with candidates 6..2 bits. The script measures the
time to score one plan (one forward pass over N images, label-free: KL from the maxnet)
and profiles it by operator; counts the plans one search step scores (two moves per free
quantizer) and the steps a search from uniform 4 bits to a budget halfway to uniform
3 bits takes (by running the search with a cost-only scorer, which always takes the move
that lowers the cost most: a lower bound on the steps of a real search); and prints the
estimated search time = plans scored x seconds per plan, for the exact search and for the
lazy one (`--rescore 8`, the default).

    python bench/search_time.py [--images 32,64] [--threads 2]
"""

from __future__ import annotations

import argparse
import time

import torch
from tabulate import tabulate

from rtfq_deploy.budget import parse_budget
from rtfq_deploy.costs import subnet_costs
from rtfq_deploy.models import SupernetConfig, build_supernet
from rtfq_deploy.search import PlanScorer, SearchOptions, greedy_search
from rtfq_deploy.space import SearchSpace, SubnetConfig
from rtfq_deploy.train.mixed import free_quantizers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", default="32,64")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--resolution", type=int, default=224)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = build_supernet(SupernetConfig("resnet50", space=SearchSpace(resolutions=(args.resolution,),
                                                                        widths=(1.0,), bits=(6, 5, 4, 3, 2)))).eval()
    r = args.resolution
    q4, q3 = (subnet_costs(model, SubnetConfig(r, 1.0, q)).bitops for q in (4, 3))
    budget = parse_budget(f"bitops={(q4 + q3) // 2}")
    started = time.perf_counter()
    walk_only = greedy_search(model, r, 1.0, budget, lambda cfg: 0.0)
    cost_only_s = time.perf_counter() - started
    lazy_walk = greedy_search(model, r, 1.0, budget, lambda cfg: 0.0, SearchOptions(rescore=8))
    free = len(free_quantizers(model))
    plans = walk_only.evaluations
    rows = []
    for n in (int(v) for v in args.images.split(",")):
        x = torch.randn(n, 3, r, r)
        with torch.no_grad():
            model.train()
            reference = torch.softmax(model(x, model.active(model.config.space.maxnet)), 1)
        scorer = PlanScorer(model, x, reference_probs=reference)
        cfg = SubnetConfig(r, 1.0, 4)
        scorer(cfg)
        started = time.perf_counter()
        for _ in range(3):
            scorer(cfg)
        per_plan = (time.perf_counter() - started) / 3
        rows.append([n, f"{per_plan:.2f}", plans, len(walk_only.steps), f"{plans * per_plan / 60:.1f}",
                     lazy_walk.evaluations, f"{lazy_walk.evaluations * per_plan / 60:.1f}"])
        if n == int(args.images.split(",")[0]):
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                scorer(cfg)
            table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=8)
    print(f"ResNet-50 at {r} px, {free} free quantizers ({2 * free} moves at most per step), {args.threads} "
          f"thread(s); budget {budget}: {len(walk_only.steps)} steps, {plans} plans scored "
          f"(the cost walks of those plans took {cost_only_s:.1f} s)")
    print(tabulate(rows, headers=["images", "s per plan", "exact: plans", "steps", "exact: est. min",
                                  "lazy M=8: plans", "lazy: est. min"], disable_numparse=True))
    print(f"\nWhere one plan's scoring goes ({args.images.split(',')[0]} images):")
    print(table)


if __name__ == "__main__":
    main()
