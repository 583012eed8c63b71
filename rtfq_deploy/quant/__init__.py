"""Quantizer kinds, selected by name in the supernet's configuration (the names:
:data:`rtfq_deploy.formats.QUANTIZER_NAMES`).

AlignQ comes in variants that differ in what they do with activations (the ablation in
``train/alignq_ablation.py`` measures each); ``alignq`` names the best exactly exportable
one (:data:`rtfq_deploy.formats.QUANTIZER_ALIASES`), and a checkpoint stores the variant's
own name, so a later change of the alias changes no trained supernet.
"""

from __future__ import annotations

from functools import partial
from typing import Callable

from rtfq_deploy.formats import QUANTIZER_ALIASES, QUANTIZER_NAMES
from rtfq_deploy.quant.alignq import AlignQQuantizer, CdfOptions
from rtfq_deploy.quant.base import Quantizer
from rtfq_deploy.quant.encoding import CdfCodes, Encoding, LinearCodes, qrange
from rtfq_deploy.quant.lsq import LSQQuantizer

ALIGNQ_VARIANTS: dict[str, CdfOptions] = {
    "alignq-v1": CdfOptions(),  # what "alignq" meant until the ablation (kept for reproducibility)
    "alignq-learned": CdfOptions(sigma="learned"),
    "alignq-full": CdfOptions(post_relu="full"),
    "alignq-n01": CdfOptions(sigma="fixed"),
    "alignq-conv": CdfOptions(placement="conv-inputs"),
    "alignq-conv-learned": CdfOptions(sigma="learned", placement="conv-inputs"),
    "alignq-branch": CdfOptions(placement="branch"),
    "alignq-branch-logistic": CdfOptions(placement="branch", cdf="logistic"),
    "alignq-weights": CdfOptions(placement="none"),  # activations are LSQ's
    "alignq-inverse": CdfOptions(domain="original"),  # a diagnostic: does not export
}

QuantizerFactory = Callable[..., Quantizer]  # (bit_choices, signed, channels, role) -> Quantizer
_FACTORIES: dict[str, QuantizerFactory] = {
    "lsq": LSQQuantizer,
    **{name: partial(AlignQQuantizer, options=options, kind=name) for name, options in ALIGNQ_VARIANTS.items()},
}
# Keyed and ordered by the names checkpoints and the CLI use (a name without a factory fails here).
QUANTIZERS: dict[str, QuantizerFactory] = {name: _FACTORIES[name] for name in QUANTIZER_NAMES}


def resolve_kind(kind: str) -> str:
    """A kind's own name (an alias such as ``alignq`` resolved)."""
    return QUANTIZER_ALIASES.get(kind, kind)


def quantizer_class(kind: str) -> QuantizerFactory:
    try:
        return QUANTIZERS[resolve_kind(kind)]
    except KeyError:
        raise ValueError(f"unknown quantizer kind {kind!r} (known: {', '.join(sorted(QUANTIZERS))})") from None


__all__ = ["ALIGNQ_VARIANTS", "QUANTIZERS", "AlignQQuantizer", "CdfCodes", "CdfOptions", "Encoding", "LSQQuantizer",
           "LinearCodes", "Quantizer", "qrange", "quantizer_class", "resolve_kind"]
