"""``rtfq subnets``: every subnet of a checkpoint with its exact costs."""

from __future__ import annotations

from pathlib import Path

import click

from rtfq_deploy.cli.common import Command, emit_table

SORT_KEYS = ("macs", "bitops", "params", "weight_bytes", "subnet")


def _giga(v: int) -> str:
    return f"{v / 1e9:.3f}"


def _mega(v: int) -> str:
    return f"{v / 1e6:.2f}"


COLUMNS = [
    ("subnet", "subnet", str),
    ("macs", "GMACs", _giga),
    ("bitops", "GBitOPs", _giga),
    ("params", "params (M)", _mega),
    ("weight_bytes", "weights (MB)", _mega),
    ("bn_calibrated", "BN calibrated", lambda v: "yes" if v else "no"),
]


@click.command(cls=Command)
@click.option("--checkpoint", type=click.Path(dir_okay=False, path_type=Path), required=True, help="Supernet checkpoint.")
@click.option("--sort", "sort_key", type=click.Choice(SORT_KEYS), default="macs", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON (raw counts) instead of a table.")
def subnets(checkpoint: Path, sort_key: str, as_json: bool) -> None:
    """List every subnet (the space's uniform ones and the mixed-precision plans the
    checkpoint stores) with MACs, BitOPs, parameters and weight bytes."""
    from rtfq_deploy.checkpoint import load_checkpoint
    from rtfq_deploy.costs import costs_of
    from rtfq_deploy.evaluate import subnet_fields

    ckpt = load_checkpoint(checkpoint)
    rows = [
        {"subnet": str(cfg), **subnet_fields(cfg), **costs.to_dict(), "bn_calibrated": str(cfg) in ckpt.bn_stats}
        for cfg, costs in costs_of(ckpt.model, ckpt.subnets()).items()
    ]
    rows.sort(key=lambda r: (r[sort_key], r["subnet"]) if sort_key != "subnet" else r["subnet"])
    emit_table(rows, COLUMNS, as_json)
