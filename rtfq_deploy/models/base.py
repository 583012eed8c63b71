"""What every supernet architecture shares: its configuration and the bookkeeping that
turns a subnet choice into an :class:`~rtfq_deploy.plan.ActiveSubnet`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator, Mapping

from torch import Tensor, nn

from rtfq_deploy.graph import IntGraph
from rtfq_deploy.layers import SlimBatchNorm2d, SlimConv2d, SlimLinear
from rtfq_deploy.plan import ActiveSubnet, BitPlan, BitPolicy
from rtfq_deploy.errors import RtfqError
from rtfq_deploy.formats import LEGACY_QUANTIZER_NAMES
from rtfq_deploy.quant import QUANTIZERS, Quantizer, quantizer_class, resolve_kind
from rtfq_deploy.space import MixedBits, SearchSpace, SpaceError, SubnetConfig


@dataclass(frozen=True)
class SupernetConfig:
    """Everything needed to rebuild a supernet; stored in its checkpoint."""

    arch: str
    num_classes: int = 1000
    space: SearchSpace = field(default_factory=SearchSpace)
    policy: BitPolicy = field(default_factory=BitPolicy)
    weight_quantizer: str = "lsq"
    act_quantizer: str = "lsq"

    def __post_init__(self) -> None:
        # an alias ("alignq") becomes the kind it names now, which is what the checkpoint stores
        object.__setattr__(self, "weight_quantizer", resolve_kind(self.weight_quantizer))
        object.__setattr__(self, "act_quantizer", resolve_kind(self.act_quantizer))
        if self.num_classes < 1:
            raise RtfqError(f"the number of classes must be >= 1, got {self.num_classes}")
        for bits in self.policy.extra_bits():
            if not 2 <= bits <= 8:
                raise RtfqError(f"policy bit-widths must be between 2 and 8, got {bits}")
        for kind in (self.weight_quantizer, self.act_quantizer):
            if kind not in QUANTIZERS:
                raise RtfqError(f"unknown quantizer kind {kind!r} (known: {', '.join(sorted(QUANTIZERS))})")

    @property
    def bit_choices(self) -> tuple[int, ...]:
        """Bit-widths every quantizer keeps parameters for."""
        return tuple(sorted(set(self.space.bits) | set(self.policy.extra_bits()), reverse=True))

    def to_dict(self) -> dict:
        return {
            "arch": self.arch,
            "num_classes": self.num_classes,
            "space": self.space.to_dict(),
            "policy": self.policy.to_dict(),
            "quantizer": self.quantizer,
        }

    @property
    def quantizer(self) -> str:
        """The kinds as one string: a single name when weights and activations share it
        (what every reader so far expects; a reader that lacks the kind refuses the file
        with "unknown quantizer kind"), else ``weights=W,activations=A``."""
        w, a = self.weight_quantizer, self.act_quantizer
        return w if w == a else f"weights={w},activations={a}"

    @classmethod
    def from_dict(cls, data: Mapping) -> "SupernetConfig":
        return cls(
            arch=str(data["arch"]),
            num_classes=int(data["num_classes"]),
            space=SearchSpace.from_dict(data["space"]),
            policy=BitPolicy.from_dict(data["policy"]),
            **_parse_kinds(str(data["quantizer"])),
        )


def _parse_kinds(text: str) -> dict[str, str]:
    """A stored quantizer string; names written before the AlignQ variants keep their meaning."""
    if "=" not in text:
        kind = LEGACY_QUANTIZER_NAMES.get(text, text)
        return {"weight_quantizer": kind, "act_quantizer": kind}
    parts = dict(p.partition("=")[::2] for p in text.split(","))
    if set(parts) != {"weights", "activations"}:
        raise RtfqError(f"unknown quantizer kind {text!r}")
    return {"weight_quantizer": LEGACY_QUANTIZER_NAMES.get(parts["weights"], parts["weights"]),
            "act_quantizer": LEGACY_QUANTIZER_NAMES.get(parts["activations"], parts["activations"])}


Layer = SlimConv2d | SlimLinear

# (tensor, the quantizer that produced it or None, subnet) -> the same after the stage.
StageFn = Callable[[Tensor, "Quantizer | None", ActiveSubnet], "tuple[Tensor, Quantizer | None]"]


@dataclass(frozen=True)
class Stage:
    """A run of the forward pass that reads only the previous stage's output, so a
    forward may start at any stage from a kept input (the search scores plans that
    differ in one quantizer by re-running only the stages from its own on).

    ``owns``: the module paths inside the stage; a quantizer belongs to the stage whose
    path is its name or a prefix of it.
    """

    owns: tuple[str, ...]
    run: StageFn

    def has(self, name: str) -> bool:
        return any(name == p or name.startswith(p + ".") for p in self.owns)


class Supernet(nn.Module):
    """Base of supernet architectures.

    Subclasses build their modules in ``__init__`` through :meth:`make_quantizer` and
    :meth:`conv`/:meth:`linear`, then call :meth:`finish`. They describe their integer
    dataflow once, in :meth:`graph`; costs (BitOPs), ``layer_inputs`` and export read it.
    """

    def __init__(self, config: SupernetConfig) -> None:
        super().__init__()
        self.config = config
        self._weight_cls = quantizer_class(config.weight_quantizer)
        self._act_cls = quantizer_class(config.act_quantizer)

    # -- construction helpers -------------------------------------------------------
    def make_quantizer(self, signed: bool, channels: int | None, role: str) -> Quantizer:
        """A weight quantizer (per-channel, ``channels`` set) or an activation one, of the
        kind the configuration names for that tensor kind."""
        cls = self._act_cls if channels is None else self._weight_cls
        return cls(self.config.bit_choices, signed, channels, role)

    def conv(self, c_in: int, c_out: int, k: int, **kwargs) -> SlimConv2d:
        return SlimConv2d(c_in, c_out, k, channel_divisor=self.config.space.channel_divisor,
                          quantizer=self.make_quantizer, **kwargs)

    def linear(self, c_in: int, c_out: int, **kwargs) -> SlimLinear:
        return SlimLinear(c_in, c_out, channel_divisor=self.config.space.channel_divisor,
                          quantizer=self.make_quantizer, **kwargs)

    def finish(self) -> None:
        """Name quantizers and BatchNorms by their module path (plans and calibrated
        statistics are keyed by it) and initialise weight step sizes from the weights."""
        for name, module in self.named_modules():
            if isinstance(module, (Quantizer, SlimBatchNorm2d)):
                module.name = name
        readers = self.graph().readers()
        for name, quant in self.quantizers():
            if quant.channels is None:
                quant.place(tuple(type(n).__name__ for n in readers.get(name, ())))
        self.init_weight_steps()

    def init_weight_steps(self) -> None:
        """LSQ step initialisation from the current weights; call again after loading new weights."""
        for _, layer in self.layers():
            layer.weight_quant.init_from(layer.weight)

    # -- introspection -------------------------------------------------------------
    def layers(self) -> Iterator[tuple[str, Layer]]:
        """Every conv and linear layer, in forward order."""
        for name, module in self.named_modules():
            if isinstance(module, (SlimConv2d, SlimLinear)):
                yield name, module

    def quantizers(self) -> Iterator[tuple[str, Quantizer]]:
        for name, module in self.named_modules():
            if isinstance(module, Quantizer):
                yield name, module

    def graph(self) -> IntGraph:
        """The deployed integer dataflow (see :mod:`rtfq_deploy.graph`), described once."""
        raise NotImplementedError

    def layer_inputs(self) -> dict[str, str]:
        """Layer name -> name of the activation quantizer whose output the layer reads."""
        return self.graph().layer_inputs()

    # -- subnets -------------------------------------------------------------------
    def plan(self, config: SubnetConfig) -> BitPlan:
        """Every quantizer's bits for ``config``: a uniform bit-width through the config's
        policy, a mixed plan as it is (after :meth:`check_subnet`)."""
        if config.uniform:
            return BitPlan.uniform(((n, q.role) for n, q in self.quantizers()), config.bits, self.config.policy)
        self.check_subnet(config)
        return BitPlan.of(config.bits.as_dict())

    def float_plan(self) -> BitPlan:
        return BitPlan.float(n for n, _ in self.quantizers())

    def check_subnet(self, config: SubnetConfig) -> SubnetConfig:
        """``config`` if this supernet can run it, else a :class:`SpaceError` naming why.

        A mixed plan must name exactly this supernet's quantizers, use bit-widths they
        keep step sizes for, and keep the policy's fixed roles (first and last layer,
        residual operands) at the policy's bits.
        """
        space = self.config.space
        if config.uniform:
            return space.validate(config)
        space.validate(SubnetConfig(config.resolution, config.width, space.bits[0]))
        plan, roles = config.bits.as_dict(), {n: q.role for n, q in self.quantizers()}
        missing, unknown = sorted(set(roles) - set(plan)), sorted(set(plan) - set(roles))
        if missing or unknown:
            what = f"has no entry for {missing[0]}" if missing else f"names {unknown[0]}, which"
            raise SpaceError(f"bit plan {config}: {what}" + ("" if missing else f" {self.config.arch} does not have")
                             + f" ({len(missing)} missing, {len(unknown)} unknown of {len(roles)} quantizers)")
        choices = self.config.bit_choices
        for name, bits in plan.items():
            if bits not in choices:
                raise SpaceError(f"bit plan {config}: {name} at {bits} bits; this supernet's quantizers keep "
                                 f"step sizes for {', '.join(map(str, choices))} bits")
            fixed = self.config.policy.fixed_bits(roles[name])
            if fixed is not None and bits != fixed:
                raise SpaceError(f"bit plan {config}: {name} ({roles[name]}) is fixed at {fixed} bits by the "
                                 f"supernet's policy, the plan gives {bits}")
        return config

    def subnet(self, resolution: int, width: float, bits: Mapping[str, int]) -> SubnetConfig:
        """The canonical subnet of a per-quantizer plan: the uniform one when the plan is a
        uniform subnet's (so one network never has two ids), else a checked mixed plan."""
        mixed = SubnetConfig(resolution, width, MixedBits.of(dict(bits)))
        for q in self.config.space.bits:
            uniform = SubnetConfig(resolution, width, q)
            if self.plan(uniform).as_dict() == mixed.bits.as_dict():
                return self.check_subnet(uniform)
        return self.check_subnet(mixed)

    def active(self, config: SubnetConfig, bn_stats: Mapping[str, tuple[Tensor, Tensor]] | None = None) -> ActiveSubnet:
        return ActiveSubnet(config.width, self.plan(config), bn_stats)

    def stages(self) -> list[Stage]:
        """The forward pass as stages, in order (the image in, the logits out). An
        architecture gives these; one that overrides :meth:`forward` instead is one stage."""
        return [Stage(tuple(n for n, _ in self.named_children()), lambda x, quant, net: (self.forward(x, net), None))]

    def forward(self, x: Tensor, net: ActiveSubnet) -> Tensor:
        quant = None
        for stage in self.stages():
            x, quant = stage.run(x, quant, net)
        return x
