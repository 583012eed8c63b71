"""``rtfq-serve``: arrives with issue #6; the entry point exists so installs and docs are stable."""

from __future__ import annotations

import click

from rtfq_deploy.cli.common import Command, not_yet


@click.command(cls=Command, context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
def serve() -> None:
    """Not implemented yet (issue #6)."""
    not_yet("rtfq-serve", 6)
