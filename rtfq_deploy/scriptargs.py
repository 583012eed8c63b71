"""Argument types and a one-line-error parser for the research scripts in train/, bench/
and export/: bad input is one line ``prog: error: ...`` and exit 2, never a usage block
or a traceback."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import NoReturn


class Parser(argparse.ArgumentParser):
    """argparse whose errors are one line (``prog: error: ...``) and exit 2, no usage block."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def positive(text: str) -> int:
    """argparse type: a whole number from 1 to 10^6."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if not 1 <= value <= 10**6:
        raise argparse.ArgumentTypeError(f"must be between 1 and 1000000, got {value}")
    return value


def positive_float(text: str) -> float:
    """argparse type: a finite number above 0, at most 10^6 (NaN, inf, 0 and -1 refused)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 < value <= 1e6:  # False for NaN too
        raise argparse.ArgumentTypeError(f"must be above 0 and at most 1000000, got {text!r}")
    return value


def out_dir(text: str) -> Path:
    """argparse type: a folder, made absolute so that the training runs' command lines and
    run.json name absolute paths (``pkill -f``, ``--resume`` from anywhere)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("empty path")
    try:
        return Path(text).resolve()
    except (ValueError, OSError) as e:  # a NUL byte, a name too long
        raise argparse.ArgumentTypeError(f"not a usable path: {e}") from None


def seed_list(text: str) -> list[int]:
    """argparse type: 1 to 100 comma-separated seeds in 0..2^31-1."""
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated seeds, got {text!r}") from None
    if not seeds or not all(0 <= s < 2**31 for s in seeds) or len(seeds) > 100:
        raise argparse.ArgumentTypeError(f"expected 1 to 100 seeds in 0..2^31-1, got {text!r}")
    return seeds


def int_list(text: str) -> list[int]:
    """argparse type: comma-separated whole numbers from 1 to 10^6 (``8,4``)."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated whole numbers, got {text!r}") from None
    if not values or not all(1 <= v <= 10**6 for v in values):
        raise argparse.ArgumentTypeError(f"expected whole numbers from 1 to 1000000, got {text!r}")
    return values


def name_list(text: str) -> list[str]:
    """argparse type: comma-separated names (``r224-w1.00,r128-w0.60``)."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"expected comma-separated names, got {text!r}")
    return names
