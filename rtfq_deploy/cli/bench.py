"""``rtfq-bench``: arrives with issue #5; the entry point exists so installs and docs are stable."""

from __future__ import annotations

import click

from rtfq_deploy.cli.common import Command, not_yet


@click.command(cls=Command, context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
def bench() -> None:
    """Not implemented yet (issue #5)."""
    not_yet("rtfq-bench", 5)
