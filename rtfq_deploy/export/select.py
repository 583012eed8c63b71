"""Choosing subnets for a MAC or BitOP budget (parsed by :func:`rtfq_deploy.budget.parse_count`)."""

from __future__ import annotations

from typing import Mapping

from rtfq_deploy.accuracy import read_accuracy  # noqa: F401  (torch-free home; re-exported here)
from rtfq_deploy.costs import Costs
from rtfq_deploy.errors import RtfqError
from rtfq_deploy.space import SubnetConfig

METRICS = ("macs", "bitops")


def format_cost(value: float, metric: str) -> str:
    return f"{value / 1e9:.3f} G{'MACs' if metric == 'macs' else 'BitOPs'}"


def choose(costs: Mapping[SubnetConfig, Costs], budget: float, metric: str = "macs", bits: int | None = None,
           accuracy: Mapping[str, float] | None = None) -> tuple[SubnetConfig, str]:
    """The subnet to export for ``budget`` and a sentence saying why.

    With an accuracy table: the most accurate subnet within the budget (ties: the
    cheaper). Without one: the costliest subnet within the budget. ``costs`` may hold
    mixed-precision plans too; ``bits`` keeps only the uniform subnets of that bit-width.
    """
    candidates = [c for c in costs if bits is None or c.bits == bits]
    if not candidates:
        valid = ", ".join(str(b) for b in sorted({c.bits for c in costs if c.uniform}, reverse=True))
        raise RtfqError(f"bit-width {bits} is not in the space (valid: {valid})")
    cost = {c: getattr(costs[c], metric) for c in candidates}
    within = [c for c in candidates if cost[c] <= budget]
    if not within:
        cheapest = min(candidates, key=lambda c: (cost[c], str(c)))
        raise RtfqError(f"budget {format_cost(budget, metric)} is below the cheapest subnet "
                        f"({cheapest}: {format_cost(cost[cheapest], metric)})")
    if accuracy is not None:
        scored = [c for c in within if str(c) in accuracy]
        if not scored:
            raise RtfqError("the accuracy table has no subnet within the budget")
        best = max(scored, key=lambda c: (accuracy[str(c)], -cost[c], str(c)))
        return best, (f"most accurate within {format_cost(budget, metric)}: top-1 {accuracy[str(best)]:.4f}, "
                      f"{format_cost(cost[best], metric)}")
    best = max(within, key=lambda c: (cost[c], str(c)))
    return best, (f"no accuracy table given, so the costliest subnet within {format_cost(budget, metric)} "
                  f"({format_cost(cost[best], metric)}); pass --accuracy to choose by accuracy")


def bucket_budgets(costs: Mapping[SubnetConfig, Costs], buckets: int, metric: str = "macs",
                   bits: int | None = None) -> list[float]:
    """Upper edges of ``buckets`` equal intervals spanning the candidates' cost range."""
    values = [getattr(c, metric) for cfg, c in costs.items() if bits is None or cfg.bits == bits]
    if not values:
        return []
    lo, hi = min(values), max(values)
    return [lo + (hi - lo) * k / buckets for k in range(1, buckets + 1)]
