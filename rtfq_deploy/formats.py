"""The names and constants that the toolkit's files share between host and device.

One home for what the exporter writes and the device-side benchmark, fetch, manifest and
server read: the ``rtfq.*`` ONNX metadata keys, the runtime names, the image suffixes and
the evaluation crop, the default input normalisation, and the architecture and quantizer
names a checkpoint records. Standard library only (no torch, numpy or onnx), so the
device side imports it freely; an import contract (setup.cfg, ``[importlinter]``) keeps it
that way. Changing a value here changes file formats: files written before must still load.
"""

from __future__ import annotations

from typing import Any, Mapping

# -- ONNX metadata (``metadata_props``) of an exported file ---------------------------------
METADATA_PREFIX = "rtfq."
META_SUBNET = "rtfq.subnet"
META_BITS = "rtfq.bits"
META_MACS = "rtfq.macs"
META_BITOPS = "rtfq.bitops"
META_PARAMS = "rtfq.params"
META_INPUT = "rtfq.input"  # JSON: name, shape, layout, dtype, preprocess, mean, std
META_OUTPUT = "rtfq.output"
META_CLASS_NAMES = "rtfq.class_names"  # JSON array of the classes, in logit order
META_BN_STATISTICS = "rtfq.bn_statistics"
META_WEIGHTS = "rtfq.weights"  # WEIGHTS_INT8 or WEIGHTS_INT4_PACKED
META_CHECKPOINT_SHA256 = "rtfq.checkpoint_sha256"
META_ARCH = "rtfq.arch"
META_QUANTIZER = "rtfq.quantizer"
META_TOOLKIT_VERSION = "rtfq.toolkit_version"
WEIGHTS_INT8 = "int8"
WEIGHTS_INT4_PACKED = "int4-packed"  # expand with rtfq_deploy.int4 before running

# -- runtimes a model is benchmarked on and served for ------------------------------------
ONNXRUNTIME = "onnxruntime"
OPENVINO = "openvino"
RUNTIMES = (ONNXRUNTIME, OPENVINO)  # in this order in tables, manifests and menus
DEFAULT_RUNTIME = ONNXRUNTIME  # what files written before runtimes existed were measured on

# -- images ---------------------------------------------------------------------------------
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm"})
CROP_FRACTION = 0.875  # the usual eval preprocessing: resize the short side to R / 0.875, crop R x R
# torchvision's ImageNet preprocessing, used unless the checkpoint's metadata says otherwise.
IMAGENET_NORMALIZATION: Mapping[str, list[float]] = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
NORMALIZATION_KEY = "normalization"  # where a checkpoint's metadata keeps its own

# -- what a supernet checkpoint names (the torch-side registries key on these) --------------
ARCH_NAMES = ("resnet50", "resnet18", "tiny_resnet", "mobilenet_v2", "tiny_mobilenet")  # rtfq_deploy.models.ARCHS
# rtfq_deploy.quant.QUANTIZERS: LSQ, then AlignQ's variants (rtfq_deploy.quant.ALIGNQ_VARIANTS)
QUANTIZER_NAMES = ("lsq", "alignq-v1", "alignq-learned", "alignq-full", "alignq-n01", "alignq-conv",
                   "alignq-conv-learned", "alignq-branch", "alignq-branch-logistic", "alignq-weights",
                   "alignq-inverse")
# Names the CLI accepts for a kind; a checkpoint stores the kind's own name.
QUANTIZER_ALIASES: Mapping[str, str] = {"alignq": "alignq-branch"}
# What a checkpoint written before the AlignQ variants meant by a name.
LEGACY_QUANTIZER_NAMES: Mapping[str, str] = {"alignq": "alignq-v1"}


def normalization_of(meta: Mapping[str, Any]) -> Mapping[str, Any]:
    """The mean and std a checkpoint's images are normalised with: its metadata's, else
    ImageNet's (a checkpoint made before training recorded one)."""
    return meta.get(NORMALIZATION_KEY, IMAGENET_NORMALIZATION)
