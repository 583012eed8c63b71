from __future__ import annotations

import math

import pytest
import torch

from rtfq_deploy.calibrate import calibrate_bn, init_activation_steps, pack_bn_stats, unpack_bn_stats
from rtfq_deploy.plan import ActiveSubnet
from rtfq_deploy.space import SubnetConfig


def _randomise_bn(model) -> None:
    for name, buf in model.named_buffers():
        if name.endswith("running_mean"):
            buf.normal_(0, 2)
        elif name.endswith("running_var"):
            buf.uniform_(3, 5)


def test_first_batchnorm_gets_the_exact_statistics_over_all_batches(tiny):
    net = tiny.active(SubnetConfig(64, 0.73, 4))
    batches = [torch.randn(4, 3, 64, 64) * 2 + 0.5 for _ in range(3)]
    stats = calibrate_bn(tiny, net, batches)
    with torch.no_grad():
        pre = torch.cat([tiny.conv1(tiny.q_input(b, net), net) for b in batches])
    flat = pre.transpose(0, 1).flatten(1).double()
    mean, var = stats["bn1"]
    assert mean.shape == (8,)  # 16 x 0.73 = 11.68 -> 8 channels
    assert torch.allclose(mean.double(), flat.mean(dim=1), atol=1e-5)
    assert torch.allclose(var.double(), flat.var(dim=1), rtol=1e-5)
    assert set(stats) == {n for n, m in tiny.named_modules() if m.__class__.__name__ == "SlimBatchNorm2d"}


def test_calibrated_eval_matches_batch_statistics_and_is_per_subnet(tiny):
    _randomise_bn(tiny)  # stored statistics are now wrong for every subnet
    config = SubnetConfig(64, 0.6, 6)
    batch = torch.randn(16, 3, 64, 64)
    net = ActiveSubnet(config.width, tiny.float_plan())  # float: no rounding flips
    stats = calibrate_bn(tiny, net, [batch])
    with torch.no_grad():
        train_out = tiny.train()(batch, net)
        tiny.eval()
        calibrated = tiny(batch, ActiveSubnet(config.width, net.bits, stats))
        stored = tiny(batch, net)
    # Eval with the calibrated statistics reproduces batch normalisation up to the
    # unbiased-variance factor n / (n - 1), n >= 16 x 2 x 2; stored statistics do not.
    scale = train_out.abs().max().item()
    err_cal = (calibrated - train_out).abs().max().item()
    err_stored = (stored - train_out).abs().max().item()
    assert err_cal < 0.02 * scale
    assert err_cal * 10 < err_stored
    wide = calibrate_bn(tiny, tiny.active(SubnetConfig(64, 1.0, 6)), [batch])
    assert wide["layer4.0.bn2"][0].shape == (128,) and stats["layer4.0.bn2"][0].shape == (80,)


def test_calibration_restores_mode_and_needs_images(tiny):
    tiny.eval()
    calibrate_bn(tiny, tiny.active(SubnetConfig(32, 1.0, 8)), [torch.randn(2, 3, 32, 32)])
    assert not tiny.training
    with pytest.raises(ValueError, match="no calibration images"):
        calibrate_bn(tiny, tiny.active(SubnetConfig(32, 1.0, 8)), [])


def test_pack_round_trip():
    stats = {"bn1": (torch.randn(8), torch.rand(8))}
    back = unpack_bn_stats(pack_bn_stats(stats))
    assert torch.equal(back["bn1"][0], stats["bn1"][0]) and torch.equal(back["bn1"][1], stats["bn1"][1])


def test_activation_steps_follow_lsq_init_from_data(tiny):
    batch = torch.randn(8, 3, 64, 64) * 3
    init_activation_steps(tiny, ActiveSubnet(1.0, tiny.float_plan()), batch)
    q = tiny.q_input
    for bits in q.bit_choices:
        qp = 2 ** (bits - 1) - 1
        assert q.scale(bits).item() == pytest.approx(2 * batch.abs().mean().item() / math.sqrt(qp), rel=1e-5)
    assert tiny.layer3[0].q1.scale(4).item() != pytest.approx(2 * 0.3989 / math.sqrt(15))  # prior replaced


def test_given_statistics_must_cover_every_batchnorm(tiny):
    config = SubnetConfig(32, 1.0, 8)
    stats = calibrate_bn(tiny, tiny.active(config), [torch.randn(2, 3, 32, 32)])
    tiny.eval()
    partial = {k: v for k, v in stats.items() if k != "layer2.0.bn1"}
    with pytest.raises(KeyError, match="no entry for 'layer2.0.bn1'"):
        tiny(torch.randn(1, 3, 32, 32), tiny.active(config, bn_stats=partial))
    narrow = calibrate_bn(tiny, tiny.active(SubnetConfig(32, 0.6, 8)), [torch.randn(2, 3, 32, 32)])
    with pytest.raises(ValueError, match="calibrated statistics have"):
        tiny(torch.randn(1, 3, 32, 32), tiny.active(config, bn_stats=narrow))
