"""Export one subnet of a supernet checkpoint to an ONNX file."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import onnx
import torch

from rtfq_deploy import __version__
from rtfq_deploy.checkpoint import Checkpoint
from rtfq_deploy.costs import Costs, subnet_costs
from rtfq_deploy.export.lower import IntNet, lower
from rtfq_deploy.export.onnx_graph import to_onnx
from rtfq_deploy.export.verify import VerifyReport, verify
from rtfq_deploy import formats as fmt
from rtfq_deploy.fileio import atomic_write
from rtfq_deploy.images import load_folder
from rtfq_deploy.int4 import expand_int4
from rtfq_deploy.plan import ActiveSubnet
from rtfq_deploy.space import SubnetConfig

log = logging.getLogger(__name__)


class VerificationFailed(Exception):
    """The exported graph does not compute what the PyTorch subnet computes."""


@dataclass(frozen=True)
class ExportOptions:
    pack_int4: bool = False
    verify: bool = True
    verify_samples: int = 16
    threads: int = 1
    seed: int = 0
    overwrite: bool = False
    verify_images: Path | None = None  # held-out target images; random inputs otherwise


@dataclass
class ExportResult:
    subnet: SubnetConfig
    path: Path
    size: int
    bn_statistics: str
    report: VerifyReport | None
    costs: Costs


def subnet_network(ckpt: Checkpoint, config: SubnetConfig) -> tuple[ActiveSubnet, str]:
    """The active subnet to export and where its BatchNorm statistics come from."""
    stats = ckpt.bn_stats.get(str(config))
    if stats is None:
        log.warning("%s: no calibrated BatchNorm statistics in the checkpoint; folding the stored running "
                    "statistics (right only for the network they were measured on)", config)
    return ckpt.model.active(config, stats), "calibrated" if stats is not None else "stored"


def build_model(ckpt: Checkpoint, config: SubnetConfig, checkpoint_sha256: str, *, pack_int4: bool = False,
                costs: Costs | None = None) -> tuple[onnx.ModelProto, IntNet, ActiveSubnet, str]:
    model = ckpt.model.eval()
    net, bn_source = subnet_network(ckpt, config)
    ir = lower(model, net, config.resolution)
    costs = costs or subnet_costs(model, config)
    classes = ckpt.meta.get("class_names") or [str(i) for i in range(model.config.num_classes)]
    r = config.resolution
    metadata = {
        fmt.META_SUBNET: str(config),
        fmt.META_BITS: json.dumps(net.bits.as_dict(), sort_keys=True),
        fmt.META_MACS: str(costs.macs),
        fmt.META_BITOPS: str(costs.bitops),
        fmt.META_PARAMS: str(costs.params),
        fmt.META_INPUT: json.dumps({"name": ir.input, "shape": ["N", 3, r, r], "layout": "NCHW", "dtype": "float32",
                                    "preprocess": "RGB scaled to [0, 1], then (x - mean) / std per channel",
                                    **fmt.normalization_of(ckpt.meta)}),
        fmt.META_OUTPUT: json.dumps({"name": ir.output, "shape": ["N", model.config.num_classes], "kind": "logits"}),
        fmt.META_CLASS_NAMES: json.dumps(classes),
        fmt.META_BN_STATISTICS: bn_source,
        fmt.META_WEIGHTS: fmt.WEIGHTS_INT4_PACKED if pack_int4 else fmt.WEIGHTS_INT8,
        fmt.META_CHECKPOINT_SHA256: checkpoint_sha256,
        fmt.META_ARCH: model.config.arch,
        fmt.META_QUANTIZER: model.config.quantizer,
        fmt.META_TOOLKIT_VERSION: __version__,
    }
    onnx_model = to_onnx(ir, metadata, pack_int4=pack_int4)
    onnx.checker.check_model(onnx_model, full_check=True)
    return onnx_model, ir, net, bn_source


def verification_inputs(ckpt: Checkpoint, config: SubnetConfig, options: ExportOptions) -> torch.Tensor:
    r = config.resolution
    if options.verify_images is not None:
        norm = fmt.normalization_of(ckpt.meta)
        return load_folder(options.verify_images, r, norm["mean"], norm["std"], options.verify_samples)
    generator = torch.Generator().manual_seed(options.seed)
    return torch.randn(options.verify_samples, 3, r, r, generator=generator)


def export_subnet(ckpt: Checkpoint, checkpoint_sha256: str, config: SubnetConfig, path: str | os.PathLike,
                  options: ExportOptions = ExportOptions()) -> ExportResult:
    """Build, verify and atomically write one subnet. Verification runs before anything
    is written, on the file as a device loads it (INT4 weights expanded)."""
    path = Path(path)
    if path.exists() and not options.overwrite:
        raise FileExistsError(f"{path} exists (use --force to overwrite)")
    costs = subnet_costs(ckpt.model, config)
    onnx_model, ir, net, bn_source = build_model(ckpt, config, checkpoint_sha256, pack_int4=options.pack_int4,
                                                 costs=costs)
    report = None
    if options.verify:
        inputs = verification_inputs(ckpt, config, options)
        runnable = expand_int4(onnx_model) if options.pack_int4 else onnx_model
        report = verify(ckpt.model, net, ir, runnable, inputs, options.threads)
        if not report.passed:
            raise VerificationFailed(f"{config}: verification failed: {'; '.join(report.problems())} "
                                     "(nothing written; --no-verify writes it anyway)")
    data = onnx_model.SerializeToString()
    with atomic_write(path, overwrite=options.overwrite) as f:
        f.write(data)
    return ExportResult(config, path, len(data), bn_source, report, costs)
