"""Clustering pseudo-labels for the unlabeled target domain (SHOT, Liang et al., ICML 2020, Sec. 3.3).

The paper's pseudo-labels are the student's own confident predictions on the batch;
when the source model is wrong on a whole kind of target image, self-training on those
confirms the mistake. SHOT labels every target image by the nearest class centroid in
feature space, the centroids weighted by the predictions over the whole target set:
a class whose images the classifier half gets wrong still forms one cluster, and the
cluster's centre pulls its stragglers over. Used with ``--pseudo-labels centroid``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from rtfq_deploy.data.pipeline import normalize
from rtfq_deploy.images import CROP_FRACTION
from rtfq_deploy.models.base import Supernet
from rtfq_deploy.plan import ActiveSubnet

FEATURE_BATCH = 128  # images per forward pass (BatchNorm normalises with each pass's statistics)


def centroid_labels(features: Tensor, probs: Tensor, rounds: int = 2) -> Tensor:
    """Labels by cosine distance to class centroids: first weighted by ``probs``
    (N x K), then, ``rounds - 1`` times, by the previous round's hard labels. Only
    classes that are some image's label (first: its top prediction) get a centroid, as
    in SHOT's code: a class the classifier never predicts would otherwise get one near
    the mean feature and collect the uncertain images."""
    f = F.normalize(torch.cat([features, torch.ones_like(features[:, :1])], dim=1).double(), dim=1)
    weights = probs.double()
    labels = probs.argmax(1)
    for _ in range(rounds):
        centroids = weights.t() @ f / (weights.sum(0)[:, None] + 1e-8)
        present = torch.nonzero(torch.bincount(labels, minlength=probs.shape[1]) > 0).flatten()
        similarity = f @ F.normalize(centroids[present], dim=1).t()
        labels = present[similarity.argmax(1)]
        weights = F.one_hot(labels, probs.shape[1]).double()
    return labels


@torch.no_grad()
def target_labels(model: Supernet, net: ActiveSubnet, images: Tensor, normalization: dict, seed: int) -> Tensor:
    """Clustering labels of every image of ``images`` (N x 3 x S x S uint8, the target
    domain's cache) from ``net``'s pooled features, centre-cropped as at evaluation. The
    passes take the images in a fixed shuffled order, so each pass's batch statistics
    mix classes as a training batch does."""
    crop = round(images.shape[-1] * CROP_FRACTION)
    off = (images.shape[-1] - crop) // 2
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))
    passes = order.tensor_split(-(-len(images) // FEATURE_BATCH))  # near-equal: no pass of one image
    features, probs = [], []
    captured: list[Tensor] = []
    hook = model.get_submodule(model.graph().classifier).register_forward_pre_hook(lambda _, args: captured.append(args[0].detach()))
    try:
        device = next(model.parameters()).device
        for idx in passes:
            x = images[idx, :, off:off + crop, off:off + crop].to(torch.float32).div_(255.0)
            logits = model(normalize(x, normalization).to(device), net)
            features.append(captured.pop().float().cpu())
            probs.append(F.softmax(logits.float(), dim=1).cpu())
    finally:
        hook.remove()
    labels = torch.empty(len(images), dtype=torch.long)
    labels[order] = centroid_labels(torch.cat(features), torch.cat(probs))
    return labels


class ClusterLabels:
    """The target set's clustering labels, from the teacher's maxnet at the step the
    target terms start and every ``every`` steps after; ``rtfq-train --resume`` restores
    the table from the training state, so a resumed run uses the labels an uninterrupted
    one would."""

    def __init__(self, images: Tensor, normalization: dict, start: int, every: int, seed: int, classes: int) -> None:
        self.images, self.normalization = images, normalization
        self.start, self.every, self.seed, self.classes = start, every, seed, classes
        self.table: Tensor | None = None

    def due(self, step: int) -> bool:
        return step >= self.start and (self.table is None or (step - self.start) % self.every == 0)

    def refresh(self, model: Supernet, net: ActiveSubnet, step: int) -> None:
        self.table = target_labels(model, net, self.images, self.normalization, self.seed + step)

    def batch(self, indices: list[int]) -> Tensor:
        assert self.table is not None
        return self.table[torch.tensor(indices)]

    def state(self) -> Tensor | None:
        return self.table

    def load(self, table: object) -> None:
        if table is None:
            self.table = None
            return
        if not (isinstance(table, Tensor) and table.dtype == torch.long and table.shape == (len(self.images),)
                and (len(table) == 0 or 0 <= int(table.min()) <= int(table.max()) < self.classes)):
            raise ValueError(f"its pseudo-labels are not {len(self.images)} class indices below {self.classes}")
        self.table = table.clone()
