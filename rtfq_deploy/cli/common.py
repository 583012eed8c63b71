"""What every command shares: one-line errors with exit code 2, and table/JSON output."""

from __future__ import annotations

import json
import logging
import math
import re
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

import click

from rtfq_deploy.errors import RtfqError

USAGE_EXIT = 2


def setup_logging(verbose: bool) -> None:
    """-v shows this toolkit's debug lines, not every library's (Pillow logs each PNG chunk)."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("rtfq_deploy").setLevel(logging.DEBUG if verbose else logging.WARNING)


_LINE_BREAKS = {ord(c): repr(c)[1:-1] for c in "\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029"}


def _one_line(message: str) -> str:
    """A message that names user text (a path, a value) stays one line whatever that text
    holds: every character str.splitlines() breaks at is written as its escape."""
    return message.strip().translate(_LINE_BREAKS)


class _OneLineErrors:
    """Run click in non-standalone mode and turn every user error into one line on
    stderr and exit code 2 (no usage dump, no traceback)."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):  # type: ignore[no-untyped-def]
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)  # type: ignore[misc]
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)  # type: ignore[misc]
        except (click.exceptions.Abort, KeyboardInterrupt):
            click.echo("Aborted.", err=True)
            sys.exit(130)
        except click.exceptions.NoArgsIsHelpError as e:  # a bare `rtfq`: its help, as with --help
            click.echo(e.ctx.get_help())
            sys.exit(0)
        except click.ClickException as e:
            click.echo(f"Error: {_one_line(e.format_message())}", err=True)
            sys.exit(USAGE_EXIT if isinstance(e, click.UsageError) else e.exit_code)
        except (RtfqError, FileExistsError) as e:
            click.echo(f"Error: {_one_line(str(e))}", err=True)
            sys.exit(USAGE_EXIT)
        except OSError as e:
            where = f": {e.filename}" if e.filename else ""
            click.echo(f"Error: {_one_line(f'{e.strerror or e}{where}')}", err=True)
            sys.exit(USAGE_EXIT)
        sys.exit(rv if isinstance(rv, int) else 0)


class Command(_OneLineErrors, click.Command):
    pass


class Group(_OneLineErrors, click.Group):
    command_class = Command

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        """Each subcommand's whole first sentence (click cuts it at the terminal width
        less the name, which left summaries ending in '...'); long ones wrap instead."""
        rows = []
        for name in self.list_commands(ctx):
            cmd = self.get_command(ctx, name)
            if cmd is not None and not cmd.hidden:
                rows.append((name, cmd.get_short_help_str(limit=1000)))
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)


class FiniteFloat(click.ParamType):
    """A float that is finite and within [low, high] (or the open ends with ``*_open``).

    click.FloatRange lets NaN through (every comparison with NaN is false), so the
    boundary check is written once here and every numeric option uses it.
    """

    name = "number"

    def __init__(self, low: float | None = None, high: float | None = None, *, low_open: bool = False,
                 high_open: bool = False) -> None:
        self.low, self.high, self.low_open, self.high_open = low, high, low_open, high_open

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> float:
        if isinstance(value, float) and math.isfinite(value):
            number = value
        else:
            try:
                number = float(str(value).strip())
            except (TypeError, ValueError, OverflowError):
                self.fail(f"{value!r} is not a number", param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        if self.low is not None and (number < self.low or (self.low_open and number == self.low)):
            self.fail(f"{value} must be {'>' if self.low_open else '>='} {self.low:g}", param, ctx)
        if self.high is not None and (number > self.high or (self.high_open and number == self.high)):
            self.fail(f"{value} must be {'<' if self.high_open else '<='} {self.high:g}", param, ctx)
        return number


_SIGNED_INT = re.compile(r"[+-]?[0-9]+", re.ASCII)
_UNSIGNED_INT = re.compile(r"[0-9]+", re.ASCII)


def ascii_int(text: str, max_digits: int = 40, signed: bool = True) -> int | None:
    """The integer that ``text`` spells in ASCII digits (an optional sign when ``signed``),
    at most ``max_digits`` of them; None otherwise. Every integer a user types is read
    here: int() alone also takes other scripts' digits ('\u0661'), '1_0' and surrounding
    blanks, and str.isdigit() also takes '\u00b2', which int() then refuses."""
    if len(text) > max_digits + 1 or not (_SIGNED_INT if signed else _UNSIGNED_INT).fullmatch(text):
        return None
    if len(text.lstrip("+-")) > max_digits:
        return None
    return int(text)


class BoundedInt(click.ParamType):
    """An integer within [low, high]; both bounds are required, so no option takes a
    value that later overflows a C integer or allocates without limit."""

    name = "integer"

    def __init__(self, low: int, high: int) -> None:
        self.low, self.high = low, high

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, bool):
            self.fail(f"{value!r} is not an integer", param, ctx)
        if isinstance(value, int):
            number = value
        else:
            text = str(value).strip()
            if len(text) > 41:
                self.fail("is not an integer in range", param, ctx)
            parsed = ascii_int(text)
            if parsed is None:
                self.fail(f"{value!r} is not an integer", param, ctx)
            number = parsed
        if not self.low <= number <= self.high:
            self.fail(f"{number} is not between {self.low} and {self.high}", param, ctx)
        return number


SEED = BoundedInt(0, 2**31 - 1)


def bounded_list(item: click.ParamType, max_items: int = 16) -> Callable[[click.Context | None, click.Parameter | None, str | None], tuple | None]:
    """Click callback parsing '224,192,160' with ``item`` (a bounded type) per value, at
    most ``max_items`` of them: every element passes the same check as a single option."""

    def parse(ctx: click.Context | None, param: click.Parameter | None, value: str | None) -> tuple | None:
        if value is None:
            return None
        parts = [v.strip() for v in value.split(",") if v.strip()]
        if not parts:
            raise click.BadParameter("expected at least one value", ctx, param)
        if len(parts) > max_items:
            raise click.BadParameter(f"at most {max_items} values, got {len(parts)}", ctx, param)
        try:
            return tuple(item.convert(v, param, ctx) for v in parts)
        except click.BadParameter as e:
            raise click.BadParameter(f"{e.message} (expected a comma-separated list)", ctx, param) from None

    return parse


def emit_table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str, Callable[[Any], Any]]], as_json: bool) -> None:
    """Print ``rows`` as a tabulate table, or as JSON (raw values) with ``--json``.

    ``columns`` are (key, header, formatter) triples for the table view.
    """
    if as_json:
        click.echo(json.dumps(list(rows), indent=2))
        return
    from tabulate import tabulate

    table = [[fmt(row[key]) for key, _, fmt in columns] for row in rows]
    click.echo(tabulate(table, headers=[h for _, h, _ in columns], tablefmt="simple", disable_numparse=True))


# The client commands' (fetch, enroll) trust anchor for an https:// server.
cafile_option = click.option("--cafile", type=click.Path(dir_okay=False, path_type=Path), default=None,
                             help="PEM certificate(s) of a private CA to trust for an https:// server.")
