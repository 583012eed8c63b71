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
continues bit-for-bit from the last saved step. Run directory::

    RUN_DIR/run.json        data, checkpoint, TrainConfig (what --resume continues)
    RUN_DIR/state.pt        student, teacher, optimizer, step (atomic, every N steps)
    RUN_DIR/metrics.jsonl   one line per logged step
    RUN_DIR/supernet.pt     the trained supernet with per-subnet BatchNorm statistics
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import math
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rtfq_deploy.calibrate import init_activation_steps
from rtfq_deploy.checkpoint import Checkpoint, load_checkpoint, safe_torch_load, save_checkpoint
from rtfq_deploy.data.folders import ImageFolder, check_same_classes, scan
from rtfq_deploy.data.pipeline import Stream, augment, load_domain, resize_to, stored_size
from rtfq_deploy.errors import RtfqError
from rtfq_deploy.fileio import atomic_write, sha256_file
from rtfq_deploy.formats import NORMALIZATION_KEY, normalization_of
from rtfq_deploy.images import MIN_BN_IMAGES
from rtfq_deploy.models.base import Supernet
from rtfq_deploy.plan import ActiveSubnet
from rtfq_deploy.quant.base import Quantizer
from rtfq_deploy.space import SubnetConfig
from rtfq_deploy.train.config import TrainConfig
from rtfq_deploy.train.losses import distillation, information_maximization, pseudo_label_loss, pseudo_labels
from rtfq_deploy.train.admm import CorrelationADMM, aligning_quantizers, capture as admm_capture
from rtfq_deploy.train.pseudo import ClusterLabels
from rtfq_deploy.train.mixed import BitScheduler, DistortionMitigation, MixedRule, free_quantizers
from rtfq_deploy.train.sampler import check_rule, make_rule, step_rng

log = logging.getLogger(__name__)

STATE_FORMAT = "rtfq-train-state"
_SHA_RE = re.compile(r"[0-9a-f]{64}")


def _brief(value: Any) -> str:
    text = str(value)
    return text[:12] + "..." if len(text) > 16 else text
SOURCE_STREAM, TARGET_STREAM = 1, 2


@dataclass(frozen=True)
class Distributed:
    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def broadcast(self, tensor: Tensor, device: torch.device) -> Tensor:
        """Rank 0's ``tensor`` on every rank (alone: unchanged), so what only rank 0
        saves is what every rank used."""
        if self.world == 1:
            return tensor
        import torch.distributed as dist

        moved = tensor.to(device)
        dist.broadcast(moved, 0)
        return moved.to(tensor.device)

    def barrier(self) -> None:
        """Wait for every process; a no-op when training alone."""
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()


def distributed_from_env() -> Distributed:
    """torchrun sets WORLD_SIZE/RANK; gloo on CPU, NCCL on GPUs."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Distributed()
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() and os.environ.get("RTFQ_BACKEND") != "gloo"
                                else "gloo")
    return Distributed(dist.get_rank(), dist.get_world_size())


def lr_at(cfg: TrainConfig, step: int) -> float:
    """Linear warm-up, then cosine annealing to zero over the remaining steps."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, cfg.steps - cfg.warmup_steps)
    return 0.5 * cfg.lr * (1.0 + math.cos(math.pi * min(step - cfg.warmup_steps, span) / span))


def make_optimizer(model: Supernet, cfg: TrainConfig) -> torch.optim.Optimizer:
    """Step sizes in their own group: their own lr scale and no weight decay."""
    steps = {id(p) for m in model.modules() if isinstance(m, Quantizer) for p in m.parameters(recurse=False)}
    weights = [p for p in model.parameters() if id(p) not in steps]
    step_params = [p for p in model.parameters() if id(p) in steps]
    groups = [{"params": weights, "weight_decay": cfg.weight_decay, "lr_scale": 1.0},
              {"params": step_params, "weight_decay": 0.0, "lr_scale": cfg.step_lr_scale}]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=0.9, nesterov=True)
    return torch.optim.Adam(groups, lr=cfg.lr)


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """teacher <- momentum * teacher + (1 - momentum) * student, parameters and float buffers."""
    for t, s in zip(teacher.parameters(), student.parameters()):
        t.mul_(momentum).add_(s.detach(), alpha=1.0 - momentum)
    for t, s in zip(teacher.buffers(), student.buffers()):
        if t.dtype.is_floating_point:
            t.mul_(momentum).add_(s.detach(), alpha=1.0 - momentum)
        else:
            t.copy_(s)


def rampup(cfg: TrainConfig, step: int) -> float:
    """Weight multiplier of the target terms: 0 for ``target_start`` steps, then
    exp(-5 (1 - t)^2) over ``rampup_steps``
    (the consistency ramp-up of Laine & Aila 2017 and Mean Teacher), so a network that
    does not yet classify the source does not sharpen its own wrong target predictions."""
    if step < cfg.target_start:
        return 0.0
    step -= cfg.target_start
    if step >= cfg.rampup_steps:
        return 1.0
    t = step / cfg.rampup_steps
    return math.exp(-5.0 * (1.0 - t) ** 2)


def step_losses(forward: Callable[[Tensor, ActiveSubnet], Tensor], model: Supernet, subnets: list,
                xs: Tensor, ys: Tensor, xt: Tensor, teacher_logits: Tensor | None, cfg: TrainConfig,
                backward: Callable[[Tensor, bool], None], target_scale: float = 1.0,
                idm: DistortionMitigation | None = None, admm: CorrelationADMM | None = None,
                target_labels: tuple[Tensor, Tensor | None] | None = None) -> dict[str, float]:
    """Run every sampled subnet, backpropagating each as it goes (so only one subnet's
    graph is alive at a time); returns the summed loss terms for logging. With ``admm``,
    every source pass adds AlignQ's correlation term, and the step's mean D then takes
    one ADMM step (Eqs. 11-12). ``target_labels``: the target batch's pseudo-labels and
    their confidence mask (None: every image counts), when they do not come from the top
    subnet's own predictions (the teacher's on the weak view with ``--target-aug
    strong``, or clustering labels)."""
    w = cfg.losses
    totals = {"loss": 0.0, "ce": 0.0, "distill": 0.0, "pseudo": 0.0, "im": 0.0}
    labels = mask = top_logits = None
    reference: dict[str, Tensor] = {}
    step_ds: dict[str, list[Tensor]] = {}
    for i, sub in enumerate(subnets):
        net = model.active(sub)
        aligned = set() if idm is None else idm.everything if i == 0 else idm.targets(sub, subnets[0])
        with (idm.capture(aligned) if aligned else contextlib.nullcontext({})) as outputs, \
                (admm_capture(model) if admm is not None else contextlib.nullcontext({})) as ds:
            logits_s = forward(resize_to(xs, sub.resolution), net)
        terms = {"ce": F.cross_entropy(logits_s, ys)}
        weights = {"ce": w.ce, "distill": w.distill * target_scale, "pseudo": w.pseudo * target_scale,
                   "im": w.im * target_scale, "idm": cfg.idm, "inplace": w.ce * cfg.inplace_distill, "admm": 1.0}
        if ds:
            terms["admm"] = admm.loss(ds)
            for name, d in ds.items():
                step_ds.setdefault(name, []).append(d.detach())
        if i == 0:
            totals["source_acc"] = float((logits_s.argmax(1) == ys).float().mean())
            top_logits = logits_s.detach()
            reference = {k: v.detach() for k, v in outputs.items()}
        else:
            if cfg.inplace_distill > 0:  # in-place distillation from the top plan (RFQuant: 0.5 CE + 0.5 KL)
                terms["inplace"] = distillation(logits_s, top_logits)
                weights["ce"] = w.ce * (1.0 - cfg.inplace_distill)
            if outputs:
                aligned_loss = DistortionMitigation.loss(outputs, reference)
                if aligned_loss is not None:
                    terms["idm"] = aligned_loss
        if w.uses_target:
            logits_t = forward(resize_to(xt, sub.resolution), net)
            if i == 0 and target_labels is not None:
                labels, mask = target_labels
            elif i == 0:
                labels, mask = pseudo_labels(logits_t, w.threshold)
            if i == 0 and mask is not None:
                totals["pseudo_rate"] = float(mask.float().mean())
            if w.pseudo > 0:
                terms["pseudo"] = pseudo_label_loss(logits_t, labels, mask)
            if w.im > 0:
                terms["im"] = information_maximization(logits_t)
            if w.distill > 0 and i > 0 and teacher_logits is not None:
                terms["distill"] = distillation(logits_t, teacher_logits, w.temperature)
        loss = sum(weights[k] * v for k, v in terms.items())
        backward(loss, i == len(subnets) - 1)
        totals["loss"] += float(loss.detach())
        for k, v in terms.items():
            totals[k] = totals.get(k, 0.0) + float(v.detach())
    if admm is not None and step_ds:
        admm.update({name: torch.stack(d).mean(0) for name, d in step_ds.items()})
    return totals


class Run:
    """A training run in RUN_DIR: start fresh or resume, then :meth:`train`."""

    def __init__(self, run_dir: Path, cfg: TrainConfig, checkpoint: Path, source: Path, target: Path,
                 dist: Distributed) -> None:
        self.run_dir, self.cfg, self.checkpoint_path = run_dir, cfg, checkpoint
        self.source_dir, self.target_dir, self.dist = source, target, dist
        self._record: dict[str, Any] | None = None  # run.json, written once setup has succeeded
        self._recorded_sha: str | None = None  # the checkpoint's sha256 as run.json states it (resume)
        self._identity: dict[str, Any] | None = None  # what state.pt must carry to be this run's (see identity)
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

    # -- setup -----------------------------------------------------------------
    @classmethod
    def create(cls, run_dir: Path, cfg: TrainConfig, checkpoint: Path, source: Path, target: Path,
               dist: Distributed) -> "Run":
        if (run_dir / "run.json").exists():
            raise RtfqError(f"{run_dir} already holds a run: continue it with --resume {run_dir} or choose a new --out")
        if run_dir.exists() and not run_dir.is_dir():
            raise RtfqError(f"{run_dir} exists and is not a directory")
        run = cls(run_dir, cfg, checkpoint, source, target, dist)
        # run.json is written by train() once the checkpoint and both data folders have
        # loaded: a start that fails on its inputs leaves nothing that blocks the next try.
        run._record = {"checkpoint": str(checkpoint.resolve()), "source": str(source.resolve()),
                       "target": str(target.resolve()), "config": cfg.to_dict()}
        return run

    def _write_record(self) -> None:
        self.dist.barrier()  # every rank has loaded its inputs before rank 0 writes run.json
        if self.dist.main and self._record is not None:
            self._record["checkpoint_sha256"] = (self._identity or {}).get("checkpoint_sha256")
            self.run_dir.mkdir(parents=True, exist_ok=True)
            with atomic_write(self.run_dir / "run.json", overwrite=False) as f:
                f.write(json.dumps(self._record, indent=2).encode())
        self._record = None

    @classmethod
    def resume(cls, run_dir: Path, dist: Distributed) -> "Run":
        from rtfq_deploy.fileio import read_json

        path = run_dir / "run.json"
        if not path.exists():
            raise RtfqError(f"{run_dir} holds no run to resume (no run.json)")
        record = read_json(path, "run record", max_bytes=1 << 20, expect=dict)
        paths = [record.get(k) for k in ("checkpoint", "source", "target")]
        if not all(isinstance(p, str) and p and "\0" not in p for p in paths) or not isinstance(record.get("config"), dict):
            raise RtfqError(f"{path}: damaged run record (needs 'checkpoint', 'source', 'target' and 'config')")
        recorded = record.get("checkpoint_sha256")  # absent in runs started before it was recorded
        if recorded is not None and not (isinstance(recorded, str) and _SHA_RE.fullmatch(recorded)):
            raise RtfqError(f"{path}: damaged run record ('checkpoint_sha256' is not a sha256)")
        try:
            cfg = TrainConfig.from_dict(record["config"])
        except RtfqError as e:
            raise RtfqError(f"{path}: {e}") from None
        run = cls(run_dir, cfg, *(Path(p) for p in paths), dist)
        run._recorded_sha = recorded
        return run

    def identity(self, model: Supernet, checkpoint_sha256: str) -> dict[str, Any]:
        """What makes a training state this run's: the checkpoint it started from, the seed,
        the sampling rule and the supernet's quantizers (names, roles, bit-widths). Stored in
        state.pt and compared on resume, so another run's state (or a run.json edited to
        another seed or rule) is refused instead of trained on."""
        quantizers = [[name, q.role, list(q.bit_choices)] for name, q in model.quantizers()]
        return {"checkpoint_sha256": checkpoint_sha256, "seed": self.cfg.seed, "rule": self.cfg.rule,
                "quantizers": hashlib.sha256(json.dumps(quantizers).encode()).hexdigest()}

    def _check_checkpoint(self, model: Supernet) -> None:
        """The checkpoint must still be the one the run started from (run.json says which)."""
        sha = sha256_file(self.checkpoint_path, what="checkpoint")
        if self._recorded_sha is not None and sha != self._recorded_sha:
            raise RtfqError(f"{self.checkpoint_path}: the checkpoint changed since this run started (its sha256 "
                            f"{sha[:12]}... is not run.json's {self._recorded_sha[:12]}...); resume with the original "
                            "checkpoint or start a new run")
        self._identity = self.identity(model, sha)

    def _data(self, model: Supernet) -> tuple[ImageFolder, ImageFolder, Stream, Stream]:
        source, target = scan(self.source_dir, "source"), scan(self.target_dir, "target")
        check_same_classes(source, target)
        if len(source.classes) != model.config.num_classes:
            raise RtfqError(f"the data has {len(source.classes)} classes but the supernet has "
                            f"{model.config.num_classes} (create it with rtfq init --num-classes "
                            f"{len(source.classes)})")
        size = stored_size(model.config.space.resolutions[0])
        cfg, half = self.cfg, self.cfg.batch_size // 2
        src = load_domain(source, "source", size, cfg.cache_mb, cfg.workers)
        # the calibration at the end needs two target images: checked now, not after the last step
        tgt = load_domain(target, "target", size, cfg.cache_mb, cfg.workers, min_count=MIN_BN_IMAGES)
        self.skipped = {"source": src.skipped, "target": tgt.skipped}
        self.target_paths = list(tgt.paths)  # the readable ones, in the folder's order
        return (source, target, Stream(src, half, cfg.seed, SOURCE_STREAM, self.dist.rank, self.dist.world, cfg.workers),
                Stream(tgt, half, cfg.seed, TARGET_STREAM, self.dist.rank, self.dist.world, cfg.workers))

    # -- state -----------------------------------------------------------------
    def _save_state(self, step: int, student: Supernet, teacher: Supernet, opt: torch.optim.Optimizer,
                    scheduler: BitScheduler | None = None, admm: CorrelationADMM | None = None,
                    clusters: ClusterLabels | None = None) -> None:
        """Save, unless a weight went non-finite: a NaN state would poison every resume."""
        bad = _first_non_finite(student) or _first_non_finite(teacher)
        if bad is not None:
            raise Diverged(f"training diverged by step {step}: {bad} is not finite; nothing past the last saved state "
                           f"was kept (lower --lr or the loss weights)")
        if not self.dist.main:
            return
        state = {"format": STATE_FORMAT, "version": 1, "step": step, "identity": dict(self._identity or {}),
                 "student": {k: v.detach().cpu() for k, v in student.state_dict().items()},
                 "teacher": {k: v.detach().cpu() for k, v in teacher.state_dict().items()},
                 "optimizer": _to_cpu(opt.state_dict())}
        if scheduler is not None:
            state["scheduler"] = scheduler.state()
        if admm is not None:
            state["admm"] = admm.state()
        if clusters is not None:
            state["pseudo_labels"] = clusters.state()
        with atomic_write(self.run_dir / "state.pt", overwrite=True) as f:
            torch.save(state, f)

    def _load_state(self, student: Supernet, teacher: Supernet, opt: torch.optim.Optimizer,
                    scheduler: BitScheduler | None = None, admm: CorrelationADMM | None = None,
                    clusters: ClusterLabels | None = None) -> int:
        path = self.run_dir / "state.pt"
        if not path.exists():
            return 0
        state = safe_torch_load(path)
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            raise RtfqError(f"{path}: not an rtfq training state")
        step = state.get("step")
        if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step <= self.cfg.steps:
            raise RtfqError(f"{path}: damaged training state (step {step!r} is not in 0..{self.cfg.steps})")
        self._check_identity(path, state.get("identity"))
        try:
            student.load_state_dict(state["student"])
            teacher.load_state_dict(state["teacher"])
            opt.load_state_dict(state["optimizer"])
            if scheduler is not None and step > 0:
                scheduler.load(state["scheduler"])
                unknown = sorted(scheduler.frozen - set(free_quantizers(student)))
                if unknown:
                    raise ValueError(f"the bit-width scheduler names {unknown[0][:80]!r}, not a free quantizer of "
                                     "this supernet")
            if admm is not None and step > 0:
                admm.load(state["admm"])
            if clusters is not None and step > 0:
                clusters.load(state["pseudo_labels"])
        except (KeyError, TypeError, ValueError, RuntimeError, IndexError, AttributeError) as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            raise RtfqError(f"{path}: damaged training state ({first}); remove it to restart from step 0") from None
        bad = _first_non_finite(student)
        if bad is not None:
            raise RtfqError(f"{path}: damaged training state ({bad} is not finite); remove it to restart from step 0")
        return step

    def _check_identity(self, path: Path, stored: Any) -> None:
        """Refuse a state.pt of another run (see :meth:`identity`)."""
        if stored is None:  # written before states carried an identity
            log.warning("%s carries no run identity (an older toolkit wrote it); trusting run.json", path)
            return
        mine = self._identity or {}
        if not isinstance(stored, dict) or set(stored) != set(mine):
            raise RtfqError(f"{path}: damaged training state (its run identity is malformed); remove it to restart "
                            "from step 0")
        for key, what in (("checkpoint_sha256", "starting checkpoint"), ("seed", "seed"), ("rule", "sampling rule"),
                          ("quantizers", "quantizers")):
            if stored[key] != mine[key] or type(stored[key]) is not type(mine[key]):
                raise RtfqError(f"{path}: this training state belongs to another run (its {what} differs from "
                                f"run.json's: {_brief(stored[key])} vs {_brief(mine[key])}); remove it to restart "
                                "from step 0, or resume the run it belongs to")

    def _trim_metrics(self, start: int) -> None:
        """Drop lines a killed run logged after its last saved state (they will be redone)."""
        from rtfq_deploy.fileio import read_json_lines

        path = self.run_dir / "metrics.jsonl"
        if not self.dist.main or not os.path.lexists(path):
            return
        keep: list[bytes] = []
        damaged: str | None = None  # why the latest line was refused: fatal unless it is the last one
        for number, line, row in read_json_lines(path, "metrics log"):
            if damaged is not None:
                raise RtfqError(f"{damaged}; fix or remove it")
            step = row.get("step") if isinstance(row, dict) else None
            if isinstance(row, RtfqError):
                damaged = f"{path}: line {number} is damaged ({str(row).removeprefix(f'{path}: line {number}: ')})"
            elif isinstance(step, bool) or not isinstance(step, int):
                damaged = f"{path}: line {number} is damaged (no integer 'step')"
            elif step < start:
                keep.append(line)
        if damaged is not None:  # cut by a kill mid-write: the step is redone anyway
            log.warning("%s: dropped a cut last line", path)
        with atomic_write(path, overwrite=True) as f:
            f.write(b"".join(line + b"\n" for line in keep))

    # -- training --------------------------------------------------------------
    def train(self, progress: Callable[[dict], None] | None = None) -> Path:
        cfg, dist = self.cfg, self.dist
        ckpt = load_checkpoint(self.checkpoint_path)
        student = ckpt.model
        self._check_checkpoint(student)
        check_rule(cfg.rule, student.config.space, cfg.single_bits)  # before the images are read
        source, target, src_stream, tgt_stream = self._data(student)
        normalization = normalization_of(ckpt.meta)
        student.to(self.device).train()
        teacher = copy.deepcopy(student).requires_grad_(False)
        opt = make_optimizer(student, cfg)
        rule, scheduler, idm = self._rule(student)
        admm = self._admm(student)
        clusters = self._clusters(student, tgt_stream, normalization)
        start = self._load_state(student, teacher, opt, scheduler, admm, clusters)
        self._write_record()
        if start == 0:
            self._init_steps(student, src_stream, tgt_stream, normalization)
            teacher.load_state_dict(student.state_dict())
        self._trim_metrics(start)
        forward_model: nn.Module = student
        if dist.world > 1:
            from torch.nn.parallel import DistributedDataParallel

            # Narrow subnets leave parameters unused; the maxnet's steps are not the minnet's.
            forward_model = DistributedDataParallel(student, find_unused_parameters=True, broadcast_buffers=False)
        crop = student.config.space.resolutions[0]
        maxnet = student.config.space.maxnet
        metrics = open(self.run_dir / "metrics.jsonl", "a") if dist.main else None
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
                    self._save_state(done, student, teacher, opt, scheduler, admm, clusters)
            if dist.world > 1:
                _check_ranks_agree(student)
            self._save_state(cfg.steps, student, teacher, opt, scheduler, admm, clusters)
        finally:
            if metrics is not None:
                metrics.close()
        return self._finish(ckpt, student, source, target, normalization)

    def _rule(self, model: Supernet) -> tuple[Callable[[int, int], list], BitScheduler | None,
                                              DistortionMitigation | None]:
        """The step's subnets as a function of (seed, step), with the mixed rule's
        scheduler (whose frozen candidates the rule reads) and IDM."""
        cfg, space = self.cfg, model.config.space
        if cfg.rule != "mixed":
            return make_rule(cfg.rule, space, cfg.n_random, cfg.single_bits), None, None
        mixed = MixedRule.for_model(model, cfg.n_random)
        scheduler = BitScheduler(cfg.scheduler_start, cfg.scheduler_period, cfg.steps) if cfg.scheduler else None
        idm = DistortionMitigation(model, space.bits[-1]) if cfg.idm > 0 else None
        return (lambda seed, step: mixed(step_rng(seed, step), scheduler.frozen if scheduler else frozenset()),
                scheduler, idm)

    def _admm(self, model: Supernet) -> CorrelationADMM | None:
        if self.cfg.admm is None:
            return None
        if not aligning_quantizers(model):
            raise RtfqError(f"--admm preserves correlations of AlignQ activations, and this supernet's activations "
                            f"are {model.config.act_quantizer} (create it with rtfq init --act-quantizer alignq)")
        return CorrelationADMM(*self.cfg.admm)

    def _clusters(self, model: Supernet, target: Stream, normalization: dict) -> ClusterLabels | None:
        cfg = self.cfg
        if cfg.pseudo_labels != "centroid" or cfg.losses.pseudo == 0:
            return None
        if target.domain.cache is None:
            files = len(target.domain) + target.domain.skipped  # what load_domain's size check counts
            raise RtfqError(f"--pseudo-labels centroid labels the whole target set every {cfg.pseudo_every} steps and "
                            f"needs it decoded up front: set cache_mb to at least "
                            f"{math.ceil(files * 3 * target.domain.size ** 2 / 2**20)}")
        return ClusterLabels(target.domain.cache, normalization, cfg.target_start, cfg.pseudo_every, cfg.seed,
                             model.config.num_classes)

    def _backward(self, forward_model: nn.Module) -> Callable[[Tensor, bool], None]:
        def backward(loss: Tensor, last: bool) -> None:
            sync = contextlib.nullcontext() if last or not hasattr(forward_model, "no_sync") else forward_model.no_sync()
            with sync:
                loss.backward()
        return backward

    def _init_steps(self, model: Supernet, src: Stream, tgt: Stream, normalization: dict) -> None:
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
        xs = torch.cat([augment(next(s.batches(0, 1))[0], space.resolutions[0], self.cfg.seed,
                                s.stream, 0, normalization) for s in full]).to(self.device)
        plan = model.float_plan()
        changing = [b for b in space.bits if any(q.changes_domain(b) for _, q in model.quantizers())]
        if changing:
            plan = model.plan(SubnetConfig(space.resolutions[0], space.widths[0], max(changing)))
        init_activation_steps(model, ActiveSubnet(space.widths[0] if changing else 1.0, plan), xs)

    def _finish(self, ckpt: Checkpoint, student: Supernet, source: ImageFolder, target: ImageFolder,
                normalization: dict) -> Path:
        """Calibrate every subnet's BatchNorm on target images and write supernet.pt."""
        out = self.run_dir / "supernet.pt"
        if not self.dist.main:
            return out
        from rtfq_deploy.evaluate import calibrate_subnets

        g = torch.Generator().manual_seed(self.cfg.seed)
        order = torch.randperm(len(self.target_paths), generator=g)[: self.cfg.calib_images].tolist()
        paths = [self.target_paths[i] for i in sorted(order)]
        stats = calibrate_subnets(student, list(student.config.space), paths, normalization, device=self.device,
                                  where=f"target folder {target.root}")
        student.cpu()
        meta = {**ckpt.meta, "created_by": "rtfq-train", "class_names": list(source.classes),
                NORMALIZATION_KEY: normalization, "trained": {"steps": self.cfg.steps, "rule": self.cfg.rule,
                                                            "config": self.cfg.to_dict(), "skipped": self.skipped},
                "calibration": {"images": len(paths), "domain": "target"}}
        save_checkpoint(out, student, bn_stats=stats, meta=meta, overwrite=True)
        return out


class Diverged(RtfqError):
    """The loss or a weight became NaN or infinite: training stops before saving it."""


def _first_non_finite(model: nn.Module) -> str | None:
    """The name of the first parameter or buffer holding NaN or an infinity, else None."""
    with torch.no_grad():
        for name, t in [*model.named_parameters(), *model.named_buffers()]:
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                return name
    return None


def _check_ranks_agree(model: nn.Module) -> None:
    """Every process must end with the same weights (each saw different images, so only
    synchronised gradients make them agree); a mismatch is a bug, not noise."""
    import torch.distributed as dist

    with torch.no_grad():
        flat = torch.cat([p.detach().double().flatten().cpu() for p in model.parameters()])
        digest = torch.stack([flat.sum(), (flat * flat).sum(), (flat * torch.arange(flat.numel()) % 9973).sum()])
        gathered = [torch.zeros_like(digest) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, digest)
    if any(not torch.equal(g, gathered[0]) for g in gathered):
        raise RuntimeError("data-parallel processes ended with different weights: gradients were not synchronised")
    log.info("all %d processes hold identical weights", len(gathered))


def _to_cpu(obj: Any) -> Any:
    if isinstance(obj, Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj
