"""The accuracy table (top-1 per subnet) that ``rtfq eval`` writes.

Torch-free, since ``rtfq-bench select`` reads it on a device.
"""

from __future__ import annotations

import math
from pathlib import Path

from rtfq_deploy.errors import RtfqError
from rtfq_deploy.fileio import read_json


def read_accuracy(path: str | Path) -> dict[str, float]:
    """Top-1 accuracy per subnet from the table ``rtfq eval`` writes.

    Accepted shapes: {"subnets": [{"subnet": ..., "top1": ...}, ...]}, the bare list, or
    a mapping of subnet to a number or to {"top1": ...}.
    """
    data = read_json(path, "accuracy table")
    rows = data.get("subnets", data) if isinstance(data, dict) else data
    try:
        if isinstance(rows, list):
            table = {str(r["subnet"]): float(r.get("top1", r.get("accuracy"))) for r in rows}
        else:
            table = {str(k): float(v["top1"] if isinstance(v, dict) else v) for k, v in rows.items()}
    except (KeyError, TypeError, ValueError, AttributeError):
        raise RtfqError(f"{path}: not an accuracy table (expected rows with 'subnet' and 'top1')") from None
    if not table:
        raise RtfqError(f"{path}: the accuracy table is empty")
    bad = next((k for k, v in table.items() if not math.isfinite(v)), None)
    if bad is not None:
        raise RtfqError(f"{path}: the accuracy of {bad} is not a finite number")
    return table
