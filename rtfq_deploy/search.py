"""Bidirectional greedy search for a per-quantizer bit plan under a budget (OneShot-MPQ, Eq. 9).

From a start plan, every step scores the 2L plans that move one free quantizer one
candidate up or down, keeps the one minimising J = norm(loss) + lambda * norm(cost)
(both min-max normalised over the step's candidates; the cost is the largest of the
budget's ratios cost / limit) and stops once the plan fits the budget. No gradient steps.

Scoring a plan (:class:`PlanScorer`): one forward pass of N target images with
BatchNorm normalising by the batch's own statistics, i.e. BatchNorm recalibrated for
that plan on those N images at the cost of one pass instead of two. With labels the
loss is the cross-entropy; without (the usual domain-adaptation case) it is the KL
divergence from the adapted maxnet's predictions on the same images, a label-free score
that orders plans as their distance from the most accurate network of the space
(train/mpq_ablation.py measures its rank correlation with labeled top-1).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from rtfq_deploy.budget import Budget, format_value
from rtfq_deploy.costs import Costs, LayerShape, plan_costs, walk
from rtfq_deploy.errors import RtfqError
from rtfq_deploy.formats import normalization_of
from rtfq_deploy.layers import WeightCache, batch_statistics
from rtfq_deploy.models.base import Supernet
from rtfq_deploy.plan import ActiveSubnet
from rtfq_deploy.planfile import free_quantizers
from rtfq_deploy.quant import Quantizer
from rtfq_deploy.space import MixedBits, SubnetConfig

log = logging.getLogger(__name__)

SEARCH_KINDS = {"bitops": "bitops", "size": "weight_bytes", "macs": "macs"}  # budget kind -> Costs field
DEFAULT_LAMBDA = 1.5
MIN_LAMBDA = 0.01  # below it the cost term no longer steers the search towards the budget
DEFAULT_KEEP_BYTES = 2 << 30  # stage inputs a scorer keeps (ResNet-50 at 224 px: about 24 MB an image)


@dataclass(frozen=True)
class SearchOptions:
    lam: float = DEFAULT_LAMBDA
    rescore: int = 0  # lazy greedy: moves scored per step after the first (0: every move, exact Eq. 9)

    def __post_init__(self) -> None:
        if not (isinstance(self.lam, (int, float)) and math.isfinite(self.lam) and self.lam >= MIN_LAMBDA):
            raise ValueError(f"lambda must be a finite number of at least {MIN_LAMBDA}, got {self.lam!r}")
        if isinstance(self.rescore, bool) or not isinstance(self.rescore, int) or self.rescore < 0:
            raise ValueError(f"rescore must be a non-negative integer, got {self.rescore!r}")


def step_bound(quantizers: int, candidates: int) -> tuple[int, int]:
    """(bidirectional steps, all steps) of a search over ``quantizers`` free quantizers
    with ``candidates`` bit-widths each: L (C - 1) steps that may move up or down, then
    at most L (C - 1) more that only move down (each lowers one quantizer by one
    candidate, and the plan of every quantizer at its lowest candidate fits), so the
    search ends within 2 L (C - 1) steps and 1 + 3 L^2 (C - 1) scored plans."""
    return quantizers * (candidates - 1), 2 * quantizers * (candidates - 1)


@dataclass
class SearchStep:
    step: int
    subnet: str
    loss: float
    costs: dict[str, int]
    candidates: int
    seconds: float
    done: float  # share of the way from the start plan's cost down to the budget
    eta: float = 0.0  # seconds the rest of the search is expected to take (see _eta)


@dataclass
class SearchResult:
    subnet: SubnetConfig
    costs: Costs
    loss: float
    score: str
    steps: list[SearchStep] = field(default_factory=list)
    evaluations: int = 0
    seconds: float = 0.0


def check_budget(budget: Budget) -> None:
    bad = [str(limit) for limit in budget.limits if limit.kind not in SEARCH_KINDS]
    if bad:
        raise RtfqError(f"a search budget limits {', '.join(SEARCH_KINDS)} (got {', '.join(bad)}; latency and memory "
                        "are measured on a device: rtfq-bench select)")


def over(costs: Costs, budget: Budget) -> float:
    """The largest ratio cost / limit of the budget (<= 1 when the plan fits)."""
    return max(getattr(costs, SEARCH_KINDS[limit.kind]) / limit.value for limit in budget.limits)


def choose_shape(model: Supernet, budget: Budget, resolution: int | None, width: float | None
                 ) -> tuple[int, float]:
    """The (resolution, width) to search: the given ones, else the largest (by MACs)
    whose cheapest uniform plan fits the budget."""
    space = model.config.space
    shapes = [(r, w) for r in space.resolutions for w in space.widths
              if (resolution is None or r == resolution) and (width is None or w == width)]
    if not shapes:
        space.validate(SubnetConfig(resolution or space.resolutions[0], width or space.widths[0], space.bits[0]))
    fitting = []
    for r, w in shapes:
        shapes_rw = walk(model, r, w)
        cheapest = plan_costs(model, shapes_rw, model.plan(SubnetConfig(r, w, space.bits[-1])))
        if over(cheapest, budget) <= 1.0:
            fitting.append((cheapest.macs, r, w))
    if not fitting:
        raise RtfqError(f"budget {budget} is unreachable: no resolution and width of the space fits it even with "
                        f"every quantizer at {space.bits[-1]} bits")
    _, r, w = max(fitting)
    return r, w


class PlanScorer:
    """Loss of a plan on fixed target images (lower is better); see the module docstring.

    Plans of a search differ from the current one in one quantizer, so a score re-runs
    only the model's stages from that quantizer's on, from the inputs the current plan
    gave them (kept by :meth:`rebase`, within ``keep_bytes``; BatchNorm before that
    stage has the same batch statistics either way), with each layer's fake-quantized
    weights computed once (:class:`~rtfq_deploy.layers.WeightCache`). The values are
    those of a whole forward pass: the same operations on the same tensors.
    """

    def __init__(self, model: Supernet, images: Tensor, labels: Tensor | None = None,
                 reference_probs: Tensor | None = None, reference: str = "the maxnet",
                 keep_bytes: int = DEFAULT_KEEP_BYTES) -> None:
        if (labels is None) == (reference_probs is None):
            raise ValueError("score with labels or with reference predictions, not both or neither")
        self.model, self.images, self.labels, self.reference_probs = model, images, labels, reference_probs
        self.kind = "cross-entropy on labeled images" if labels is not None else \
            f"KL divergence from {reference}'s predictions on unlabeled images"
        self.keep_bytes = keep_bytes
        self._stages = model.stages()
        self._stage_of = {name: next(i for i, st in enumerate(self._stages) if st.has(name))
                          for name, _ in model.quantizers()}
        self._weights = WeightCache()
        self._base: ActiveSubnet | None = None
        self._kept: dict[int, tuple[Tensor, Quantizer | None]] = {}  # stage -> the base plan's input to it
        self._keep: set[int] | None = None  # which stages' inputs fit within keep_bytes

    def __call__(self, config: SubnetConfig) -> float:
        return self._score(config, keep=False)

    def rebase(self, config: SubnetConfig) -> None:
        """Make ``config`` the plan the next scores start from (the search's current plan)."""
        self._score(config, keep=True)

    def _net(self, config: SubnetConfig) -> ActiveSubnet:
        return ActiveSubnet(config.width, self.model.plan(config), None, self._weights)

    def _start(self, net: ActiveSubnet) -> int:
        """The first stage whose quantizers' bits differ from the base plan's."""
        base = self._base
        if base is None or base.width != net.width:
            return 0
        now, was = net.bits.as_dict(), base.bits.as_dict()
        changed = [self._stage_of[n] for n, b in now.items() if was.get(n) != b]
        return min(changed, default=len(self._stages))

    @torch.no_grad()
    def _score(self, config: SubnetConfig, keep: bool) -> float:
        net = self._net(config)
        keep = keep or self._base is None
        if self._keep is None:
            self._keep = self._choose_kept(net)
        first = self._start(net)
        start = max((i for i in self._kept if i <= first), default=0) if first else 0
        if keep:
            self._kept = {i: v for i, v in self._kept.items() if i <= first}
            self._base = net
        x, quant = self._kept[start] if start in self._kept else (self.images, None)
        with batch_statistics(self.model):
            for i in range(start, len(self._stages)):
                if keep and i > first and i in self._keep:
                    self._kept[i] = (x, quant)
                x, quant = self._stages[i].run(x, quant, net)
        return self._loss(x)

    def _choose_kept(self, net: ActiveSubnet) -> set[int]:
        """The stages whose inputs are kept: from the last one back while they fit (sizes
        from a pass over two images: a stage input's size is proportional to the batch)."""
        sizes, x, quant = [], self.images[:2], None
        with batch_statistics(self.model):
            for stage in self._stages:
                sizes.append(x.element_size() * x.numel() * len(self.images) // len(x))
                x, quant = stage.run(x, quant, net)
        kept, total = set(), 0
        for i in range(len(sizes) - 1, 0, -1):
            if total + sizes[i] <= self.keep_bytes:
                kept.add(i)
                total += sizes[i]
        log.debug("search: keeping the inputs of %d of %d stages (%.0f MB)", len(kept), len(sizes), total / 2**20)
        return kept

    def _loss(self, logits: Tensor) -> float:
        if self.labels is not None:
            return float(F.cross_entropy(logits, self.labels))
        return float(F.kl_div(F.log_softmax(logits, dim=1), self.reference_probs, reduction="batchmean"))


def _judge(losses: Sequence[float], norm_costs: Sequence[float], lam: float, floor: float) -> list[float]:
    """Eq. 9's J; a loss never measured (-inf) counts as the lowest measured one."""
    finite = [v for v in losses if v != float("-inf")]
    low = min(finite) if finite else floor
    return [a + lam * b for a, b in zip(_minmax([max(v, low) for v in losses]), norm_costs)]


def _minmax(values: Sequence[float]) -> list[float]:
    lo, hi = min(values), max(values)
    return [0.0 if hi == lo else (v - lo) / (hi - lo) for v in values]


def start_plan(model: Supernet, shape: Sequence[LayerShape], resolution: int, width: float, budget: Budget
               ) -> SubnetConfig:
    """The cheapest uniform plan that does not fit (the search walks down from there),
    or the most costly one when it fits already."""
    space = model.config.space
    uniform = [SubnetConfig(resolution, width, q) for q in space.bits]  # highest bits first
    fits = [over(plan_costs(model, shape, model.plan(c)), budget) <= 1.0 for c in uniform]
    if fits[0]:
        return uniform[0]
    return uniform[fits.index(True) - 1] if True in fits else uniform[-1]


def greedy_search(model: Supernet, resolution: int, width: float, budget: Budget, scorer: Callable[[SubnetConfig], float],
                  options: SearchOptions = SearchOptions(),
                  progress: Callable[[SearchStep], None] | None = None) -> SearchResult:
    """Eq. 9's search. With ``options.rescore`` = M > 0 (lazy greedy), a step scores the
    moves never scored (those of the quantizer moved last) and the M others that look
    best when every move's loss is estimated as the current loss plus the change that
    move made when last scored; J is then taken over every move (estimates for the
    rest) and the best scored move is kept. The first step scores every move; M = 0
    scores every move at every step. For a loss whose moves do not interact the
    estimates are exact and lazy picks what exact picks (tested).

    The search ends: after L (C - 1) steps without meeting the budget (a small lambda
    lets the loss pull plans up again; L free quantizers, C candidates), or once every
    upward or downward move leads to a plan already visited, it takes only downward
    moves, each lowering one quantizer by one candidate, so it meets the budget within
    2 L (C - 1) steps in all (:func:`step_bound`)."""
    t0 = time.perf_counter()
    shape = walk(model, resolution, width)
    candidates = sorted(model.config.space.bits)
    free = free_quantizers(model)
    rebase = getattr(scorer, "rebase", lambda config: None)  # a PlanScorer re-runs only what a move changes
    current = start_plan(model, shape, resolution, width, budget)
    current_costs = plan_costs(model, shape, model.plan(current))
    loss = scorer(current)
    evaluations = 1
    if over(current_costs, budget) <= 1.0:  # the space's costliest plan already fits
        return SearchResult(current, current_costs, loss, "", [], evaluations, time.perf_counter() - t0)
    bits = {n: int(b) for n, b in model.plan(current).as_dict().items()}
    seen = {MixedBits.of(bits)}
    start_over = over(current_costs, budget)
    change: dict[tuple[str, int], float] = {}  # (quantizer, direction) -> loss change when last scored
    result_steps: list[SearchStep] = []
    bidirectional, limit = step_bound(len(free), len(candidates))
    descending = False
    timing = (0.0, 0)  # seconds and plans scored so far, for the ETA
    for step in range(1, limit + 2):
        t_step = time.perf_counter()
        if step > bidirectional and not descending:
            descending = True
            log.info("no plan within %s after %d steps in both directions: moving down only", budget, step - 1)
        moves = _moves(bits, free, candidates, seen, descending)
        if not moves and not descending:
            descending = True
            log.info("every move leads to a visited plan after %d steps: moving down only", step - 1)
            moves = _moves(bits, free, candidates, seen, descending)
        if not moves or step > limit:  # at the cheapest plan, which choose_shape found to fit: cannot happen
            raise RtfqError(f"budget {budget} is unreachable at r{resolution}: the search ran out of moves")
        configs = [SubnetConfig(resolution, width, m) for _, m in moves]
        over_now = over(current_costs, budget)
        costs = [over(plan_costs(model, shape, model.plan(c)), budget) for c in configs]
        norm_costs = _minmax(costs)
        estimate = [loss + change.get(key, float("-inf")) for key, _ in moves]  # -inf: never scored
        if options.rescore and step > 1:
            unknown = [k for k, e in enumerate(estimate) if e == float("-inf")]  # scored now, always
            guess = _judge(estimate, norm_costs, options.lam, loss)
            order = sorted((k for k in range(len(moves)) if estimate[k] != float("-inf")),
                           key=lambda k: (guess[k], str(configs[k])))
            chosen_set = unknown + order[:options.rescore]
        else:
            chosen_set = list(range(len(moves)))
        scored = {k: scorer(configs[k]) for k in chosen_set}
        evaluations += len(scored)
        for k, value in scored.items():
            change[moves[k][0]] = value - loss
            estimate[k] = value
        # J over every move (estimates for the unscored), so lazy and exact normalise alike
        judged = _judge(estimate, norm_costs, options.lam, loss)
        best = min(scored, key=lambda k: (judged[k], str(configs[k])))
        bits, loss = moves[best][1].as_dict(), scored[best]
        rebase(configs[best])
        current_costs = plan_costs(model, shape, model.plan(configs[best]))
        seen.add(moves[best][1])
        change = {key: value for key, value in change.items() if key[0] != moves[best][0][0]}  # its moves changed
        chosen = model.subnet(resolution, width, bits)
        seconds = time.perf_counter() - t_step
        timing = (timing[0] + seconds, timing[1] + len(scored) + (step > 1))  # a re-based plan counts as one
        drops = [over_now - costs[k] for k, ((name, d), _) in enumerate(moves) if d < 0
                 for _ in range(candidates.index(bits[name]))]
        record = SearchStep(step, str(chosen), loss, current_costs.to_dict(), len(scored), seconds,
                            min(1.0, (start_over - over(current_costs, budget)) / (start_over - 1.0)),
                            _eta(drops, over(current_costs, budget) - 1.0, timing,
                                 options.rescore + 2 if options.rescore else len(moves)))
        result_steps.append(record)
        if progress:
            progress(record)
        if over(current_costs, budget) <= 1.0:
            return SearchResult(chosen, current_costs, loss, "", result_steps, evaluations, time.perf_counter() - t0)
    raise RtfqError(f"no plan within budget {budget} after {limit} search steps")


def _eta(drops: Sequence[float], gap: float, timing: tuple[float, int], plans_per_step: int) -> float:
    """Seconds left: the fewest further steps that could close ``gap`` (each step lowers
    one quantizer by one candidate, by about what that move lowered the cost this step:
    ``drops``, one per candidate still below each quantizer) times a step's plans
    (``plans_per_step``: lazy M plus the moved quantizer's two) at the seconds per plan
    so far (``timing``: seconds, plans; after the first step a step's re-based plan
    counts as one)."""
    if gap <= 0:
        return 0.0
    steps, closed = 0, 0.0
    for drop in sorted(drops, reverse=True):
        if closed >= gap or drop <= 0:
            break
        steps, closed = steps + 1, closed + drop
    seconds, plans = timing
    return steps * plans_per_step * seconds / max(1, plans)


def _moves(bits: dict[str, int], free: Sequence[str], candidates: Sequence[int], seen: set, descending: bool
           ) -> list[tuple[tuple[str, int], MixedBits]]:
    """Plans one candidate up or down from ``bits`` for one free quantizer, not visited
    yet; ``descending``: every plan one candidate down (each step lowers the plan, so
    none repeats)."""
    moves: list[tuple[tuple[str, int], MixedBits]] = []
    for name in free:
        i = candidates.index(bits[name])
        for d in ((-1,) if descending else (-1, 1)):
            if 0 <= i + d < len(candidates):
                plan = MixedBits.of({**bits, name: candidates[i + d]})
                if descending or plan not in seen:
                    moves.append(((name, d), plan))
    return moves


def describe_costs(costs: Costs) -> str:
    return ", ".join([f"{format_value('bitops', costs.bitops)} BitOPs", f"{format_value('macs', costs.macs)} MACs",
                      f"{format_value('size', costs.weight_bytes)} of weights"])


def make_scorer(ckpt, data, resolution: int, *, labeled: bool = False, images: int = 256, seed: int = 0
                ) -> PlanScorer:
    """The scorer ``rtfq search`` uses: ``images`` drawn (seeded) from ``data`` (class
    folders when ``labeled``; any folder tree otherwise), at ``resolution``."""
    from rtfq_deploy.data.folders import scan
    from rtfq_deploy.evaluate import calibration_sample, load_at
    from rtfq_deploy.images import MIN_BN_IMAGES, image_files

    model = ckpt.model
    normalization = normalization_of(ckpt.meta)
    if labeled:
        folder = scan(data, "search")
        classes = ckpt.meta.get("class_names")
        if classes is not None and list(folder.classes) != list(classes):
            raise RtfqError(f"{data}: class folders differ from the checkpoint's classes (--labeled needs them)")
        paths, labels = [p for p, _ in folder.samples], folder.labels
    else:
        paths, labels = image_files(data), None
        if not paths:
            raise RtfqError(f"{data}: no images")
    index = {p: i for i, p in enumerate(paths)}
    pick = calibration_sample(paths, images, seed)
    # each plan is scored with BatchNorm normalising by these images' own statistics
    x, kept = load_at(pick, resolution, normalization, str(data), min_count=MIN_BN_IMAGES)
    if labels is not None:
        return PlanScorer(model, x, torch.tensor([labels[index[pick[i]]] for i in kept]))
    maxnet = model.config.space.maxnet
    reference = _reference_at(model, maxnet, ckpt.bn_stats.get(str(maxnet)), pick, kept, normalization)
    return PlanScorer(model, x, reference_probs=reference, reference=str(maxnet))


def search_checkpoint(ckpt, budget: Budget, data, *, labeled: bool = False, resolution: int | None = None,
                      width: float | None = None, images: int = 256, seed: int = 0,
                      options: SearchOptions = SearchOptions(),
                      progress: Callable[[SearchStep], None] | None = None) -> SearchResult:
    """Search a checkpoint's supernet on the images under ``data``: the whole command
    behind ``rtfq search``."""
    check_budget(budget)
    model = ckpt.model.eval()
    r, w = choose_shape(model, budget, resolution, width)
    scorer = make_scorer(ckpt, data, r, labeled=labeled, images=images, seed=seed)
    result = greedy_search(model, r, w, budget, scorer, options, progress)
    result.score = scorer.kind
    return result


@torch.no_grad()
def _reference_at(model: Supernet, maxnet: SubnetConfig, stats, pick, kept, normalization) -> Tensor:
    """The maxnet's predictions on the same images at its own resolution."""
    from rtfq_deploy.evaluate import load_at

    x, kept_max = load_at([pick[i] for i in kept], maxnet.resolution, normalization, warn=False)
    if len(kept_max) != len(kept):
        raise RtfqError("an image readable at one resolution was not at another")
    if stats is not None:
        return F.softmax(model.eval()(x, model.active(maxnet, stats)), dim=1)
    with batch_statistics(model):
        return F.softmax(model(x, model.active(maxnet)), dim=1)
