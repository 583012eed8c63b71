"""The allowed range of every numeric training setting, in one table.

``rtfq-train``'s options, recipe files and a resumed ``run.json`` all pass through
:func:`check`, so a NaN learning rate or a 10**9-step warm-up is refused wherever it
comes from. Torch-free, so the command line can build its option types from it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from rtfq_deploy.errors import RtfqError

_MANY = 10**8  # steps: far beyond any run, small enough for every schedule's arithmetic


class SettingError(RtfqError, ValueError):
    """A training setting outside its range (a ValueError too, as dataclass checks raise)."""


@dataclass(frozen=True)
class Range:
    """``low <= value <= high`` (strict at an open end); ``integer`` settings take ints only."""

    integer: bool
    low: float
    high: float
    low_open: bool = False
    high_open: bool = False

    def describe(self) -> str:
        if self.integer:
            return f"an integer from {self.low:g} to {self.high:g}"
        left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
        return f"a finite number in {left}{self.low:g}, {self.high:g}{right}"


SETTINGS: dict[str, Range] = {
    "steps": Range(True, 1, _MANY),
    "batch_size": Range(True, 4, 65536),  # each domain's half needs 2 images: BatchNorm cannot train on 1
    "lr": Range(False, 0.0, 10.0, low_open=True),
    "weight_decay": Range(False, 0.0, 1.0),
    "step_lr_scale": Range(False, 0.0, 1000.0),
    "warmup_steps": Range(True, 0, _MANY),
    "target_start": Range(True, 0, _MANY),
    "rampup_steps": Range(True, 0, _MANY),
    "ema": Range(False, 0.0, 1.0, high_open=True),
    "n_random": Range(True, 0, 64),
    "single_bits": Range(True, 2, 8),
    "seed": Range(True, 0, 2**31 - 1),
    "checkpoint_every": Range(True, 1, _MANY),
    "log_every": Range(True, 1, _MANY),
    "calib_images": Range(True, 2, 10**7),  # BatchNorm statistics need two images
    "cache_mb": Range(False, 0.0, float(2**20)),
    "workers": Range(True, 0, 256),
    "inplace_distill": Range(False, 0.0, 1.0),
    "idm": Range(False, 0.0, 1000.0),
    "scheduler_start": Range(True, 0, _MANY),
    "scheduler_period": Range(True, 1, _MANY),
    "pseudo_every": Range(True, 1, _MANY),
}
OPTIONAL = frozenset({"step_lr_scale", "single_bits", "inplace_distill", "scheduler_start", "scheduler_period"})

LOSSES: dict[str, Range] = {
    "ce": Range(False, 0.0, 1000.0),
    "distill": Range(False, 0.0, 1000.0),
    "pseudo": Range(False, 0.0, 1000.0),
    "im": Range(False, 0.0, 1000.0),
    "threshold": Range(False, 0.0, 1.0),
    "temperature": Range(False, 0.0, 100.0, low_open=True),
}


def check(name: str, value: Any, limit: Range, option: str | None = None) -> int | float:
    """``value`` as the setting's type, or a SettingError naming ``option``."""
    label = option or f"--{name.replace('_', '-')}"
    bad = SettingError(f"{label} must be {limit.describe()}, got {value!r}"[:300])
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise bad
    if limit.integer:
        if isinstance(value, float):
            if not (math.isfinite(value) and value.is_integer()):
                raise bad
            value = int(value)
    else:
        if not math.isfinite(value):
            raise bad
        value = float(value)
    if value < limit.low or value > limit.high or (limit.low_open and value == limit.low) or (
            limit.high_open and value == limit.high):
        raise bad
    return value
