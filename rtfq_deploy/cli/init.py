"""``rtfq init``: write a fresh supernet checkpoint."""

from __future__ import annotations

from pathlib import Path

import click

from rtfq_deploy.cli.common import Command, comma_list
from rtfq_deploy.space import DEFAULT_BITS, DEFAULT_CHANNEL_DIVISOR, DEFAULT_RESOLUTIONS, DEFAULT_WIDTHS, format_width

ARCH_NAMES = ("resnet50", "resnet18", "tiny_resnet")  # kept in step with rtfq_deploy.models.ARCHS by a test


def _bits_or_q(value: str) -> int | None:
    return None if value.lower() == "q" else int(value)


@click.command(cls=Command)
@click.option("--arch", type=click.Choice(ARCH_NAMES), default="resnet50", show_default=True, help="Supernet architecture.")
@click.option("--pretrained", type=click.Path(dir_okay=False, path_type=Path),
              help="torchvision-keyed weights file (e.g. resnet50-11ad3fa6.pth), read without running pickled code.")
@click.option("--num-classes", type=click.IntRange(min=1), default=1000, show_default=True)
@click.option("--resolutions", callback=comma_list(int), default=",".join(map(str, DEFAULT_RESOLUTIONS)), show_default=True,
              help="Input resolutions of the subnet space.")
@click.option("--widths", callback=comma_list(float), default=",".join(format_width(w) for w in DEFAULT_WIDTHS),
              show_default=True, help="Width multipliers of the subnet space.")
@click.option("--bits", callback=comma_list(int), default=",".join(map(str, DEFAULT_BITS)), show_default=True,
              help="Bit-widths of the subnet space.")
@click.option("--channel-divisor", type=click.IntRange(min=1), default=DEFAULT_CHANNEL_DIVISOR, show_default=True,
              help="Slimmed channel counts are rounded to a multiple of this.")
@click.option("--edge-bits", default="8", show_default=True,
              help="Bits of the first conv and the classifier (weights and inputs); 'q' follows the subnet.")
@click.option("--residual-bits", default="8", show_default=True,
              help="Bits of the residual add operands; 'q' follows the subnet.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the weight initialisation.")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), required=True, help="Checkpoint to write.")
@click.option("--force", is_flag=True, help="Overwrite an existing output file.")
def init(arch: str, pretrained: Path | None, num_classes: int, resolutions: tuple, widths: tuple, bits: tuple,
         channel_divisor: int, edge_bits: str, residual_bits: str, seed: int, output: Path, force: bool) -> None:
    """Create a supernet checkpoint (optionally from torchvision ImageNet weights)."""
    import torch

    from rtfq_deploy.checkpoint import load_pretrained, read_state_dict, save_checkpoint
    from rtfq_deploy.models import SupernetConfig, build_supernet
    from rtfq_deploy.plan import BitPolicy
    from rtfq_deploy.space import SearchSpace

    if output.exists() and not force:
        raise click.UsageError(f"{output} exists (use --force to overwrite)")
    try:
        policy = BitPolicy(edge_bits=_bits_or_q(edge_bits), residual_bits=_bits_or_q(residual_bits))
    except ValueError:
        raise click.BadParameter("expected a bit-width or 'q'", param_hint="--edge-bits/--residual-bits") from None
    space = SearchSpace(resolutions, widths, bits, channel_divisor)
    config = SupernetConfig(arch=arch, num_classes=num_classes, space=space, policy=policy)
    state = read_state_dict(pretrained) if pretrained else None
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = build_supernet(config)
    notes = load_pretrained(model, state) if state is not None else []
    meta = {"created_by": "rtfq init", "seed": seed, "pretrained": str(pretrained) if pretrained else None}
    save_checkpoint(output, model, meta=meta, overwrite=force)
    for note in notes:
        click.echo(note)
    click.echo(f"wrote {output}: {arch}, {num_classes} classes, {len(space)} subnets "
               f"(R={list(space.resolutions)}, W={[format_width(w) for w in space.widths]}, Q={list(space.bits)})")
