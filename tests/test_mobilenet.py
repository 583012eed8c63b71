"""MobileNetV2 through the pipeline: torchvision's network, elastic in R, W (depthwise
included) and Q, exported exactly with every convolution on an integer kernel."""

from __future__ import annotations

import random

import pytest
import torch

from rtfq_deploy.calibrate import calibrate_bn, init_activation_steps
from rtfq_deploy.checkpoint import Checkpoint
from rtfq_deploy.costs import subnet_costs
from rtfq_deploy.export.api import build_model
from rtfq_deploy.export.lower import AddOp, ConvOp
from rtfq_deploy.export.verify import verify
from rtfq_deploy.models import SupernetConfig, build_supernet
from rtfq_deploy.models.mobilenet import make_divisible
from rtfq_deploy.plan import ActiveSubnet
from rtfq_deploy.space import SearchSpace, SubnetConfig, slim_channels
from rtfq_deploy.planfile import free_quantizers
from tests.fixtures.torchvision_ref import synth_state_dict
from tests.test_cli import _one_line_error, _run
from tests.test_export import _prepared


def test_full_network_has_torchvisions_size():
    """torchvision's mobilenet_v2 at width 1.0 and 224 px: 0.3008 GMACs, 3.50 M
    parameters (3,504,872 with BatchNorm), 52 convolutions of which 17 depthwise."""
    model = build_supernet(SupernetConfig("mobilenet_v2"))
    costs = subnet_costs(model, SubnetConfig(224, 1.0, 8))
    assert costs.macs == 300_774_272
    convs = [layer for _, layer in model.layers() if isinstance(layer, torch.nn.Conv2d)]
    assert len(convs) == 52 and sum(c.depthwise for c in convs) == 17
    quantizer_keys = {f"{n}.{k}" for n, q in model.quantizers() for k in q.state_dict()}
    params = sum(v.numel() for k, v in model.state_dict().items()
                 if k not in quantizer_keys and "running" not in k and "num_batches" not in k)
    assert params == 3_504_872
    assert [make_divisible(c * 0.5) for c in (32, 16, 24, 96, 320)] == [16, 8, 16, 48, 160]


def test_slimming_keeps_depthwise_channels_in_step():
    """At a narrow width every depthwise conv has as many filters (and groups) as the
    expansion before it has outputs, and the residual operands have equal channels."""
    model = build_supernet(SupernetConfig("tiny_mobilenet", num_classes=10)).eval()
    width = 0.6
    seen: dict[str, tuple] = {}
    handles = [layer.register_forward_hook(lambda m, a, out, n=name: seen.__setitem__(n, (a[0].shape[1], out.shape[1])))
               for name, layer in model.layers()]
    with torch.no_grad():
        model(torch.randn(2, 3, 64, 64), model.active(SubnetConfig(64, width, 8)))
    for h in handles:
        h.remove()
    for name, layer in model.layers():
        c_in, c_out = seen[name]
        if getattr(layer, "depthwise", False):
            assert c_in == c_out == slim_channels(layer.full_in, width)
        elif name != "classifier.1":
            assert c_out == slim_channels(layer.full_out, width)


@pytest.mark.parametrize("bits", [8, 6, 4])
def test_export_is_exact_and_every_conv_runs_on_an_integer_kernel(bits):
    """Depthwise convs are QLinearConv with group, the linear bottleneck's signed add a
    QLinearAdd, ReLU6 an integer Clip; verification passes on the exact bar."""
    cfg = SubnetConfig(64, 0.6, bits)
    ckpt = _prepared("tiny_mobilenet", [cfg])
    onnx_model, ir, net, _ = build_model(ckpt, cfg, "0" * 64)
    inputs = torch.randn(48, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    report = verify(ckpt.model, net, ir, onnx_model, inputs)
    # passed: on the exact bar, or (randomised BatchNorm with negative gammas makes this
    # network float-sensitive at 8 bits) no further from the float64 subnet than its own
    # float32 run is
    assert report.passed, report.problems()
    model = ckpt.model  # tiny_mobilenet: 31 convs (10 depthwise) and 3 residual adds
    layers = [layer for _, layer in model.layers() if isinstance(layer, torch.nn.Conv2d)]
    n_res = sum(getattr(m, "use_res_connect", False) for m in model.features)
    assert (len(layers), sum(c.depthwise for c in layers), n_res) == (31, 10, 3)
    convs = [op for op in ir.ops if isinstance(op, ConvOp) and not op.gemm]
    assert len(convs) == 31 and sum(op.groups > 1 for op in convs) == 10
    adds = [op for op in ir.ops if isinstance(op, AddOp)]
    assert len(adds) == 3 and all(ir.qparams[op.out].signed for op in adds)
    ops = report.optimized_ops
    assert ops.get("QLinearConv") == 31 and ops.get("QLinearAdd") == 3 and ops.get("QGemm") == 1
    assert not report.float_kernels
    groups = {n.name: a.i for n in onnx_model.graph.node if n.op_type == "Conv" for a in n.attribute if a.name == "group"}
    assert sorted(set(groups.values()))[0] == 1 and max(groups.values()) > 1


def test_pretrained_weights_that_do_not_fit_are_one_line(tmp_path):
    model = build_supernet(SupernetConfig("mobilenet_v2"))
    quantizer_keys = {f"{n}.{k}" for n, q in model.quantizers() for k in q.state_dict()}
    shapes = [(k, list(v.shape)) for k, v in model.state_dict().items() if k not in quantizer_keys]
    good = synth_state_dict(shapes)
    missing = dict(good)
    del missing["features.5.conv.1.0.weight"]
    misshapen = dict(good)
    misshapen["features.5.conv.1.0.weight"] = torch.zeros(192, 3, 3, 3)
    for name, sd in (("missing", missing), ("misshapen", misshapen)):
        torch.save(sd, tmp_path / f"{name}.pth")
        _one_line_error(_run("rtfq", "init", "--arch", "mobilenet_v2", "--pretrained", str(tmp_path / f"{name}.pth"),
                             "-o", str(tmp_path / "x.pt")), "weights do not fit 'mobilenet_v2'")
    assert not (tmp_path / "x.pt").exists()
    torch.save(good, tmp_path / "good.pth")
    result = _run("rtfq", "init", "--arch", "mobilenet_v2", "--pretrained", str(tmp_path / "good.pth"),
                  "--num-classes", "10", "-o", str(tmp_path / "x.pt"))
    assert result.returncode == 0, result.stderr
    assert "classifier re-initialised" in result.stdout and "48 subnets" in result.stdout


def _prepared_kind(kind: str, cfg_of) -> tuple:
    """A tiny_mobilenet of quantizer ``kind`` with data-initialised steps and statistics
    calibrated for the subnet ``cfg_of(model)`` names."""
    torch.manual_seed(0)
    space = SearchSpace(resolutions=(64, 48), widths=(1.0, 0.6), bits=(6, 4, 2) if kind == "alignq" else (8, 6, 4))
    model = build_supernet(SupernetConfig("tiny_mobilenet", num_classes=10, space=space, weight_quantizer=kind,
                                          act_quantizer=kind))
    images = torch.randn(16, 3, 64, 64)
    init_activation_steps(model, ActiveSubnet(1.0, model.float_plan()), images)
    cfg = cfg_of(model)
    stats = {str(cfg): calibrate_bn(model, model.active(cfg), [images])}
    return Checkpoint(model.eval(), stats, {}), cfg


@pytest.mark.parametrize("kind", ["lsq", "alignq"])
def test_mixed_plans_and_alignq_export_exactly(kind):
    """A random per-layer plan over the free quantizers (mixed precision), and the AlignQ
    kind's CDF codes behind ReLU6, export exactly with no change to the network file."""
    def mixed(model):
        rng = random.Random(0)
        plan = model.plan(SubnetConfig(64, 0.6, model.config.space.bits[0])).as_dict()
        for name in free_quantizers(model):
            plan[name] = rng.choice(model.config.space.bits)
        return model.subnet(64, 0.6, plan)

    ckpt, cfg = _prepared_kind(kind, mixed if kind == "lsq" else lambda m: SubnetConfig(64, 0.6, 4))
    assert cfg.uniform == (kind == "alignq")
    onnx_model, ir, net, _ = build_model(ckpt, cfg, "0" * 64)
    inputs = torch.randn(32, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    report = verify(ckpt.model, net, ir, onnx_model, inputs)
    assert report.passed, report.problems()
    assert report.optimized_ops.get("QLinearConv") == 31 and not report.float_kernels
    if kind == "alignq":
        assert report.cdf_code_mismatches and not any(report.cdf_code_mismatches.values())
