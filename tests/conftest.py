from __future__ import annotations

import pytest
import torch

from rtfq_deploy.models import SupernetConfig, build_supernet


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture
def tiny():
    """The small supernet with the paper's default 48-subnet space."""
    return build_supernet(SupernetConfig("tiny_resnet", num_classes=10))
