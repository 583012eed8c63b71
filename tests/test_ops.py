"""The op and encoding registries: a network family is one model file.

``PlainNet`` below is a third architecture defined here only: its integer graph uses
every op (a depthwise conv, ReLU6, a signed linear bottleneck and its add without ReLU,
max and average pooling) through the registries, and nothing in the package names it.
It trains, exports and verifies exactly like the built-in families.
"""

from __future__ import annotations

import random

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from rtfq_deploy import graph, ops
from rtfq_deploy.calibrate import calibrate_bn, init_activation_steps
from rtfq_deploy.checkpoint import Checkpoint
from rtfq_deploy.costs import subnet_costs, walk
from rtfq_deploy.export.api import build_model
from rtfq_deploy.export.encodings import ENCODINGS
from rtfq_deploy.export.onnx_graph import to_float_onnx
from rtfq_deploy.export.verify import ort_session, verify
from rtfq_deploy.graph import Add, AvgPool, Conv, IntGraph, MaxPool, Quantize
from rtfq_deploy.layers import SlimBatchNorm2d, conv_bn
from rtfq_deploy.models import ARCHS, Supernet, SupernetConfig, build_supernet
from rtfq_deploy.quant import CdfCodes, LinearCodes
from rtfq_deploy.space import SearchSpace, SubnetConfig
from rtfq_deploy.train.config import TrainConfig
from rtfq_deploy.train.step import make_optimizer, step_losses
from rtfq_deploy.train.mixed import conv_bn_pairs
from rtfq_deploy.train.losses import LossWeights
from rtfq_deploy.train.sampler import sandwichq

SPACE = SearchSpace(resolutions=(32, 24), widths=(1.0, 0.5), bits=(8, 4))


class PlainNet(Supernet):
    """stem conv-bn-relu6 -> maxpool -> depthwise conv-bn-relu6 -> 1x1 conv-bn (signed) -> + stem -> avgpool -> fc"""

    def __init__(self, config: SupernetConfig) -> None:
        super().__init__(config)
        self.q_in = self.make_quantizer(True, None, "first")
        self.stem = self.conv(3, 16, 3, padding=1, slim_in=False, role="first")
        self.stem_bn = SlimBatchNorm2d(16)
        self.q_stem = self.make_quantizer(False, None, "body")
        self.dw = self.conv(16, 16, 3, padding=1, depthwise=True)
        self.dw_bn = SlimBatchNorm2d(16)
        self.q_dw = self.make_quantizer(False, None, "body")
        self.pw = self.conv(16, 16, 1)
        self.pw_bn = SlimBatchNorm2d(16)
        self.q_pw = self.make_quantizer(True, None, "residual")
        self.q_sum = self.make_quantizer(True, None, "body")
        self.q_pool = self.make_quantizer(False, None, "last")
        self.head = self.linear(16, config.num_classes, role="last")
        self.finish()

    def graph(self) -> IntGraph:
        return IntGraph((Quantize("q_in"), Conv("stem", "q_in", "q_stem", "stem_bn", relu_max=6.0),
                         MaxPool("q_stem", "pool", 2, 2, 0),
                         Conv("dw", "pool", "q_dw", "dw_bn", relu_max=6.0), Conv("pw", "q_dw", "q_pw", "pw_bn"),
                         Add("q_pw", "pool", "q_sum"), AvgPool("q_sum", "q_pool"), Conv("head", "q_pool", None, linear=True)))

    def forward(self, x: Tensor, net) -> Tensor:  # type: ignore[override]
        x = self.q_in(x, net)
        stem = F.max_pool2d(self.q_stem(F.relu6(conv_bn(self.stem, self.stem_bn, x, net, self.q_in)), net), 2)
        y = self.q_dw(F.relu6(conv_bn(self.dw, self.dw_bn, stem, net, self.q_stem)), net)
        y = self.q_pw(conv_bn(self.pw, self.pw_bn, y, net, self.q_dw), net)
        y = self.q_sum(y + stem, net)
        return self.head(self.q_pool(F.adaptive_avg_pool2d(y, 1).flatten(1), net), net)


@pytest.fixture
def plain(monkeypatch):
    monkeypatch.setitem(ARCHS, "plain", PlainNet)
    return build_supernet(SupernetConfig("plain", num_classes=4, space=SPACE))


def test_every_graph_node_and_ir_op_has_one_rule():
    nodes = {graph.Quantize, graph.Conv, graph.Add, graph.MaxPool, graph.AvgPool}
    assert set(ops.BY_NODE) == nodes
    assert set(ops.BY_IR) == {ops.QuantizeOp, ops.ConvOp, ops.AddOp, ops.MaxPoolOp, ops.GlobalAvgPoolOp}
    assert set(ENCODINGS) == {LinearCodes, CdfCodes}
    with pytest.raises(TypeError, match="no op rule"):
        ops.rule_for(object())


def test_a_third_architecture_trains_and_exports_exactly(plain):
    """Conv/BN pairs, the classifier and costs come from the model's own graph; a few
    SandwichQ steps train it; every subnet then exports exactly on integer kernels."""
    assert conv_bn_pairs(plain) == {"stem.weight_quant": "stem_bn", "dw.weight_quant": "dw_bn",
                                    "pw.weight_quant": "pw_bn"}
    assert plain.graph().classifier == "head"
    shapes = walk(plain, 32, 0.5)  # 8 channels: the depthwise conv has 8 filters of 3x3
    assert [(s.name, s.weights) for s in shapes] == [("stem", 8 * 27), ("dw", 8 * 9), ("pw", 64), ("head", 4 * 8)]
    assert shapes[1].macs == 16 * 16 * 8 * 9

    g = torch.Generator().manual_seed(0)
    xs, ys = torch.randn(16, 3, 32, 32, generator=g) * 2, torch.randint(0, 4, (16,), generator=g)
    init_activation_steps(plain, plain.active(SPACE.maxnet), xs)
    cfg = TrainConfig(steps=12, batch_size=16, lr=0.01, losses=LossWeights(distill=0.0, pseudo=0.0, im=0.0))
    opt = make_optimizer(plain, cfg)
    rng = random.Random(0)
    plain.train()
    losses = []
    for _ in range(cfg.steps):
        opt.zero_grad()
        totals = step_losses(plain, plain, sandwichq(SPACE, rng, 2), xs, ys, xs, None, cfg,
                             lambda loss, last: loss.backward())
        opt.step()
        losses.append(totals["ce"])
    assert losses[-1] < losses[0]  # it learns the 16 images

    stats = {str(c): calibrate_bn(plain, plain.active(c), [F.interpolate(xs, size=c.resolution)]) for c in SPACE}
    ckpt = Checkpoint(plain.eval(), stats, {})
    for c in SPACE:
        onnx_model, ir, net, _ = build_model(ckpt, c, "0" * 64)
        x = torch.randn(32, 3, c.resolution, c.resolution, generator=g) * 3
        report = verify(plain, net, ir, onnx_model, x)
        assert report.passed and report.exact, (c, report.problems())
        assert report.optimized_ops.get("QLinearConv") == 3 and report.optimized_ops.get("QLinearAdd") == 1
        assert subnet_costs(plain, c).macs == sum(s.macs for s in walk(plain, c.resolution, c.width))


def test_relu6_is_an_integer_clamp_at_the_code_of_six(plain):
    """An 8-bit unsigned quantizer whose range passes 6 gets a Clip at its code of 6; the
    export then matches PyTorch on inputs that drive the activations far past 6. The fp32
    graph caps with a float Clip."""
    plain.eval()
    with torch.no_grad():
        for q in (plain.q_stem, plain.q_dw):
            q.step.fill_(0.1)  # 255 codes of 0.1: a range of 25.5, so ReLU6 caps at code 60
    c = SubnetConfig(32, 1.0, 8)
    xs = torch.randn(16, 3, 32, 32) * 8
    init_activation_steps(plain, plain.active(c), xs)
    with torch.no_grad():
        for q in (plain.q_stem, plain.q_dw):
            q.step.fill_(0.1)
    stats = {str(c): calibrate_bn(plain, plain.active(c), [xs])}
    onnx_model, ir, net, _ = build_model(Checkpoint(plain.eval(), stats, {}), c, "0" * 64)
    assert ir.ceilings == {"q_stem": 60, "q_dw": 60, "pool": 60}
    clips = {n.output[0]: n for n in onnx_model.graph.node if n.op_type == "Clip"}
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in onnx_model.graph.initializer}
    assert int(inits[clips["q_dw_q"].input[2]]) == 60
    # the stem's activations do pass 6: the clamp is exercised
    with torch.no_grad():
        pre = F.conv2d(plain.q_in(xs, net), plain.stem.weight)
    assert float(pre.max()) > 6
    report = verify(plain, net, ir, onnx_model, xs)
    assert report.passed and report.exact, report.problems()
    float_model = to_float_onnx(ir)
    assert sum(n.op_type == "Clip" for n in float_model.graph.node) == 2
    fp32 = ort_session(float_model.SerializeToString()).run(None, {"input": xs.numpy()})[0]
    assert np.isfinite(fp32).all()
