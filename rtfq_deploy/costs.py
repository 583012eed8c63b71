"""Cost model: MACs, BitOPs, parameters and weight bytes of a subnet.

Costs come from walking the supernet's integer graph (:mod:`rtfq_deploy.graph`) at the
subnet's resolution and width, not from a second formula of the architecture. The walk depends only on (resolution, width); bit-widths are then
read from the bit plan, so one walk serves every bit plan of that shape.

Definitions, per conv/linear layer l of the deployed network:
- MACs_l = output elements x input channels per group x kernel area (BatchNorm, ReLU,
  adds and pooling are not counted, as in the usual 4.09 GMACs of ResNet-50);
- BitOPs = sum of MACs_l x weight bits_l x bits of the activation l reads (32 for float);
- params = weights + one bias per output channel (BatchNorm folded into the bias);
- weight bytes = weights packed at their bit-width, ceil(count x bits / 8) per layer;
  biases and scales (8 bytes per output channel) are not included.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable

from rtfq_deploy.models.base import Supernet
from rtfq_deploy.ops import LayerShape, ShapeWalk, rule_for
from rtfq_deploy.plan import BitPlan
from rtfq_deploy.space import SubnetConfig

FLOAT_BITS = 32


@dataclass(frozen=True)
class LayerCost:
    name: str
    macs: int
    weights: int
    out_channels: int
    weight_bits: int
    act_bits: int

    @property
    def params(self) -> int:
        return self.weights + self.out_channels

    @property
    def bitops(self) -> int:
        return self.macs * self.weight_bits * self.act_bits

    @property
    def weight_bytes(self) -> int:
        return math.ceil(self.weights * self.weight_bits / 8)


@dataclass(frozen=True)
class Costs:
    macs: int
    bitops: int
    params: int
    weight_bytes: int
    layers: tuple[LayerCost, ...] = ()

    def to_dict(self) -> dict:
        return {"macs": self.macs, "bitops": self.bitops, "params": self.params, "weight_bytes": self.weight_bytes}


def walk(model: Supernet, resolution: int, width: float) -> list[LayerShape]:
    """Shapes of every conv/linear layer of the (resolution, width) subnet, in forward
    order, by propagating (channels, size) along the supernet's integer graph (each op's
    rule in :mod:`rtfq_deploy.ops`)."""
    state = ShapeWalk(model, resolution, width)
    shapes = (rule_for(node).shape(node, state) for node in model.graph())
    return [s for s in shapes if s is not None]


def plan_costs(model: Supernet, shapes: list[LayerShape], plan: BitPlan) -> Costs:
    """Costs of a walked subnet under a bit plan."""
    inputs = model.layer_inputs()
    layers = []
    for s in shapes:
        w_bits = plan[f"{s.name}.weight_quant"] or FLOAT_BITS
        a_bits = plan[inputs[s.name]] or FLOAT_BITS
        layers.append(LayerCost(s.name, s.macs, s.weights, s.out_channels, w_bits, a_bits))
    return Costs(
        macs=sum(c.macs for c in layers),
        bitops=sum(c.bitops for c in layers),
        params=sum(c.params for c in layers),
        weight_bytes=sum(c.weight_bytes for c in layers),
        layers=tuple(layers),
    )


def subnet_costs(model: Supernet, config: SubnetConfig) -> Costs:
    return plan_costs(model, walk(model, config.resolution, config.width), model.plan(config))


def costs_of(model: Supernet, configs: Iterable[SubnetConfig]) -> dict[SubnetConfig, Costs]:
    """Costs of many subnets, uniform or mixed, with one walk per (resolution, width)."""
    shapes: dict[tuple[int, float], list[LayerShape]] = {}
    out: dict[SubnetConfig, Costs] = {}
    for cfg in configs:
        key = (cfg.resolution, cfg.width)
        if key not in shapes:
            shapes[key] = walk(model, *key)
        out[cfg] = plan_costs(model, shapes[key], model.plan(cfg))
    return out


def space_costs(model: Supernet) -> dict[SubnetConfig, Costs]:
    """Costs of every (uniform) subnet of the model's space."""
    return costs_of(model, model.config.space)
