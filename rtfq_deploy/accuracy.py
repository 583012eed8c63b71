"""The accuracy table (top-1 per subnet) that ``rtfq eval`` writes, written and read here.

Layout (version 1)::

    {"format": "rtfq-accuracy", "version": 1, "checkpoint": "...", "checkpoint_sha256": "...",
     "data": "...", "subnets": [{"subnet": "r160-w0.73-q4", "top1": 0.71, ...}, ...]}

Torch-free, since ``rtfq-bench select`` reads it on a device. The table carries the
sha256 of the checkpoint it was measured on; ``rtfq-export --accuracy`` checks it against
the checkpoint and ``rtfq-bench select`` against each measured file's
``rtfq.checkpoint_sha256`` metadata, refusing a table of another checkpoint unless --force.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from rtfq_deploy.errors import RtfqError
from rtfq_deploy.fileio import atomic_write, is_number, read_json

log = logging.getLogger(__name__)
_SHA_RE = re.compile(r"[0-9a-f]{64}")

FORMAT = "rtfq-accuracy"
VERSION = 1
MAX_BYTES = 16 * 2**20  # an honest table is a few kB per hundred subnets
MAX_ROWS = 100_000


@dataclass(frozen=True)
class AccuracyTable:
    """Top-1 per subnet, and the sha256 of the checkpoint it was measured on (None for a
    bare table, which cannot be checked)."""

    path: Path
    top1: dict[str, float]
    checkpoint_sha256: str | None

    def check_checkpoint(self, sha256: str | None, what: str, force: bool = False) -> bool:
        """Refuse (RtfqError) a table measured on another checkpoint than ``sha256`` (the
        checkpoint, or the one a model file was exported from) unless ``force``; True if
        they match, False if either digest is unknown or ``force`` let a mismatch pass."""
        if sha256 is None or self.checkpoint_sha256 is None:
            return False
        if sha256 == self.checkpoint_sha256:
            return True
        message = (f"{self.path}: the accuracy table was measured on checkpoint {self.checkpoint_sha256[:12]}..., "
                   f"{what} is {sha256[:12]}...")
        if not force:
            raise RtfqError(f"{message}; its accuracies are not this network's (use --force to use it anyway)")
        log.warning("%s; used anyway (--force)", message)
        return False


def write_accuracy_table(path: str | os.PathLike, rows: Sequence[Mapping[str, Any]], checkpoint: str | os.PathLike,
                         checkpoint_sha256: str, data: str | os.PathLike, overwrite: bool = False) -> None:
    """Write the table atomically (a killed ``rtfq eval`` leaves no half table for
    ``rtfq-bench select`` to read); ``rows`` are :func:`rtfq_deploy.evaluate.evaluate_subnets`'s."""
    table = {"format": FORMAT, "version": VERSION, "checkpoint": str(checkpoint),
             "checkpoint_sha256": checkpoint_sha256, "data": str(data), "subnets": list(rows)}
    with atomic_write(Path(path), overwrite=overwrite) as f:
        f.write((json.dumps(table, indent=2) + "\n").encode())


def read_accuracy(path: str | Path) -> dict[str, float]:
    """Top-1 accuracy per subnet from the table ``rtfq eval`` writes (:func:`read_accuracy_table`)."""
    return read_accuracy_table(path).top1


def read_accuracy_table(path: str | Path) -> AccuracyTable:
    """The table ``rtfq eval`` writes, checked: every accuracy a number in [0, 1], every
    subnet named once, and its ``checkpoint_sha256`` (when present) a sha256.

    Accepted shapes: {"subnets": [{"subnet": ..., "top1": ...}, ...], "checkpoint_sha256": ...},
    the bare list, or a mapping of subnet to a number or to {"top1": ...}. Subnet names are
    strings and accuracies finite numbers (not strings, not true/false): anything else is
    one error.
    """
    path = Path(path)
    data = read_json(path, "accuracy table", max_bytes=MAX_BYTES, expect=(dict, list))
    rows = data.get("subnets", data) if isinstance(data, dict) else data
    shape = f"{path}: not an accuracy table (expected rows with 'subnet' and 'top1')"
    digest = data.get("checkpoint_sha256") if isinstance(data, dict) and "subnets" in data else None
    if digest is not None and not (isinstance(digest, str) and _SHA_RE.fullmatch(digest)):
        raise RtfqError(f"{path}: the accuracy table's checkpoint_sha256 is not a sha256")
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
        if not 0.0 <= value <= 1.0:
            raise RtfqError(f"{path}: the accuracy of {name[:80]} is {value!r}, outside [0, 1] (top-1 is a fraction)")
        if name in table:
            raise RtfqError(f"{path}: subnet {name[:80]} has two rows in the accuracy table")
        table[name] = float(value)
    if not table:
        raise RtfqError(f"{path}: the accuracy table is empty")
    return AccuracyTable(path, table, digest)
