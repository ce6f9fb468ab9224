"""Pieces shared by every CLI command module."""

from __future__ import annotations

import sys
from dataclasses import dataclass

import click

from ..config import Config
from ..errors import P2PInferError


@dataclass
class AppContext:
    config: Config


def run_cli(group: click.Group) -> None:
    """Run the CLI; user-facing errors become one line on stderr and exit status 1."""
    try:
        group.main(prog_name="p2pinfer", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except P2PInferError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)
