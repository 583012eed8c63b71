"""The RTF-Q objective's terms (paper section III), each a plain function of logits."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from rtfq_deploy.train.limits import LOSSES, check


_OPTIONS = {"ce": "--w-ce", "distill": "--w-distill", "pseudo": "--w-pseudo", "im": "--w-im", "threshold": "--threshold"}


@dataclass(frozen=True)
class LossWeights:
    """Weights of the objective's terms. The paper names the terms but not their weights;
    the defaults follow SHOT (Liang et al., ICML 2020), whose information maximisation
    and pseudo-label losses RTF-Q's regulariser and self-supervision are: IM with weight
    1 (entropy and diversity equally), pseudo-labels 0.3; distillation 1 as in the
    sandwich rule's in-place distillation (Yu & Huang, 2019). Source-only training is
    ``LossWeights(distill=0, pseudo=0, im=0)``."""

    ce: float = 1.0
    distill: float = 1.0
    pseudo: float = 0.3
    im: float = 1.0
    threshold: float = 0.9  # pseudo-label confidence (max softmax probability)
    temperature: float = 1.0  # of the distillation softmax

    def __post_init__(self) -> None:
        # finite and in range (limits.LOSSES); a SettingError is a ValueError too
        for name, limit in LOSSES.items():
            option = _OPTIONS.get(name, f"losses.{name}")
            object.__setattr__(self, name, check(name, getattr(self, name), limit, option))

    @property
    def uses_target(self) -> bool:
        return self.distill > 0 or self.pseudo > 0 or self.im > 0


def distillation(student: Tensor, teacher: Tensor, temperature: float = 1.0) -> Tensor:
    """KL(teacher || student) on softened distributions, scaled by T^2 (Hinton et al.)."""
    t = temperature
    target = F.softmax(teacher.detach() / t, dim=1)
    return F.kl_div(F.log_softmax(student / t, dim=1), target, reduction="batchmean") * (t * t)


def pseudo_labels(logits: Tensor, threshold: float) -> tuple[Tensor, Tensor]:
    """Hard labels and the mask of predictions at least ``threshold`` confident."""
    prob = F.softmax(logits.detach(), dim=1)
    confidence, labels = prob.max(dim=1)
    return labels, confidence >= threshold


def pseudo_label_loss(logits: Tensor, labels: Tensor, mask: Tensor | None) -> Tensor:
    """Cross-entropy on the confident targets, averaged over the whole batch (so a batch
    with few confident predictions contributes little, as in FixMatch); ``mask`` None:
    every target counts."""
    if mask is None:
        return F.cross_entropy(logits, labels)
    if not bool(mask.any()):
        return logits.sum() * 0.0
    per_sample = F.cross_entropy(logits, labels, reduction="none")
    return (per_sample * mask).sum() / logits.shape[0]


def information_maximization(logits: Tensor, eps: float = 1e-8) -> Tensor:
    """Mean per-sample entropy minus the entropy of the mean prediction: confident,
    yet diverse over classes. Its minimum is -log(K)."""
    prob = F.softmax(logits, dim=1)
    entropy = -(prob * torch.log(prob + eps)).sum(dim=1).mean()
    mean = prob.mean(dim=0)
    diversity = -(mean * torch.log(mean + eps)).sum()
    return entropy - diversity
