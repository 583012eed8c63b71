"""The accuracy table (top-1 per subnet) that ``rtfq eval`` writes.

Torch-free, since ``rtfq-bench select`` reads it on a device.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from rtfq_deploy.errors import RtfqError
from rtfq_deploy.fileio import is_number, read_json

MAX_BYTES = 16 * 2**20  # an honest table is a few kB per hundred subnets
MAX_ROWS = 100_000


def read_accuracy(path: str | Path) -> dict[str, float]:
    """Top-1 accuracy per subnet from the table ``rtfq eval`` writes.

    Accepted shapes: {"subnets": [{"subnet": ..., "top1": ...}, ...]}, the bare list, or
    a mapping of subnet to a number or to {"top1": ...}. Subnet names are strings and
    accuracies finite numbers (not strings, not true/false): anything else is one error.
    """
    data = read_json(path, "accuracy table", max_bytes=MAX_BYTES, expect=(dict, list))
    rows = data.get("subnets", data) if isinstance(data, dict) else data
    shape = f"{path}: not an accuracy table (expected rows with 'subnet' and 'top1')"
    pairs: list[tuple[Any, Any]] = []
    if isinstance(rows, list):
        for r in rows:
            if not isinstance(r, dict):
                raise RtfqError(shape)
            pairs.append((r.get("subnet"), r.get("top1", r.get("accuracy"))))
    elif isinstance(rows, dict):
        pairs = [(k, v.get("top1") if isinstance(v, dict) else v) for k, v in rows.items()]
    else:
        raise RtfqError(shape)
    if len(pairs) > MAX_ROWS:
        raise RtfqError(f"{path}: the accuracy table has more than {MAX_ROWS} rows")
    table: dict[str, float] = {}
    for name, value in pairs:
        if not isinstance(name, str) or not name or not is_number(value):
            raise RtfqError(shape)
        if not math.isfinite(value):
            raise RtfqError(f"{path}: the accuracy of {name} is not a finite number")
        table[name] = float(value)
    if not table:
        raise RtfqError(f"{path}: the accuracy table is empty")
    return table

