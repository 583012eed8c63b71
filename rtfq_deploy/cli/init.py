"""``rtfq init``: write a fresh supernet checkpoint."""

from __future__ import annotations

from pathlib import Path

import click

from rtfq_deploy.cli.common import SEED, BoundedInt, Command, FiniteFloat, bounded_list
from rtfq_deploy.formats import ARCH_NAMES, QUANTIZER_ALIASES, QUANTIZER_NAMES
from rtfq_deploy.space import (DEFAULT_BITS, DEFAULT_CHANNEL_DIVISOR, DEFAULT_RESOLUTIONS, DEFAULT_WIDTHS,
                               MAX_CHANNEL_DIVISOR, MAX_RESOLUTION, MAX_VALUES, format_width)

QUANTIZER_HELP = ("lsq: learned step size (uniform). alignq: AlignQ's normal-CDF codes at <= 6 bits, its best "
                  f"variant ({QUANTIZER_ALIASES['alignq']}); alignq-*: the variants the AlignQ ablation compares "
                  "(alignq-v1: every activation, sigma calibrated once; -learned: sigma learned; -full: the signed "
                  "CDF on post-ReLU tensors; -n01: the paper's fixed N(0, 1); -conv: only tensors that nothing but "
                  "convolutions read; -branch: only tensors inside residual branches; -logistic: the logistic CDF, "
                  "one table op in onnxruntime; -weights: AlignQ weights, LSQ activations; -inverse: a diagnostic "
                  "that does not export). At 7-8 bits AlignQ's codes become unreachable behind the 8-bit "
                  "pre-quantization, so it is LSQ there (first/last layer and residual operands at the default 8 "
                  "bits are LSQ); prefer --bits <= 6 with it.")
KINDS = click.Choice([*QUANTIZER_NAMES, *QUANTIZER_ALIASES])


BITS = BoundedInt(2, 8)
MAX_CLASSES = 100_000


def _bits_or_q(ctx: click.Context, param: click.Parameter, value: str) -> int | None:
    """A fixed bit-width (2 to 8) or 'q' (follow the subnet)."""
    if value.strip().lower() == "q":
        return None
    try:
        return BITS.convert(value, param, ctx)
    except click.BadParameter:
        raise click.BadParameter(f"expected a bit-width or 'q' (bit-widths are 2 to 8), got {value!r}", ctx, param) from None


@click.command(cls=Command)
@click.option("--arch", type=click.Choice(ARCH_NAMES), default="resnet50", show_default=True, help="Supernet architecture.")
@click.option("--pretrained", type=click.Path(dir_okay=False, path_type=Path),
              help="torchvision-keyed weights file (e.g. resnet50-11ad3fa6.pth), read without running pickled code.")
@click.option("--num-classes", type=BoundedInt(1, MAX_CLASSES), default=1000, show_default=True)
@click.option("--resolutions", callback=bounded_list(BoundedInt(1, MAX_RESOLUTION), MAX_VALUES), default=",".join(map(str, DEFAULT_RESOLUTIONS)), show_default=True,
              help=f"Input resolutions of the subnet space (1 to {MAX_RESOLUTION}, at most {MAX_VALUES}).")
@click.option("--widths", callback=bounded_list(FiniteFloat(0.0, 1.0, low_open=True), MAX_VALUES), default=",".join(format_width(w) for w in DEFAULT_WIDTHS),
              show_default=True, help="Width multipliers of the subnet space.")
@click.option("--bits", callback=bounded_list(BITS, MAX_VALUES), default=",".join(map(str, DEFAULT_BITS)), show_default=True,
              help="Bit-widths of the subnet space.")
@click.option("--channel-divisor", type=BoundedInt(1, MAX_CHANNEL_DIVISOR), default=DEFAULT_CHANNEL_DIVISOR, show_default=True,
              help="Slimmed channel counts are rounded to a multiple of this.")
@click.option("--edge-bits", default="8", show_default=True, callback=_bits_or_q,
              help="Bits of the first conv and the classifier (weights and inputs); 'q' follows the subnet.")
@click.option("--residual-bits", default="8", show_default=True, callback=_bits_or_q,
              help="Bits of the residual add operands; 'q' follows the subnet.")
@click.option("--quantizer", type=KINDS, default="lsq", show_default=True,
              help="Quantizer kind of weights and activations. " + QUANTIZER_HELP)
@click.option("--weight-quantizer", type=KINDS, help="Weights' kind (overrides --quantizer).")
@click.option("--act-quantizer", type=KINDS, help="Activations' kind (overrides --quantizer).")
@click.option("--seed", type=SEED, default=0, show_default=True, help="Seed of the weight initialisation.")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), required=True, help="Checkpoint to write.")
@click.option("--force", is_flag=True, help="Overwrite an existing output file.")
def init(arch: str, pretrained: Path | None, num_classes: int, resolutions: tuple, widths: tuple, bits: tuple,
         channel_divisor: int, edge_bits: int | None, residual_bits: int | None, quantizer: str,
         weight_quantizer: str | None, act_quantizer: str | None, seed: int, output: Path, force: bool) -> None:
    """Create a supernet checkpoint (optionally from torchvision ImageNet weights)."""
    import torch

    from rtfq_deploy.checkpoint import load_pretrained, read_state_dict, save_checkpoint
    from rtfq_deploy.models import SupernetConfig, build_supernet
    from rtfq_deploy.plan import BitPolicy
    from rtfq_deploy.space import SearchSpace

    if output.exists() and not force:
        raise click.UsageError(f"{output} exists (use --force to overwrite)")
    policy = BitPolicy(edge_bits=edge_bits, residual_bits=residual_bits)
    space = SearchSpace(resolutions, widths, bits, channel_divisor)
    config = SupernetConfig(arch=arch, num_classes=num_classes, space=space, policy=policy,
                            weight_quantizer=weight_quantizer or quantizer, act_quantizer=act_quantizer or quantizer)
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
               f"(R={list(space.resolutions)}, W={[format_width(w) for w in space.widths]}, Q={list(space.bits)}, "
               f"quantizer {config.quantizer})")
