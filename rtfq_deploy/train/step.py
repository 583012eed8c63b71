"""One training step's arithmetic: learning rate, optimizer groups, EMA teacher, target
ramp-up, and the losses of every sampled subnet (paper section III, steps 3 and 4).

Pure functions of the configuration and the step, so a resumed run recomputes exactly
what the interrupted one would have.
"""

from __future__ import annotations

import contextlib
import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rtfq_deploy.data.pipeline import resize_to
from rtfq_deploy.models.base import Supernet
from rtfq_deploy.plan import ActiveSubnet
from rtfq_deploy.quant.base import Quantizer
from rtfq_deploy.train.admm import CorrelationADMM, capture as admm_capture
from rtfq_deploy.train.config import TrainConfig
from rtfq_deploy.train.losses import distillation, information_maximization, pseudo_label_loss, pseudo_labels
from rtfq_deploy.train.mixed import DistortionMitigation


def lr_at(cfg: TrainConfig, step: int) -> float:
    """Linear warm-up, then cosine annealing to zero over the remaining steps."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, cfg.steps - cfg.warmup_steps)
    return 0.5 * cfg.lr * (1.0 + math.cos(math.pi * min(step - cfg.warmup_steps, span) / span))


def make_optimizer(model: Supernet, cfg: TrainConfig) -> torch.optim.Optimizer:
    """Step sizes in their own group: their own lr scale and no weight decay. Other
    quantizer parameters (AlignQ's learned log sigma: scale-free, so paced like the
    weights) get the weights' lr and no weight decay, in a third group only when present
    (so a saved optimizer state of a supernet without them still loads)."""
    own = {id(p): n for m in model.modules() if isinstance(m, Quantizer) for n, p in m.named_parameters(recurse=False)}
    weights = [p for p in model.parameters() if id(p) not in own]
    step_params = [p for p in model.parameters() if own.get(id(p)) == "step"]
    other = [p for p in model.parameters() if id(p) in own and own[id(p)] != "step"]
    groups = [{"params": weights, "weight_decay": cfg.weight_decay, "lr_scale": 1.0},
              {"params": step_params, "weight_decay": 0.0, "lr_scale": cfg.step_lr_scale}]
    if other:
        groups.append({"params": other, "weight_decay": 0.0, "lr_scale": 1.0})
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
