"""``rtfq search``: the most accurate per-quantizer bit plan within a budget (bidirectional greedy search)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from rtfq_deploy.cli.common import SEED, BoundedInt, Command, FiniteFloat

# Bounds of the search's options (rtfq_deploy.search.MIN_LAMBDA is the library's; this
# module stays torch-free). A search ends within 2 L (C - 1) steps of at most 2 L plans
# each (L free quantizers, C candidate bit-widths; rtfq_deploy.search.step_bound).
MIN_LAMBDA = 0.01
MAX_SEARCH_IMAGES = 1024  # one forward pass of all of them per plan: memory grows with N
MAX_RESCORE = 1024  # moves are 2 per free quantizer (ResNet-50: under 250): beyond them, the same as 0

SEARCH_OPTIONS = [
    click.option("--data", type=click.Path(file_okay=False, path_type=Path),
                 help="Target images to score plans on: any folder tree (label-free score), or class folders "
                      "with --labeled."),
    click.option("--labeled", is_flag=True,
                 help="DATA's class folders are true labels (held-out labeled target images): score plans by "
                      "cross-entropy instead of by KL divergence from the adapted maxnet."),
    click.option("--resolution", type=BoundedInt(1, 1024), help="Search at this resolution (default: the largest "
                 "resolution and width whose cheapest plan fits the budget)."),
    click.option("--width", type=FiniteFloat(0.0, 1.0, low_open=True), help="Search at this width."),
    click.option("--search-images", type=BoundedInt(2, MAX_SEARCH_IMAGES), default=256, show_default=True,
                 help=f"Images each plan is scored on, at least 2 readable (one forward pass of all of them per "
                      f"plan, BatchNorm on their statistics; at most {MAX_SEARCH_IMAGES})."),
    click.option("--lambda", "lam", type=FiniteFloat(MIN_LAMBDA, 1000.0), default=1.5, show_default=True,
                 help=f"Weight of the normalised cost against the normalised loss (Eq. 9), from {MIN_LAMBDA} (below "
                      "it the cost no longer steers the search to the budget) to 1000."),
    click.option("--search-seed", type=SEED, default=0, show_default=True, help="Which images are drawn."),
    click.option("--rescore", type=BoundedInt(0, MAX_RESCORE), default=8, show_default=True,
                 help="Lazy greedy: after the first step, score the last-moved quantizer's moves and the M others "
                      "that look best by the loss change each made when last scored (0: score every move at every "
                      "step, Eq. 9 exactly; on the benchmark both found the same plans with 2.6x fewer scores)."),
]


def search_options(f):
    for option in reversed(SEARCH_OPTIONS):
        f = option(f)
    return f


def progress_printer():
    """One line per search step on stderr, with how far the cost has come down to the budget."""
    def show(step) -> None:
        from rtfq_deploy.budget import format_value

        click.echo(f"[{100 * max(0.0, step.done):3.0f}%] step {step.step}: {step.subnet}  loss {step.loss:.4f}  "
                   f"{format_value('bitops', step.costs['bitops'], 4)} BitOPs  "
                   f"{format_value('size', step.costs['weight_bytes'], 4)}  "
                   f"{step.candidates} plans in {step.seconds:.1f} s, about {_duration(step.eta)} left", err=True)
    return show


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.0f} min"


def run_search(ckpt, budget_text: str, data: Path, labeled: bool, resolution, width, search_images: int, lam: float,
               search_seed: int, rescore: int = 0):
    from rtfq_deploy.budget import parse_budget
    from rtfq_deploy.search import SearchOptions, check_budget, search_checkpoint

    budget = parse_budget(budget_text)
    check_budget(budget)
    return budget, search_checkpoint(ckpt, budget, data, labeled=labeled, resolution=resolution, width=width,
                                     images=search_images, seed=search_seed, options=SearchOptions(lam=lam, rescore=rescore),
                                     progress=progress_printer())


@click.command(cls=Command)
@click.option("--checkpoint", type=click.Path(dir_okay=False, path_type=Path), required=True, help="Supernet checkpoint.")
@click.option("--budget", required=True,
              help="Limits the plan must meet, joined by commas: bitops=20G, size=2MB (weight bytes at the plan's "
                   "bits), macs=0.5G (chooses resolution and width).")
@search_options
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), required=True, help="Plan file to write.")
@click.option("--force", is_flag=True, help="Overwrite an existing output file.")
@click.option("--json", "as_json", is_flag=True, help="Print the plan file and the search's record as JSON.")
def search(checkpoint: Path, budget: str, data: Path | None, labeled: bool, resolution: int | None, width: float | None,
           search_images: int, lam: float, search_seed: int, rescore: int, output: Path, force: bool,
           as_json: bool) -> None:
    """Search the per-quantizer bit plan with the lowest loss within a budget
    (OneShot-MPQ's bidirectional greedy search) and write its plan file, for rtfq-export
    --plan and rtfq eval --plans."""
    if data is None:
        raise click.UsageError("missing --data (target images to score plans on)")
    if output.exists() and not force:
        raise click.UsageError(f"{output} exists (use --force to overwrite)")
    from rtfq_deploy.budget import parse_budget
    from rtfq_deploy.checkpoint import load_checkpoint
    from rtfq_deploy.planfile import plan_document, write_plan
    from rtfq_deploy.search import check_budget, describe_costs

    check_budget(parse_budget(budget))  # bad input fails before the slow load
    ckpt = load_checkpoint(checkpoint)
    limits, result = run_search(ckpt, budget, data, labeled, resolution, width, search_images, lam, search_seed,
                                rescore)
    document = plan_document(ckpt.model, result.subnet, result.costs.to_dict())
    document["search"] = {"budget": str(limits), "score": result.score, "lambda": lam, "rescore": rescore, "images": search_images,
                          "data": str(data), "steps": len(result.steps), "plans_scored": result.evaluations,
                          "seconds": round(result.seconds, 2), "loss": result.loss}
    write_plan(output, document, overwrite=force)
    if as_json:
        click.echo(json.dumps(document, indent=2))
    else:
        click.echo(f"wrote {output}: {result.subnet}, {describe_costs(result.costs)}; {result.score} "
                   f"{result.loss:.4f}; {result.evaluations} plans scored in {result.seconds:.1f} s")
