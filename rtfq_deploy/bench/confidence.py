"""Confidence intervals for a latency p50, and which choices they leave in doubt.

Standard library only (the server and ``rtfq-bench select`` use it without numpy).

The interval is distribution-free: for n samples, the median lies between the order
statistics ``n/2 -+ z*sqrt(n)/2`` with probability about 95% (z = 1.96), whatever the
latency distribution looks like (it is skewed and heavy-tailed on a busy host, so a
normal interval on the mean would mislead). Samples taken round robin with the other
candidates (:mod:`rtfq_deploy.bench.interleave`) are close to independent of the host's
slow periods, which is what the rule assumes. With several processes the interval is
widened to hold every process's own p50, since the processes differ more than the
samples within one.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Mapping, Sequence

Z95 = 1.959964
CI_KEY = "latency_p50_ci_ms"  # results rows and budget entries: [low, high] in ms


def median(values: Sequence[float]) -> float:
    data = sorted(values)
    n = len(data)
    if n == 0:
        raise ValueError("median of no values")
    return data[n // 2] if n % 2 else (data[n // 2 - 1] + data[n // 2]) / 2


def median_ci(samples: Sequence[float], z: float = Z95) -> tuple[float, float]:
    """(low, high) of the order-statistic interval for the median of ``samples``; with
    fewer than 6 samples the whole range (no narrower statement is honest)."""
    data = sorted(samples)
    n = len(data)
    if n == 0:
        raise ValueError("no samples")
    if n < 6:
        return data[0], data[-1]
    half = z * math.sqrt(n) / 2
    low = max(0, math.floor(n / 2 - half) - 1)  # 1-based order statistic -> 0-based index
    high = min(n - 1, math.ceil(n / 2 + half))
    return data[low], data[high]


def pooled_ci(per_process: Sequence[Sequence[float]]) -> tuple[float, float, float]:
    """(p50, low, high) over every process's samples: the pooled median and its interval,
    widened to hold each process's own median."""
    pooled = [x for samples in per_process for x in samples]
    p50 = median(pooled)
    low, high = median_ci(pooled)
    if len(per_process) > 1:
        medians = [median(s) for s in per_process if s]
        low, high = min(low, *medians), max(high, *medians)
    return p50, low, high


def relative_half_width(p50: float, low: float, high: float) -> float:
    return (high - low) / 2 / p50 if p50 > 0 else math.inf


def straddles(entry: Mapping[str, Any], limits: Iterable[Any], drift: float = 0.0) -> bool:
    """True if ``entry``'s p50 interval holds a latency limit of the budget (a
    :class:`rtfq_deploy.budget.Limit` on ``latency_p50_ms``): measured again, the
    entry may land on the other side of it, and the choice with it. ``drift``: a
    relative change of the host's speed between measurements, which widens the interval
    by that factor either way."""
    ci = entry.get(CI_KEY)
    if not (isinstance(ci, (list, tuple)) and len(ci) == 2 and all(isinstance(v, (int, float)) for v in ci)):
        return False
    low, high = ci[0] / (1.0 + drift), ci[1] * (1.0 + drift)
    return any(limit.key == "latency_p50_ms" and low <= limit.value <= high for limit in limits)


MAX_DRIFT = 0.25  # a device more than 25% slower or faster than last time is chosen for afresh


def drift(before: Mapping[str, float], now: Mapping[str, float]) -> float:
    """How much the host's speed moved between two measurements of one device: |L - 1|
    for L the median ratio now / before of the p50s of the models measured both times
    (0 when none was), at most MAX_DRIFT. The ratios between models hold within about
    1% from one enrollment to the next, while the level moves by several percent with
    the host's load for minutes at a time."""
    from rtfq_deploy.fileio import is_number

    ratios = [now[k] / before[k] for k in before.keys() & now.keys()
              if is_number(before[k]) and is_number(now[k]) and before[k] > 0]
    if not ratios:
        return 0.0
    level = median(ratios)
    return min(MAX_DRIFT, abs(level - 1.0)) if math.isfinite(level) else 0.0


def straddling(choices: Iterable[Any]) -> list[Any]:
    """The met choices (:class:`rtfq_deploy.budget.Choice`) whose entry's p50 interval
    straddles one of the budget's latency limits."""
    return [c for c in choices if c.met and straddles(c.entry, c.budget.limits)]


def rivals(choice: Any, entries: Iterable[Mapping[str, Any]]) -> list[str]:
    """More accurate entries (of the choice's runtime) that missed the budget only on a
    latency limit inside their p50 interval: measured again, one of them may be chosen."""
    from rtfq_deploy.budget import Budget
    from rtfq_deploy.fileio import is_number

    chosen = choice.entry
    if not choice.met or not is_number(chosen.get("accuracy")):
        return []
    out = []
    for e in entries:
        if e.get("runtime") != chosen.get("runtime") or not is_number(e.get("accuracy")):
            continue
        if e["accuracy"] <= chosen["accuracy"] or e is chosen:
            continue
        failed = [limit for limit in choice.budget.limits if not Budget((limit,), "").meets(e)]
        if failed and all(limit.key == "latency_p50_ms" for limit in failed) and straddles(e, failed):
            out.append(str(e.get("subnet")))
    return out


def doubt(choice: Any, entries: Iterable[Mapping[str, Any]]) -> str | None:
    """Why a met choice may differ when measured again (its own interval straddles the
    budget, or a more accurate rival's does), or None."""
    if not choice.met:
        return None
    lines = []
    if straddles(choice.entry, choice.budget.limits):
        low, high = choice.entry[CI_KEY]
        lines.append(f"its p50 interval {low:.4g}-{high:.4g} ms straddles the budget")
    near = rivals(choice, entries)
    if near:
        lines.append(f"{', '.join(near[:5])} (more accurate) may meet it too")
    return "; ".join(lines) or None
