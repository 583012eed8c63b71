"""Per-layer mixed-precision training (OneShot-MPQ, Eqs. 2-3 and 6-8).

Every quantizer the bit policy leaves free (not the first and last layer, not residual
operands) chooses its bits from the space's bit-widths, weights and activations
independently; an activation read by two layers (a block's conv1 and downsample) has one
quantizer and so is one choice. Per step the rule trains the max plan and ``n`` random
plans (:class:`MixedRule`); the bit-width scheduler (:class:`BitScheduler`) keeps the
smallest candidate away from the weight quantizers whose weights sit closest to rounding
boundaries; information distortion mitigation (:class:`DistortionMitigation`) pulls the
BatchNorm outputs of layers at their smallest bit-width towards the max plan's.

Choices where the paper and its public code (RFQuant) differ, or are silent:
- unstable-weight score weighted by 1/2^(b-1) (the paper), threshold (1 - eps) step / 2
  (RFQuant); the freeze removes a weight quantizer's smallest candidate only (the score
  measures weights);
- the scheduler's period and start are training steps (``scheduler_period``,
  ``scheduler_start``), K follows a cosine from 0.5 to 0.2 over the periods;
- IDM is RFQuant's: mean squared error between BatchNorm outputs, weight ``idm``
  (0.01), only for plans at the max plan's resolution and width (same shapes);
- fairness weight decay is a no-op with this project's default (Adam, weight decay 0)
  and is not implemented.
Everything random is a function of (seed, step), and the scheduler's state is saved in
``state.pt``, so ``--resume`` stays exact.
"""

from __future__ import annotations

import contextlib
import math
import random
from dataclasses import dataclass, field
from typing import Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

from rtfq_deploy.layers import SlimBatchNorm2d
from rtfq_deploy.models.base import Supernet
from rtfq_deploy.planfile import free_quantizers
from rtfq_deploy.space import MixedBits, SubnetConfig

EPSILON = 0.25
K_START, K_END = 0.5, 0.2


@dataclass(frozen=True)
class MixedRule:
    """Max plan first (uniform at the space's highest bits, largest resolution and
    width), then ``n`` plans with random resolution, width and per-quantizer bits."""

    model_plan: Mapping[str, int]  # the fixed quantizers' bits (policy), by name
    free: tuple[str, ...]
    space_bits: tuple[int, ...]
    resolutions: tuple[int, ...]
    widths: tuple[float, ...]
    n: int

    @classmethod
    def for_model(cls, model: Supernet, n: int) -> "MixedRule":
        space = model.config.space
        free = tuple(free_quantizers(model))
        fixed = {k: v for k, v in model.plan(space.maxnet).as_dict().items() if k not in free}
        return cls(fixed, free, space.bits, space.resolutions, space.widths, n)

    def __call__(self, rng: random.Random, frozen: frozenset[str] = frozenset()) -> list[SubnetConfig]:
        top = SubnetConfig(self.resolutions[0], self.widths[0], self.space_bits[0])
        out = [top]
        for _ in range(self.n):
            r, w = rng.choice(self.resolutions), rng.choice(self.widths)
            bits = dict(self.model_plan)
            for name in self.free:
                choices = self.space_bits[:-1] if name in frozen and len(self.space_bits) > 1 else self.space_bits
                bits[name] = rng.choice(choices)
            out.append(SubnetConfig(r, w, MixedBits.of(bits)))
        return out


def unstable_score(weight: Tensor, quant, bits_choices: tuple[int, ...], eps: float = EPSILON) -> float:
    """Eq. 6: the share of weights within eps of a rounding boundary, summed over the
    candidates with weight 1/2^(b-1) (low bit-widths count most). Measured in code units
    (``quant.unrounded``), so it means the same for every quantizer kind; a clamped weight
    counts as unstable, as its error exceeds half a step."""
    score = 0.0
    with torch.no_grad():
        for b in bits_choices:
            v = quant.unrounded(weight, b)
            error = (v - quant.to_int(weight, b).to(v.dtype)).abs()
            score += float((error > (1.0 - eps) / 2).float().mean()) / 2 ** (b - 1)
    return score


@dataclass
class BitScheduler:
    """Eq. 7: every ``period`` steps from ``start``, the top-K share of free weight
    quantizers by :func:`unstable_score` lose their smallest candidate until the next
    period; K follows a cosine from 0.5 to 0.2 over the training's periods."""

    start: int
    period: int
    steps: int
    frozen: frozenset[str] = field(default_factory=frozenset)

    def k_at(self, step: int) -> float:
        span = max(1, self.steps - self.start)
        t = min(1.0, max(0.0, (step - self.start) / span))
        return K_END + 0.5 * (K_START - K_END) * (1.0 + math.cos(math.pi * t))

    def due(self, step: int) -> bool:
        return step >= self.start and (step - self.start) % self.period == 0

    def update(self, model: Supernet, free: set[str], bits_choices: tuple[int, ...], step: int) -> None:
        scores = {}
        for name, layer in model.layers():
            q = layer.weight_quant
            if q.name in free:
                scores[q.name] = unstable_score(layer.weight, q, bits_choices)
        top = sorted(scores, key=lambda n: (-scores[n], n))[: round(self.k_at(step) * len(scores))]
        self.frozen = frozenset(top)

    def state(self) -> dict:
        return {"frozen": sorted(self.frozen)}

    def load(self, state: Mapping) -> None:
        frozen = state.get("frozen") if isinstance(state, Mapping) else None
        if not isinstance(frozen, list) or not all(isinstance(n, str) for n in frozen):
            raise ValueError("bit-width scheduler state is not a list of quantizer names")
        self.frozen = frozenset(frozen)


def conv_bn_pairs(model: Supernet) -> dict[str, str]:
    """Weight quantizer of each conv -> the BatchNorm right after it, as the model's own
    integer graph pairs them."""
    return {f"{layer}.weight_quant": bn for layer, bn in model.graph().conv_bn_pairs().items()}


class DistortionMitigation:
    """Eq. 8 as RFQuant computes it: the max plan's BatchNorm outputs on the source batch
    are the reference; a plan of the same resolution and width adds the mean squared
    error of every layer whose weights it samples at the smallest bit-width."""

    def __init__(self, model: Supernet, lowest: int) -> None:
        self.pairs = conv_bn_pairs(model)
        self.modules = {m.name: m for m in model.modules() if isinstance(m, SlimBatchNorm2d)}
        self.lowest = lowest

    @property
    def everything(self) -> set[str]:
        return set(self.pairs.values())

    def targets(self, sub: SubnetConfig, top: SubnetConfig) -> set[str]:
        """BatchNorms to align for ``sub`` (none unless it has the top plan's shapes)."""
        if sub.uniform or (sub.resolution, sub.width) != (top.resolution, top.width):
            return set()
        bits = sub.bits.as_dict()
        return {bn for q, bn in self.pairs.items() if bits.get(q) == self.lowest}

    @contextlib.contextmanager
    def capture(self, names: set[str]) -> Iterator[dict[str, Tensor]]:
        """The outputs of the BatchNorms in ``names`` during the forward run inside."""
        outputs: dict[str, Tensor] = {}
        handles = [self.modules[n].register_forward_hook(
            lambda module, inputs, output, n=n: outputs.__setitem__(n, output)) for n in names]
        try:
            yield outputs
        finally:
            for h in handles:
                h.remove()

    @staticmethod
    def loss(outputs: Mapping[str, Tensor], reference: Mapping[str, Tensor]) -> Tensor | None:
        terms = [F.mse_loss(outputs[n], reference[n]) for n in sorted(outputs) if n in reference]
        return torch.stack(terms).mean() if terms else None
