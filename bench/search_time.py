"""How long `rtfq search` takes on ResNet-50 at 224 px: the old scorer against the new, in one run.

A random-weight ResNet-50 supernet with candidates 6..2 bits (101 free quantizers), N
target images (16 by default), label-free score (KL from the maxnet), a budget halfway
between uniform 4 and uniform 3 bits, the lazy search (`--rescore 8`, the default).

- old: the scorer as it was before stage reuse: a whole forward pass per plan, weights
  fake-quantized at every pass, the four-buffer fake-quant (x / s, round, clamp, * s),
  at 1 thread (the figure issue 24 started from) and at `--threads`;
- new: `PlanScorer` as `rtfq search` runs it: only the stages from the moved quantizer's
  on, from kept inputs; each layer's weights quantized once per bit-width; in-place
  fake-quant; `--threads` threads.

The new search runs for real (wall time, plans, steps, the ETA printed after its first
step against the time the rest took, peak RSS). On every `--every`-th plan the old scorer
scores the same plan too, at 1 thread and at `--threads`, so both are timed under the
same load over the whole run; the old search is not run in full: its scores are the new
ones (the largest relative difference is printed), so it takes the same path, and its
time is plans scored x its median seconds per plan.

    python bench/search_time.py [--images 16] [--threads 2] [--every 10]
"""

from __future__ import annotations

import argparse
import contextlib
import resource
import statistics
import sys
import time

import torch
from tabulate import tabulate

import rtfq_deploy.quant.lsq as lsq
from rtfq_deploy.budget import parse_budget
from rtfq_deploy.costs import subnet_costs
from rtfq_deploy.layers import batch_statistics
from rtfq_deploy.models import SupernetConfig, build_supernet
from rtfq_deploy.search import PlanScorer, SearchOptions, greedy_search
from rtfq_deploy.space import SearchSpace, SubnetConfig
from rtfq_deploy.planfile import free_quantizers


@contextlib.contextmanager
def four_buffer_fake_quant():
    """LSQ's inference fake-quant as it was: four kernels, four buffers."""
    new = lsq.lsq_quantize

    def old(x, step, qmin, qmax, grad_scale):
        step = step.clamp_min(1e-8)
        return torch.clamp(torch.round(x / step), qmin, qmax) * step

    lsq.lsq_quantize = old
    try:
        yield
    finally:
        lsq.lsq_quantize = new


def old_score(model, x, reference, cfg) -> float:
    with torch.no_grad(), batch_statistics(model), four_buffer_fake_quant():
        logits = model(x, model.active(cfg))
    return float(torch.nn.functional.kl_div(torch.log_softmax(logits, 1), reference, reduction="batchmean"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--resolution", type=int, default=224)
    parser.add_argument("--every", type=int, default=10, help="the old scorer also scores every N-th plan")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = build_supernet(SupernetConfig("resnet50", space=SearchSpace(resolutions=(args.resolution,),
                                                                        widths=(1.0,), bits=(6, 5, 4, 3, 2)))).eval()
    r = args.resolution
    q4, q3 = (subnet_costs(model, SubnetConfig(r, 1.0, q)).bitops for q in (4, 3))
    budget = parse_budget(f"bitops={(q4 + q3) // 2}")
    x = torch.randn(args.images, 3, r, r)
    with torch.no_grad(), batch_statistics(model):
        reference = torch.softmax(model(x, model.active(model.config.space.maxnet)), 1)

    scorer = PlanScorer(model, x, reference_probs=reference)
    old_seconds: dict[int, list[float]] = {1: [], args.threads: []}
    new_seconds: list[float] = []
    worst = [0.0]

    def scored(cfg):
        """The new score, and every --every-th plan the old one too, at 1 thread and at
        --threads: both scorers see the same load over the whole search."""
        started = time.perf_counter()
        value = scorer(cfg)
        new_seconds.append(time.perf_counter() - started)
        if len(new_seconds) % args.every == 1:
            for threads in old_seconds:
                torch.set_num_threads(threads)
                started = time.perf_counter()
                old = old_score(model, x, reference, cfg)
                old_seconds[threads].append(time.perf_counter() - started)
                worst[0] = max(worst[0], abs(old - value) / max(1e-12, abs(value)))
            torch.set_num_threads(args.threads)
        return value
    scored.rebase = scorer.rebase  # type: ignore[attr-defined]

    steps: list = []

    def progress(step) -> None:
        steps.append(step)
        print(f"step {step.step}: {step.candidates} plans in {step.seconds:.1f} s, about {step.eta / 60:.1f} min left",
              file=sys.stderr, flush=True)

    result = greedy_search(model, r, 1.0, budget, scored, SearchOptions(rescore=8), progress=progress)
    new_total = result.seconds - sum(sum(v) for v in old_seconds.values())  # without the old scorer's turns
    rss_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    plans = result.evaluations
    old_1, old_n = (statistics.median(old_seconds[t]) for t in (1, args.threads))
    new_per_plan = new_total / plans
    # what the ETA after step 1 foretold (both with the old scorer's turns, which every step has alike)
    rest = sum(s.seconds for s in steps[1:])
    print(f"ResNet-50 at {r} px, {len(free_quantizers(model))} free quantizers, {args.images} images, budget {budget}, "
          f"lazy M=8: {len(result.steps)} steps, {plans} plans scored; the old scorer, run on every {args.every}th "
          f"plan ({len(old_seconds[1])} plans), agrees with the new within {worst[0]:.1e} (relative)")
    rows = [["old, 1 thread", f"{old_1:.2f}", f"{plans * old_1 / 60:.1f} (plans x s per plan)", "1.00"],
            [f"old, {args.threads} threads", f"{old_n:.2f}", f"{plans * old_n / 60:.1f} (plans x s per plan)",
             f"{old_1 / old_n:.2f}"],
            [f"new, {args.threads} threads", f"{new_per_plan:.2f}", f"{new_total / 60:.1f} (measured)",
             f"{old_1 / new_per_plan:.2f}"]]
    print(tabulate(rows, headers=["scorer", "s per plan", "search min", "speed-up vs old 1 thread"],
                   disable_numparse=True))
    print(f"\nETA printed after step 1: {steps[0].eta / 60:.1f} min; the rest took {rest / 60:.1f} min "
          f"({steps[0].eta / max(1e-9, rest):.2f}x)")
    print(f"peak RSS {rss_gb:.2f} GB; plan {result.subnet}, {result.costs.bitops / 1e9:.2f} GBitOPs")


if __name__ == "__main__":
    main()
