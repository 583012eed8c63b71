"""Quantizer kinds, selected by name in the supernet's configuration (the names:
:data:`rtfq_deploy.formats.QUANTIZER_NAMES`)."""

from __future__ import annotations

from rtfq_deploy.formats import QUANTIZER_NAMES
from rtfq_deploy.quant.alignq import AlignQQuantizer
from rtfq_deploy.quant.base import Quantizer
from rtfq_deploy.quant.encoding import CdfCodes, Encoding, LinearCodes, qrange
from rtfq_deploy.quant.lsq import LSQQuantizer

_CLASSES: dict[str, type[Quantizer]] = {"lsq": LSQQuantizer, "alignq": AlignQQuantizer}
# Keyed and ordered by the names checkpoints and the CLI use (a name without a class fails here).
QUANTIZERS: dict[str, type[Quantizer]] = {name: _CLASSES[name] for name in QUANTIZER_NAMES}


def quantizer_class(kind: str) -> type[Quantizer]:
    try:
        return QUANTIZERS[kind]
    except KeyError:
        raise ValueError(f"unknown quantizer kind {kind!r} (known: {', '.join(sorted(QUANTIZERS))})") from None


__all__ = ["QUANTIZERS", "AlignQQuantizer", "CdfCodes", "Encoding", "LSQQuantizer", "LinearCodes", "Quantizer", "qrange",
           "quantizer_class"]
