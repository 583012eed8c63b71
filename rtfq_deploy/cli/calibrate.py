"""``rtfq calibrate``: store BatchNorm statistics of subnets (uniform or mixed) in a checkpoint."""

from __future__ import annotations

from pathlib import Path

import click

from rtfq_deploy.cli.common import BoundedInt, Command


@click.command(cls=Command)
@click.option("--checkpoint", type=click.Path(dir_okay=False, path_type=Path), required=True, help="Supernet checkpoint.")
@click.option("--data", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Target-domain images (any folder tree; labels are not used).")
@click.option("--subnets", "subnet_list",
              help="'all' or comma-separated subnet ids [default: all, or none when --plans is given].")
@click.option("--plans", "plan_files", multiple=True, type=click.Path(exists=True, path_type=Path),
              help="Plan file of a (mixed-precision) subnet, or a folder of them; repeatable. Their plans are "
                   "stored in the checkpoint, so their ids work with --subnet afterwards.")
@click.option("--images", type=BoundedInt(2, 10**6), default=512, show_default=True,
              help="Images to calibrate each subnet's BatchNorm on (a fixed random subset; at least 2).")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="Checkpoint to write (the input itself with --force).")
@click.option("--force", is_flag=True, help="Overwrite an existing output file.")
def calibrate(checkpoint: Path, data: Path, subnet_list: str | None, plan_files: tuple[Path, ...], images: int,
              device: str, output: Path, force: bool) -> None:
    """Recalibrate BatchNorm statistics of subnets on target images and store them, keyed by
    subnet id, in a checkpoint that rtfq eval and rtfq-export then use."""
    if output.exists() and not force:
        raise click.UsageError(f"{output} exists (use --force to overwrite)")
    from rtfq_deploy.checkpoint import load_checkpoint, save_checkpoint
    from rtfq_deploy.images import image_files
    from rtfq_deploy.errors import RtfqError
    from rtfq_deploy.evaluate import ensure_calibrated, torch_device
    from rtfq_deploy.planfile import chosen_subnets

    dev = torch_device(device)
    ckpt = load_checkpoint(checkpoint)
    model = ckpt.model
    subnets = chosen_subnets(ckpt, subnet_list, plan_files, "calibrate")
    clash = next((c for c in subnets if not c.uniform and ckpt.plans.get(str(c), c) != c), None)
    if clash is not None:
        raise RtfqError(f"{clash}: the checkpoint stores another plan with this id (a digest collision); "
                        "change one quantizer of the new plan")
    files = image_files(data)
    if not files:
        raise RtfqError(f"{data}: no images")
    model.to(dev)
    stats = ensure_calibrated(ckpt, subnets, files, images, data, device=dev, recalibrate=True,
                              say=lambda line: click.echo(line, err=True))
    plans = {**ckpt.plans, **{str(c): c for c in subnets if not c.uniform}}
    save_checkpoint(output, model.cpu(), bn_stats={**ckpt.bn_stats, **stats}, meta=ckpt.meta, plans=plans,
                    overwrite=force)
    click.echo(f"wrote {output}: BatchNorm statistics of {len(stats)} subnet(s) "
               f"({len(ckpt.bn_stats) + len(stats) - len(set(stats) & set(ckpt.bn_stats))} in all)")
