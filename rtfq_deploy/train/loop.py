"""RTF-Q training: the supernet student, its EMA teacher, SandwichQ sampling, resume and
data-parallel scale-out.

A step (paper section III):
1. a source batch (labeled) and a target batch (unlabeled), half each, cropped and
   flipped; every sampled subnet sees them resized to its own resolution;
2. the teacher's maxnet (an EMA of the student) predicts the target batch;
3. the sampling rule names the subnets, top subnet first. Each is run on the source
   batch (cross-entropy) and on the target batch: pseudo-labels from the top subnet's
   confident predictions (with ``--target-aug strong``: the subnets see a strongly
   augmented view and the labels are the teacher's confident predictions on the weak
   one; with ``--pseudo-labels centroid``: SHOT's clustering labels), information
   maximisation and, below the top subnet, distillation from the teacher. The source
   and target batches go through separately, so BatchNorm normalises each with its own
   domain's statistics (as the target-domain statistics calibrated for deployment will);
4. gradients of all subnets accumulate into one optimizer step (lr: warm-up, then cosine);
   the teacher follows by EMA.

Everything random in step k is a function of (seed, k), so ``--resume`` after a crash
continues bit-for-bit from the last saved step.

This module is the loop; the rest lives by job: one step's losses and schedules in
:mod:`~rtfq_deploy.train.step`, the run directory's files in :mod:`~rtfq_deploy.train.state`,
building a run's pieces in :mod:`~rtfq_deploy.train.wiring`, the calibrated supernet.pt in
:mod:`~rtfq_deploy.train.finish`, processes in :mod:`~rtfq_deploy.train.distributed`.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn

from rtfq_deploy.checkpoint import load_checkpoint
from rtfq_deploy.data.pipeline import augment
from rtfq_deploy.errors import RtfqError
from rtfq_deploy.fileio import sha256_file
from rtfq_deploy.formats import normalization_of
from rtfq_deploy.models.base import Supernet
from rtfq_deploy.planfile import free_quantizers
from rtfq_deploy.train import state
from rtfq_deploy.train.config import TrainConfig
from rtfq_deploy.train.distributed import Distributed, check_ranks_agree, distributed_from_env
from rtfq_deploy.train.finish import SUPERNET, write_supernet
from rtfq_deploy.train.losses import pseudo_labels
from rtfq_deploy.train.sampler import check_rule
from rtfq_deploy.train.state import STATE_FORMAT, Diverged
from rtfq_deploy.train.step import ema_update, lr_at, make_optimizer, rampup, step_losses
from rtfq_deploy.train.wiring import (SOURCE_STREAM, TARGET_STREAM, cluster_labels, correlation_admm, init_steps,
                                      load_data, sampling_rule)

# Importable from here as before (tests, the cli and scripts): names that moved by job.
__all__ = ["STATE_FORMAT", "Diverged", "Distributed", "Run", "distributed_from_env", "ema_update", "lr_at",
           "make_optimizer", "rampup", "step_losses"]


class Run:
    """A training run in RUN_DIR: start fresh or resume, then :meth:`train`."""

    def __init__(self, run_dir: Path, cfg: TrainConfig, checkpoint: Path, source: Path, target: Path,
                 dist: Distributed) -> None:
        self.run_dir, self.cfg, self.checkpoint_path = run_dir, cfg, checkpoint
        self.source_dir, self.target_dir, self.dist = source, target, dist
        self._record: dict[str, Any] | None = None  # run.json, written once setup has succeeded
        self._recorded_sha: str | None = None  # the checkpoint's sha256 as run.json states it (resume)
        self._identity: dict[str, Any] = {}  # what state.pt must carry to be this run's (state.run_identity)
        if cfg.device == "cuda" and not torch.cuda.is_available():
            raise RtfqError("--device cuda: this PyTorch build has no CUDA or no GPU is visible (use --device cpu)")
        per_process = cfg.batch_size // 2 // dist.world
        if per_process < 2 or (cfg.batch_size // 2) % dist.world:
            raise RtfqError(f"--batch-size {cfg.batch_size} gives {cfg.batch_size / 2 / dist.world:g} images per domain "
                            f"to each of {dist.world} process(es); BatchNorm needs at least 2 and an even split: use "
                            f"a multiple of {2 * dist.world} of at least {4 * dist.world}")
        self.device = torch.device("cuda" if cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
                                   else "cpu")
        if self.device.type == "cuda" and dist.world > 1:
            torch.cuda.set_device(dist.rank % torch.cuda.device_count())
            self.device = torch.device("cuda", torch.cuda.current_device())

    @classmethod
    def create(cls, run_dir: Path, cfg: TrainConfig, checkpoint: Path, source: Path, target: Path,
               dist: Distributed) -> "Run":
        if (run_dir / state.RECORD).exists():
            raise RtfqError(f"{run_dir} already holds a run: continue it with --resume {run_dir} or choose a new --out")
        if run_dir.exists() and not run_dir.is_dir():
            raise RtfqError(f"{run_dir} exists and is not a directory")
        run = cls(run_dir, cfg, checkpoint, source, target, dist)
        # run.json is written by train() once the checkpoint and both data folders have
        # loaded: a start that fails on its inputs leaves nothing that blocks the next try.
        run._record = {"checkpoint": str(checkpoint.resolve()), "source": str(source.resolve()),
                       "target": str(target.resolve()), "config": cfg.to_dict()}
        return run

    @classmethod
    def resume(cls, run_dir: Path, dist: Distributed) -> "Run":
        cfg, paths, recorded = state.read_record(run_dir)
        run = cls(run_dir, cfg, *paths, dist)
        run._recorded_sha = recorded
        return run

    def _write_record(self) -> None:
        self.dist.barrier()  # every rank has loaded its inputs before rank 0 writes run.json
        if self.dist.main and self._record is not None:
            state.write_record(self.run_dir, {**self._record,
                                              "checkpoint_sha256": self._identity.get("checkpoint_sha256")})
        self._record = None

    def _check_checkpoint(self, model: Supernet) -> None:
        """The checkpoint must still be the one the run started from (run.json says which)."""
        sha = sha256_file(self.checkpoint_path, what="checkpoint")
        if self._recorded_sha is not None and sha != self._recorded_sha:
            raise RtfqError(f"{self.checkpoint_path}: the checkpoint changed since this run started (its sha256 "
                            f"{sha[:12]}... is not run.json's {self._recorded_sha[:12]}...); resume with the original "
                            "checkpoint or start a new run")
        self._identity = state.run_identity(self.cfg, model, sha)

    def train(self, progress: Callable[[dict], None] | None = None) -> Path:
        cfg, dist = self.cfg, self.dist
        ckpt = load_checkpoint(self.checkpoint_path)
        student = ckpt.model
        self._check_checkpoint(student)
        check_rule(cfg.rule, student.config.space, cfg.single_bits)  # before the images are read
        data = load_data(cfg, student, self.source_dir, self.target_dir, dist)
        src_stream, tgt_stream = data.source_stream, data.target_stream
        normalization = normalization_of(ckpt.meta)
        student.to(self.device).train()
        teacher = copy.deepcopy(student).requires_grad_(False)
        opt = make_optimizer(student, cfg)
        rule, scheduler, idm = sampling_rule(cfg, student)
        admm = correlation_admm(cfg, student)
        clusters = cluster_labels(cfg, student, tgt_stream, normalization)
        state_path = self.run_dir / state.STATE
        start = state.load_state(state_path, cfg.steps, self._identity, student, teacher, opt, scheduler, admm,
                                 clusters)
        self._write_record()
        if start == 0:
            init_steps(cfg, student, src_stream, tgt_stream, normalization, self.device)
            teacher.load_state_dict(student.state_dict())
        if dist.main:
            state.trim_metrics(self.run_dir / state.METRICS, start)

        def save(step: int) -> None:
            state.save_state(state_path, step, self._identity, student, teacher, opt, scheduler, admm, clusters,
                             write=dist.main)

        forward_model: nn.Module = student
        if dist.world > 1:
            from torch.nn.parallel import DistributedDataParallel

            # Narrow subnets leave parameters unused; the maxnet's steps are not the minnet's.
            forward_model = DistributedDataParallel(student, find_unused_parameters=True, broadcast_buffers=False)
        crop = student.config.space.resolutions[0]
        maxnet = student.config.space.maxnet
        metrics = open(self.run_dir / state.METRICS, "a") if dist.main else None
        try:
            t0, images, data_s = time.perf_counter(), 0, 0.0
            batches = zip(src_stream.batches(start, cfg.steps), tgt_stream.batches(start, cfg.steps))
            for step in range(start, cfg.steps):
                lr = lr_at(cfg, step)
                for group in opt.param_groups:
                    group["lr"] = lr * group["lr_scale"]
                if scheduler is not None and scheduler.due(step):
                    scheduler.update(student, set(free_quantizers(student)), student.config.space.bits, step)
                t_data = time.perf_counter()
                (xs_u8, ys), (xt_u8, _) = next(batches)
                xs = augment(xs_u8, crop, cfg.seed, SOURCE_STREAM, step, normalization,
                             strong=cfg.source_aug == "strong").to(self.device)
                xt = augment(xt_u8, crop, cfg.seed, TARGET_STREAM, step, normalization).to(self.device)
                strong = cfg.target_aug == "strong" and cfg.losses.uses_target
                xt_student = augment(xt_u8, crop, cfg.seed, TARGET_STREAM, step, normalization,
                                     strong=True).to(self.device) if strong else xt
                ys = ys.to(self.device)
                data_s += time.perf_counter() - t_data
                teacher_logits = target_labels = None
                if cfg.losses.distill > 0 or strong:
                    with torch.no_grad():
                        teacher_logits = teacher(xt, teacher.active(maxnet))
                    if strong:
                        target_labels = pseudo_labels(teacher_logits, cfg.losses.threshold)
                if clusters is not None and step >= cfg.target_start:
                    if clusters.due(step):
                        clusters.refresh(teacher, teacher.active(maxnet), step)
                        clusters.table = dist.broadcast(clusters.table, self.device)
                    target_labels = clusters.batch(tgt_stream.indices(step)).to(self.device), None
                opt.zero_grad(set_to_none=True)
                totals = step_losses(forward_model, student, rule(cfg.seed, step), xs, ys, xt_student, teacher_logits,
                                     cfg, self._backward(forward_model), rampup(cfg, step), idm, admm, target_labels)
                if not math.isfinite(totals["loss"]):
                    raise Diverged(f"training diverged at step {step + 1}: the loss is {totals['loss']}; nothing past "
                                   f"the last saved state was kept (lower --lr or the loss weights)")
                opt.step()
                ema_update(teacher, student, cfg.ema)
                images += (xs.shape[0] + xt.shape[0]) * dist.world
                done = step + 1
                if metrics is not None and (done % cfg.log_every == 0 or done == cfg.steps):
                    elapsed = time.perf_counter() - t0
                    row = {"step": step, "lr": lr, **{k: round(v, 6) for k, v in totals.items()},
                           "images_per_s": round(images / elapsed, 2), "data_share": round(data_s / elapsed, 4)}
                    metrics.write(json.dumps(row) + "\n")
                    metrics.flush()
                    if progress:
                        progress(row)
                    t0, images, data_s = time.perf_counter(), 0, 0.0
                if done % cfg.checkpoint_every == 0 and done < cfg.steps:
                    save(done)
            if dist.world > 1:
                check_ranks_agree(student)
            save(cfg.steps)
        finally:
            if metrics is not None:
                metrics.close()
        out = self.run_dir / SUPERNET
        if not dist.main:
            return out
        return write_supernet(out, cfg, ckpt, student, data.source, data.target, data.target_paths, normalization,
                              data.skipped, self.device)

    @staticmethod
    def _backward(forward_model: nn.Module) -> Callable[[Tensor, bool], None]:
        def backward(loss: Tensor, last: bool) -> None:
            sync = contextlib.nullcontext() if last or not hasattr(forward_model, "no_sync") else forward_model.no_sync()
            with sync:
                loss.backward()
        return backward
