"""AlignQ's ADMM correlation preservation (Chen et al., AlignQ, Sec. 3.2, Eqs. 5-12).

For an activation quantizer l with continuous (CDF-aligned, pre-rounding) values X (n
samples x d features) and quantized values Q(X), the paper penalises the change of the
sample correlations D_l = X X^T - Q(X) Q(X)^T (its Eq. 5 with X stored d x n). ADMM splits
``L_Q + mu ||D~||`` s.t. ``D = D~`` into three steps per training iteration:

- Eq. 9: the weights take the gradient of :meth:`CorrelationADMM.loss` (the D-dependent
  terms of the augmented Lagrangian, Eq. 8, with the sign of its trace term made
  consistent with Eqs. 10-12; see there) added to the task loss;
- Eqs. 10-11: ``D~_l = shrink(D_l + Gamma_l / rho)`` (:func:`shrink`);
- Eq. 12: ``Gamma_l += rho (D_l - D~_l)``.

:meth:`CorrelationADMM.update` does Eqs. 11-12 with the D of the same forward pass (one
ADMM step per iteration, as in the paper's Algorithm 1 and the public code).

Normalisation. The public code (``tinganchen/AlignQ``, e.g.
``cdf_alignment_admm/resnet-20-cifar-10/model/quantization_uniform_admm.py``) builds
``corr(x) = x_std @ x_std.T / d`` with x_std z-scored per feature over the batch, i.e. it
divides the n x n Gram matrix by the feature count d. We keep the division by d (raw
Gram entries grow with d, 10^4-10^5 for conv activations, and would swamp the cross
entropy) but not the per-feature z-scoring, which would rescale Q(X) off its grid and
divide by a zero standard deviation wherever a feature is constant over the batch.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import Tensor

log = logging.getLogger(__name__)

_STATE_KEYS = frozenset({"mu", "rho", "d_tilde", "gamma"})


MAX_PENALTY = 1000.0  # beyond this the term swamps the task loss by orders of magnitude


def check_penalties(mu: Any, rho: Any) -> tuple[float, float]:
    """The penalties as floats: finite, 0 <= mu <= MAX_PENALTY (mu = 0 switches the
    sparsity off) and 0 < rho <= MAX_PENALTY (Eq. 11 divides by it)."""
    for name, value in (("mu", mu), ("rho", rho)):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"ADMM {name} must be a number, got {type(value).__name__}")
        if not math.isfinite(value):
            raise ValueError(f"ADMM {name} must be finite, got {value}")
    if not 0 <= mu <= MAX_PENALTY:
        raise ValueError(f"ADMM mu must be in [0, {MAX_PENALTY:g}], got {mu}")
    if not 0 < rho <= MAX_PENALTY:
        raise ValueError(f"ADMM rho must be in (0, {MAX_PENALTY:g}], got {rho}")
    return float(mu), float(rho)


def shrink(v: Tensor, mu: float, rho: float) -> Tensor:
    """Eq. 11 as printed: ``(1 - mu / (rho ||v||_F)) v`` if ``||v||_F > mu / rho``, else 0.

    This block soft-thresholding is the exact minimiser of
    ``mu ||x||_F + rho / 2 ||x - v||_F^2`` (the proximal operator of ``(mu / rho) ||.||_F``,
    a group lasso with one group per layer), not of the elementwise
    ``mu ||x||_1 + rho / 2 ||x - v||_F^2`` that Eq. 10's notation suggests (that one is
    solved by elementwise soft-thresholding). The public code uses the same block form.
    Computed without a host sync so it can run every iteration on an accelerator.
    """
    mu, rho = check_penalties(mu, rho)
    threshold = mu / rho
    norm = torch.linalg.vector_norm(v)
    # the clamp only guards the branch that torch.where discards (norm <= threshold)
    scale = torch.where(norm > threshold, 1.0 - threshold / norm.clamp_min(torch.finfo(norm.dtype).tiny), 0.0)
    return scale.to(v.dtype) * v


def discrepancy(z: Tensor, zq: Tensor) -> Tensor:
    """D = (Z Z^T - Zq Zq^T) / d for a batch: every dim but the first is flattened into
    d features, so D is n x n (sample correlations). Differentiable in both inputs;
    computed in float32 at least, because half-precision Gram sums over 10^4+ features
    lose the small differences D is made of."""
    if z.shape != zq.shape:
        raise ValueError(f"discrepancy: shapes differ, {tuple(z.shape)} vs {tuple(zq.shape)}")
    if z.dim() < 2 or z.shape[0] == 0 or z[0].numel() == 0:
        raise ValueError(f"discrepancy: need a non-empty batch with features, got shape {tuple(z.shape)}")
    dtype = torch.promote_types(z.dtype, torch.float32)
    x = z.reshape(z.shape[0], -1).to(dtype)
    xq = zq.reshape(zq.shape[0], -1).to(dtype)
    return (x @ x.T - xq @ xq.T) / x.shape[1]


class CorrelationADMM:
    """Per-layer ADMM state (D~_l, Gamma_l) of AlignQ's correlation preservation.

    Layers are keyed by name; a layer's state starts at zeros the first time
    :meth:`update` sees it (the public code starts from ``torch.rand``, which puts an
    arbitrary positive bias into the first iterations). D is n x n, so its shape follows
    the batch size: a batch of another size (e.g. the last, smaller one) sees zero state in
    :meth:`loss` and restarts that layer's state in :meth:`update`.
    """

    def __init__(self, mu: float, rho: float) -> None:
        self.mu, self.rho = check_penalties(mu, rho)
        self.d_tilde: dict[str, Tensor] = {}
        self.gamma: dict[str, Tensor] = {}

    def _stored(self, name: str, d: Tensor) -> tuple[Tensor, Tensor] | None:
        """The layer's (D~, Gamma) on D's device and dtype, or None if absent or of
        another shape."""
        dt = self.d_tilde.get(name)
        g = self.gamma.get(name)
        if dt is None or g is None or dt.shape != d.shape or g.shape != d.shape:
            return None
        return dt.to(device=d.device, dtype=d.dtype), g.to(device=d.device, dtype=d.dtype)

    @staticmethod
    def _check_d(name: str, d: Tensor) -> None:
        if not isinstance(d, Tensor) or d.dim() != 2 or d.shape[0] != d.shape[1]:
            shape = tuple(d.shape) if isinstance(d, Tensor) else type(d).__name__
            raise ValueError(f"ADMM layer {name!r}: D must be a square matrix, got {shape}")

    def loss(self, ds: Mapping[str, Tensor]) -> Tensor | None:
        """The D-dependent terms of the augmented Lagrangian summed over layers,
        ``trace(Gamma^T (D - D~)) + rho / 2 ||D - D~||_F^2``, differentiable in D (D~ and
        Gamma are constants here, as in Eq. 9); its gradient in D is
        ``Gamma + rho (D - D~)``. Add it to the task loss. None for an empty mapping.
        Reads the state, never changes it.

        Sign: Eq. 8 prints ``trace(Gamma^T (D~ - D))``, but Eqs. 10-12 (``V = D + Gamma /
        rho``, ``Gamma += rho (D - D~)``) are the ADMM steps of ``trace(Gamma^T (D - D~))``:
        minimising Eq. 8 as printed over D~ gives ``V = D - Gamma / rho`` and its dual
        ascent is ``Gamma += rho (D~ - D)``. With Eqs. 10-12 kept as printed, Eq. 8's sign
        turns the dual term into positive feedback (``tests/test_admm.py``: D grows about
        3x on a toy problem instead of shrinking), so the term here has the sign that
        makes the three steps one ADMM.
        """
        total: Tensor | None = None
        for name, d in ds.items():
            self._check_d(name, d)
            stored = self._stored(name, d)
            if stored is None:
                term = 0.5 * self.rho * d.square().sum()
            else:
                dt, g = stored
                r = d - dt
                term = (g * r).sum() + 0.5 * self.rho * r.square().sum()
            total = term if total is None else total + term
        return total

    @torch.no_grad()
    def update(self, ds: Mapping[str, Tensor]) -> None:
        """Eqs. 11-12 with D detached: ``V = D + Gamma / rho``, ``D~ = shrink(V)``,
        ``Gamma += rho (D - D~)``. A layer whose D is not finite keeps its state (one bad
        batch would otherwise poison Gamma for the rest of training); that costs one host
        sync per layer."""
        for name, d in ds.items():
            self._check_d(name, d)
            d = d.detach().to(torch.promote_types(d.dtype, torch.float32))
            if not bool(torch.isfinite(d).all()):
                log.warning("ADMM layer %r: D is not finite, state left unchanged", name)
                continue
            stored = self._stored(name, d)
            if stored is None:
                if name in self.d_tilde:
                    log.info("ADMM layer %r: D shape %s differs from the state's, restarting from zeros",
                             name, tuple(d.shape))
                dt, g = torch.zeros_like(d), torch.zeros_like(d)
            else:
                dt, g = stored
            dt = shrink(d + g / self.rho, self.mu, self.rho)
            self.d_tilde[name] = dt
            self.gamma[name] = g + self.rho * (d - dt)

    def state(self) -> dict[str, Any]:
        """Plain dict (floats, str-keyed dicts of CPU tensors), loadable with
        ``torch.load(..., weights_only=True)``."""
        return {
            "mu": self.mu,
            "rho": self.rho,
            "d_tilde": {k: v.detach().cpu().clone() for k, v in self.d_tilde.items()},
            "gamma": {k: v.detach().cpu().clone() for k, v in self.gamma.items()},
        }

    def load(self, state: Any) -> None:
        """Restore :meth:`state`'s output, which comes from a file on resume: everything is
        checked before anything changes, and anything malformed raises a one-line
        ValueError. The stored mu and rho replace this instance's (Gamma is scaled by the
        rho it was built with); a differing value is logged."""
        if not isinstance(state, dict):
            raise ValueError(f"ADMM state must be a dict, got {type(state).__name__}")
        keys = set(state)
        if keys != _STATE_KEYS:
            missing, extra = sorted(_STATE_KEYS - keys), sorted(map(str, keys - _STATE_KEYS))
            raise ValueError(f"ADMM state keys wrong: missing {missing}, unexpected {extra}")
        mu, rho = check_penalties(state["mu"], state["rho"])
        parts: dict[str, dict[str, Tensor]] = {}
        for part in ("d_tilde", "gamma"):
            table = state[part]
            if not isinstance(table, dict):
                raise ValueError(f"ADMM state {part!r} must be a dict, got {type(table).__name__}")
            for name, t in table.items():
                if not isinstance(name, str):
                    raise ValueError(f"ADMM state {part!r}: layer names must be str, got {type(name).__name__}")
                if not isinstance(t, Tensor):
                    raise ValueError(f"ADMM state {part}[{name!r}] must be a tensor, got {type(t).__name__}")
                if not t.is_floating_point():
                    raise ValueError(f"ADMM state {part}[{name!r}] must be floating point, got {t.dtype}")
                if t.dim() != 2 or t.shape[0] != t.shape[1]:
                    raise ValueError(f"ADMM state {part}[{name!r}] must be a square matrix, got {tuple(t.shape)}")
                if not bool(torch.isfinite(t).all()):
                    raise ValueError(f"ADMM state {part}[{name!r}] is not finite")
            parts[part] = table
        if set(parts["d_tilde"]) != set(parts["gamma"]):
            raise ValueError("ADMM state: 'd_tilde' and 'gamma' name different layers")
        for name, dt in parts["d_tilde"].items():
            if dt.shape != parts["gamma"][name].shape:
                raise ValueError(f"ADMM state layer {name!r}: d_tilde {tuple(dt.shape)} "
                                 f"and gamma {tuple(parts['gamma'][name].shape)} differ in shape")
        if (mu, rho) != (self.mu, self.rho):
            log.warning("ADMM resume: using the stored mu=%g, rho=%g instead of mu=%g, rho=%g",
                        mu, rho, self.mu, self.rho)
        self.mu, self.rho = mu, rho
        self.d_tilde = {k: v.detach().clone() for k, v in parts["d_tilde"].items()}
        self.gamma = {k: v.detach().clone() for k, v in parts["gamma"].items()}


def parse_admm(text: str) -> tuple[float, float]:
    """The CLI value "MU,RHO" (e.g. the public code's "0.2,0.3"): exactly two finite
    numbers, mu >= 0 and rho > 0. Raises a one-line ValueError otherwise."""
    if not isinstance(text, str):
        raise ValueError(f"ADMM penalties must be a string 'MU,RHO', got {type(text).__name__}")
    fields = text.split(",")
    if len(fields) != 2:
        raise ValueError(f"ADMM penalties must be 'MU,RHO' (two comma-separated numbers), got {text!r}")
    values = []
    for name, field in zip(("mu", "rho"), fields):
        try:
            values.append(float(field.strip()))
        except ValueError:
            raise ValueError(f"ADMM {name} is not a number: {field.strip()!r} in {text!r}") from None
    return check_penalties(*values)


def aligning_quantizers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The activation quantizers that have an aligned (pre-rounding) form: ADMM's layers."""
    return [m for m in model.modules() if callable(getattr(m, "aligned", None)) and getattr(m, "channels", 0) is None]


@contextlib.contextmanager
def capture(model: torch.nn.Module) -> Iterator[dict[str, Tensor]]:
    """D of every quantizer that aligns its input (``aligned`` gives X, its output is
    Q(X)) during the forward passes inside the block, keyed by quantizer name; quantizers
    at bit-widths without an aligned form (LSQ, AlignQ at 8 bits) give none."""
    ds: dict[str, Tensor] = {}

    def hook(quant: torch.nn.Module, args: tuple, out: Tensor) -> None:
        x, net = args
        z = quant.aligned(x, net.bits[quant.name])  # type: ignore[operator]
        if z is not None:
            ds[quant.name] = discrepancy(z, out)  # type: ignore[index]

    handles = [q.register_forward_hook(hook) for q in aligning_quantizers(model)]
    try:
        yield ds
    finally:
        for h in handles:
            h.remove()
