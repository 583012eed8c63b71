"""``rtfq plan``: write a subnet's plan file, optionally with some quantizers' bits changed."""

from __future__ import annotations

import json
from pathlib import Path

import click

from rtfq_deploy.cli.common import Command, ascii_int

MAX_SETS = 4096


def _assignment(ctx: click.Context, param: click.Parameter, values: tuple[str, ...]) -> list[tuple[str, int]]:
    """'PATTERN=BITS' pairs (bits 2 to 8), checked before the checkpoint loads."""
    if len(values) > MAX_SETS:
        raise click.BadParameter(f"at most {MAX_SETS} assignments", ctx, param)
    out = []
    for value in values:
        pattern, sep, text = value.rpartition("=")
        bits = ascii_int(text, max_digits=2, signed=False)  # ASCII digits only: '\u00b2' passes isdigit()
        if not sep or not pattern or bits is None or not 2 <= bits <= 8 or len(pattern) > 200:
            shown = value if len(value) <= 80 else value[:80] + "..."
            raise click.BadParameter(f"expected PATTERN=BITS with BITS from 2 to 8, e.g. 'layer3.*=4', got {shown!r}",
                                     ctx, param)
        out.append((pattern, bits))
    return out


@click.command(cls=Command)
@click.option("--checkpoint", type=click.Path(dir_okay=False, path_type=Path), required=True, help="Supernet checkpoint.")
@click.option("--subnet", required=True,
              help="The subnet to start from: a uniform id (r160-w0.73-q4) or a mixed plan the checkpoint stores.")
@click.option("--from-plan", "from_plan", type=click.Path(dir_okay=False, path_type=Path),
              help="Start from this plan file instead of --subnet's bits (keeps --subnet's resolution and width).")
@click.option("--set", "assignments", multiple=True, callback=_assignment,
              help="PATTERN=BITS: quantizers whose name matches the shell-style PATTERN get BITS, e.g. "
                   "'layer3.*.weight_quant=4'; repeatable, applied in order. Quantizers the bit policy fixes "
                   "(first and last layer, residual operands) keep their bits.")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path),
              help="Write the plan file here (default: print it).")
@click.option("--force", is_flag=True, help="Overwrite an existing output file (a regular file; never a device or FIFO).")
def plan(checkpoint: Path, subnet: str, from_plan: Path | None, assignments: list[tuple[str, int]],
         output: Path | None, force: bool) -> None:
    """Write the plan file of a subnet: its resolution, width and every quantizer's bits,
    with costs and its canonical id. A plan file is how a mixed-precision subnet is named
    to rtfq eval --plans, rtfq calibrate --plans and rtfq-export --plan. A plan that
    equals a uniform subnet's keeps the uniform id."""
    if output is not None:
        from rtfq_deploy.fileio import check_output

        check_output(output)  # a FIFO or device is refused even with --force
    if output is not None and output.exists() and not force:
        raise click.UsageError(f"{output} exists (use --force to overwrite)")
    from fnmatch import fnmatchcase

    from rtfq_deploy.checkpoint import load_checkpoint
    from rtfq_deploy.costs import subnet_costs
    from rtfq_deploy.errors import RtfqError
    from rtfq_deploy.planfile import check_plan_bits, free_quantizers, plan_document, read_plan, resolve_plan, write_plan
    from rtfq_deploy.space import SpaceError

    ckpt = load_checkpoint(checkpoint)
    model = ckpt.model
    base = ckpt.resolve(subnet)
    if from_plan is not None:
        base = resolve_plan(model, read_plan(from_plan))
    bits = {name: int(b) for name, b in model.plan(base).as_dict().items()}
    settable = set(free_quantizers(model))
    for pattern, value in assignments:
        matched = [name for name in bits if fnmatchcase(name, pattern)]
        free = [name for name in matched if name in settable]
        if not free:
            why = "only quantizers the bit policy fixes (first and last layer, residual operands)" if matched else \
                f"no quantizer (names look like {', '.join(sorted(bits)[:3])}, ...)"
            raise RtfqError(f"--set {pattern}={value}: the pattern matches {why}")
        bits.update(dict.fromkeys(free, value))
    try:
        config = model.subnet(base.resolution, base.width, bits)
    except SpaceError as e:
        raise RtfqError(str(e)) from None
    check_plan_bits(model, config, "--set")
    document = plan_document(model, config, subnet_costs(model, config).to_dict())
    if output is None:
        click.echo(json.dumps(document, indent=2))
        return
    write_plan(output, document, overwrite=force)
    c = document["costs"]
    click.echo(f"wrote {output}: {config}, {c['macs'] / 1e9:.3f} GMACs, {c['bitops'] / 1e9:.3f} GBitOPs, "
               f"{c['weight_bytes'] / 1e6:.2f} MB of weights")
