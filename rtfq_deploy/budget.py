"""Budgets on a device (latency, peak memory, file size, MACs, BitOPs) and the choice rule.

Shared by ``rtfq-bench select``, ``rtfq-serve`` and ``rtfq fetch``, so it imports
neither torch nor onnx: it runs on a device with only the light dependencies.

Syntax of one budget: ``KIND=VALUE`` joined by commas when several must hold at once
(``latency=20ms,memory=64MB``). KIND is one of ``latency`` (p50), ``latency-p90``,
``memory`` (peak resident memory), ``size`` (model file), ``macs``, ``bitops``. A value
whose unit says its kind may drop ``KIND=``: ``20ms`` is a p50 latency and ``0.8G`` (no
unit) a MAC count. Byte values need the kind, since ``64MB`` could be memory or size.
Byte units: B, KB/MB/GB (powers of 1000) and KiB/MiB/GiB (powers of 1024).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from rtfq_deploy.errors import RtfqError
from rtfq_deploy.fileio import is_number

# kind -> the manifest/results key it limits; entries carry these keys.
METRIC_KEYS = {
    "latency": "latency_p50_ms",
    "latency-p90": "latency_p90_ms",
    "memory": "peak_memory_bytes",
    "size": "size_bytes",
    "macs": "macs",
    "bitops": "bitops",
}
_ALIASES = {"latency-p50": "latency", "p50": "latency", "p90": "latency-p90", "mem": "memory",
            "file": "size", "mac": "macs"}
_UNIT_KIND = {"time": ("latency", "latency-p90"), "bytes": ("memory", "size"), "count": ("macs", "bitops")}

_TIME = {"us": 1e-3, "ms": 1.0, "s": 1e3}
_BYTES = {"b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "kib": 2**10, "mib": 2**20, "gib": 2**30}
_COUNT = {"": 1.0, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12}
# Largest value a limit may take, per unit kind: far beyond any device (1e15 ms, 1 EiB,
# 1e18 operations), small enough that every later sum or ratio stays finite.
_MAX = {"time": 1e15, "bytes": float(2**60), "count": 1e18}
_MAX_TEXT = 1000
_NUMBER_RE = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(?:[eE]([+-]?\d+))?\s*([A-Za-z]*)")


@dataclass(frozen=True)
class Limit:
    """One bound: ``entry[key] <= value`` (ms for latency, bytes, or a count)."""

    kind: str
    value: float

    @property
    def key(self) -> str:
        return METRIC_KEYS[self.kind]

    def __str__(self) -> str:
        return f"{self.kind}={format_value(self.kind, self.value)}"


@dataclass(frozen=True)
class Budget:
    """Limits that must all hold; ``text`` is what the user wrote, for reports."""

    limits: tuple[Limit, ...]
    text: str

    def __str__(self) -> str:
        return ",".join(str(limit) for limit in self.limits)

    def meets(self, entry: Mapping[str, Any]) -> bool:
        return all(_number(entry.get(limit.key)) <= limit.value for limit in self.limits)


def parse_number(text: str, unit_kind: str) -> float:
    """'20ms' -> 20.0 (ms), '64MiB' -> 67108864, '0.8G' -> 8e8, by ``unit_kind``."""
    value, unit = _split(text)
    scale = _scales(unit_kind).get(unit.lower())
    if scale is None:
        units = ", ".join(u for u in _scales(unit_kind) if u) or "none"
        raise RtfqError(f"malformed budget {text!r}: unit {unit or '(none)'!r} is not one of {units}")
    return _finite(value * scale, text, unit_kind)


def parse_count(text: str) -> float:
    """A MAC or BitOP count: '0.8G' -> 8e8 (suffixes K, M, G, T: powers of 1000), as
    ``rtfq-export --budget`` takes it."""
    return parse_number(text, "count")


def parse_limit(text: str) -> Limit:
    text = text.strip()
    kind, sep, value_text = text.partition("=")
    if sep:
        kind = _ALIASES.get(kind.strip().lower(), kind.strip().lower())
        if kind not in METRIC_KEYS:
            raise RtfqError(f"unknown budget kind {kind!r} in {text!r}: expected one of {', '.join(METRIC_KEYS)}")
        return Limit(kind, parse_number(value_text, _unit_kind(kind)))
    value, unit = _split(text)
    unit = unit.lower()
    if unit in _TIME:
        return Limit("latency", _finite(value * _TIME[unit], text, "time"))
    if unit in _COUNT:
        return Limit("macs", _finite(value * _COUNT[unit], text, "count"))
    if unit in _BYTES:
        raise RtfqError(f"budget {text!r} could be peak memory or file size: write memory={text} or size={text}")
    raise RtfqError(f"malformed budget {text!r}: unknown unit {unit!r}")


def parse_budget(text: str) -> Budget:
    """``'latency=20ms,memory=64MB'`` -> a Budget whose limits must all hold."""
    if len(text) > _MAX_TEXT:
        raise RtfqError(f"malformed budget: {len(text)} characters is too long for a budget")
    parts = [p for p in text.split(",") if p.strip()]
    if not parts:
        raise RtfqError("empty budget: expected e.g. 20ms, memory=64MB or 0.8G")
    limits = tuple(parse_limit(p) for p in parts)
    kinds = [limit.kind for limit in limits]
    if len(set(kinds)) != len(kinds):
        raise RtfqError(f"budget {text!r} limits the same quantity twice")
    return Budget(limits, text.strip())


def format_value(kind: str, value: float, digits: int = 12) -> str:
    """The canonical text of a value: with the default digits it parses back to the same
    value (to 12 significant digits); fewer digits are for messages."""
    unit = _unit_kind(kind)
    if unit == "time":
        return f"{value:.{digits}g}ms"
    if unit == "bytes":
        return f"{value / 1e6:.{digits}g}MB"
    return f"{value / 1e9:.{digits}g}G"


@dataclass(frozen=True)
class Choice:
    """The entry chosen for a budget; ``met`` is False when nothing meets it and
    ``entry`` is then the cheapest option on the budget's first limit; ``kept``: the
    previous choice, kept because the measurement cannot tell it from the new one."""

    budget: Budget
    entry: Mapping[str, Any]
    met: bool
    reason: str
    kept: bool = False


def choose(entries: Sequence[Mapping[str, Any]], budget: Budget, name_key: str = "subnet",
           previous: str | None = None, drift: float = 0.0) -> Choice:
    """The most accurate entry that meets every limit (ties: the cheaper on the first
    limit, then the name). Entries without an accuracy rank below those with one.

    ``previous``: the entry chosen for this budget last time (a device measuring itself
    again). It stays chosen while the new measurement is in doubt, so a choice does not
    flip with the noise of a busy host: it may still meet the budget (every latency
    limit inside or above its p50 interval, every other limit met) and the new choice's
    or its own p50 interval holds a latency limit. A new choice that is clearly within
    the budget and more accurate, or a previous one clearly over it, replaces it.
    ``drift``: how much the host's speed moved since the previous measurement
    (:func:`rtfq_deploy.bench.confidence.drift`); the intervals are widened by it.
    """
    strict = _choose(entries, budget, name_key)
    if previous is None or strict.entry.get(name_key) == previous:
        return strict
    old = next((e for e in entries if e.get(name_key) == previous), None)
    if old is None or not _may_meet(old, budget, drift):
        return strict
    from rtfq_deploy.bench.confidence import straddles

    if not (straddles(old, budget.limits, drift) or (strict.met and straddles(strict.entry, budget.limits, drift))):
        return strict
    moved = f" (the host's speed moved {drift:.1%} since)" if drift else ""
    return Choice(budget, old, True, f"kept {previous}, chosen before: measured again it may still meet {budget} "
                  f"and the new measurement cannot tell it from {strict.entry.get(name_key)}{moved}", kept=True)


def _may_meet(entry: Mapping[str, Any], budget: Budget, drift: float) -> bool:
    """Every limit met, or a latency limit inside the entry's (widened) p50 interval."""
    from rtfq_deploy.bench.confidence import straddles

    return all(Budget((limit,), "").meets(entry)
               or (limit.key == "latency_p50_ms" and straddles(entry, (limit,), drift)) for limit in budget.limits)


def _choose(entries: Sequence[Mapping[str, Any]], budget: Budget, name_key: str) -> Choice:
    if not entries:
        raise RtfqError("nothing to choose from: no measured models")
    first = budget.limits[0]
    meeting = [e for e in entries if budget.meets(e)]
    if not meeting:
        cheapest = min(entries, key=lambda e: (_number(e.get(first.key)), str(e.get(name_key))))
        got = format_value(first.kind, _number(cheapest.get(first.key)), digits=4)
        return Choice(budget, cheapest, False,
                      f"nothing meets {budget}; the cheapest option is {cheapest.get(name_key)} ({first.kind} {got})")
    best = max(meeting, key=lambda e: (_accuracy(e), -_number(e.get(first.key)), str(e.get(name_key))))
    acc = best.get("accuracy")
    why = f"top-1 {acc:.4f}" if isinstance(acc, (int, float)) else "no accuracy known"
    return Choice(budget, best, True, f"most accurate meeting {budget}: {best.get(name_key)} ({why})")


def pareto_front(entries: Sequence[Mapping[str, Any]], cost_key: str) -> list[Mapping[str, Any]]:
    """Entries no other entry beats on both accuracy (higher) and ``cost_key`` (lower),
    sorted by cost."""
    ranked = sorted((e for e in entries if _accuracy(e) > -math.inf and _number(e.get(cost_key)) < math.inf),
                    key=lambda e: (_number(e.get(cost_key)), -_accuracy(e)))
    front: list[Mapping[str, Any]] = []
    for e in ranked:
        if not front or _accuracy(e) > _accuracy(front[-1]):
            front.append(e)
    return front


def _split(text: str) -> tuple[float, str]:
    if len(text) > _MAX_TEXT:
        raise RtfqError(f"malformed budget: {len(text)} characters is too long for a budget")
    match = _NUMBER_RE.fullmatch(text.strip())
    if match is None:
        raise RtfqError(f"malformed budget {text!r}: expected a number and a unit, e.g. 20ms, 64MB or 0.8G")
    value = float(f"{match[1]}e{match[2] or 0}")  # float() parses any exponent; 10 ** int(...) may not end
    if not math.isfinite(value) or value <= 0:
        raise RtfqError(f"budget must be a positive, finite number, got {text!r}")
    return value, match[3]


def _finite(value: float, text: str, unit_kind: str) -> float:
    """Every limit is a positive number no larger than the kind's maximum."""
    if not math.isfinite(value) or value <= 0 or value > _MAX[unit_kind]:
        top = format_value(_UNIT_KIND[unit_kind][0], _MAX[unit_kind], digits=3)
        raise RtfqError(f"budget {text!r} is out of range (positive, at most {top})")
    return value


def _unit_kind(kind: str) -> str:
    return next(unit for unit, kinds in _UNIT_KIND.items() if kind in kinds)


def _scales(unit_kind: str) -> Mapping[str, float]:
    return {"time": _TIME, "bytes": _BYTES, "count": _COUNT}[unit_kind]


def _number(value: Any) -> float:
    """A missing or non-numeric metric never meets a limit."""
    return float(value) if is_number(value) else math.inf


def _accuracy(entry: Mapping[str, Any]) -> float:
    value = entry.get("accuracy")
    return float(value) if is_number(value) else -math.inf
