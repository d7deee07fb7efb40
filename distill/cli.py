"""The `distill` command line: one subcommand per stage, each a thin layer over its module."""
from __future__ import annotations

import functools
import logging
import os
import sys

import click

from .errors import DistillError, UsageError


def friendly_errors(fn):
    """Turn DistillError into one line on stderr and exit 2 (usage) or 1 (failure); no traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except DistillError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(e.exit_code)
        except KeyboardInterrupt:
            click.echo("interrupted; run the same command again to resume", err=True)
            sys.exit(130)

    return wrapper


@click.group()
@click.option("-v", "--verbose", is_flag=True, help="Log debug messages.")
@click.version_option(package_name="distill")
def cli(verbose):
    """Distill a large teacher model into a small student: generate -> train -> eval -> export -> bench."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def main():
    cli(prog_name="distill")
