"""Data-parallel scale-out: which process this is, and the few collectives training needs.

Under torchrun every process trains its share of each batch; alone, every call here is a
no-op, so the single-process path imports nothing from ``torch.distributed``.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
from torch import Tensor, nn

log = logging.getLogger(__name__)


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


def check_ranks_agree(model: nn.Module) -> None:
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
