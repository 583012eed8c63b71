"""The integer dataflow of a supernet, described once.

A supernet lists, in forward order, what its deployed integer network computes: which
layer reads which quantized tensor, which BatchNorm follows it, which quantizer writes
its output, where residual adds and pools sit. Tensors are named by the quantizer that
produces them (a max-pool output keeps its input's codes under its own name). Lowering
to the integer IR, the cost walk (MACs, BitOPs) and ``layer_inputs`` all read this one
description, so none of them knows an architecture; ``forward`` stays plain PyTorch and
the export tests prove the two agree.

Torch-free: plain frozen dataclasses.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator


@dataclass(frozen=True)
class Quantize:
    """The float image enters the integer path through quantizer ``out``."""

    out: str


@dataclass(frozen=True)
class Conv:
    """Layer ``layer`` (a conv, depthwise or not, or the classifier when ``linear``) reads
    tensor ``inp``; BatchNorm ``bn`` (if any) and ReLU (when ``out``'s quantizer is
    unsigned; capped at ``relu_max`` if set, e.g. 6 for ReLU6) follow; quantizer ``out``
    writes the result, or ``out=None`` leaves it float (the logits). A signed ``out`` has
    no activation (MobileNetV2's linear bottleneck)."""

    layer: str
    inp: str
    out: str | None
    bn: str | None = None
    linear: bool = False
    relu_max: float | None = None


@dataclass(frozen=True)
class Add:
    """Residual add of two quantized tensors; quantizer ``out`` follows, with ReLU when
    it is unsigned (ResNet) and none when it is signed (MobileNetV2)."""

    a: str
    b: str
    out: str


@dataclass(frozen=True)
class MaxPool:
    """Max pooling on the codes of ``inp``; ``out`` is carried exactly as ``inp`` is."""

    inp: str
    out: str
    kernel: int
    stride: int
    padding: int


@dataclass(frozen=True)
class AvgPool:
    """Global average pooling of ``inp``, flattened, quantized by ``out``."""

    inp: str
    out: str


Node = Quantize | Conv | Add | MaxPool | AvgPool


@dataclass(frozen=True)
class IntGraph:
    nodes: tuple[Node, ...]

    def __iter__(self) -> Iterator[Node]:
        return iter(self.nodes)

    def convs(self) -> Iterator[Conv]:
        return (n for n in self.nodes if isinstance(n, Conv))

    @property
    def classifier(self) -> str:
        """The classifier layer's name (the one layer whose output stays float)."""
        heads = [c.layer for c in self.convs() if c.out is None]
        if len(heads) != 1:
            raise ValueError(f"an integer graph has one float output layer, this one has {len(heads)}")
        return heads[0]

    def conv_bn_pairs(self) -> dict[str, str]:
        """Layer name -> the BatchNorm that follows it."""
        return {c.layer: c.bn for c in self.convs() if c.bn is not None}

    def layer_inputs(self) -> dict[str, str]:
        """Layer name -> name of the quantized tensor it reads (a pooled tensor resolves to
        the quantizer whose codes it carries)."""
        carried = {n.out: self.carrier(n.inp) for n in self.nodes if isinstance(n, MaxPool)}
        return {c.layer: carried.get(c.inp, c.inp) for c in self.convs()}

    def readers(self) -> dict[str, tuple[Node, ...]]:
        """Quantized tensor -> the nodes that read its codes (through max pooling, which
        carries them)."""
        readers: dict[str, list[Node]] = {}
        for n in self.nodes:
            inputs = (n.a, n.b) if isinstance(n, Add) else () if isinstance(n, Quantize) else (n.inp,)
            for t in inputs:
                if not isinstance(n, MaxPool):
                    readers.setdefault(self.carrier(t), []).append(n)
        return {t: tuple(rs) for t, rs in readers.items()}

    def carrier(self, tensor: str) -> str:
        """The quantizer whose codes ``tensor`` carries."""
        for n in self.nodes:
            if isinstance(n, MaxPool) and n.out == tensor:
                return self.carrier(n.inp)
        return tensor


def out_size(size: int, kernel: int, stride: int, padding: int) -> int:
    """Spatial output size of a conv or pool (floor mode, as PyTorch and ONNX compute it)."""
    return (size + 2 * padding - kernel) // stride + 1
