"""``rtfq eval``: top-1 accuracy of every subnet on a labeled image folder."""

from __future__ import annotations

from pathlib import Path

import click

from rtfq_deploy.cli.common import BoundedInt, Command, emit_table

COLUMNS = [
    ("subnet", "subnet", str),
    ("top1", "top-1", lambda v: f"{v:.4f}"),
    ("macs", "GMACs", lambda v: f"{v / 1e9:.3f}"),
    ("bitops", "GBitOPs", lambda v: f"{v / 1e9:.3f}"),
    ("bn", "BatchNorm", str),
]


@click.command("eval", cls=Command)
@click.option("--checkpoint", type=click.Path(dir_okay=False, path_type=Path), required=True, help="Supernet checkpoint.")
@click.option("--data", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Labeled images, one folder per class (the checkpoint's classes).")
@click.option("--subnets", "subnet_list",
              help="'all' (the space's subnets and the checkpoint's stored plans) or comma-separated subnet ids "
                   "[default: all, or none when --plans is given].")
@click.option("--plans", "plan_files", multiple=True, type=click.Path(exists=True, path_type=Path),
              help="Plan file of a (mixed-precision) subnet, or a folder of them; repeatable.")
@click.option("--calib", type=click.Path(file_okay=False, path_type=Path),
              help="Unlabeled target images to calibrate BatchNorm of subnets the checkpoint has no statistics for "
                   "(default: the --data images themselves).")
@click.option("--calib-images", type=BoundedInt(2, 10**6), default=512, show_default=True,
              help="Images to calibrate each missing subnet's BatchNorm on (at least 2).")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), help="Write the table as JSON (acc.json).")
@click.option("--force", is_flag=True, help="Overwrite an existing output file.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def eval_(checkpoint: Path, data: Path, subnet_list: str | None, plan_files: tuple[Path, ...], calib: Path | None,
          calib_images: int, device: str,
          output: Path | None, force: bool, as_json: bool) -> None:
    """Accuracy table of the supernet's subnets (input of rtfq-export --accuracy and rtfq-bench select),
    uniform ones by id and mixed-precision ones from their plan files."""
    if output is not None:
        from rtfq_deploy.fileio import check_output

        check_output(output)  # a FIFO or device is refused even with --force
    if output is not None and output.exists() and not force:
        raise click.UsageError(f"{output} exists (use --force to overwrite)")
    from rtfq_deploy.checkpoint import load_checkpoint
    from rtfq_deploy.data.folders import scan
    from rtfq_deploy.errors import RtfqError
    from rtfq_deploy.accuracy import write_accuracy_table
    from rtfq_deploy.evaluate import ensure_calibrated, evaluate_subnets, torch_device
    from rtfq_deploy.fileio import sha256_file
    from rtfq_deploy.formats import normalization_of
    from rtfq_deploy.planfile import chosen_subnets

    dev = torch_device(device)
    ckpt = load_checkpoint(checkpoint)
    model = ckpt.model
    subnets = chosen_subnets(ckpt, subnet_list, plan_files, "evaluate")
    folder = scan(data, "evaluation")
    classes = ckpt.meta.get("class_names")
    if classes is not None and list(folder.classes) != list(classes):
        raise RtfqError(f"{data}: class folders {list(folder.classes)[:4]}... differ from the checkpoint's classes "
                        f"{list(classes)[:4]}...")
    if len(folder.classes) != model.config.num_classes:
        raise RtfqError(f"{data} has {len(folder.classes)} classes, the supernet {model.config.num_classes}")
    model.to(dev)
    stats = dict(ckpt.bn_stats)
    if any(str(c) not in stats for c in subnets):
        calib_folder = scan(calib, "calibration") if calib else folder
        note = "" if calib else " (the evaluation images; pass --calib for separate target images)"
        stats.update(ensure_calibrated(ckpt, subnets, [p for p, _ in calib_folder.samples], calib_images,
                                       calib_folder.root, device=dev, note=note,
                                       say=lambda line: click.echo(line, err=True)))
    rows = evaluate_subnets(model.cpu() if dev.type == "cpu" else model, subnets, stats, [p for p, _ in folder.samples],
                            folder.labels, normalization_of(ckpt.meta), device=dev, where=str(data))
    for r in rows:
        r["bn"] = "checkpoint" if r["subnet"] in ckpt.bn_stats else "calibrated now"
    if output is not None:
        write_accuracy_table(output, rows, checkpoint, sha256_file(checkpoint), data, overwrite=force)
    emit_table(rows, COLUMNS, as_json)
