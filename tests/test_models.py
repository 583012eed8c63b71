from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from rtfq_deploy.calibrate import calibrate_bn, init_activation_steps
from rtfq_deploy.checkpoint import load_pretrained
from rtfq_deploy.layers import SlimBatchNorm2d
from rtfq_deploy.models import ARCHS, SupernetConfig, build_supernet
from rtfq_deploy.plan import ActiveSubnet, BitPolicy
from rtfq_deploy.quant import qrange
from rtfq_deploy.space import SearchSpace, SubnetConfig
from tests.fixtures.torchvision_ref import reference_input, synth_state_dict

# Key names, shapes and logits recorded by running torchvision's own model files
# (tests/fixtures/make_torchvision_fixture.py), for every arch both fixtures hold.
FIXTURE = {"archs": {arch: ref for name in ("torchvision_resnet.json", "torchvision_mobilenet_v2.json")
                     for arch, ref in json.loads((Path(__file__).parent / "fixtures" / name).read_text())["archs"].items()}}


def _quantizer_keys(model) -> set[str]:
    return {f"{n}.{k}" for n, q in model.quantizers() for k in q.state_dict()}


@pytest.mark.parametrize("training", [True, False])
def test_every_subnet_of_the_small_supernet_runs_at_its_resolution(tiny, training):
    tiny.train(training)
    seen = set()
    for config in tiny.config.space:
        x = torch.randn(2, 3, config.resolution, config.resolution)
        with torch.no_grad():
            y = tiny(x, tiny.active(config))
        assert y.shape == (2, 10) and torch.isfinite(y).all(), config
        seen.add(config)
    assert len(seen) == 48


def test_subnet_weights_are_views_of_the_supernet(tiny):
    conv = tiny.layer2[0].conv2
    w = conv.active_weight(16, 0.6)
    assert w.untyped_storage().data_ptr() == conv.weight.untyped_storage().data_ptr()
    assert w.shape == (16, 16, 3, 3)  # 32 * 0.6 = 19.2 -> 16 (nearest multiple of 8)
    with torch.no_grad():
        conv.weight[0, 0, 0, 0] = 123.0
    assert w[0, 0, 0, 0] == 123.0
    # Training a subnet updates the leading channels of the shared weights only.
    tiny.zero_grad()
    tiny(torch.randn(2, 3, 64, 64), tiny.active(SubnetConfig(64, 0.6, 4))).sum().backward()
    g = conv.weight.grad
    assert g[:16, :16].abs().sum() > 0 and g[16:].abs().sum() == 0 and g[:, 16:].abs().sum() == 0


def test_training_forward_leaves_running_statistics_alone(tiny):
    before = {k: v.clone() for k, v in tiny.state_dict().items() if "running" in k}
    tiny.train()
    tiny(torch.randn(4, 3, 64, 64), tiny.active(SubnetConfig(64, 0.73, 6)))
    assert all(torch.equal(v, tiny.state_dict()[k]) for k, v in before.items())


@pytest.mark.parametrize("arch", ["tiny_resnet", "resnet18", "resnet50", "tiny_mobilenet"])
@pytest.mark.parametrize("bits", [4, 8])
def test_every_layer_reads_its_declared_quantizer_grid(arch, bits):
    """layer_inputs() (used by BitOPs and export) matches the real dataflow: each conv and
    linear input lies on the integer grid of the quantizer declared to feed it, and on the
    grid of no other activation quantizer (every quantizer gets its own step first)."""
    model = build_supernet(SupernetConfig(arch, num_classes=10)).eval()
    acts = [(n, q) for n, q in model.quantizers() if q.channels is None]
    # steps from data and BatchNorm statistics calibrated for the subnet, as after training:
    # with the prior's steps and the initial running statistics a narrow MobileNetV2's small
    # activations round to all zeros, which lie on every grid
    x = torch.randn(4, 3, 64, 64)
    init_activation_steps(model, ActiveSubnet(1.0, model.float_plan()), x)
    with torch.no_grad():
        for i, (_, q) in enumerate(acts):
            q.step.mul_(1.0 + 0.137 * math.sqrt(i + 2))  # pairwise irrational step ratios
    config = SubnetConfig(64, 0.73, bits)
    net = model.active(config, calibrate_bn(model, model.active(config), [x]))
    inputs: dict[str, torch.Tensor] = {}
    handles = [layer.register_forward_pre_hook(lambda m, a, n=name: inputs.__setitem__(n, a[0]))
               for name, layer in model.layers()]
    with torch.no_grad():
        model(torch.randn(2, 3, 64, 64), net)
    for h in handles:
        h.remove()
    declared = model.layer_inputs()
    assert set(declared) == set(inputs) == {n for n, _ in model.layers()}

    def on_grid(x: torch.Tensor, qname: str) -> bool:
        q = dict(acts)[qname]
        b = net.bits[qname]
        codes = x / q.scale(b)
        lo, hi = qrange(b, q.signed)
        return bool(torch.allclose(codes, codes.round(), atol=1e-3)) and lo - 1e-3 <= codes.min() <= codes.max() <= hi + 1e-3

    for layer, qname in declared.items():
        assert on_grid(inputs[layer], qname), layer
        others = [n for n, _ in acts if n != qname and on_grid(inputs[layer], n)]
        assert others == [], (layer, others)


def test_uniform_plan_follows_the_bit_policy(tiny):
    plan = tiny.plan(SubnetConfig(224, 1.0, 4)).as_dict()
    assert plan["q_input"] == plan["conv1.weight_quant"] == 8  # first layer
    assert plan["q_pool"] == plan["fc.weight_quant"] == 8  # classifier
    assert plan["layer1.0.q_res"] == plan["layer2.0.downsample.2"] == 8  # add operands
    assert plan["layer1.0.q1"] == plan["layer1.0.conv2.weight_quant"] == plan["layer1.0.q_out"] == 4
    follow = build_supernet(SupernetConfig("tiny_resnet", policy=BitPolicy(edge_bits=None, residual_bits=None)))
    assert set(follow.plan(SubnetConfig(224, 1.0, 4)).as_dict().values()) == {4}
    assert set(tiny.float_plan().as_dict().values()) == {None}


def test_add_operands_and_output_are_quantized(tiny):
    roles = {n: (q.role, q.signed) for n, q in tiny.quantizers()}
    for prefix in ("layer1.0", "layer2.0", "layer3.0", "layer4.0"):
        assert roles[f"{prefix}.q_res"] == ("residual", True)
        assert roles[f"{prefix}.q_out"] == ("body", False)
    assert roles["layer2.0.downsample.2"] == ("residual", True)
    assert roles["q_input"] == ("first", True)


@pytest.mark.parametrize("arch", ["resnet18", "resnet50", "mobilenet_v2"])
def test_names_and_shapes_are_torchvisions(arch):
    model = build_supernet(SupernetConfig(arch))
    own = {k: list(v.shape) for k, v in model.state_dict().items() if k not in _quantizer_keys(model)}
    expected = {k: shape for k, shape in FIXTURE["archs"][arch]["keys"]}
    assert own == expected


@pytest.mark.parametrize("arch", ["resnet18", "resnet50", "mobilenet_v2"])
def test_torchvision_weights_give_torchvisions_logits(arch):
    """Weights keyed as torchvision's, loaded into the float full-width subnet, reproduce
    the logits torchvision's own resnet.py / mobilenetv2.py computed (see tests/fixtures)."""
    ref = FIXTURE["archs"][arch]
    model = build_supernet(SupernetConfig(arch))
    notes = load_pretrained(model, synth_state_dict([(k, s) for k, s in ref["keys"]], seed=0))
    assert notes == [f"loaded {len(ref['keys'])} tensors"]
    model.eval()
    with torch.no_grad():
        logits = model(reference_input(seed=1), ActiveSubnet(1.0, model.float_plan()))
    expected = torch.tensor(ref["logits"])
    assert torch.allclose(logits, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())


def test_registry_builds_every_arch_with_a_custom_space():
    space = SearchSpace(resolutions=(64, 32), widths=(1.0, 0.5), bits=(4, 2))
    for arch in ARCHS:
        model = build_supernet(SupernetConfig(arch, num_classes=5, space=space))
        assert model.config.bit_choices == (8, 4, 2)
        y = model(torch.randn(2, 3, 32, 32), model.active(SubnetConfig(32, 0.5, 2)))
        assert y.shape == (2, 5)
    bns = [m for m in model.modules() if isinstance(m, SlimBatchNorm2d)]
    assert all(m.name for m in bns)
