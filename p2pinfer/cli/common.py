"""Pieces shared by every CLI command module."""

from __future__ import annotations

import sys
from dataclasses import dataclass

import click

from ..config import Config
from ..errors import P2PInferError
from ..wording import plural  # noqa: F401  (re-exported: the CLI modules import it from here)


@dataclass
class AppContext:
    config: Config


def credits(amount: int, *, signed: bool = False) -> str:
    """An amount of ledger credits with its unit: ``+16 credits``, ``-50 credits``, ``1 credit``."""
    number = f"{amount:+d}" if signed else f"{amount}"
    return f"{number} credit{'' if abs(amount) == 1 else 's'}"


CREDIT_MEANING = ("one credit = one output token that a verification quorum accepted; a verifier earns 4 per "
                  "verdict that agrees with the decision; penalties are in credits too")


def run_cli(group: click.Group) -> None:
    """Run the CLI; user-facing errors become one line on stderr and exit status 1."""
    try:
        group.main(prog_name="p2pinfer", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        click.echo(f"error: {describe_click_error(group, exc)}", err=True)
        sys.exit(exc.exit_code)
    except P2PInferError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)


def describe_click_error(group: click.Group, exc: click.ClickException) -> str:
    """One line for a usage error: what was wrong and what to do (click's own text spans several lines)."""
    message = exc.format_message().rstrip(".")
    message = message[:1].lower() + message[1:]
    if not isinstance(exc, click.UsageError):
        return message
    context = exc.ctx
    command = context.command_path if context is not None else "p2pinfer"
    if isinstance(exc, click.NoSuchOption) and context is not None and context.parent is not None:
        global_option = next((p for p in group.params if exc.option_name in getattr(p, "opts", ())), None)
        if global_option is not None:
            metavar = "" if getattr(global_option, "is_flag", False) else " " + _metavar(global_option, context)
            return (f"{exc.option_name} is a global option: put it before the command, e.g. "
                    f"`p2pinfer {exc.option_name}{metavar} {context.info_name} ...`")
    return f"{message} (see `{command} --help`)"


def _metavar(option: click.Parameter, context: click.Context) -> str:
    try:
        return option.make_metavar(context)  # click >= 8.2
    except TypeError:
        return option.make_metavar()  # type: ignore[call-arg]  # click 8.1
