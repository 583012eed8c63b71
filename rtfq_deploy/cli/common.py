"""What every command shares: one-line errors with exit code 2, and table/JSON output."""

from __future__ import annotations

import json
import logging
import sys
from typing import Any, Callable, Sequence

import click

from rtfq_deploy.errors import RtfqError

USAGE_EXIT = 2


def setup_logging(verbose: bool) -> None:
    """-v shows this toolkit's debug lines, not every library's (Pillow logs each PNG chunk)."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("rtfq_deploy").setLevel(logging.DEBUG if verbose else logging.WARNING)


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
            click.echo(f"Error: {e.format_message()}", err=True)
            sys.exit(USAGE_EXIT if isinstance(e, click.UsageError) else e.exit_code)
        except (RtfqError, FileExistsError) as e:
            click.echo(f"Error: {e}", err=True)
            sys.exit(USAGE_EXIT)
        except OSError as e:
            where = f": {e.filename}" if e.filename else ""
            click.echo(f"Error: {e.strerror or e}{where}", err=True)
            sys.exit(USAGE_EXIT)
        sys.exit(rv if isinstance(rv, int) else 0)


class Command(_OneLineErrors, click.Command):
    pass


class Group(_OneLineErrors, click.Group):
    command_class = Command


def comma_list(kind: Callable[[str], Any]) -> Callable[[click.Context | None, click.Parameter | None, str | None], tuple | None]:
    """Click callback parsing '224,192,160' into a tuple of ``kind``."""

    def parse(ctx: click.Context | None, param: click.Parameter | None, value: str | None) -> tuple | None:
        if value is None:
            return None
        try:
            items = tuple(kind(v.strip()) for v in value.split(",") if v.strip())
        except ValueError:
            raise click.BadParameter(f"expected a comma-separated list, got {value!r}") from None
        if not items:
            raise click.BadParameter("expected at least one value")
        return items

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


def not_yet(name: str, issue: int) -> None:
    raise click.ClickException(f"{name} is not implemented yet (see issue #{issue})")
