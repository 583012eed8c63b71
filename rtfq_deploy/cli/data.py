"""``rtfq data``: datasets the toolkit can make itself."""

from __future__ import annotations

from pathlib import Path

import click

from rtfq_deploy.cli.common import BoundedInt, Group


@click.group(cls=Group)
def data() -> None:
    """Make datasets (no downloads)."""


@data.command()
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--shift", type=click.Choice(["mild", "strong"]), default="mild", show_default=True,
              help="How far the target is from the source (see below).")
@click.option("--classes", type=BoundedInt(2, 16), help="Number of shape classes.  [default: 10 mild, 16 strong]")
@click.option("--per-class", type=BoundedInt(1, 100_000), default=60, show_default=True,
              help="Source and target images per class.")
@click.option("--test-per-class", type=BoundedInt(1, 100_000), default=30, show_default=True,
              help="Held-out target images per class.")
@click.option("--size", type=BoundedInt(16, 512), default=64, show_default=True, help="Image side in pixels.")
@click.option("--seed", type=BoundedInt(0, 2**32 - 1), default=0, show_default=True)
def synth(out: str, shift: str, classes: int | None, per_class: int, test_per_class: int, size: int,
          seed: int) -> None:
    """Write a synthetic domain-shift benchmark to OUT (source/, target/, target_test/).

    Source: filled shapes in saturated colours on light plain backgrounds. Target with
    --shift mild: the same shapes, dark and muted, on grey textured backgrounds (a
    source-only classifier keeps ~95% right). --shift strong: filled, hatched or outlined
    shapes of either polarity, stretched, rotated and partly occluded, on lit, textured,
    cluttered, noisy backgrounds. Deterministic: the same options give the same pixels.
    """
    from rtfq_deploy.data.synth import DEFAULT_CLASSES, SynthConfig, generate

    if not out.strip():
        raise click.BadParameter("must name a folder", param_hint="OUT")
    classes = DEFAULT_CLASSES[shift] if classes is None else classes
    counts = generate(Path(out), SynthConfig(classes, per_class, test_per_class, size, seed, shift))
    click.echo(f"wrote {out}: " + ", ".join(f"{split} {n} images" for split, n in counts.items()))
