"""``rtfq data``: datasets the toolkit can make itself."""

from __future__ import annotations

from pathlib import Path

import click

from rtfq_deploy.cli.common import Group


@click.group(cls=Group)
def data() -> None:
    """Make datasets (no downloads)."""


@data.command()
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@click.option("--classes", type=int, default=10, show_default=True, help="Number of shape classes (2-12).")
@click.option("--per-class", type=int, default=60, show_default=True, help="Source and target images per class.")
@click.option("--test-per-class", type=int, default=30, show_default=True, help="Held-out target images per class.")
@click.option("--size", type=int, default=64, show_default=True, help="Image side in pixels.")
@click.option("--seed", type=int, default=0, show_default=True)
def synth(out: Path, classes: int, per_class: int, test_per_class: int, size: int, seed: int) -> None:
    """Write a synthetic domain-shift benchmark to OUT (source/, target/, target_test/).

    Source: filled bright shapes on light backgrounds; target: outlined shapes on dark
    textured backgrounds. Deterministic: the same options give the same pixels.
    """
    from rtfq_deploy.data.synth import SynthConfig, generate

    counts = generate(out, SynthConfig(classes, per_class, test_per_class, size, seed))
    click.echo(f"wrote {out}: " + ", ".join(f"{split} {n} images" for split, n in counts.items()))
