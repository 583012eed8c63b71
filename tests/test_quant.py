from __future__ import annotations

import math

import pytest
import torch

from rtfq_deploy.plan import ActiveSubnet, BitPlan
from rtfq_deploy.quant import LSQQuantizer, qrange, quantizer_class
from rtfq_deploy.quant.lsq import lsq_init_step, lsq_quantize


def _net(q: LSQQuantizer, bits: int | None) -> ActiveSubnet:
    q.name = "q"
    return ActiveSubnet(1.0, BitPlan.of({"q": bits}))


def test_qrange():
    assert qrange(4, True) == (-8, 7) and qrange(4, False) == (0, 15)
    assert qrange(8, True) == (-128, 127) and qrange(8, False) == (0, 255)


@pytest.mark.parametrize("bits", [2, 4, 6, 8])
@pytest.mark.parametrize("signed", [True, False])
def test_activation_values_lie_on_the_b_bit_grid(bits, signed):
    q = LSQQuantizer((8, 6, 4, 2), signed=signed)
    x = torch.randn(4, 8, 5, 5) * 30
    y = q(x, _net(q, bits))
    step = q.scale(bits)
    codes = y / step
    qmin, qmax = qrange(bits, signed)
    assert torch.allclose(codes, codes.round(), atol=1e-4)
    assert codes.min() >= qmin - 1e-4 and codes.max() <= qmax + 1e-4
    # Large inputs saturate at both ends of the range (scaled x has |x/s| >> qmax).
    assert codes.round().max() == qmax and codes.round().min() == qmin
    assert torch.equal(q.to_int(y, bits), codes.round())


@pytest.mark.parametrize("bits", [4, 6, 8])
def test_weights_per_channel_on_grid_with_sliced_steps(bits):
    w = torch.randn(32, 16, 3, 3)
    q = LSQQuantizer((8, 6, 4), signed=True, channels=32)
    q.init_from(w)
    sliced = w[:24, :8]  # a slimmed layer uses the leading steps
    y = q(sliced, _net(q, bits))
    steps = q.scale(bits, 24).reshape(-1, 1, 1, 1)
    codes = y / steps
    qmin, qmax = qrange(bits, True)
    assert torch.allclose(codes, codes.round(), atol=1e-4)
    assert codes.min() >= qmin - 1e-4 and codes.max() <= qmax + 1e-4
    # Every channel has its own step.
    assert len(set(q.scale(bits, 24).tolist())) == 24


def test_none_bits_is_float_identity():
    q = LSQQuantizer((8, 4), signed=True)
    x = torch.randn(3, 7)
    assert q(x, _net(q, None)) is x


def test_rounds_half_to_even_like_onnx_quantizelinear():
    x = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5, 3.5])
    y = lsq_quantize(x, torch.tensor(1.0), -8, 7, 1.0)
    assert y.tolist() == [0.0, 2.0, 2.0, -0.0, -2.0, 4.0]


def test_lsq_step_gradient_matches_the_paper():
    # d(x_hat)/ds = round(x/s) - x/s inside the range, qmin / qmax outside (Esser et al. eq. 3).
    s = torch.tensor(0.5, requires_grad=True)
    x = torch.tensor([0.3, 0.8, -0.2, 10.0, -10.0])
    y = lsq_quantize(x, s, -4, 3, 1.0)
    grads = [torch.autograd.grad(y[i], s, retain_graph=True)[0].item() for i in range(len(x))]
    v = x / 0.5
    expected = [torch.round(v[0]) - v[0], torch.round(v[1]) - v[1], torch.round(v[2]) - v[2], 3.0, -4.0]
    assert grads == pytest.approx([float(e) for e in expected], abs=1e-6)
    # Straight-through gradient for x inside the range, zero outside.
    xg = x.clone().requires_grad_(True)
    lsq_quantize(xg, torch.tensor(0.5), -4, 3, 1.0).sum().backward()
    assert xg.grad.tolist() == [1.0, 1.0, 1.0, 0.0, 0.0]


def test_gradients_reach_only_the_active_bit_widths_step():
    q = LSQQuantizer((8, 6, 4), signed=False)
    x = torch.rand(2, 4, 6, 6) * 4
    q(x, _net(q, 6)).square().sum().backward()
    grad = q.step.grad
    assert grad[q.bit_index(6)] != 0
    assert grad[q.bit_index(8)] == 0 and grad[q.bit_index(4)] == 0
    # LSQ gradient scale 1 / sqrt(N * Qp) with N the features per sample.
    q2 = LSQQuantizer((8, 6, 4), signed=False)
    s = q2.step.detach()[1].clone().requires_grad_()
    ref = lsq_quantize(x, s, 0, 63, 1.0).square().sum()
    (g_ref,) = torch.autograd.grad(ref, s)
    assert grad[1].item() == pytest.approx(g_ref.item() / math.sqrt(4 * 6 * 6 * 63), rel=1e-5)


def test_lsq_init_and_unknown_bits():
    w = torch.randn(4, 10)
    q = LSQQuantizer((8, 4), signed=True, channels=4)
    q.init_from(w)
    expected = 2 * w.abs().mean(dim=1) / math.sqrt(7)
    assert torch.allclose(q.scale(4), expected)
    assert torch.allclose(lsq_init_step(w, 4, True, dim=0), expected)
    with pytest.raises(ValueError, match="no 6-bit parameters"):
        q(w, _net(q, 6))


def test_quantizer_registry():
    assert quantizer_class("lsq") is LSQQuantizer
    with pytest.raises(ValueError, match="unknown quantizer kind"):
        quantizer_class("nope")


def _reference_lsq(x, s, qmin, qmax, g):
    """LSQ composed from autograd primitives, as in Esser et al.'s pseudo-code."""
    s = (s - s * g).detach() + s * g
    v = torch.clamp(x / s, qmin, qmax)
    return (v + (torch.round(v) - v).detach()) * s


@pytest.mark.parametrize("per_channel", [False, True])
def test_fused_lsq_matches_the_autograd_composition(per_channel):
    x = (torch.randn(6, 5, 4, 4) * 3).requires_grad_()
    s = (torch.rand(6, 1, 1, 1) + 0.2 if per_channel else torch.tensor(0.7)).requires_grad_()
    y = lsq_quantize(x, s, -8, 7, 0.03)
    x2, s2 = x.detach().clone().requires_grad_(), s.detach().clone().requires_grad_()
    y2 = _reference_lsq(x2, s2, -8, 7, 0.03)
    assert torch.equal(y, y2)
    w = torch.randn_like(y)
    (y * w).sum().backward()
    (y2 * w).sum().backward()
    assert torch.allclose(x.grad, x2.grad) and torch.allclose(s.grad, s2.grad, rtol=1e-4, atol=1e-6)


def test_inference_path_equals_training_path():
    x, s = torch.randn(3, 8, 5, 5) * 2, torch.tensor(0.3)
    with torch.no_grad():
        fast = lsq_quantize(x, s, 0, 15, 1.0)
    assert torch.equal(fast, lsq_quantize(x, s.clone().requires_grad_(), 0, 15, 1.0).detach())
