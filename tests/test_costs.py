from __future__ import annotations

import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from rtfq_deploy.costs import space_costs, subnet_costs, walk
from rtfq_deploy.models import SupernetConfig, build_supernet
from rtfq_deploy.plan import ActiveSubnet
from rtfq_deploy.space import SearchSpace, SubnetConfig


@pytest.fixture(scope="module")
def r50():
    return build_supernet(SupernetConfig("resnet50"))


def test_resnet50_full_width_is_the_well_known_4_09_gmacs(r50):
    costs = subnet_costs(r50, SubnetConfig(224, 1.0, 8))
    assert costs.macs == 4_089_184_256  # torchvision ResNet-50: 4.09 GMACs at 224 px
    # Folded parameters: torchvision's 25,557,032 minus BatchNorm's 2 x 26,560 plus a bias per conv channel.
    assert costs.params == 25_557_032 - 2 * 26_560 + 26_560


@pytest.mark.parametrize("config", ["r224-w1.00-q8", "r160-w0.73-q4", "r128-w0.60-q6", "r192-w0.86-q4"])
def test_macs_agree_with_torch_flop_counter_on_the_sliced_float_network(r50, config):
    cfg = SubnetConfig.parse(config)
    with FlopCounterMode(display=False) as counter:
        r50.eval()(torch.zeros(1, 3, cfg.resolution, cfg.resolution), ActiveSubnet(cfg.width, r50.float_plan()))
    assert subnet_costs(r50, cfg).macs * 2 == counter.get_total_flops()


def test_bitops_weights_and_first_last_policy(r50):
    q4 = subnet_costs(r50, SubnetConfig(224, 1.0, 4))
    by_name = {layer.name: layer for layer in q4.layers}
    assert (by_name["conv1"].weight_bits, by_name["conv1"].act_bits) == (8, 8)
    assert (by_name["fc"].weight_bits, by_name["fc"].act_bits) == (8, 8)
    assert (by_name["layer3.2.conv2"].weight_bits, by_name["layer3.2.conv2"].act_bits) == (4, 4)
    edge = by_name["conv1"].macs + by_name["fc"].macs
    assert q4.bitops == edge * 64 + (q4.macs - edge) * 16
    edge_weights = by_name["conv1"].weights + by_name["fc"].weights
    body_weights = sum(layer.weights for layer in q4.layers) - edge_weights
    assert q4.weight_bytes == edge_weights + math.ceil(body_weights * 4 / 8)  # every body layer is even-sized
    q8 = subnet_costs(r50, SubnetConfig(224, 1.0, 8))
    assert q8.bitops == q8.macs * 64 and q8.macs == q4.macs and q8.params == q4.params


def test_costs_shrink_with_resolution_width_and_bits(tiny):
    costs = space_costs(tiny)
    assert len(costs) == 48
    space = tiny.config.space
    for cfg, c in costs.items():
        for smaller in (SubnetConfig(r, cfg.width, cfg.bits) for r in space.resolutions if r < cfg.resolution):
            assert costs[smaller].macs < c.macs and costs[smaller].params == c.params
        for smaller in (SubnetConfig(cfg.resolution, cfg.width, b) for b in space.bits if b < cfg.bits):
            assert costs[smaller].bitops < c.bitops and costs[smaller].macs == c.macs
    assert costs[space.minnet].bitops == min(c.bitops for c in costs.values())


def test_walk_follows_slimmed_channels(tiny):
    shapes = {s.name: s for s in walk(tiny, 64, 0.6)}
    # conv1: 3 -> 8 channels (16 x 0.6 = 9.6, nearest multiple of 8), 7x7 kernel, 32x32 output.
    assert shapes["conv1"].out_channels == 8
    assert shapes["conv1"].macs == 32 * 32 * 8 * 3 * 49
    assert shapes["fc"].macs == shapes["fc"].weights == 80 * 10  # 128 x 0.6 = 76.8 -> 80 inputs
    assert shapes["fc"].out_channels == 10


def test_resnet18_bitops_match_oneshot_mpq_convention():
    """OneShot-MPQ's ResNet-18 at 224 px: 35.0 G BitOPs with a 4-bit body, 23.0 G with a
    3-bit body (first conv and classifier at 8 bits); this cost model gives 34.71 G and 22.85 G."""
    r18 = build_supernet(SupernetConfig("resnet18", space=SearchSpace(bits=(4, 3))))
    assert round(subnet_costs(r18, SubnetConfig(224, 1.0, 4)).bitops / 1e9, 2) == 34.71
    assert round(subnet_costs(r18, SubnetConfig(224, 1.0, 3)).bitops / 1e9, 2) == 22.85
