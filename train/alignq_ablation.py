"""AlignQ against LSQ under domain shift, at 4 and 2 bits, over several data seeds: which
of this implementation's departures from the paper costs AlignQ its accuracy.

For every seed: the strong-shift synthetic data (`rtfq data synth --shift strong`), then
tiny_resnet supernets with the space R 64/56/48/40 x W 1.00/0.86/0.73/0.60 x Q 4/2
(32 subnets), all trained with the strong shift's CPU recipe (RTF-Q: SandwichQ, EMA
teacher, target terms) from the same initial weights (same seed). The runs (quantizer
kinds: `rtfq init --help`; AlignQ's weights are the same in every variant):

  lsq                  LSQ weights and activations (this project's RTF-Q)
  alignq-v1            AlignQ as first built: every activation, sigma calibrated once
  alignq-v1-admm       alignq-v1 plus ADMM correlation preservation, --admm 0.2,0.3 (the paper's code)
  alignq-w             AlignQ weights, LSQ activations } which side of AlignQ costs
  alignq-a             LSQ weights, AlignQ activations } (alignq-a: run on request)
  alignq-learned       (a) sigma learned (log sigma, a gradient through the CDF)
  alignq-full          (b) the signed full-normal CDF on post-ReLU tensors (half the codes)
  alignq-n01           (c) the paper code's fixed N(0, 1), never fitted to data
  alignq-conv          (e) the CDF only on tensors that nothing but convolutions read
  alignq-conv-learned  (e) both of the above
  alignq-branch        (e) the CDF only on tensors one conv reads (inside residual branches)
  alignq-branch-logistic  the same with the logistic CDF (one table op in onnxruntime)
  alignq-inverse       (e) a diagnostic, not exportable: codes valued back in the input's
                       domain (inverse CDF): is it computing in the CDF domain that costs?

Each is evaluated on the seed's held-out target images (every subnet). The script prints
mean +- std over seeds of the mean target top-1 at q4 and at q2, then each run minus LSQ
and minus alignq-v1 per seed, and writes OUT/alignq_ablation.json. Finished runs are
reused (only their accuracy tables are needed, kept in train/ablation/alignq/), so

    python train/alignq_ablation.py --out train/ablation/alignq

reprints the table in a second and trains only what is missing (about 4 minutes a run
here, two at a time: 27 runs, about an hour on an empty --out).
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

from rtfq_deploy import ablation
from rtfq_deploy.ablation import mean_std, recipe_steps, scaled, sh, tool, train_and_eval

RECIPE = "synth_strong_paper_cpu"
SPACE = ["--resolutions", "64,56,48,40", "--widths", "1.0,0.86,0.73,0.6", "--bits", "4,2"]
BITS = (4, 2)
RUNS: dict[str, tuple[str, str, list[str]]] = {  # name -> (weights' kind, activations' kind, rtfq-train options)
    "lsq": ("lsq", "lsq", []),
    "alignq-v1": ("alignq-v1", "alignq-v1", []),
    "alignq-v1-admm": ("alignq-v1", "alignq-v1", ["--admm", "0.2,0.3"]),
    "alignq-w": ("alignq-v1", "lsq", []),
    "alignq-a": ("lsq", "alignq-v1", []),
    "alignq-learned": ("alignq-learned", "alignq-learned", []),
    "alignq-full": ("alignq-full", "alignq-full", []),
    "alignq-n01": ("alignq-n01", "alignq-n01", []),
    "alignq-conv": ("alignq-conv", "alignq-conv", []),
    "alignq-conv-learned": ("alignq-conv-learned", "alignq-conv-learned", []),
    "alignq-branch": ("alignq-branch", "alignq-branch", []),
    "alignq-branch-logistic": ("alignq-branch-logistic", "alignq-branch-logistic", []),
    "alignq-inverse": ("alignq-inverse", "alignq-inverse", []),
}
DEFAULT_RUNS = ("lsq", "alignq-v1", "alignq-v1-admm", "alignq-w", "alignq-learned", "alignq-full", "alignq-n01",
                "alignq-conv", "alignq-conv-learned", "alignq-branch", "alignq-branch-logistic", "alignq-inverse")


def prepare(out: Path, seed: int, names: list[str]) -> None:
    """The seed's data and the initial weights of the quantizer kinds ``names`` train with."""
    ablation.make_data(out, seed, "strong")
    for weights, acts in dict.fromkeys(RUNS[name][:2] for name in names):
        init = out / f"init-{weights}-{acts}.pt"
        if not init.exists():
            sh(tool("rtfq"), "init", "--arch", "tiny_resnet", "--num-classes", "16", *SPACE, "--weight-quantizer",
               weights, "--act-quantizer", acts, "--seed", str(seed), "-o", str(init))


def one(out: Path, seed: int, name: str, steps: dict[str, int], override: int | None, threads: int) -> dict:
    weights, acts, options = RUNS[name]
    table = train_and_eval(out, seed, name, lambda: ["--checkpoint", str(out / f"init-{weights}-{acts}.pt"), "--recipe",
                                                     RECIPE, *options, *scaled(steps, 1.0, override)], threads)
    top1 = {r["subnet"]: r["top1"] for r in table["subnets"]}
    return {f"q{q}": statistics.fmean(v for k, v in top1.items() if k.endswith(f"-q{q}")) for q in BITS}


def report(results: dict[str, dict[int, dict]], seeds: list[int], wall: float, out: Path) -> None:
    print(f"\nMean target top-1 over the 16 subnets of each bit-width, held-out target images, "
          f"seeds {','.join(map(str, seeds))} (mean +- std); wall {wall / 60:.1f} min")
    print(f"{'run':<24}" + "".join(f"{f'q{q}':>16}" for q in BITS))
    for name, per_seed in results.items():
        done = [s for s in seeds if s in per_seed]
        print(f"{name:<24}" + "".join(f"{mean_std([per_seed[s][f'q{q}'] for s in done]):>16}" for q in BITS)
              + ("" if done == seeds else f"   (seeds {','.join(map(str, done))})"))
    for base in ("lsq", "alignq-v1"):
        print(f"\nminus {base}, per seed:")
        for name in results:
            done = [s for s in seeds if s in results.get(name, {}) and s in results.get(base, {})]
            if name == base or not done:
                continue
            line = f"{name:<24}"
            for q in BITS:
                diffs = [results[name][s][f"q{q}"] - results[base][s][f"q{q}"] for s in done]
                line += f"  q{q} {mean_std(diffs)} (" + ", ".join(f"{d:+.3f}" for d in diffs) + ")"
            print(line)
    ablation.write_json(out / "alignq_ablation.json", {
        "seeds": seeds, "results": {n: {str(s): v for s, v in r.items()} for n, r in results.items()}}, newline=False)


def main() -> None:
    ap = ablation.parser(__doc__.split("\n\n")[0], RUNS, DEFAULT_RUNS)
    ap.add_argument("--steps", type=ablation.positive, help="override the recipe's steps (every phase scaled alike)")
    ap.add_argument("--report-only", action="store_true", help="report the kept runs, train nothing")
    args = ap.parse_args()
    names = ablation.run_names(ap, args.runs, RUNS)
    steps = recipe_steps(RECIPE)
    started = time.monotonic()
    results = ablation.run_table(args.out, args.seeds, names,
                                 lambda out, seed, name, threads: one(out, seed, name, steps, args.steps, threads),
                                 jobs=args.jobs, prepare=prepare, report_only=args.report_only)
    report(results, args.seeds, time.monotonic() - started, args.out)


if __name__ == "__main__":
    main()
