"""``rtfq-train``: RTF-Q domain adaptation of a supernet checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click
from click.core import ParameterSource

from rtfq_deploy.cli.common import BoundedInt, Command, FiniteFloat, setup_logging
from rtfq_deploy.train.limits import LOSSES, SETTINGS, Range

# option name -> TrainConfig field (loss weights live under "losses")
_OVERRIDES = {
    "steps": "steps", "batch_size": "batch_size", "lr": "lr", "optimizer": "optimizer", "ema": "ema",
    "rule": "rule", "n_random": "n_random", "single_bits": "single_bits", "seed": "seed",
    "warmup_steps": "warmup_steps", "step_lr_scale": "step_lr_scale", "rampup_steps": "rampup_steps", "target_start": "target_start", "weight_decay": "weight_decay", "checkpoint_every": "checkpoint_every",
    "log_every": "log_every", "calib_images": "calib_images", "workers": "workers", "device": "device",
    "inplace_distill": "inplace_distill", "idm": "idm", "scheduler_start": "scheduler_start",
    "scheduler_period": "scheduler_period", "admm": "admm", "pseudo_labels": "pseudo_labels",
    "pseudo_every": "pseudo_every", "target_aug": "target_aug", "source_aug": "source_aug",
}
_LOSS_OVERRIDES = {"w_ce": "ce", "w_distill": "distill", "w_pseudo": "pseudo", "w_im": "im", "threshold": "threshold"}


def _bounded(limit: Range) -> click.ParamType:
    """The click type of a setting: the same range TrainConfig checks, caught at parse time."""
    if limit.integer:
        return BoundedInt(int(limit.low), int(limit.high))
    return FiniteFloat(limit.low, limit.high, low_open=limit.low_open, high_open=limit.high_open)


def _read_recipe(path: Path) -> dict[str, Any]:
    """A recipe file, or the name of a built-in one (synth_cpu, synth_strong_cpu, synth_strong_paper_cpu, office31, officehome, domainnet)."""
    builtin = Path(__file__).resolve().parents[1] / "train" / "recipes" / f"{path}.json"
    if not path.exists() and path.parent == Path(".") and builtin.exists():
        path = builtin
    from rtfq_deploy.fileio import read_json

    data = read_json(path, "recipe", max_bytes=1 << 20, expect=dict)
    return {k: v for k, v in data.items() if not k.startswith("_")}


@click.command(cls=Command, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--checkpoint", type=click.Path(dir_okay=False, path_type=Path), help="Supernet checkpoint to adapt (from rtfq init).")
@click.option("--source", type=click.Path(file_okay=False, path_type=Path), help="Labeled source images, one folder per class.")
@click.option("--target", type=click.Path(file_okay=False, path_type=Path), help="Unlabeled target images (same class folders; labels unused).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), help="Run directory to create.")
@click.option("--resume", type=click.Path(file_okay=False, path_type=Path), help="Continue the run in this directory.")
@click.option("--recipe", type=click.Path(dir_okay=False, path_type=Path),
              help="JSON file of training settings, or a built-in recipe: synth_cpu, synth_strong_cpu, synth_strong_paper_cpu, office31, officehome, domainnet.")
@click.option("--steps", type=_bounded(SETTINGS["steps"]), help="Optimizer steps.  [default: 5000]")
@click.option("--batch-size", type=_bounded(SETTINGS["batch_size"]), help="Images per step, half source and half target (at least 2 each: BatchNorm needs them).  [default: 64]")
@click.option("--lr", type=_bounded(SETTINGS["lr"]), help="Peak learning rate (cosine annealed).  [default: 2e-4]")
@click.option("--optimizer", type=click.Choice(["adam", "sgd"]), help="[default: adam]")
@click.option("--step-lr-scale", type=_bounded(SETTINGS["step_lr_scale"]),
              help="lr of the quantizer step sizes relative to --lr.  [default: 0.05 with adam, 1 with sgd]")
@click.option("--weight-decay", type=_bounded(SETTINGS["weight_decay"]), help="Weight decay of the weights (not the step sizes).  [default: 0]")
@click.option("--warmup-steps", type=_bounded(SETTINGS["warmup_steps"]), help="Linear warm-up steps.  [default: 0]")
@click.option("--target-start", type=_bounded(SETTINGS["target_start"]), help="Source-only steps before the target terms start.  [default: 0]")
@click.option("--rampup-steps", type=_bounded(SETTINGS["rampup_steps"]), help="Ramp the target terms' weights up over N steps.  [default: 0]")
@click.option("--ema", type=_bounded(SETTINGS["ema"]), help="Teacher EMA momentum.  [default: 0.999]")
@click.option("--rule", type=click.Choice(["sandwichq", "sandwich", "max6min", "single", "mixed"]),
              help="Subnet sampling: SandwichQ (paper), standard Sandwich per bit-width, max+6 random+min, one "
                   "bit-width, or mixed: the max plan and --n-random per-quantizer bit plans (OneShot-MPQ).  "
                   "[default: sandwichq]")
@click.option("--n-random", type=_bounded(SETTINGS["n_random"]), help="Random subnets per step.  [default: 2]")
@click.option("--single-bits", type=_bounded(SETTINGS["single_bits"]), help="The bit-width trained by --rule single.")
@click.option("--inplace-distill", type=_bounded(SETTINGS["inplace_distill"]),
              help="Plans below the top one learn (1 - W) CE + W KL to the top plan's source logits.  "
                   "[default: 0.5 with --rule mixed, else 0]")
@click.option("--idm", type=_bounded(SETTINGS["idm"]),
              help="Mixed rule: weight of information distortion mitigation (BatchNorm outputs of layers at the "
                   "lowest bit-width pulled to the max plan's).  [default: 0.01]")
@click.option("--no-idm", is_flag=True, help="Mixed rule: no information distortion mitigation (ablation).")
@click.option("--no-scheduler", is_flag=True, help="Mixed rule: no bit-width scheduler (ablation).")
@click.option("--scheduler-start", type=_bounded(SETTINGS["scheduler_start"]),
              help="Mixed rule: first step of the bit-width scheduler.  [default: steps / 10]")
@click.option("--scheduler-period", type=_bounded(SETTINGS["scheduler_period"]),
              help="Mixed rule: steps between the scheduler's updates.  [default: steps / 30]")
@click.option("--admm", metavar="MU,RHO",
              help="AlignQ supernets: ADMM correlation preservation of the aligned activations with penalties "
                   "MU in [0, 1000] and RHO in (0, 1000] (the paper's code: 0.2,0.3).  [default: off]")
@click.option("--w-ce", type=_bounded(LOSSES["ce"]), help="Weight of the source cross-entropy.  [default: 1]")
@click.option("--w-distill", type=_bounded(LOSSES["distill"]), help="Weight of distillation from the EMA teacher.  [default: 1]")
@click.option("--w-pseudo", type=_bounded(LOSSES["pseudo"]), help="Weight of the target pseudo-label loss.  [default: 0.3]")
@click.option("--w-im", type=_bounded(LOSSES["im"]), help="Weight of information maximisation on target.  [default: 1]")
@click.option("--threshold", type=_bounded(LOSSES["threshold"]), help="Pseudo-label confidence threshold.  [default: 0.9]")
@click.option("--pseudo-labels", type=click.Choice(["confident", "centroid"]),
              help="Pseudo-labels: confident predictions on the batch (the top subnet's, paper; the teacher's with "
                   "--target-aug strong), or SHOT's clustering labels of the whole target set from the teacher's "
                   "maxnet.  [default: confident]")
@click.option("--pseudo-every", type=_bounded(SETTINGS["pseudo_every"]),
              help="With --pseudo-labels centroid: steps between relabelling the target set.  [default: 50]")
@click.option("--target-aug", type=click.Choice(["weak", "strong"]),
              help="Target views: crops and flips for all (paper), or strong: the subnets learn from a strongly "
                   "augmented view what the teacher predicts on the weak one (FixMatch).  [default: weak]")
@click.option("--source-aug", type=click.Choice(["weak", "strong"]),
              help="Source views: crops and flips, or strong: the same strong augmentation (a control for "
                   "--target-aug strong).  [default: weak]")
@click.option("--source-only", is_flag=True, help="Baseline: source cross-entropy only (no teacher, no target losses).")
@click.option("--seed", type=_bounded(SETTINGS["seed"]), help="Seed of every random choice (batches, crops, subnets).  [default: 0]")
@click.option("--checkpoint-every", type=_bounded(SETTINGS["checkpoint_every"]), help="Save the resumable state every N steps.  [default: 500]")
@click.option("--log-every", type=_bounded(SETTINGS["log_every"]), help="Log a metrics line every N steps.  [default: 50]")
@click.option("--calib-images", type=_bounded(SETTINGS["calib_images"]), help="Target images for each subnet's BatchNorm statistics.  [default: 512]")
@click.option("--workers", type=_bounded(SETTINGS["workers"]), help="Image decoding workers.  [default: 2]")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), help="[default: auto]")
@click.option("-v", "--verbose", is_flag=True, help="Log details to stderr.")
@click.pass_context
def train(ctx: click.Context, checkpoint: Path | None, source: Path | None, target: Path | None, out: Path | None,
          resume: Path | None, recipe: Path | None, source_only: bool, no_idm: bool, no_scheduler: bool, verbose: bool,
          **options: Any) -> None:
    """Adapt a supernet from a labeled source domain to an unlabeled target domain (RTF-Q).

    Writes OUT/supernet.pt (every subnet's BatchNorm calibrated on target images),
    OUT/metrics.jsonl and a resumable OUT/state.pt. Under torchrun every process
    trains its share of each batch (data parallel, gloo on CPU, NCCL on GPUs).
    """
    setup_logging(verbose)
    from rtfq_deploy.errors import RtfqError
    from rtfq_deploy.train.config import TrainConfig
    from rtfq_deploy.train.distributed import distributed_from_env
    from rtfq_deploy.train.loop import Run

    given = [k for k in options if ctx.get_parameter_source(k) == ParameterSource.COMMANDLINE]
    if resume is not None:
        extra = [f"--{k.replace('_', '-')}" for k in given] + [f"--{n}" for n, v in
                 (("checkpoint", checkpoint), ("source", source), ("target", target), ("out", out), ("recipe", recipe))
                 if v is not None] + [flag for flag, on in (("--source-only", source_only), ("--no-idm", no_idm),
                                                            ("--no-scheduler", no_scheduler)) if on]
        if extra:
            raise click.UsageError(f"--resume continues the run with its own settings; drop {', '.join(extra)}")
        dist = distributed_from_env()
        run = Run.resume(resume, dist)
    else:
        missing = [n for n, v in (("--checkpoint", checkpoint), ("--source", source), ("--target", target), ("--out", out))
                   if v is None]
        if missing:
            raise click.UsageError(f"missing {', '.join(missing)} (or --resume RUN_DIR)")
        settings = _read_recipe(recipe) if recipe else {}
        losses = settings.pop("losses", {})
        if not isinstance(losses, dict):
            raise click.UsageError(f"recipe {recipe}: 'losses' must be an object of loss weights")
        losses = dict(losses)
        for k in given:
            if k in _OVERRIDES:
                settings[_OVERRIDES[k]] = options[k]
            else:
                losses[_LOSS_OVERRIDES[k]] = options[k]
        if source_only:
            losses.update(distill=0.0, pseudo=0.0, im=0.0)
        if no_idm:
            settings["idm"] = 0.0
        if no_scheduler:
            settings["scheduler"] = False
        settings["losses"] = losses
        try:
            cfg = TrainConfig.from_dict(settings)
        except RtfqError as e:
            raise RtfqError(f"recipe {recipe}: {e}" if recipe and not given else str(e)) from None
        dist = distributed_from_env()
        run = Run.create(out, cfg, checkpoint, source, target, dist)
    total, batch = run.cfg.steps, run.cfg.batch_size

    def progress(row: dict) -> None:
        done = row["step"] + 1
        eta = (total - done) * batch / max(row["images_per_s"], 1e-9)
        parts = [f"step {done}/{total}", f"loss {row['loss']:.3f}", f"ce {row['ce']:.3f}"]
        parts += [f"{k} {row[k]:.3f}" for k in ("distill", "inplace", "idm", "admm", "pseudo", "im") if row.get(k)]
        if "pseudo_rate" in row:
            parts.append(f"confident {row['pseudo_rate']:.0%}")
        parts += [f"src-acc {row['source_acc']:.2f}", f"{row['images_per_s']:.0f} img/s (data {row['data_share']:.0%})", f"eta {eta / 60:.1f} min"]
        click.echo("  ".join(parts), err=True)

    result = run.train(progress if run.dist.main else None)
    if run.dist.main:
        click.echo(f"wrote {result} (every subnet's BatchNorm calibrated on target images); "
                   f"metrics in {run.run_dir / 'metrics.jsonl'}")
