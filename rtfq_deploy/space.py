"""The subnet space: input resolution x width multiplier x bit plan.

A :class:`SubnetConfig` is one subnet and has a canonical id used on the command line,
in file names, in checkpoints, tables and manifests, and as a dictionary key:
``r160-w0.73-q4`` for a uniform bit-width (one of the space's grid points) and
``r160-w0.73-m`` plus 8 hex digits of the plan's digest for a per-quantizer mixed plan
(:class:`MixedBits`), whose full form lives in a plan file or a checkpoint. The channel
rounding rule lives here too, because training, costing and export must all agree on it.
Torch-free: devices read ids too.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from decimal import Decimal
from fractions import Fraction
from typing import Iterator

from rtfq_deploy.errors import RtfqError

DEFAULT_RESOLUTIONS = (224, 192, 160, 128)
DEFAULT_WIDTHS = (1.00, 0.86, 0.73, 0.60)
DEFAULT_BITS = (8, 6, 4)
DEFAULT_CHANNEL_DIVISOR = 8
# Bounds of any space: a 1024 x 1024 input is 21x the paper's largest activations, so a
# typo like 100000 (a 120 GB cost walk) fails here, in `rtfq init` and in a checkpoint.
MAX_RESOLUTION = 1024
MAX_VALUES = 16  # resolutions, widths or bit-widths per space (at most 16**3 subnets)
MAX_CHANNEL_DIVISOR = 256
MAX_QUANTIZERS = 4096  # entries of one mixed plan (ResNet-50 has 124 quantizers)
MAX_QUANTIZER_NAME = 200
MIN_BITS, MAX_BITS = 2, 8

_CONFIG_RE = re.compile(r"r(\d+)-w(\d+(?:\.\d+)?)-q(\d+)")
_ID_RE = re.compile(r"r(\d{1,6})-w(\d{1,3}(?:\.\d{1,12})?)-(?:q(\d{1,3})|m([0-9a-f]{8}))")


class SpaceError(RtfqError, ValueError):
    """A subnet string or value that is malformed or outside the space."""


def slim_channels(full: int, width: float, divisor: int = DEFAULT_CHANNEL_DIVISOR) -> int:
    """Channels a slimmed layer keeps: ``full * width`` rounded to the nearest multiple of
    ``divisor`` (ties round up), at least ``divisor`` and never more than ``full``.

    Exact decimal arithmetic (the width's shortest decimal form) keeps the result
    independent of float rounding, e.g. 100 x 0.6 is exactly 60.
    """
    if width == 1.0:
        return full
    scaled = Fraction(full) * Fraction(Decimal(repr(float(width))))
    units = int(scaled / divisor + Fraction(1, 2))
    return min(full, max(divisor, units * divisor))


def format_width(width: float) -> str:
    """Shortest exact decimal form of ``width`` with at least two decimals (``1.00``, ``0.875``)."""
    text = format(Decimal(repr(float(width))), "f")
    whole, _, frac = text.partition(".")
    return f"{whole}.{frac.ljust(2, '0')}"


@dataclass(frozen=True)
class MixedBits:
    """Bit-width of every quantizer of a mixed-precision subnet, sorted by name.

    Its digest (8 hex digits of the SHA-256 of the canonical JSON) names the subnet; a
    checkpoint refuses two plans whose digests collide, so an id never means two plans.
    """

    items: tuple[tuple[str, int], ...]

    def __post_init__(self) -> None:
        items = self.items
        if not isinstance(items, tuple) or not items or len(items) > MAX_QUANTIZERS:
            raise SpaceError(f"a bit plan names between 1 and {MAX_QUANTIZERS} quantizers")
        for entry in items:
            if not (isinstance(entry, tuple) and len(entry) == 2 and isinstance(entry[0], str)
                    and 0 < len(entry[0]) <= MAX_QUANTIZER_NAME):
                raise SpaceError("a bit plan maps quantizer names (strings) to bit-widths")
            bits = entry[1]
            if isinstance(bits, bool) or not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
                raise SpaceError(f"bit plan: {entry[0]} has bit-width {bits!r}, expected an integer "
                                 f"from {MIN_BITS} to {MAX_BITS}")
        ordered = tuple(sorted(items))
        if len({name for name, _ in ordered}) != len(ordered):
            raise SpaceError("a bit plan names a quantizer twice")
        object.__setattr__(self, "items", ordered)

    @classmethod
    def of(cls, mapping: dict[str, int]) -> "MixedBits":
        return cls(tuple(mapping.items()))

    def as_dict(self) -> dict[str, int]:
        return dict(self.items)

    @property
    def digest(self) -> str:
        text = json.dumps(self.as_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:8]


@dataclass(frozen=True)
class SubnetConfig:
    """One subnet: input resolution, width multiplier and bit plan, the latter either a
    uniform bit-width Q (mapped onto quantizers by the supernet's policy) or
    :class:`MixedBits`."""

    resolution: int
    width: float
    bits: int | MixedBits

    def __post_init__(self) -> None:
        if isinstance(self.resolution, bool) or not isinstance(self.resolution, int) \
                or not 0 < self.resolution <= MAX_RESOLUTION:
            raise SpaceError(f"resolution must be between 1 and {MAX_RESOLUTION}, got {self.resolution}")
        if not 0.0 < self.width <= 1.0:
            raise SpaceError(f"width must be in (0, 1], got {self.width}")
        if not isinstance(self.bits, MixedBits) and (isinstance(self.bits, bool) or not isinstance(self.bits, int)
                                                     or not MIN_BITS <= self.bits <= MAX_BITS):
            raise SpaceError(f"bit-width must be between {MIN_BITS} and {MAX_BITS}, got {self.bits}")

    @property
    def uniform(self) -> bool:
        return not isinstance(self.bits, MixedBits)

    def __str__(self) -> str:
        prefix = f"r{self.resolution}-w{format_width(self.width)}"
        return f"{prefix}-q{self.bits}" if self.uniform else f"{prefix}-m{self.bits.digest}"

    def sort_key(self) -> tuple:
        """Largest first: resolution, width, then uniform bits (mixed plans after, by id)."""
        return (-self.resolution, -self.width, 0 if self.uniform else 1,
                -self.bits if self.uniform else 0, str(self))

    @classmethod
    def parse(cls, text: str) -> "SubnetConfig":
        """A uniform subnet from its id; a mixed id has no plan in it (see :func:`split_id`)."""
        match = _CONFIG_RE.fullmatch(text.strip())
        if match is None:
            if _ID_RE.fullmatch(text.strip()):
                raise SpaceError(f"{text.strip()} is a mixed-precision subnet: give its plan file "
                                 "(or use a checkpoint that stores its plan)")
            raise SpaceError(
                f"malformed subnet {text!r}: expected r<resolution>-w<width>-q<bits>, e.g. r160-w0.73-q4"
            )
        return cls(int(match[1]), float(match[2]), int(match[3]))


def split_id(text: str) -> tuple[int, float, int | None, str | None]:
    """(resolution, width, uniform bits or None, mixed digest or None) of a subnet id."""
    match = _ID_RE.fullmatch(text) if isinstance(text, str) else None
    if match is None:
        raise SpaceError(f"malformed subnet id {text!r}: expected r<resolution>-w<width>-q<bits> "
                         "or r<resolution>-w<width>-m<8 hex digits>")
    bits = int(match[3]) if match[3] is not None else None
    SubnetConfig(int(match[1]), float(match[2]), bits if bits is not None else MIN_BITS)  # range checks
    return int(match[1]), float(match[2]), bits, match[4]


def _fmt_values(values: tuple) -> str:
    return ", ".join(format_width(v) if isinstance(v, float) else str(v) for v in values)


@dataclass(frozen=True)
class SearchSpace:
    """The grid of subnets a supernet is trained for; stored in its checkpoint."""

    resolutions: tuple[int, ...] = DEFAULT_RESOLUTIONS
    widths: tuple[float, ...] = DEFAULT_WIDTHS
    bits: tuple[int, ...] = DEFAULT_BITS
    channel_divisor: int = DEFAULT_CHANNEL_DIVISOR

    def __post_init__(self) -> None:
        # Canonical order: largest first, so the first element is the maxnet's.
        object.__setattr__(self, "resolutions", tuple(sorted({int(r) for r in self.resolutions}, reverse=True)))
        object.__setattr__(self, "widths", tuple(sorted({float(w) for w in self.widths}, reverse=True)))
        object.__setattr__(self, "bits", tuple(sorted({int(b) for b in self.bits}, reverse=True)))
        if not (self.resolutions and self.widths and self.bits):
            raise SpaceError("a search space needs at least one resolution, width and bit-width")
        if not 1 <= self.channel_divisor <= MAX_CHANNEL_DIVISOR:
            raise SpaceError(f"channel divisor must be between 1 and {MAX_CHANNEL_DIVISOR}, got {self.channel_divisor}")
        too_many = [n for n in ("resolutions", "widths", "bits") if len(getattr(self, n)) > MAX_VALUES]
        if too_many:
            raise SpaceError(f"a search space has at most {MAX_VALUES} {too_many[0]}")
        for i in range(max(len(self.resolutions), len(self.widths), len(self.bits))):  # range checks of every value
            SubnetConfig(self.resolutions[min(i, len(self.resolutions) - 1)], self.widths[min(i, len(self.widths) - 1)],
                         self.bits[min(i, len(self.bits) - 1)])

    def __iter__(self) -> Iterator[SubnetConfig]:
        for r in self.resolutions:
            for w in self.widths:
                for b in self.bits:
                    yield SubnetConfig(r, w, b)

    def __len__(self) -> int:
        return len(self.resolutions) * len(self.widths) * len(self.bits)

    def __contains__(self, config: object) -> bool:
        """Uniform subnets of the grid; a mixed plan is in no space by itself (its
        supernet checks it, see :meth:`Supernet.check_subnet`)."""
        return (
            isinstance(config, SubnetConfig)
            and config.uniform
            and config.resolution in self.resolutions
            and config.width in self.widths
            and config.bits in self.bits
        )

    @property
    def maxnet(self) -> SubnetConfig:
        return SubnetConfig(self.resolutions[0], self.widths[0], self.bits[0])

    @property
    def minnet(self) -> SubnetConfig:
        return SubnetConfig(self.resolutions[-1], self.widths[-1], self.bits[-1])

    def validate(self, config: SubnetConfig) -> SubnetConfig:
        """Return ``config`` if its resolution, width and (uniform) bit-width are in the
        space, else raise naming the valid values."""
        problems = []
        if config.resolution not in self.resolutions:
            problems.append(f"resolution {config.resolution} (valid: {_fmt_values(self.resolutions)})")
        if config.width not in self.widths:
            problems.append(f"width {format_width(config.width)} (valid: {_fmt_values(self.widths)})")
        if config.uniform and config.bits not in self.bits:
            problems.append(f"bit-width {config.bits} (valid: {_fmt_values(self.bits)})")
        if problems:
            raise SpaceError(f"subnet {config} is not in the space: " + "; ".join(problems))
        return config

    def parse(self, text: str) -> SubnetConfig:
        """Parse a subnet string and check it belongs to this space."""
        try:
            config = SubnetConfig.parse(text)
        except SpaceError as e:
            raise SpaceError(f"{e} (this space: R={_fmt_values(self.resolutions)}; "
                             f"W={_fmt_values(self.widths)}; Q={_fmt_values(self.bits)})") from None
        return self.validate(config)

    def to_dict(self) -> dict:
        return {
            "resolutions": list(self.resolutions),
            "widths": list(self.widths),
            "bits": list(self.bits),
            "channel_divisor": self.channel_divisor,
        }

    @classmethod
    def from_dict(cls, data: dict) -> "SearchSpace":
        return cls(
            resolutions=tuple(data["resolutions"]),
            widths=tuple(data["widths"]),
            bits=tuple(data["bits"]),
            channel_divisor=int(data["channel_divisor"]),
        )
