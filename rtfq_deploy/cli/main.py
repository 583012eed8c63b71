"""The ``rtfq`` command group."""

from __future__ import annotations


import click

from rtfq_deploy import __version__
from rtfq_deploy.cli.common import Group, setup_logging
from rtfq_deploy.cli.calibrate import calibrate
from rtfq_deploy.cli.data import data
from rtfq_deploy.cli.demo import demo
from rtfq_deploy.cli.enroll import enroll
from rtfq_deploy.cli.eval import eval_
from rtfq_deploy.cli.fetch import fetch
from rtfq_deploy.cli.init import init
from rtfq_deploy.cli.plan import plan
from rtfq_deploy.cli.search import search
from rtfq_deploy.cli.subnets import subnets


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="rtfq_deploy")
@click.option("-v", "--verbose", is_flag=True, help="Log progress details to stderr.")
def rtfq(verbose: bool) -> None:
    """rtfq_deploy: integer subnets of one retraining-free quantized supernet, for edge devices."""
    setup_logging(verbose)


rtfq.add_command(calibrate)
rtfq.add_command(data)
rtfq.add_command(demo)
rtfq.add_command(eval_)
rtfq.add_command(init)
rtfq.add_command(plan)
rtfq.add_command(search)
rtfq.add_command(subnets)
rtfq.add_command(fetch)
rtfq.add_command(enroll)
