"""The subnet space: input resolution x width multiplier x bit-width.

A :class:`SubnetConfig` is one point of the space and has a canonical string form
(``r160-w0.73-q4``) used on the command line, in file names and as a dictionary key.
The channel rounding rule lives here too, because training, costing and export must all
agree on it.
"""

from __future__ import annotations

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

_CONFIG_RE = re.compile(r"r(\d+)-w(\d+(?:\.\d+)?)-q(\d+)")


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


@dataclass(frozen=True, order=True)
class SubnetConfig:
    """One subnet: input resolution, width multiplier and (uniform) bit-width."""

    resolution: int
    width: float
    bits: int

    def __post_init__(self) -> None:
        if not 0 < self.resolution <= MAX_RESOLUTION:
            raise SpaceError(f"resolution must be between 1 and {MAX_RESOLUTION}, got {self.resolution}")
        if not 0.0 < self.width <= 1.0:
            raise SpaceError(f"width must be in (0, 1], got {self.width}")
        if not 2 <= self.bits <= 8:
            raise SpaceError(f"bit-width must be between 2 and 8, got {self.bits}")

    def __str__(self) -> str:
        return f"r{self.resolution}-w{format_width(self.width)}-q{self.bits}"

    @classmethod
    def parse(cls, text: str) -> "SubnetConfig":
        match = _CONFIG_RE.fullmatch(text.strip())
        if match is None:
            raise SpaceError(
                f"malformed subnet {text!r}: expected r<resolution>-w<width>-q<bits>, e.g. r160-w0.73-q4"
            )
        return cls(int(match[1]), float(match[2]), int(match[3]))


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
        return (
            isinstance(config, SubnetConfig)
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
        """Return ``config`` if it is in the space, else raise naming the valid values."""
        problems = []
        if config.resolution not in self.resolutions:
            problems.append(f"resolution {config.resolution} (valid: {_fmt_values(self.resolutions)})")
        if config.width not in self.widths:
            problems.append(f"width {format_width(config.width)} (valid: {_fmt_values(self.widths)})")
        if config.bits not in self.bits:
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
