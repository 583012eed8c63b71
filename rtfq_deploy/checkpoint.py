"""Supernet checkpoints and pretrained weight files.

One versioned format: a ``torch.save`` archive holding only tensors, strings and plain
containers, read back with ``torch.load(weights_only=True)`` so loading never runs
pickled code. Layout (version 1)::

    {"format": "rtfq-supernet", "version": 1,
     "config": JSON of SupernetConfig (architecture, subnet space, bit policy, quantizer),
     "state_dict": weights, BatchNorm parameters and buffers, quantizer step sizes,
     "bn_stats": {subnet id: {BatchNorm name: (2, C) tensor of mean, var}},
     "plans": JSON list of the mixed-precision subnets among those ids
              ({"resolution", "width", "bits": {quantizer: bits}}; optional, absent before),
     "meta": JSON object (class names, provenance, ...)}

A uniform id (``r160-w0.73-q4``) names a subnet of the space by itself; a mixed id
(``r160-w0.73-m1a2b3c4d``) is resolved through ``plans``, and a checkpoint never holds two
plans with one id.

Writes are atomic (temp file + rename). Reads check the archive first: only a regular
file is opened (a FIFO or a device is refused, never waited on), and every member of the
zip archive ``torch.save`` writes is read through :mod:`zipfile`, which checks its CRC-32,
so flipped bytes in the weights are refused instead of loaded (torch's reader does not
check them).
"""

from __future__ import annotations

import json
import os
import pickle
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import Tensor

from rtfq_deploy.calibrate import BNStats, pack_bn_stats, unpack_bn_stats
from rtfq_deploy.errors import CheckpointError, RtfqError
from rtfq_deploy.fileio import atomic_write, open_regular, parse_json
from rtfq_deploy.layers import SlimBatchNorm2d
from rtfq_deploy.models import Supernet, SupernetConfig, build_supernet
from rtfq_deploy.space import MAX_QUANTIZERS, SpaceError, SubnetConfig, slim_channels, split_id

FORMAT = "rtfq-supernet"
VERSION = 1


@dataclass
class Checkpoint:
    model: Supernet
    bn_stats: dict[str, BNStats] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    plans: dict[str, SubnetConfig] = field(default_factory=dict)  # mixed-precision subnets by id

    def resolve(self, text: str) -> SubnetConfig:
        """The subnet an id names: a uniform subnet of the space or a plan this checkpoint stores."""
        text = text.strip()
        if text in self.plans:
            return self.plans[text]
        if _mixed_id(text):
            known = ", ".join(sorted(self.plans)[:4]) or "none"
            raise RtfqError(f"mixed-precision subnet {text} is not stored in this checkpoint (it stores: {known}); "
                            "give its plan file instead")
        return self.model.config.space.parse(text)

    def subnets(self) -> list[SubnetConfig]:
        """The space's uniform subnets, then the stored mixed plans."""
        return list(self.model.config.space) + sorted(self.plans.values(), key=SubnetConfig.sort_key)


def save_checkpoint(path: str | os.PathLike, model: Supernet, *, bn_stats: Mapping[str, BNStats] | None = None,
                    meta: Mapping[str, Any] | None = None, plans: Mapping[str, SubnetConfig] | None = None,
                    overwrite: bool = False) -> None:
    """``plans`` must hold every mixed id of ``bn_stats`` (it may hold more)."""
    bn_stats = dict(bn_stats or {})
    plans = dict(plans or {})
    unplanned = [k for k in bn_stats if k not in plans and _mixed_id(k)]
    if unplanned:
        raise RtfqError(f"statistics for mixed-precision subnet {unplanned[0]} without its plan")
    payload = {
        "format": FORMAT,
        "version": VERSION,
        "config": json.dumps(model.config.to_dict(), sort_keys=True),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "bn_stats": {key: pack_bn_stats(stats) for key, stats in bn_stats.items()},
        "plans": json.dumps([{"resolution": c.resolution, "width": c.width, "bits": c.bits.as_dict()}
                             for _, c in sorted(plans.items()) if not c.uniform], sort_keys=True),
        "meta": json.dumps(dict(meta or {}), sort_keys=True),
    }
    with atomic_write(path, overwrite=overwrite) as f:
        torch.save(payload, f)


def safe_torch_load(path: str | os.PathLike) -> Any:
    """``torch.load`` restricted to tensors and plain containers, with one-line errors,
    of a regular file whose archive CRCs are checked first (:func:`check_archive`)."""
    p = Path(path)
    try:
        f = open_regular(p, "checkpoint")
    except RtfqError as e:
        message = str(e)
        raise CheckpointError(f"{p}: no such file" if message.endswith(": no such file")
                              else message) from None
    with f:
        check_archive(f, p)
        f.seek(0)
        return _load(f, p)


def check_archive(f: Any, p: Path) -> None:
    """Read every member of a ``torch.save`` zip archive, checking each one's CRC-32
    (CheckpointError naming the damage). A file that is not a zip archive (torch's legacy
    format, e.g. torchvision's older weights) has no checksums; it is left to torch.load."""
    try:
        if not zipfile.is_zipfile(f):
            return
        f.seek(0)
        with zipfile.ZipFile(f) as archive:
            for info in archive.infolist():
                with archive.open(info) as member:
                    while member.read(1 << 20):
                        pass
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, ValueError, NotImplementedError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise CheckpointError(f"{p}: damaged file (its archive fails the checksum check: {first}); it cannot be "
                              "trusted") from None
    except OSError as e:
        raise CheckpointError(f"{p}: cannot read: {e.strerror or e}") from None


def _load(f: Any, p: Path) -> Any:
    try:
        return torch.load(f, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # The restricted unpickler names the global it blocked; other failures are garbage data.
        if "GLOBAL" in str(e):
            raise CheckpointError(
                f"{p}: refused to load: it holds pickled objects other than tensors and plain containers "
                "(loading it could run code)"
            ) from None
        raise CheckpointError(f"{p}: not a readable checkpoint (truncated or corrupt?)") from None
    except Exception as e:  # torch.load raises many types on garbage (RuntimeError, EOFError, KeyError...)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{p}: not a readable checkpoint (truncated or corrupt?): {first}") from None


def load_checkpoint(path: str | os.PathLike) -> Checkpoint:
    obj = safe_torch_load(path)
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not an rtfq supernet checkpoint (create one with `rtfq init`)")
    version = obj.get("version")
    if isinstance(version, bool) or version != VERSION:
        raise CheckpointError(f"{path}: checkpoint format version {version!r} is not supported (this toolkit reads {VERSION})")
    try:
        config = SupernetConfig.from_dict(parse_json(obj["config"], "its 'config'", "configuration", expect=dict))
        meta = parse_json(obj["meta"], "its 'meta'", "metadata", expect=dict)
        bn_stats = {key: unpack_bn_stats(stats) for key, stats in obj["bn_stats"].items()}
        state_dict = obj["state_dict"]
        model = build_supernet(config)
        plans = _read_plans(model, obj.get("plans", "[]"))
    except RtfqError as e:
        raise CheckpointError(f"{path}: {e}") from None
    except (KeyError, TypeError, ValueError, AttributeError, IndexError, RuntimeError) as e:
        raise CheckpointError(f"{path}: malformed checkpoint ({type(e).__name__}: {e})") from None
    problems = state_dict_mismatch(model.state_dict(), state_dict)
    if problems:
        raise CheckpointError(f"{path}: weights do not match architecture {config.arch!r}: {problems}")
    model.load_state_dict(state_dict)
    bad = next((k for k, t in state_dict.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())), None)
    if bad is not None:  # eval and export must never consume what a diverged run left
        raise CheckpointError(f"{path}: weight {bad} holds NaN or infinity (a diverged training run?)")
    problem = bn_stats_mismatch(model, bn_stats, plans)
    if problem:
        raise CheckpointError(f"{path}: calibrated BatchNorm statistics do not fit: {problem}")
    return Checkpoint(model, bn_stats, meta, plans)


def _mixed_id(key: str) -> bool:
    try:
        return split_id(key)[3] is not None
    except SpaceError:
        return False


def _read_plans(model: Supernet, text: Any) -> dict[str, SubnetConfig]:
    """Stored mixed plans by id, each checked against the supernet; a colliding id is refused."""
    entries = parse_json(text, "its 'plans'", "stored plans") if isinstance(text, str) else None
    if not isinstance(entries, list) or len(entries) > 100_000:
        raise ValueError("\"plans\" is not a list of plans")
    plans: dict[str, SubnetConfig] = {}
    for e in entries:
        if not isinstance(e, dict) or not isinstance(e.get("bits"), dict) or len(e["bits"]) > MAX_QUANTIZERS:
            raise ValueError("a stored plan is not {resolution, width, bits}")
        config = model.subnet(e["resolution"], e["width"], e["bits"])
        if config.uniform:
            raise ValueError(f"a stored plan is the uniform subnet {config}")
        other = plans.setdefault(str(config), config)
        if other != config:
            raise ValueError(f"two stored plans share the id {config}")
    return plans


def bn_stats_mismatch(model: Supernet, bn_stats: Mapping[str, BNStats],
                      plans: Mapping[str, SubnetConfig] | None = None) -> str:
    """Why cached statistics cannot belong to this supernet ('' if they can): each key
    must be a subnet of its space or a stored plan and cover every BatchNorm at that
    subnet's width."""
    space = model.config.space
    bns = {m.name: m for m in model.modules() if isinstance(m, SlimBatchNorm2d)}
    for key, stats in bn_stats.items():
        try:
            width = plans[key].width if plans and key in plans else space.parse(key).width
        except RtfqError as e:
            return f"key {key!r}: {e}"
        if set(stats) != set(bns):
            return f"{key}: statistics for {len(stats)} BatchNorm layers, the supernet has {len(bns)}"
        for name, (mean, var) in stats.items():
            c = slim_channels(bns[name].num_features, width, space.channel_divisor)
            if mean.shape != (c,) or var.shape != (c,) or not mean.is_floating_point():
                return f"{key}: {name} has {tuple(mean.shape)} values, expected ({c},)"
    return ""


def state_dict_mismatch(expected: Mapping[str, Tensor], given: Mapping[str, Any], ignore: set[str] = frozenset()) -> str:
    """A short description of missing/unexpected keys and shape mismatches ('' if none)."""
    missing = [k for k in expected if k not in given and k not in ignore]
    unexpected = [k for k in given if k not in expected]
    wrong = [
        f"{k} {_describe(given[k])} vs {_describe(expected[k])}"
        for k in expected
        if k in given and k not in ignore
        and (not isinstance(given[k], Tensor) or given[k].shape != expected[k].shape
             or given[k].is_floating_point() != expected[k].is_floating_point() or given[k].is_complex())
    ]
    parts = []
    for label, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)):
        if items:
            more = f" and {len(items) - 3} more" if len(items) > 3 else ""
            parts.append(f"{len(items)} {label} ({', '.join(items[:3])}{more})")
    return "; ".join(parts)


def _describe(t: Any) -> str:
    return f"{tuple(t.shape)} {str(t.dtype).removeprefix('torch.')}" if isinstance(t, Tensor) else type(t).__name__


def read_state_dict(path: str | os.PathLike) -> dict[str, Tensor]:
    """A plain state dict from a weights file (e.g. torchvision's ``resnet50-*.pth``),
    also when wrapped as {"state_dict": ...} or {"model": ...} or saved from DataParallel."""
    obj = safe_torch_load(path)
    if isinstance(obj, dict) and obj.get("format") == FORMAT:
        raise CheckpointError(f"{path}: this is an rtfq supernet checkpoint, not a pretrained weights file")
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: not a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def load_pretrained(model: Supernet, state_dict: Mapping[str, Tensor]) -> list[str]:
    """Load torchvision-keyed weights into the supernet; returns notes for the user.

    Every weight and BatchNorm entry of the supernet must be present with its shape;
    the classifier is kept freshly initialised when the class count differs. Weight step
    sizes are re-initialised from the loaded weights.
    """
    own = model.state_dict()
    quantizer_keys = {f"{name}.{k}" for name, q in model.quantizers() for k in q.state_dict()}
    expected = {k: v for k, v in own.items() if k not in quantizer_keys}
    notes = []
    # Files saved before PyTorch 0.4.1 (e.g. resnet50-19c8e357.pth) have no BatchNorm counters.
    ignore = {k for k in expected if k.endswith("num_batches_tracked") and k not in state_dict}
    head = model.graph().classifier
    fc_w = state_dict.get(f"{head}.weight")
    if isinstance(fc_w, Tensor) and fc_w.shape != expected[f"{head}.weight"].shape:
        ignore |= {f"{head}.weight", f"{head}.bias"}
        notes.append(f"classifier re-initialised: weights have {fc_w.shape[0]} classes, supernet {model.config.num_classes}")
    problems = state_dict_mismatch(expected, state_dict, ignore)
    if problems:
        raise CheckpointError(f"weights do not fit {model.config.arch!r}: {problems}")
    model.load_state_dict({k: v for k, v in state_dict.items() if k not in ignore}, strict=False)
    model.init_weight_steps()
    notes.append(f"loaded {len(expected) - len(ignore)} tensors")  # counters left at 0 are not counted
    return notes
