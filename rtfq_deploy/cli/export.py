"""``rtfq-export``: arrives with issue #4; the entry point exists so installs and docs are stable."""

from __future__ import annotations

import click

from rtfq_deploy.cli.common import Command, not_yet


@click.command(cls=Command, context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
def export() -> None:
    """Not implemented yet (issue #4)."""
    not_yet("rtfq-export", 4)
