"""AlignQ's Eq. 11 (rtfq_deploy.train.admm.shrink) against a brute-force minimiser.

Eq. 11's block thresholding is claimed to minimise mu ||X||_F + rho/2 ||X - V||_F^2 (a
group lasso per layer, not the elementwise l1 norm Eq. 10 writes). For random V of
several sizes and scales (some with ||V||_F <= mu/rho, where the answer is exactly 0) and
several (mu, rho), this prints the max abs difference between Eq. 11 and a float64
L-BFGS minimiser of that objective, and both objective values; the closed form's must
not exceed the brute force's (+1e-12). It ends with one summary line. One core, seconds:

    python bench/admm_shrink.py [--trials 3] [--seed 0]
"""

from __future__ import annotations

import sys

import torch

from rtfq_deploy.scriptargs import Parser, positive
from rtfq_deploy.train.admm import shrink

SIZES = (2, 8, 32, 64)
SCALES = (0.02, 0.3, 1.0)  # per-entry std of V: the small one falls under the threshold
PENALTIES = ((0.2, 0.3), (0.05, 1.0), (1.0, 0.1))


def objective(x: torch.Tensor, v: torch.Tensor, mu: float, rho: float) -> torch.Tensor:
    return mu * torch.linalg.vector_norm(x) + 0.5 * rho * (x - v).square().sum()


def brute_force(v: torch.Tensor, mu: float, rho: float) -> torch.Tensor:
    x = (0.5 * v).clone().requires_grad_(True)
    opt = torch.optim.LBFGS([x], lr=1, max_iter=500, tolerance_grad=1e-14, tolerance_change=1e-16,
                            line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = objective(x, v, mu, rho)
        loss.backward()
        return loss

    opt.step(closure)
    return x.detach()


def main() -> int:
    parser = Parser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=positive, default=3, help="random V per (size, scale, mu, rho)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(args.seed)
    print(f"{'n':>3} {'scale':>5} {'mu':>5} {'rho':>5} {'||V||':>9} {'max|diff|':>10} "
          f"{'obj closed':>14} {'obj brute':>14}")
    worst_diff, worst_gap, cases, zeros, bad = 0.0, float("-inf"), 0, 0, 0
    for n in SIZES:
        for scale in SCALES:
            for mu, rho in PENALTIES:
                for _ in range(args.trials):
                    v = torch.randn(n, n, dtype=torch.float64, generator=gen) * scale
                    closed, numeric = shrink(v, mu, rho), brute_force(v, mu, rho)
                    oc, ob = objective(closed, v, mu, rho).item(), objective(numeric, v, mu, rho).item()
                    diff = (closed - numeric).abs().max().item()
                    cases += 1
                    zeros += int(torch.count_nonzero(closed) == 0)
                    bad += int(oc > ob + 1e-12)
                    worst_diff, worst_gap = max(worst_diff, diff), max(worst_gap, oc - ob)
                    print(f"{n:>3} {scale:>5} {mu:>5} {rho:>5} {torch.linalg.vector_norm(v).item():>9.4f} "
                          f"{diff:>10.2e} {oc:>14.8f} {ob:>14.8f}")
    verdict = "OK" if bad == 0 else "FAIL"
    print(f"{verdict}: {cases} cases ({zeros} exactly zero), max |Eq.11 - brute force| = {worst_diff:.2e}, "
          f"max obj(Eq.11) - obj(brute) = {worst_gap:.2e}, closed form worse in {bad}")
    return 0 if bad == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
