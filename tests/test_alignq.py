"""AlignQ: the CDF quantizer's math, its exact export, training with ADMM, and bad input."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from rtfq_deploy.calibrate import calibrate_bn, init_activation_steps
from rtfq_deploy.checkpoint import Checkpoint, CheckpointError, load_checkpoint, save_checkpoint
from rtfq_deploy.data.synth import SynthConfig, generate
from rtfq_deploy.errors import RtfqError
from rtfq_deploy.export.api import build_model
from rtfq_deploy.export.lower import lower
from rtfq_deploy.export.verify import cdf_code_mismatches, verify
from rtfq_deploy.graph import Conv
from rtfq_deploy.layers import SlimBatchNorm2d
from rtfq_deploy.models import SupernetConfig, build_supernet
from rtfq_deploy.plan import ActiveSubnet
from rtfq_deploy.formats import QUANTIZER_ALIASES
from rtfq_deploy.quant import QUANTIZERS, AlignQQuantizer, CdfCodes, CdfOptions, LinearCodes, LSQQuantizer
from rtfq_deploy.quant.alignq import CDF_MAX_BITS, code_table
from rtfq_deploy.space import SearchSpace, SubnetConfig
from tests.test_cli import _one_line_error, _run
from tests.test_train import kill_after_logged_step

SPACE = SearchSpace(resolutions=(64, 48), widths=(1.0, 0.6), bits=(6, 4, 2))


def _entropy(codes: torch.Tensor) -> float:
    counts = torch.unique(codes, return_counts=True)[1].double()
    p = counts / counts.sum()
    return float(-(p * p.log2()).sum())


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6])
def test_codes_of_a_matching_gaussian_carry_almost_k_bits(signed, bits):
    """Theorem 3.1 through the 8-bit pre-quantization: N(0, s^2) (or its half-normal after
    ReLU) calibrated on one sample, coded on another, uses the k-bit codes nearly evenly."""
    g = torch.Generator().manual_seed(bits)
    x = 1.7 * torch.randn(200_000, generator=g)
    x = x if signed else x.abs()
    q = AlignQQuantizer((8, 6, 4, 3, 2), signed)
    q.init_from(x[:20_000])
    codes = q.to_int(x[20_000:], bits)
    lo, hi = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)
    assert codes.min() >= lo and codes.max() <= hi
    assert len(torch.unique(codes)) == 1 << bits  # every code reached
    assert _entropy(codes) >= bits - 0.1
    # an LSQ quantizer initialised on the same sample uses them far less evenly at low bits
    if bits <= 3:
        lsq = LSQQuantizer((8, 6, 4, 3, 2), signed)
        lsq.init_from(x[:20_000].reshape(1, -1))
        assert _entropy(lsq.to_int(x[20_000:], bits)) < _entropy(codes)


def test_quantize_gives_the_codes_times_one_scale_and_the_cdf_gradient():
    q = AlignQQuantizer((8, 4), False)
    q.init_from(torch.randn(4096).relu())
    x = (torch.randn(1000).relu() * 1.3).requires_grad_()
    y = q.quantize(x, 4)
    torch.testing.assert_close(y.detach(), q.to_int(x, 4) * q.scale(4))
    assert q.encoding(4) == CdfCodes(float(q.pre_step()), q.encoding(4).erf_scale, 1.0, 4, False)
    y.sum().backward()
    # straight through the rounding, times d/dx alpha erf(p / (sigma sqrt 2)) at the pre-quantized p
    p = torch.round(x.detach() / q.pre_step()).clamp(0, 255) * q.pre_step()
    inside = (x.detach() / q.pre_step() <= 255).float()
    expected = inside * 2 / math.sqrt(math.pi) * torch.exp(-(p / (q.sigma * math.sqrt(2))) ** 2) / (q.sigma * math.sqrt(2))
    torch.testing.assert_close(x.grad, expected, rtol=1e-4, atol=1e-6)
    # at 8 bits it is LSQ: uniform codes on its own step
    assert isinstance(q.encoding(8), LinearCodes) and CDF_MAX_BITS == 6


def test_weight_gradient_is_eqs_3_and_4():
    q = AlignQQuantizer((4,), True, channels=8)
    w = torch.randn(8, 4, 3, 3, requires_grad=True)
    y = q.quantize(w, 4)
    mu, sigma = w.detach().mean(), w.detach().std(unbiased=False)
    u = (w.detach() - mu) / (sigma * math.sqrt(2))
    torch.testing.assert_close(y.detach(), torch.round(torch.erf(u) * 8).clamp(-8, 7) / 8)
    torch.testing.assert_close(q.to_int(w, 4).float(), (y.detach() * 8).float())
    y.backward(torch.ones_like(y))
    t = torch.remainder(2 * (y.detach() + 0.5) * 15, 1.0)
    s = torch.sigmoid(t)
    f = torch.exp(-u * u) / (sigma * math.sqrt(2 * math.pi))
    torch.testing.assert_close(w.grad, s * (1 - s) * 2 * f)


def _prepared(weight: str, act: str, bits: int, arch: str = "tiny_resnet") -> tuple[Checkpoint, SubnetConfig]:
    torch.manual_seed(0)
    model = build_supernet(SupernetConfig(arch, num_classes=10, space=SPACE, weight_quantizer=weight,
                                          act_quantizer=act))
    with torch.no_grad():
        for bn in (m for m in model.modules() if isinstance(m, SlimBatchNorm2d)):
            bn.weight.copy_(torch.randn_like(bn.weight))
            bn.weight[1] = 0.0
            bn.bias.normal_(0.0, 0.5)
    images = torch.randn(16, 3, 64, 64)
    init_activation_steps(model, ActiveSubnet(1.0, model.float_plan()), images)
    cfg = SubnetConfig(64, 0.6, bits)
    return Checkpoint(model.eval(), {str(cfg): calibrate_bn(model, model.active(cfg), [images])}, {}), cfg


# CDF tensors of tiny_resnet at <= 6 bits: q_stem and each block's q1 and q_out; under
# "conv-inputs" not q_stem (layer1.0's identity reads the pooled stem) nor the last q_out
# (the average pool reads it): those keep uniform codes.
CDF_TENSORS = {"alignq-v1": 9, "alignq-learned": 9, "alignq-full": 9, "alignq-n01": 9, "alignq-conv": 7,
               "alignq-conv-learned": 7, "alignq-branch": 4, "alignq-branch-logistic": 4, "alignq-weights": 0, "lsq": 0}


@pytest.mark.parametrize("weight,act,bits", [("alignq-v1", "alignq-v1", 6), ("alignq-v1", "alignq-v1", 4),
                                             ("alignq-v1", "alignq-v1", 2), ("lsq", "alignq-v1", 4),
                                             ("alignq-v1", "lsq", 2), ("alignq-learned", "alignq-learned", 4),
                                             ("alignq-full", "alignq-full", 2), ("alignq-n01", "alignq-n01", 4),
                                             ("alignq-conv", "alignq-conv", 2),
                                             ("alignq-conv-learned", "alignq-conv-learned", 4),
                                             ("alignq-branch", "alignq-branch", 2),
                                             ("alignq-branch-logistic", "alignq-branch-logistic", 4),
                                             ("alignq-branch-logistic", "alignq-branch-logistic", 2),
                                             ("alignq-weights", "alignq-weights", 4)])
def test_alignq_exports_exactly_on_integer_kernels(weight, act, bits):
    ckpt, cfg = _prepared(weight, act, bits)
    model, ir, net, _ = build_model(ckpt, cfg, "0" * 64)
    onnx.checker.check_model(model, full_check=True)
    report = verify(ckpt.model, net, ir, model, torch.randn(64, 3, 64, 64, generator=torch.Generator().manual_seed(1)))
    assert report.passed, report.problems()
    assert report.top1_agreement == 1.0 and report.reference_top1_match
    cdf = [t for t, q in ir.qparams.items() if isinstance(q, CdfCodes) and t != "maxpool"]  # the pool shares q_stem's
    assert len(cdf) == CDF_TENSORS[act]
    assert set(report.cdf_code_mismatches) == set(cdf) and not any(report.cdf_code_mismatches.values())
    ops = report.optimized_ops
    logistic = act.endswith("logistic")  # its chain is one table op, QLinearSigmoid
    assert ops.get("QLinearSigmoid" if logistic else "Erf", 0) == len(cdf) and ops.get("Sigmoid", 0) == 0
    assert ops["QLinearConv"] == 12 and not report.float_kernels
    made = {o for n in model.graph.node for o in n.output}
    if CDF_TENSORS[act] == 9:  # the stem's Erf chain runs after the MaxPool, on the pooled pre-codes
        assert "maxpool.u" in made and "q_stem.u" not in made
    if act.startswith("alignq-conv"):
        assert "maxpool.u" not in made and "layer4.0.q_out.u" not in made and "layer3.0.q_out.u" in made


def test_the_code_check_catches_a_wrong_cdf_chain():
    ckpt, cfg = _prepared("lsq", "alignq-v1", 4)
    ir = lower(ckpt.model, ckpt.model.active(cfg, ckpt.bn_stats[str(cfg)]), cfg.resolution)
    assert not any(cdf_code_mismatches(ckpt.model, ir).values())
    t = "layer1.0.q1"
    q = ir.qparams[t]
    ir.qparams[t] = CdfCodes(q.pre_scale, q.erf_scale * 1.05, q.alpha, q.bits, q.signed)
    assert cdf_code_mismatches(ckpt.model, ir)[t] > 0


def test_code_table_is_monotone_and_uses_every_code():
    for signed in (True, False):
        for bits in range(2, CDF_MAX_BITS + 1):
            table = code_table(bits, signed)
            assert len(table) == 256 and bool((table[1:] >= table[:-1]).all())
            assert len(torch.unique(table)) == 1 << bits


def test_checkpoint_keeps_the_kinds_and_an_older_reader_refuses_it(tmp_path):
    torch.manual_seed(0)
    config = SupernetConfig("tiny_resnet", num_classes=4, space=SPACE, weight_quantizer="lsq",
                            act_quantizer="alignq-v1")
    model = build_supernet(config)
    with torch.no_grad():
        model.get_submodule("layer1.0.q1").sigma.fill_(2.5)
    save_checkpoint(tmp_path / "a.pt", model)
    back = load_checkpoint(tmp_path / "a.pt")
    assert back.model.config == config and back.model.config.quantizer == "weights=lsq,activations=alignq-v1"
    assert float(back.model.get_submodule("layer1.0.q1").sigma) == 2.5
    assert isinstance(back.model.get_submodule("conv1.weight_quant"), LSQQuantizer)
    assert not isinstance(back.model.get_submodule("conv1.weight_quant"), AlignQQuantizer)
    assert SupernetConfig.from_dict({**config.to_dict(), "quantizer": "lsq"}).act_quantizer == "lsq"  # old files
    # a reader that knows only LSQ (every version before AlignQ) refuses the file with one line
    both = build_supernet(SupernetConfig("tiny_resnet", num_classes=4, space=SPACE, weight_quantizer="alignq",
                                         act_quantizer="alignq"))
    save_checkpoint(tmp_path / "b.pt", both)
    kind = QUANTIZER_ALIASES["alignq"]
    kept = dict(QUANTIZERS)
    del QUANTIZERS[kind]  # (not monkeypatch: its undo would put the kind back last, out of order)
    try:
        with pytest.raises(CheckpointError, match=f"unknown quantizer kind '{kind}'"):
            load_checkpoint(tmp_path / "b.pt")
    finally:
        QUANTIZERS.clear()
        QUANTIZERS.update(kept)


def test_the_alias_names_the_chosen_variant_and_files_from_before_the_variants_keep_their_meaning():
    new = SupernetConfig("tiny_resnet", num_classes=4, space=SPACE, weight_quantizer="alignq", act_quantizer="alignq")
    assert new.quantizer == QUANTIZER_ALIASES["alignq"] != "alignq" and new.quantizer in QUANTIZERS
    assert new.to_dict()["quantizer"] == new.quantizer  # what a checkpoint stores: the variant, not the alias
    for stored, weights, acts in (("alignq", "alignq-v1", "alignq-v1"),
                                  ("weights=lsq,activations=alignq", "lsq", "alignq-v1"),
                                  ("weights=alignq,activations=lsq", "alignq-v1", "lsq")):
        old = SupernetConfig.from_dict({**new.to_dict(), "quantizer": stored})
        assert (old.weight_quantizer, old.act_quantizer) == (weights, acts)
    q = build_supernet(SupernetConfig.from_dict({**new.to_dict(), "quantizer": "alignq"})).get_submodule("layer1.0.q1")
    assert q.kind == "alignq-v1" and q.options == CdfOptions()


def test_conv_only_tensors_follow_the_graph():
    """Under "conv-inputs", a tensor an add or a pool reads keeps uniform codes: in ResNet-50
    only the q_out before each stage's first block (read by conv1 and the downsample conv)."""
    model = build_supernet(SupernetConfig("resnet50", space=SPACE, weight_quantizer="alignq-conv",
                                          act_quantizer="alignq-conv"))
    conv_only = {t for t, rs in model.graph().readers().items() if all(isinstance(r, Conv) for r in rs)}
    uses = {n for n, q in model.quantizers() if q.channels is None and q.uses_cdf}
    assert uses == conv_only
    assert {"q_stem", "layer1.2.q_out", "layer2.3.q_out", "layer3.5.q_out", "layer2.1.q1", "layer2.1.q2"} <= uses
    assert not uses & {"layer1.0.q_out", "layer4.2.q_out", "layer1.0.q_res", "layer1.0.downsample.2"}
    assert len([n for n in uses if n.endswith((".q1", ".q2"))]) == 32 and len(uses) == 38  # + q_input, q_pool
    for name, q in build_supernet(SupernetConfig("resnet50", space=SPACE, weight_quantizer="alignq-v1",
                                                 act_quantizer="alignq-v1")).quantizers():
        assert q.uses_cdf, name  # "all": every activation
    branch = build_supernet(SupernetConfig("resnet50", space=SPACE, weight_quantizer="alignq-branch",
                                           act_quantizer="alignq-branch"))
    inside = {n for n, q in branch.quantizers() if q.channels is None and q.uses_cdf}
    assert inside == {n for n in uses if n.endswith((".q1", ".q2"))} | {"q_input", "q_pool"}  # one conv reads each


def test_learned_sigma_gets_the_cdf_gradient_and_fits_a_target_normal():
    """log sigma's gradient is d/dsigma of alpha erf(x / (sigma sqrt 2)) at the pre-quantized
    x, inside the pre-range; trained alone to match a CDF of sigma 2, it gets there."""
    q = AlignQQuantizer((4,), True, options=CdfOptions(sigma="learned"), kind="alignq-learned")
    x = torch.randn(4000, generator=torch.Generator().manual_seed(0)) * 2.0
    q.init_from(x * 0.25)  # calibrated on the wrong scale: sigma 0.5
    sigma = float(q.sigma_value().detach())
    q.quantize(x, 4).sum().backward()
    step = q.pre_step().detach()
    v = x / step
    xp = torch.round(v).clamp(-128, 127) * step
    u = xp / (sigma * math.sqrt(2))
    inside = (v >= -128) & (v <= 127)
    expected = (inside * 2 / math.sqrt(math.pi) * torch.exp(-u * u) * -xp / (sigma ** 2 * math.sqrt(2))).sum() * sigma
    torch.testing.assert_close(q.log_sigma.grad, expected, rtol=1e-4, atol=1e-4)
    target = torch.erf(x / (2.0 * math.sqrt(2)))
    opt = torch.optim.Adam([q.log_sigma], lr=0.02)
    for _ in range(300):
        opt.zero_grad()
        (q.quantize(x, 4) - target).pow(2).mean().backward()
        opt.step()
    assert abs(float(q.sigma_value().detach()) - 2.0) < 0.2, q.sigma_value()


def test_the_variants_options():
    relu = torch.randn(4096, generator=torch.Generator().manual_seed(1)).relu() * 3.0
    fixed = AlignQQuantizer((4,), False, options=CdfOptions(sigma="fixed"), kind="alignq-n01")
    fixed.init_from(relu)
    assert float(fixed.sigma) == 1.0  # the paper's N(0, 1), whatever the data
    full = AlignQQuantizer((4,), False, options=CdfOptions(post_relu="full"), kind="alignq-full")
    full.init_from(relu)
    codes = full.to_int(relu, 4)
    assert int(codes.max()) == 8 and full.encoding(4).levels == 8 and full.scale(4) == 1 / 8  # half the codes unused
    table = code_table(4, False, full=True)
    assert bool((table[1:] >= table[:-1]).all()) and set(table.tolist()) == set(range(9))
    with pytest.raises(ValueError, match="placement"):
        CdfOptions(placement="everywhere")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("alignq")
    generate(root / "data", SynthConfig(classes=3, per_class=8, test_per_class=4, size=32, seed=0))
    torch.manual_seed(0)
    space = SearchSpace(resolutions=(32, 24), widths=(1.0, 0.5), bits=(4, 2))
    save_checkpoint(root / "init.pt", build_supernet(SupernetConfig("tiny_resnet", num_classes=3, space=space,
                                                                    weight_quantizer="alignq", act_quantizer="alignq")))
    save_checkpoint(root / "lsq.pt", build_supernet(SupernetConfig("tiny_resnet", num_classes=3, space=space)))
    return root


def _args(setup: Path, out: Path, *extra: str, init: str = "init.pt") -> list[str]:
    return ["--checkpoint", str(setup / init), "--source", str(setup / "data" / "source"),
            "--target", str(setup / "data" / "target"), "--out", str(out), "--batch-size", "16", "--lr", "0.002",
            "--log-every", "1", "--calib-images", "16", "--workers", "0", *extra]


def test_admm_training_resumes_exactly_after_sigkill_then_exports(setup, tmp_path):
    steps = ["--steps", "6", "--checkpoint-every", "3", "--admm", "0.2,0.3"]
    whole = _run("rtfq-train", *_args(setup, tmp_path / "whole", *steps))
    assert whole.returncode == 0, whole.stderr
    rows = [json.loads(line) for line in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["admm"] > 0 for r in rows) and "admm" in whole.stderr
    assert json.loads((tmp_path / "whole" / "run.json").read_text())["config"]["admm"] == [0.2, 0.3]
    run = tmp_path / "killed"
    kill_after_logged_step(_args(setup, run, *steps), run, 4)  # the state of step 3 is saved by then
    state = torch.load(run / "state.pt", weights_only=True)
    assert state["step"] == 3 and state["admm"]["gamma"] and state["admm"]["d_tilde"]
    resumed = _run("rtfq-train", "--resume", str(run))
    assert resumed.returncode == 0, resumed.stderr
    a, b = load_checkpoint(tmp_path / "whole" / "supernet.pt"), load_checkpoint(run / "supernet.pt")
    for (name, x), (_, y) in zip(a.model.state_dict().items(), b.model.state_dict().items()):
        torch.testing.assert_close(y, x, rtol=1e-5, atol=1e-6, msg=name)
    # and without the ADMM state the resumed run would differ: Gamma is not zero
    assert any(float(g.abs().max()) > 0 for g in state["admm"]["gamma"].values())
    out = tmp_path / "m.onnx"
    result = _run("rtfq-export", "--checkpoint", str(run / "supernet.pt"), "--subnet", "r32-w0.50-q2", "-o", str(out))
    assert result.returncode == 0, result.stderr
    assert "CDF quantizers equal PyTorch's" in result.stdout
    exported = onnx.load(out)
    kind = QUANTIZER_ALIASES["alignq"]  # what "alignq" (the fixture's) names
    assert sum(n.op_type == "Erf" for n in exported.graph.node) == CDF_TENSORS[kind]
    assert {p.key: p.value for p in exported.metadata_props}["rtfq.quantizer"] == kind


def test_bad_admm_and_kinds_get_one_line(setup, tmp_path):
    for bad in ("nan,1", "1", "1,2,3", "-1,1", "1,0", "inf,1", "a,b", "", "1e9,1"):
        _one_line_error(_run("rtfq-train", *_args(setup, tmp_path / "bad", "--steps", "1", "--admm", bad)), "--admm")
        assert not (tmp_path / "bad").exists()
    _one_line_error(_run("rtfq-train", *_args(setup, tmp_path / "lsq", "--steps", "1", "--admm", "0.2,0.3",
                                              init="lsq.pt")), "AlignQ")
    _one_line_error(_run("rtfq", "init", "--arch", "tiny_resnet", "--quantizer", "cdfq", "-o", str(tmp_path / "x.pt")),
                    "cdfq")
    assert not (tmp_path / "x.pt").exists()
    ok = _run("rtfq", "init", "--arch", "tiny_resnet", "--bits", "4,2", "--act-quantizer", "alignq", "-o",
              str(tmp_path / "y.pt"))
    assert ok.returncode == 0 and "weights=lsq,activations=alignq" in ok.stdout
    assert "unreachable" in _run("rtfq", "init", "--help").stdout


def test_mixed_rule_training_and_a_per_layer_plan_export_with_alignq(setup, tmp_path):
    run = tmp_path / "mixed"
    result = _run("rtfq-train", *_args(setup, run, "--steps", "2", "--rule", "mixed", "--admm", "0.2,0.3"))
    assert result.returncode == 0, result.stderr
    plan = tmp_path / "plan.json"
    made = _run("rtfq", "plan", "--checkpoint", str(run / "supernet.pt"), "--subnet", "r32-w0.50-q4",
                "--set", "layer2.*=2", "-o", str(plan))
    assert made.returncode == 0, made.stderr
    bits = json.loads(plan.read_text())["bits"]
    assert bits["layer2.0.q1"] == 2 and bits["layer1.0.q1"] == 4
    out = tmp_path / "p.onnx"
    exported = _run("rtfq-export", "--checkpoint", str(run / "supernet.pt"), "--plan", str(plan), "--calib",
                    str(setup / "data" / "target"), "-o", str(out))
    assert exported.returncode == 0, exported.stderr
    assert "CDF quantizers equal PyTorch's" in exported.stdout
    meta = {p.key: p.value for p in onnx.load(out).metadata_props}
    assert json.loads(meta["rtfq.bits"]) == bits


class _Pow2(LSQQuantizer):
    """A made-up kind (power-of-two steps), defined here only: the test that a new kind
    needs nothing outside its own class to train, cost and export exactly."""

    kind = "pow2"

    def scale(self, bits, channels=None):
        step = super().scale(bits, channels)
        return torch.exp2(torch.round(torch.log2(step.clamp_min(1e-8))))

    def quantize(self, x, bits):
        lo, hi = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if self.signed else (0, (1 << bits) - 1)
        s = self.scale(bits, None if self.channels is None else x.shape[0])
        if self.channels is not None:
            s = s.reshape((-1,) + (1,) * (x.dim() - 1))
        v = x / s
        return (v + (torch.round(v).clamp(lo, hi) - v).detach()) * s


def test_a_new_quantizer_kind_exports_without_touching_the_exporter(monkeypatch):
    monkeypatch.setitem(QUANTIZERS, "pow2", _Pow2)
    ckpt, cfg = _prepared("pow2", "pow2", 4)
    model, ir, net, _ = build_model(ckpt, cfg, "0" * 64)
    report = verify(ckpt.model, net, ir, model, torch.randn(32, 3, 64, 64, generator=torch.Generator().manual_seed(2)))
    assert report.passed, report.problems()
    scales = [q.scale for t, q in ir.qparams.items() if isinstance(q, LinearCodes)]
    assert scales and all(math.log2(s) == round(math.log2(s)) for s in scales)


def test_ties_pinned_by_a_learned_step_are_compared_either_way_and_bugs_still_fail():
    """A trained AlignQ supernet's classifier-input step sat at 1/15 / 0.9 (one float32 ulp
    off), so the pooled 4-bit CDF codes (multiples of 1/60) landed on rounding ties, which
    float32 runtimes take one way every time. The same step here: verify names the tensor,
    passes the file, and still fails a 10% scale error."""
    ckpt, cfg = _prepared("lsq", "alignq-v1", 4)
    q_pool = ckpt.model.get_submodule("q_pool")
    with torch.no_grad():
        q_pool.step[q_pool.bit_index(8)] = 0.07407408207654953
    onnx_model, ir, net, _ = build_model(ckpt, cfg, "0" * 64)
    inputs = torch.randn(64, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    from rtfq_deploy.export.verify import pinned_ties
    assert "q_pool" in pinned_ties(ckpt.model, net, inputs)
    report = verify(ckpt.model, net, ir, onnx_model, inputs)
    assert report.passed and report.pinned_ties in ([], ["q_pool"]), report.problems()  # [] where already exact
    conv = next(op for op in ir.ops if getattr(op, "name", "") == "layer2.0.conv1")
    conv.scale = conv.scale * 1.1  # an exporter bug
    from rtfq_deploy.export.onnx_graph import to_onnx
    broken = verify(ckpt.model, net, ir, to_onnx(ir, {}), inputs)
    assert not broken.passed


def test_alignq_weights_trains_exactly_as_alignq_weights_with_lsq_activations():
    """So the ablation's alignq-w rows (weights alignq-v1, activations lsq) are alignq-weights'."""
    space = SearchSpace(resolutions=(64, 48), widths=(1.0, 0.6), bits=(4, 2))
    x = torch.randn(8, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    runs = []
    for weights, acts in (("alignq-v1", "lsq"), ("alignq-weights", "alignq-weights")):
        torch.manual_seed(0)
        model = build_supernet(SupernetConfig("tiny_resnet", num_classes=16, space=space, weight_quantizer=weights,
                                              act_quantizer=acts))
        init_activation_steps(model, ActiveSubnet(1.0, model.float_plan()), x)
        y = model.train()(x, model.active(SubnetConfig(64, 1.0, 2)))
        y.sum().backward()
        runs.append((y.detach(), [p.grad for p in model.parameters()]))
        assert not any(getattr(q, "uses_cdf", False) for _, q in model.quantizers() if q.channels is None)
    assert torch.equal(runs[0][0], runs[1][0])
    assert all((a is None and b is None) or torch.equal(a, b) for a, b in zip(runs[0][1], runs[1][1], strict=True))


def test_the_inverse_diagnostic_values_codes_in_the_input_domain_and_refuses_to_export():
    q = AlignQQuantizer((4, 2), False, options=CdfOptions(domain="original"), kind="alignq-inverse")
    x = torch.randn(100_000, generator=torch.Generator().manual_seed(0)).relu() * 2.0
    q.init_from(x)
    y = q.quantize(x, 4)
    values = torch.unique(y)
    assert len(values) == 16 and float(values[0]) == 0.0  # ReLU's zeros stay zero
    assert float((y - x).pow(2).mean() / x.pow(2).mean()) < 0.01  # a non-uniform quantizer of x itself
    ordered = y[x.argsort()]
    assert bool((ordered[1:] >= ordered[:-1]).all())  # monotone in x
    assert not q.changes_domain(4)
    with pytest.raises(RtfqError, match="diagnostic and does not export"):
        q.encoding(4)


@pytest.mark.parametrize("signed", [False, True])
def test_logistic_code_tables_equal_onnxruntimes_fused_table_on_every_pre_code(signed):
    """The logistic CDF's codes are a constant table per (bits, signed), since its argument
    scale does not depend on sigma: all 256 pre-codes of every bit-width equal what
    onnxruntime's QLinearSigmoid computes, and none is within 1e-5 of a rounding tie."""
    from onnx import TensorProto, helper

    from rtfq_deploy.export.encodings import handler
    from rtfq_deploy.export.lower import IntNet
    from rtfq_deploy.export.onnx_graph import IR_VERSION, OPSET, _Emitter
    from rtfq_deploy.export.verify import ort_session
    from rtfq_deploy.quant.alignq import erf_scale

    for bits in range(2, CDF_MAX_BITS + 1):
        enc = CdfCodes(0.01, erf_scale(signed, "logistic"), 1.0, bits, signed, cdf="logistic")
        emitter = _Emitter(IntNet("x", "codes", 1, 1, qparams={"t": enc}), pack_int4=False)
        emitter.quantize("x", "t", codes="codes")
        graph = helper.make_graph(emitter.nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [256])],
                                  [helper.make_tensor_value_info("codes", TensorProto.UINT8, [256])], emitter.inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
        model.ir_version = IR_VERSION
        domain = handler(enc).domain(enc)
        got = ort_session(model.SerializeToString()).run(None, {"x": domain})[0].astype(np.int64) - enc.zero_point
        want = code_table(bits, signed, cdf="logistic").numpy().astype(np.int64)
        assert (got == want).all(), (bits, np.nonzero(got != want))
        lo, hi = enc.qrange
        assert want.min() == lo and want.max() >= hi - (1 if bits == 6 and not signed else 0)  # (6-bit: 62 of 63)
        p = domain.astype(np.float64) / 0.01
        v = 2 * enc.levels / (1 + np.exp(-p * np.float64(np.float32(enc.erf_scale))))
        assert np.abs(v - np.floor(v) - 0.5).min() > 1e-5


def test_logistic_activation_gradient_is_the_logistic_cdfs_slope():
    q = AlignQQuantizer((4,), False, options=CdfOptions(cdf="logistic"), kind="alignq-branch-logistic")
    q.init_from(torch.randn(4096).relu())
    x = (torch.randn(1000).relu() * 1.3).requires_grad_()
    q.quantize(x, 4).sum().backward()
    from rtfq_deploy.quant.alignq import erf_scale
    step = q.pre_step()
    p = torch.round(x.detach() / step).clamp(0, 255)
    s = torch.sigmoid(p * erf_scale(False, "logistic"))
    expected = (x.detach() / step <= 255) * 2 * s * (1 - s) * erf_scale(False, "logistic") / step
    torch.testing.assert_close(x.grad, expected, rtol=1e-4, atol=1e-6)


def test_a_hostile_learned_sigma_stays_finite():
    """A checkpoint's log sigma is finite (the loader checks) but may still overflow exp():
    sigma is bounded, so codes and the exported pre-step stay finite."""
    q = AlignQQuantizer((4,), False, options=CdfOptions(sigma="learned"), kind="alignq-learned")
    x = torch.rand(1000) * 3
    for value in (100.0, -100.0, 3e38):
        with torch.no_grad():
            q.log_sigma.fill_(value)
        step = float(q.pre_step().detach())
        assert math.isfinite(step) and step > 0
        codes = q.to_int(x, 4)
        assert bool(torch.isfinite(q.quantize(x, 4)).all()) and 0 <= int(codes.min()) <= int(codes.max()) <= 15
        assert math.isfinite(q.encoding(4).pre_scale)
