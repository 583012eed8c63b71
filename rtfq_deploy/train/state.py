"""A run directory's files: the run record, the resumable training state and the metrics log.

    RUN_DIR/run.json        data, checkpoint, TrainConfig (what --resume continues)
    RUN_DIR/state.pt        student, teacher, optimizer, step (atomic, every N steps)
    RUN_DIR/metrics.jsonl   one line per logged step

Every file is written atomically and checked on reading: a damaged or foreign file is one
error line saying what to remove, never a traceback or a silent restart, and a state
holding NaN is never written (it would poison every resume).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from rtfq_deploy.checkpoint import safe_torch_load
from rtfq_deploy.errors import RtfqError
from rtfq_deploy.fileio import atomic_write, read_json, read_json_lines
from rtfq_deploy.models.base import Supernet
from rtfq_deploy.planfile import free_quantizers
from rtfq_deploy.train.admm import CorrelationADMM
from rtfq_deploy.train.config import TrainConfig
from rtfq_deploy.train.mixed import BitScheduler
from rtfq_deploy.train.pseudo import ClusterLabels

log = logging.getLogger(__name__)

STATE_FORMAT = "rtfq-train-state"
RECORD, STATE, METRICS = "run.json", "state.pt", "metrics.jsonl"
_SHA_RE = re.compile(r"[0-9a-f]{64}")


class Diverged(RtfqError):
    """The loss or a weight became NaN or infinite: training stops before saving it."""


# -- run.json ------------------------------------------------------------------------------
def write_record(run_dir: Path, record: dict[str, Any]) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    with atomic_write(run_dir / RECORD, overwrite=False) as f:
        f.write(json.dumps(record, indent=2).encode())


def read_record(run_dir: Path) -> tuple[TrainConfig, tuple[Path, Path, Path], str | None]:
    """(config, (checkpoint, source, target), the checkpoint's recorded sha256 or None)."""
    path = run_dir / RECORD
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
    checkpoint, source, target = (Path(p) for p in paths)
    return cfg, (checkpoint, source, target), recorded


# -- state.pt ------------------------------------------------------------------------------
def run_identity(cfg: TrainConfig, model: Supernet, checkpoint_sha256: str) -> dict[str, Any]:
    """What makes a training state this run's: the checkpoint it started from, the seed,
    the sampling rule and the supernet's quantizers (names, roles, bit-widths). Stored in
    state.pt and compared on resume, so another run's state (or a run.json edited to
    another seed or rule) is refused instead of trained on."""
    quantizers = [[name, q.role, list(q.bit_choices)] for name, q in model.quantizers()]
    return {"checkpoint_sha256": checkpoint_sha256, "seed": cfg.seed, "rule": cfg.rule,
            "quantizers": hashlib.sha256(json.dumps(quantizers).encode()).hexdigest()}


def save_state(path: Path, step: int, identity: dict[str, Any], student: Supernet, teacher: Supernet,
               opt: torch.optim.Optimizer, scheduler: BitScheduler | None = None,
               admm: CorrelationADMM | None = None, clusters: ClusterLabels | None = None, *,
               write: bool = True) -> None:
    """Save (only where ``write``: rank 0), unless a weight went non-finite: then every
    rank raises Diverged."""
    bad = first_non_finite(student) or first_non_finite(teacher)
    if bad is not None:
        raise Diverged(f"training diverged by step {step}: {bad} is not finite; nothing past the last saved state "
                       f"was kept (lower --lr or the loss weights)")
    if not write:
        return
    state = {"format": STATE_FORMAT, "version": 1, "step": step, "identity": dict(identity),
             "student": {k: v.detach().cpu() for k, v in student.state_dict().items()},
             "teacher": {k: v.detach().cpu() for k, v in teacher.state_dict().items()},
             "optimizer": _to_cpu(opt.state_dict())}
    if scheduler is not None:
        state["scheduler"] = scheduler.state()
    if admm is not None:
        state["admm"] = admm.state()
    if clusters is not None:
        state["pseudo_labels"] = clusters.state()
    with atomic_write(path, overwrite=True) as f:
        torch.save(state, f)


def load_state(path: Path, steps: int, identity: dict[str, Any], student: Supernet, teacher: Supernet,
               opt: torch.optim.Optimizer, scheduler: BitScheduler | None = None,
               admm: CorrelationADMM | None = None, clusters: ClusterLabels | None = None) -> int:
    """The step to continue from (0 without a state), everything else restored in place."""
    if not path.exists():
        return 0
    state = safe_torch_load(path)
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise RtfqError(f"{path}: not an rtfq training state")
    step = state.get("step")
    if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step <= steps:
        raise RtfqError(f"{path}: damaged training state (step {step!r} is not in 0..{steps})")
    check_identity(path, state.get("identity"), identity)
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
    bad = first_non_finite(student)
    if bad is not None:
        raise RtfqError(f"{path}: damaged training state ({bad} is not finite); remove it to restart from step 0")
    return step


def check_identity(path: Path, stored: Any, mine: dict[str, Any]) -> None:
    """Refuse a state.pt of another run (see :func:`run_identity`)."""
    if stored is None:  # written before states carried an identity
        log.warning("%s carries no run identity (an older toolkit wrote it); trusting run.json", path)
        return
    if not isinstance(stored, dict) or set(stored) != set(mine):
        raise RtfqError(f"{path}: damaged training state (its run identity is malformed); remove it to restart "
                        "from step 0")
    for key, what in (("checkpoint_sha256", "starting checkpoint"), ("seed", "seed"), ("rule", "sampling rule"),
                      ("quantizers", "quantizers")):
        if stored[key] != mine[key] or type(stored[key]) is not type(mine[key]):
            raise RtfqError(f"{path}: this training state belongs to another run (its {what} differs from "
                            f"run.json's: {_brief(stored[key])} vs {_brief(mine[key])}); remove it to restart "
                            "from step 0, or resume the run it belongs to")


def first_non_finite(model: nn.Module) -> str | None:
    """The name of the first parameter or buffer holding NaN or an infinity, else None."""
    with torch.no_grad():
        for name, t in [*model.named_parameters(), *model.named_buffers()]:
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                return name
    return None


# -- metrics.jsonl -------------------------------------------------------------------------
def trim_metrics(path: Path, start: int) -> None:
    """Drop lines a killed run logged after its last saved state (they will be redone)."""
    if not os.path.lexists(path):
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


def _brief(value: Any) -> str:
    text = str(value)
    return text[:12] + "..." if len(text) > 16 else text


def _to_cpu(obj: Any) -> Any:
    if isinstance(obj, Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj
