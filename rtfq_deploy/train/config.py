"""Training configuration: one frozen dataclass, stored in the run directory so that
``--resume`` continues with exactly the settings the run started with."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Mapping

from rtfq_deploy.errors import RtfqError
from rtfq_deploy.train.limits import OPTIONAL, SETTINGS, check
from rtfq_deploy.train.losses import LossWeights
from rtfq_deploy.train.sampler import RULES


ADAM_STEP_LR_SCALE = 0.05


def _check_admm(value: Any) -> tuple[float, float]:
    """(mu, rho) from the CLI ("MU,RHO") or run.json ([mu, rho]), checked by the ADMM module."""
    from rtfq_deploy.train.admm import check_penalties, parse_admm

    try:
        if isinstance(value, str):
            return parse_admm(value)
        if isinstance(value, (list, tuple)) and len(value) == 2:
            return check_penalties(*value)
    except ValueError as e:
        raise RtfqError(f"--admm: {e}") from None
    raise RtfqError(f"--admm must be two numbers MU,RHO, got {value!r}"[:300])


@dataclass(frozen=True)
class TrainConfig:
    """Defaults are the paper's (section IV-A) where it gives them: lr 2e-4 for
    Office-scale data (3e-5 for DomainNet), cosine annealing, batches half source, half
    target (it uses 128 + 128 per GPU), SandwichQ with two random subnets. The optimizer
    is not named in the paper; Adam suits an lr of that scale when fine-tuning."""

    steps: int = 5000
    batch_size: int = 64  # per step, half source and half target
    lr: float = 2e-4
    optimizer: str = "adam"  # or "sgd" (momentum 0.9, nesterov)
    weight_decay: float = 0.0
    # lr of the quantizer step sizes relative to ``lr``. None (the default) becomes 1 with
    # SGD, where LSQ's gradient scale 1/sqrt(N Qp) paces the steps like the weights, and
    # ADAM_STEP_LR_SCALE with Adam, which undoes any gradient scale and moves every
    # parameter by about lr per step: an 8-bit weight step (~1e-3) at lr 2e-3 moved by its
    # own size within a few steps, and training only at 8 bits reached 0.56 mean target
    # top-1 against 0.97 at a twentieth of the lr (train/uda_ablation.py, seed 1). The
    # resolved value is what run.json stores.
    step_lr_scale: float | None = None
    warmup_steps: int = 0
    target_start: int = 0  # steps of source-only training before the target terms start
    rampup_steps: int = 0  # then the target terms' weights ramp up as exp(-5 (1 - t)^2) over these steps
    ema: float = 0.999  # teacher = ema * teacher + (1 - ema) * student, after every step
    rule: str = "sandwichq"
    n_random: int = 2
    single_bits: int | None = None
    # Mixed precision (--rule mixed, OneShot-MPQ; see rtfq_deploy.train.mixed). In-place
    # distillation: plans below the top one learn (1 - w) CE + w KL to the top plan's
    # source logits; None becomes 0.5 with --rule mixed (RFQuant's), 0 otherwise.
    inplace_distill: float | None = None
    idm: float = 0.01  # weight of information distortion mitigation (mixed rule; 0 = off)
    scheduler: bool = True  # the bit-width scheduler (mixed rule)
    scheduler_start: int | None = None  # None: steps // 10
    scheduler_period: int | None = None  # None: max(1, steps // 30)
    # AlignQ's ADMM correlation preservation (mu, rho; see rtfq_deploy.train.admm), or None.
    admm: tuple[float, float] | None = None
    # Where the pseudo-labels come from: "confident" (the paper's: the top subnet's own
    # predictions on the batch above the confidence threshold) or "centroid" (SHOT's
    # clustering labels of the whole target set from the teacher's maxnet, every image
    # labelled, recomputed every ``pseudo_every`` steps; see rtfq_deploy.train.pseudo).
    pseudo_labels: str = "confident"
    # "weak": students and teacher see the target batch with crops and flips (the paper's);
    # "strong": the students see it through strong_augment too, while the teacher's
    # maxnet, on the weak view, gives the distillation targets and the confident
    # pseudo-labels (FixMatch, Sohn et al. 2020, with a mean teacher).
    target_aug: str = "weak"
    source_aug: str = "weak"  # "strong": the source batch through strong_augment too (a control row)
    pseudo_every: int = 50
    losses: LossWeights = field(default_factory=LossWeights)
    seed: int = 0
    checkpoint_every: int = 500
    log_every: int = 50
    calib_images: int = 512  # target images for each subnet's BatchNorm statistics at the end
    cache_mb: float = 4096.0  # decode the whole set up front when it fits
    workers: int = 2
    device: str = "auto"

    def __post_init__(self) -> None:
        # Every number in range and finite, whether it came from an option, a recipe or run.json.
        for name, limit in SETTINGS.items():
            value = getattr(self, name)
            if value is not None or name not in OPTIONAL:
                object.__setattr__(self, name, check(name, value, limit))
        if not isinstance(self.losses, LossWeights):
            raise RtfqError("'losses' must be an object of loss weights")
        if self.batch_size % 2:
            raise RtfqError(f"--batch-size must be even (half source, half target), got {self.batch_size}")
        if self.admm is not None:
            object.__setattr__(self, "admm", _check_admm(self.admm))
        if not isinstance(self.scheduler, bool):
            raise RtfqError(f"'scheduler' must be true or false, got {self.scheduler!r}"[:300])
        for name, value in (("inplace_distill", 0.5 if self.rule == "mixed" else 0.0),
                            ("scheduler_start", self.steps // 10), ("scheduler_period", max(1, self.steps // 30))):
            if getattr(self, name) is None:
                object.__setattr__(self, name, value)
        if self.step_lr_scale is None:
            object.__setattr__(self, "step_lr_scale", ADAM_STEP_LR_SCALE if self.optimizer == "adam" else 1.0)
        for name in ("optimizer", "rule", "device", "pseudo_labels", "target_aug", "source_aug"):
            if not isinstance(getattr(self, name), str):
                raise RtfqError(f"--{name.replace('_', '-')} must be a name, got {getattr(self, name)!r}"[:300])
        if self.optimizer not in ("adam", "sgd"):
            raise RtfqError(f"unknown optimizer {self.optimizer!r} (adam or sgd)")
        if not 0.0 <= self.ema < 1.0:
            raise RtfqError("--ema must be in [0, 1)")
        if self.pseudo_labels not in ("confident", "centroid"):
            raise RtfqError(f"--pseudo-labels must be confident or centroid, got {self.pseudo_labels!r}"[:300])
        for name in ("target_aug", "source_aug"):
            if getattr(self, name) not in ("weak", "strong"):
                raise RtfqError(f"--{name.replace('_', '-')} must be weak or strong, got {getattr(self, name)!r}"[:300])
        if self.rule not in RULES:
            raise RtfqError(f"unknown sampling rule {self.rule!r} (known: {', '.join(RULES)})")
        if self.rule == "single" and self.single_bits is None:
            raise RtfqError("--rule single needs --single-bits")
        if self.device not in ("auto", "cpu", "cuda"):
            raise RtfqError(f"--device must be auto, cpu or cuda, got {self.device!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "TrainConfig":
        data = dict(data)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise RtfqError(f"unknown training settings: {', '.join(sorted(unknown))}")
        try:
            if "losses" in data:
                if not isinstance(data["losses"], Mapping):
                    raise RtfqError("'losses' must be an object of loss weights")
                data["losses"] = LossWeights(**data["losses"])
            return cls(**data)
        except RtfqError:
            raise
        except (TypeError, ValueError) as e:
            raise RtfqError(f"bad training settings: {e}"[:300]) from None

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)
