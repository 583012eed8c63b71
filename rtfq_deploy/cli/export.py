"""``rtfq-export``: write integer ONNX QDQ files of supernet subnets."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from rtfq_deploy.cli.common import BoundedInt, Command
from rtfq_deploy.cli.search import search_options


def _describe(result) -> str:
    parts = [f"wrote {result.path}: {result.subnet}", f"{result.costs.macs / 1e9:.3f} GMACs",
             f"{result.size / 1e6:.2f} MB", f"BN statistics {result.bn_statistics}"]
    r = result.report
    if r is not None:
        parts.append(f"verified on {r.samples} inputs: top-1 agreement {r.top1_agreement:.3f}, "
                     f"max logit diff {r.max_logit_diff:.3g} ({r.max_diff_steps:.2f} output steps, "
                     f"{r.max_diff_input_steps:.2f} classifier-input steps), reference evaluator within "
                     f"{r.reference_max_diff_steps:.2f} steps, "
                     f"integer kernels only")
        if r.pinned_ties:
            parts.append(f"rounding ties pinned by training at {', '.join(r.pinned_ties)} compared either way")
        if r.cdf_code_mismatches:
            parts.append(f"all 256 codes of {len(r.cdf_code_mismatches)} CDF quantizers equal PyTorch's")
        if r.float32_top1_agreement is not None:
            parts.append(f"within this network's own float32 sensitivity (float32 evaluation vs float64: top-1 "
                         f"{r.float32_top1_agreement:.3f}, {r.float32_max_diff_steps:.2f} steps)")
    return "; ".join(parts)


@click.command(cls=Command, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--checkpoint", type=click.Path(dir_okay=False, path_type=Path), required=True, help="Supernet checkpoint.")
@click.option("--subnet", help="The subnet to export, e.g. r160-w0.73-q4 (or a mixed plan the checkpoint stores).")
@click.option("--plan", "plan_file", type=click.Path(dir_okay=False, path_type=Path),
              help="Export the subnet of this plan file (rtfq plan), e.g. a per-layer mixed-precision plan.")
@click.option("--budget", help="Export the best subnet within this cost, e.g. 0.8G (suffixes K/M/G/T).")
@click.option("--bits", type=BoundedInt(2, 8), help="With --budget/--buckets: only subnets of this bit-width.")
@click.option("--mixed", is_flag=True,
              help="With --budget (bitops=, size=, macs=): search a per-quantizer mixed-precision plan on --data "
                   "(as rtfq search does), calibrate its BatchNorm there (or on --calib) and export it.")
@click.option("--metric", type=click.Choice(["macs", "bitops"]), default="macs", show_default=True,
              help="What --budget and --buckets measure.")
@click.option("--accuracy", type=click.Path(dir_okay=False, path_type=Path),
              help="Accuracy table (rtfq eval): choose the most accurate subnet within the budget.")
@click.option("--all", "export_all", is_flag=True, help="Export every subnet into the output directory.")
@click.option("--buckets", type=BoundedInt(1, 4096), help="Export the best subnet of each of N equal budget intervals.")
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True,
              help="Output file (a directory with --all or --buckets).")
@click.option("--pack", type=click.Choice(["int8", "int4"]), default="int8", show_default=True,
              help="int4 stores <=4-bit weights as ONNX INT4 (half the size); expand with rtfq_deploy.int4 before running.")
@click.option("--verify/--no-verify", default=True, show_default=True,
              help="Compare onnxruntime and the ONNX reference evaluator with the PyTorch subnet before writing.")
@click.option("--verify-samples", type=BoundedInt(1, 100_000), default=16, show_default=True,
              help="Inputs to verify on (with --verify-images: N images evenly spaced over the sorted files, so every class of a class-per-folder tree).")
@click.option("--verify-images", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Held-out target-domain images (a folder tree) to verify on instead of random inputs.")
@click.option("--calib", type=click.Path(file_okay=False, path_type=Path),
              help="Target images (any folder tree) to calibrate BatchNorm on when the checkpoint has no statistics "
                   "for the subnet (needed for a mixed plan that rtfq calibrate has not stored).")
@click.option("--calib-images", type=BoundedInt(2, 10**6), default=512, show_default=True,
              help="Images to calibrate on with --calib (at least 2).")
@search_options
@click.option("--threads", type=BoundedInt(1, 1024), default=1, show_default=True, help="onnxruntime threads for verification.")
@click.option("--force", is_flag=True, help="Overwrite existing output files (regular files only), and use an "
                                        "--accuracy table measured on another checkpoint (refused otherwise).")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
def export(checkpoint: Path, subnet: str | None, plan_file: Path | None, budget: str | None, bits: int | None,
           mixed: bool, data: Path | None, labeled: bool, resolution: int | None, width: float | None,
           search_images: int, lam: float, search_seed: int, rescore: int, metric: str,
           accuracy: Path | None, export_all: bool, buckets: int | None, output: Path, pack: str, verify: bool,
           verify_samples: int, verify_images: Path | None, calib: Path | None, calib_images: int, threads: int,
           force: bool, as_json: bool) -> None:
    """Slice subnets out of a supernet checkpoint, fold BatchNorm, bake the learned step
    sizes into integer weights and write ONNX QDQ files that onnxruntime runs on integer
    kernels. Choose with --subnet, --plan, --budget [--bits] [--accuracy], --all or --buckets N."""
    modes = [m for m, on in (("--subnet", subnet), ("--plan", plan_file), ("--budget", budget), ("--all", export_all),
                             ("--buckets", buckets)) if on]
    if len(modes) != 1:
        raise click.UsageError("give exactly one of --subnet, --plan, --budget, --all, --buckets")
    if bits is not None and (subnet or plan_file or export_all):
        raise click.UsageError("--bits goes with --budget or --buckets")
    if mixed and (not budget or data is None or bits is not None or accuracy is not None):
        raise click.UsageError("--mixed needs --budget and --data (and takes neither --bits nor --accuracy)")

    import logging

    logging.basicConfig(level=logging.WARNING, format="warning: %(message)s")
    from rtfq_deploy.checkpoint import load_checkpoint
    from rtfq_deploy.costs import costs_of
    from rtfq_deploy.export.api import ExportOptions, VerificationFailed, export_subnet
    from rtfq_deploy.fileio import sha256_file, sweep_temporaries
    from rtfq_deploy.budget import parse_count
    from rtfq_deploy.accuracy import read_accuracy_table
    from rtfq_deploy.export.select import bucket_budgets, choose
    from rtfq_deploy.fileio import check_output
    from rtfq_deploy.planfile import read_plan, resolve_plan

    if subnet or plan_file or budget:
        check_output(output)  # a FIFO or device is refused even with --force, before a slow search

    if (subnet or plan_file or budget) and output.exists() and not force and not output.is_dir():
        raise click.UsageError(f"{output} exists (use --force to overwrite)")  # before a slow search
    if mixed:
        from rtfq_deploy.budget import parse_budget
        from rtfq_deploy.search import check_budget

        check_budget(parse_budget(budget))  # bad input fails before the slow load
    budget_value = parse_count(budget) if budget and not mixed else None
    accuracy_table = read_accuracy_table(accuracy) if accuracy else None
    table = accuracy_table.top1 if accuracy_table is not None else None
    plan_doc = read_plan(plan_file) if plan_file else None
    ckpt = load_checkpoint(checkpoint)
    if accuracy_table is not None:  # a table of another checkpoint: refused unless --force
        accuracy_table.check_checkpoint(sha256_file(checkpoint, what="checkpoint"), f"{checkpoint}", force)
    space = ckpt.model.config.space
    # a walk per (R, W), only to choose: the space's subnets and the checkpoint's stored plans
    costs = costs_of(ckpt.model, ckpt.subnets()) if (budget and not mixed) or buckets else {}
    if bits is not None and bits not in space.bits:
        raise click.UsageError(f"bit-width {bits} is not in the space (valid: {', '.join(map(str, space.bits))})")

    reason = None
    if subnet:
        targets = [ckpt.resolve(subnet)]
    elif plan_doc is not None:
        targets = [resolve_plan(ckpt.model, plan_doc)]
    elif mixed:
        from rtfq_deploy.cli.search import run_search
        from rtfq_deploy.search import describe_costs

        _, found = run_search(ckpt, budget, data, labeled, resolution, width, search_images, lam, search_seed,
                              rescore)
        targets = [found.subnet]
        reason = f"searched within {budget}: {describe_costs(found.costs)}, {found.score} {found.loss:.4f}"
        calib = calib or data
    elif budget_value is not None:
        chosen, reason = choose(costs, budget_value, metric, bits, table)
        targets = [chosen]
    elif export_all:
        targets = list(space)
    else:
        targets = []
        for edge in bucket_budgets(costs, buckets, metric, bits):
            chosen, _ = choose(costs, edge, metric, bits, table)
            if chosen not in targets:
                targets.append(chosen)

    single = bool(subnet or plan_file or budget)
    paths = [output] if single else [output / f"{cfg}.onnx" for cfg in targets]
    existing = [p for p in paths if p.exists()]
    if existing and not force:
        raise click.UsageError(f"{existing[0]} exists (use --force to overwrite)")
    if single and output.is_dir():
        raise click.UsageError(f"{output} is a directory; give a file name")

    uncalibrated = [c for c in targets if str(c) not in ckpt.bn_stats]
    if calib is not None and uncalibrated:
        from rtfq_deploy.evaluate import ensure_calibrated
        from rtfq_deploy.images import image_files

        # measured now and kept in memory only (rtfq calibrate stores them)
        ckpt.bn_stats.update(ensure_calibrated(ckpt, uncalibrated, image_files(calib), calib_images, calib,
                                               say=lambda line: click.echo(line, err=True)))
    elif any(not c.uniform for c in uncalibrated):
        raise click.UsageError(f"the checkpoint has no BatchNorm statistics for {uncalibrated[0]}: pass --calib DIR "
                               "(target images) or store them first with rtfq calibrate")
    sweep_temporaries(output.parent if single else output)  # what a killed export left there
    sha = sha256_file(checkpoint)
    options = ExportOptions(pack_int4=pack == "int4", verify=verify, verify_samples=verify_samples,
                            threads=threads, overwrite=force, verify_images=verify_images)
    results, failed = [], []
    for cfg, path in zip(targets, paths):
        if reason:
            click.echo(f"chose {cfg}: {reason}", err=as_json)
        try:
            result = export_subnet(ckpt, sha, cfg, path, options)
        except VerificationFailed as e:
            click.echo(f"Error: {e}", err=True)
            if single:
                sys.exit(1)
            failed.append(str(cfg))  # the others are still worth having
            continue
        results.append(result)
        if not as_json:
            click.echo(_describe(result))
    if as_json:
        click.echo(json.dumps([{"subnet": str(r.subnet), "path": str(r.path), "bytes": r.size,
                                "bn_statistics": r.bn_statistics, **r.costs.to_dict(),
                                "verify": r.report.to_dict() if r.report else None} for r in results], indent=2))
    if failed:
        click.echo(f"Error: {len(failed)} of {len(targets)} subnets failed verification and were not written: "
                   f"{', '.join(failed)}", err=True)
        sys.exit(1)
