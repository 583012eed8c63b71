"""Plan files: one subnet (resolution, width, every quantizer's bits) as a JSON document.

A mixed-precision subnet's id names it but cannot rebuild it, so the plan travels as a
file (written by ``rtfq plan`` and, later, by the search) that ``rtfq eval --plans``,
``rtfq calibrate --plans`` and ``rtfq-export --plan`` read. Layout (version 1)::

    {"format": "rtfq-plan", "version": 1, "subnet": "r160-w0.73-m1a2b3c4d",
     "arch": "resnet50", "resolution": 160, "width": 0.73,
     "bits": {"conv1.weight_quant": 8, ...},
     "costs": {"macs": ..., "bitops": ..., "params": ..., "weight_bytes": ...}}

``subnet``, ``arch`` and ``costs`` are written for people and checked on reading (the
id must be the one the bits give, the arch the checkpoint's); costs are recomputed
wherever they are used. Reading is bounded like every JSON input.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping

from rtfq_deploy.errors import RtfqError
from rtfq_deploy.fileio import atomic_write, is_int, is_number, read_json
from rtfq_deploy.space import MAX_QUANTIZERS, SpaceError, SubnetConfig, split_id

if TYPE_CHECKING:
    from rtfq_deploy.models.base import Supernet

FORMAT = "rtfq-plan"
VERSION = 1
MAX_BYTES = 2**20  # ResNet-50's 124 quantizers take about 6 kB
MAX_FILES = 10_000  # plan files per folder given to --plans


@dataclass(frozen=True)
class PlanDocument:
    """A plan file as read: what it states, not yet checked against a supernet."""

    path: Path
    resolution: int
    width: float
    bits: dict[str, int]
    subnet: str | None
    arch: str | None


def plan_document(model: "Supernet", config: SubnetConfig, costs: Mapping[str, int]) -> dict[str, Any]:
    return {"format": FORMAT, "version": VERSION, "subnet": str(config), "arch": model.config.arch,
            "resolution": config.resolution, "width": config.width,
            "bits": {name: int(b) for name, b in model.plan(config).as_dict().items()}, "costs": dict(costs)}


def write_plan(path: str | os.PathLike, document: Mapping[str, Any], overwrite: bool = False) -> None:
    with atomic_write(path, overwrite=overwrite) as f:
        f.write((json.dumps(document, indent=2) + "\n").encode())


def read_plan(path: str | os.PathLike) -> PlanDocument:
    path = Path(path)
    data = read_json(path, "plan file", max_bytes=MAX_BYTES, expect=dict)
    bad = f"{path}: not an rtfq plan file"
    if data.get("format") != FORMAT:
        raise RtfqError(f"{bad} (no \"format\": \"{FORMAT}\"; write one with `rtfq plan`)")
    if not is_int(data.get("version")) or data.get("version") != VERSION:
        raise RtfqError(f"{path}: plan file version {data.get('version')!r} is not supported (this toolkit reads {VERSION})")
    resolution, width, bits = data.get("resolution"), data.get("width"), data.get("bits")
    if isinstance(resolution, bool) or not isinstance(resolution, int):
        raise RtfqError(f"{bad}: \"resolution\" must be an integer")
    if not is_number(width):
        raise RtfqError(f"{bad}: \"width\" must be a number")
    if not isinstance(bits, dict) or not bits or len(bits) > MAX_QUANTIZERS:
        raise RtfqError(f"{bad}: \"bits\" must map 1 to {MAX_QUANTIZERS} quantizer names to bit-widths")
    for key in ("subnet", "arch"):
        if data.get(key) is not None and not isinstance(data.get(key), str):
            raise RtfqError(f"{bad}: \"{key}\" must be a string")
    try:
        SubnetConfig(resolution, float(width), 8)  # range checks of resolution and width
        if data.get("subnet") is not None:
            split_id(data["subnet"])
    except SpaceError as e:
        raise RtfqError(f"{path}: {e}") from None
    return PlanDocument(path, resolution, float(width), bits, data.get("subnet"), data.get("arch"))


def free_quantizers(model: "Supernet") -> list[str]:
    """Quantizers a mixed plan may set (the policy fixes the others): what training
    samples, the search chooses and a plan file's bits are checked against."""
    policy = model.config.policy
    return [n for n, q in model.quantizers() if policy.fixed_bits(q.role) is None]


def check_plan_bits(model: "Supernet", config: SubnetConfig, where: str) -> None:
    """Every quantizer's bits must be a candidate of its role: the policy's bits for a
    fixed role (first and last layer, residual operands), one of the space's bit-widths for
    a free one. The supernet keeps step sizes for the policy's bits on every quantizer, but
    a free quantizer never trained at them (8 bits on a 6/4/2 space): such a plan, e.g. one
    written for another checkpoint, would export cleanly and mean nothing."""
    if config.uniform:
        return
    space_bits = set(model.config.space.bits)
    policy = model.config.policy
    plan = config.bits.as_dict()
    for name, q in model.quantizers():
        bits, fixed = plan.get(name), policy.fixed_bits(q.role)
        if fixed is None and bits not in space_bits:
            raise RtfqError(f"{where}: {name} at {bits} bits; its role ({q.role}) takes the space's bit-widths "
                            f"{', '.join(map(str, sorted(space_bits, reverse=True)))} (a plan of another checkpoint?)")


def resolve_plan(model: "Supernet", doc: PlanDocument) -> SubnetConfig:
    """The canonical subnet a plan file describes, checked against ``model`` (its bits
    against each quantizer's candidates too, :func:`check_plan_bits`)."""
    if doc.arch is not None and doc.arch != model.config.arch:
        raise RtfqError(f"{doc.path}: a plan for {doc.arch!r}, the checkpoint is {model.config.arch!r}")
    try:
        config = model.subnet(doc.resolution, doc.width, doc.bits)
    except SpaceError as e:
        raise RtfqError(f"{doc.path}: {e}") from None
    if doc.subnet is not None and doc.subnet != str(config):
        raise RtfqError(f"{doc.path}: the file names subnet {doc.subnet} but its bits are those of {config} "
                        "(edited by hand? fix or delete its \"subnet\" entry)")
    check_plan_bits(model, config, str(doc.path))
    return config


def plan_paths(given: Iterable[str | os.PathLike]) -> list[Path]:
    """Plan files from arguments that are files or folders of ``*.json`` files (sorted)."""
    out: list[Path] = []
    for item in given:
        p = Path(item)
        if p.is_dir():
            found = sorted(q for q in p.glob("*.json") if q.is_file())
            if not found:
                raise RtfqError(f"{p}: no plan files (*.json) in this folder")
            out += found
        elif p.is_file():
            out.append(p)
        else:
            raise RtfqError(f"{p}: no such plan file or folder")
        if len(out) > MAX_FILES:
            raise RtfqError(f"more than {MAX_FILES} plan files given")
    return out


def load_plans(model: "Supernet", given: Iterable[str | os.PathLike]) -> list[SubnetConfig]:
    """Every plan file given (files or folders), resolved against ``model``, duplicates once."""
    configs: dict[str, SubnetConfig] = {}
    for p in plan_paths(given):
        config = resolve_plan(model, read_plan(p))
        configs.setdefault(str(config), config)
    return list(configs.values())


def chosen_subnets(ckpt, subnet_list: str | None, plan_files: Iterable[str | os.PathLike], what: str) -> list[SubnetConfig]:
    """The subnets a command's ``--subnets`` (ids, or 'all': the space's and the stored plans;
    by default all, or none when plan files are given) and ``--plans`` name, once each."""
    plan_files = list(plan_files)
    text = subnet_list if subnet_list is not None else ("" if plan_files else "all")
    subnets = ckpt.subnets() if text.strip() == "all" else [ckpt.resolve(s) for s in text.split(",") if s.strip()]
    subnets += [c for c in load_plans(ckpt.model, plan_files) if c not in subnets]
    if not subnets:
        raise RtfqError(f"no subnets to {what} (give --subnets or --plans)")
    return subnets
