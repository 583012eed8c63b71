"""Which subnets a training step trains (paper section III-F and Table II).

A rule returns the step's subnets with the step's top subnet first: its target
predictions give the pseudo-labels and it receives no distillation.
"""

from __future__ import annotations

import random
from typing import Callable

import numpy as np

from rtfq_deploy.errors import RtfqError
from rtfq_deploy.space import SearchSpace, SubnetConfig

RULES = ("sandwichq", "sandwich", "max6min", "single", "mixed")  # mixed: rtfq_deploy.train.mixed


def step_rng(seed: int, step: int) -> random.Random:
    """The random source of one step's choices: a pure function of (seed, step)."""
    return random.Random(int(np.random.SeedSequence([seed, step, 7]).generate_state(1)[0]))


def _random(space: SearchSpace, rng: random.Random, bits: int | None = None) -> SubnetConfig:
    return SubnetConfig(rng.choice(space.resolutions), rng.choice(space.widths),
                        bits if bits is not None else rng.choice(space.bits))


def sandwichq(space: SearchSpace, rng: random.Random, n: int) -> list[SubnetConfig]:
    """RTF-Q's rule: maxnet at the highest bit-width, ``n`` random subnets with random
    bit-widths, minnet at the lowest bit-width."""
    return [space.maxnet] + [_random(space, rng) for _ in range(n)] + [space.minnet]


def sandwich(space: SearchSpace, rng: random.Random, n: int) -> list[SubnetConfig]:
    """The standard sandwich rule applied per bit-width: max, ``n`` random and min at
    every bit-width (3 x (n + 2) subnets with the paper's three bit-widths)."""
    hi, lo = space.maxnet, space.minnet
    out = []
    for q in space.bits:  # highest first, so the overall maxnet leads
        out += [SubnetConfig(hi.resolution, hi.width, q)]
        out += [_random(space, rng, q) for _ in range(n)]
        out += [SubnetConfig(lo.resolution, lo.width, q)]
    return out


def max6min(space: SearchSpace, rng: random.Random, n: int) -> list[SubnetConfig]:
    """Table II's 'max + 6 random + min' (``n`` is ignored)."""
    return sandwichq(space, rng, 6)


def single(space: SearchSpace, rng: random.Random, n: int, bits: int) -> list[SubnetConfig]:
    """Single bit-width training (Fig. 3's baseline): the sandwich rule at ``bits`` only."""
    hi, lo = space.maxnet, space.minnet
    return ([SubnetConfig(hi.resolution, hi.width, bits)] + [_random(space, rng, bits) for _ in range(n)]
            + [SubnetConfig(lo.resolution, lo.width, bits)])


class RuleError(RtfqError, ValueError):
    """A sampling rule that does not fit the supernet's space (one line, exit 2)."""


def check_rule(name: str, space: SearchSpace, single_bits: int | None = None) -> None:
    """The single rule's bit-width must be one of the space's: checked when a run starts
    or resumes, before any image is read."""
    if name == "single" and (single_bits is None or single_bits not in space.bits):
        raise RuleError(f"--rule single --single-bits {single_bits}: the single rule needs a bit-width of the "
                        f"space ({', '.join(map(str, space.bits))})")


def make_rule(name: str, space: SearchSpace, n_random: int = 2, single_bits: int | None = None
              ) -> Callable[[int, int], list[SubnetConfig]]:
    """``rule(seed, step)`` -> the step's subnets, a pure function of its arguments."""
    if name not in RULES or name == "mixed":
        raise ValueError(f"unknown sampling rule {name!r} (known: {', '.join(RULES)}; mixed is built from a "
                         "supernet by rtfq_deploy.train.mixed.MixedRule)")
    if name == "single":
        check_rule(name, space, single_bits)
        return lambda seed, step: single(space, step_rng(seed, step), n_random, single_bits)
    fn = {"sandwichq": sandwichq, "sandwich": sandwich, "max6min": max6min}[name]
    return lambda seed, step: fn(space, step_rng(seed, step), n_random)
