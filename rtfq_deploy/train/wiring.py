"""What a run builds from its configuration before the first step: the two data streams,
the sampling rule (with the mixed rule's scheduler and IDM), AlignQ's ADMM, clustering
pseudo-labels, and the activation quantizers' initial step sizes.

Each piece checks its own settings against the supernet and the data, so a run that
cannot work fails here, in one line, before any training step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

import torch

from rtfq_deploy.calibrate import init_activation_steps
from rtfq_deploy.data.folders import ImageFolder, check_same_classes, scan
from rtfq_deploy.data.pipeline import Stream, augment, load_domain, stored_size
from rtfq_deploy.errors import RtfqError
from rtfq_deploy.images import MIN_BN_IMAGES
from rtfq_deploy.models.base import Supernet
from rtfq_deploy.plan import ActiveSubnet
from rtfq_deploy.space import SubnetConfig
from rtfq_deploy.train.admm import CorrelationADMM, aligning_quantizers
from rtfq_deploy.train.config import TrainConfig
from rtfq_deploy.train.distributed import Distributed
from rtfq_deploy.train.mixed import BitScheduler, DistortionMitigation, MixedRule
from rtfq_deploy.train.pseudo import ClusterLabels
from rtfq_deploy.train.sampler import make_rule, step_rng

SOURCE_STREAM, TARGET_STREAM = 1, 2  # the streams' seeds: (seed, stream, step) draws every random choice

Rule = Callable[[int, int], list]  # (seed, step) -> the step's subnets, top subnet first


@dataclass
class RunData:
    source: ImageFolder
    target: ImageFolder
    source_stream: Stream
    target_stream: Stream
    skipped: dict[str, int]  # unreadable files per domain, recorded in the trained checkpoint
    target_paths: list[Path]  # the readable target images, in the folder's order (for calibration)


def load_data(cfg: TrainConfig, model: Supernet, source_dir: Path, target_dir: Path, dist: Distributed) -> RunData:
    """Both domains, checked against each other and the supernet, each this process's share."""
    source, target = scan(source_dir, "source"), scan(target_dir, "target")
    check_same_classes(source, target)
    if len(source.classes) != model.config.num_classes:
        raise RtfqError(f"the data has {len(source.classes)} classes but the supernet has "
                        f"{model.config.num_classes} (create it with rtfq init --num-classes "
                        f"{len(source.classes)})")
    size = stored_size(model.config.space.resolutions[0])
    half = cfg.batch_size // 2
    src = load_domain(source, "source", size, cfg.cache_mb, cfg.workers)
    # the calibration at the end needs two target images: checked now, not after the last step
    tgt = load_domain(target, "target", size, cfg.cache_mb, cfg.workers, min_count=MIN_BN_IMAGES)
    return RunData(source, target,
                   Stream(src, half, cfg.seed, SOURCE_STREAM, dist.rank, dist.world, cfg.workers),
                   Stream(tgt, half, cfg.seed, TARGET_STREAM, dist.rank, dist.world, cfg.workers),
                   {"source": src.skipped, "target": tgt.skipped}, list(tgt.paths))


def sampling_rule(cfg: TrainConfig, model: Supernet) -> tuple[Rule, BitScheduler | None, DistortionMitigation | None]:
    """The step's subnets as a function of (seed, step), with the mixed rule's
    scheduler (whose frozen candidates the rule reads) and IDM."""
    space = model.config.space
    if cfg.rule != "mixed":
        return make_rule(cfg.rule, space, cfg.n_random, cfg.single_bits), None, None
    mixed = MixedRule.for_model(model, cfg.n_random)
    scheduler = BitScheduler(cfg.scheduler_start, cfg.scheduler_period, cfg.steps) if cfg.scheduler else None
    idm = DistortionMitigation(model, space.bits[-1]) if cfg.idm > 0 else None
    return (lambda seed, step: mixed(step_rng(seed, step), scheduler.frozen if scheduler else frozenset()),
            scheduler, idm)


def correlation_admm(cfg: TrainConfig, model: Supernet) -> CorrelationADMM | None:
    if cfg.admm is None:
        return None
    if not aligning_quantizers(model):
        raise RtfqError(f"--admm preserves correlations of AlignQ activations, and this supernet's activations "
                        f"are {model.config.act_quantizer} (create it with rtfq init --act-quantizer alignq)")
    return CorrelationADMM(*cfg.admm)


def cluster_labels(cfg: TrainConfig, model: Supernet, target: Stream,
                   normalization: Mapping) -> ClusterLabels | None:
    if cfg.pseudo_labels != "centroid" or cfg.losses.pseudo == 0:
        return None
    if target.domain.cache is None:
        files = len(target.domain) + target.domain.skipped  # what load_domain's size check counts
        raise RtfqError(f"--pseudo-labels centroid labels the whole target set every {cfg.pseudo_every} steps and "
                        f"needs it decoded up front: set cache_mb to at least "
                        f"{math.ceil(files * 3 * target.domain.size ** 2 / 2**20)}")
    return ClusterLabels(target.domain.cache, normalization, cfg.target_start, cfg.pseudo_every, cfg.seed,
                         model.config.num_classes)


def init_steps(cfg: TrainConfig, model: Supernet, src: Stream, tgt: Stream, normalization: Mapping,
               device: torch.device) -> None:
    """Activation quantizer initialisation on a first source + target batch (every
    rank computes the same thing from the same images: each takes the full batch).

    On the float maxnet, unless an activation quantizer changes the domain (AlignQ):
    then on the maxnet quantized at the space's highest such bit-width, where each
    quantizer is initialised just before it runs, so those downstream (the classifier
    input, 8-bit LSQ) see the [0, alpha] values they will quantize, not float ones
    (initialised on float values, an AlignQ supernet's classifier-input step was 20
    times the pooled codes' range and used 14 of its 256 codes)."""
    full = [Stream(s.domain, s.batch, s.seed, s.stream) for s in (src, tgt)]
    space = model.config.space
    xs = torch.cat([augment(next(s.batches(0, 1))[0], space.resolutions[0], cfg.seed,
                            s.stream, 0, normalization) for s in full]).to(device)
    plan = model.float_plan()
    changing = [b for b in space.bits if any(q.changes_domain(b) for _, q in model.quantizers())]
    if changing:
        plan = model.plan(SubnetConfig(space.resolutions[0], space.widths[0], max(changing)))
    init_activation_steps(model, ActiveSubnet(space.widths[0] if changing else 1.0, plan), xs)
