"""The ``p2pinfer`` command line.

Each command group lives in its own module and is registered below. Errors meant for the user
(:class:`~p2pinfer.errors.P2PInferError`) are printed as one line, without a traceback.
"""

from __future__ import annotations

from pathlib import Path

import click

from .. import __version__
from .. import log
from ..config import load_config
from .common import AppContext, run_cli
from .keys import keys
from .models import models
from .net import bootstrap_cmd
from .peer import peer_cmd
from .generate import generate_cmd
from .status import status_cmd
from .demo import demo_cmd
from .ledger import ledger


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", prog_name="p2pinfer")
@click.option("--data-dir", type=click.Path(path_type=Path, file_okay=False), default=None,
              help="Where keys, models and the ledger live [default: $XDG_DATA_HOME/p2pinfer].")
@click.option("--config", "config_path", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="TOML configuration file [default: $XDG_CONFIG_HOME/p2pinfer/config.toml if present].")
@click.option("--log-json", is_flag=True, default=None, help="Log one JSON object per line instead of key=value.")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]), default=None,
              help="Minimum level of log lines [default: info].")
@click.pass_context
def cli(ctx: click.Context, data_dir: Path | None, config_path: Path | None, log_json: bool | None,
        log_level: str | None) -> None:
    """p2pinfer: a peer-to-peer network for AI inference."""
    config = load_config(config_path, data_dir=data_dir)
    log.configure(json=config.log_json if log_json is None else log_json, level=log_level or config.log_level)
    ctx.obj = AppContext(config=config)


cli.add_command(keys)
cli.add_command(models)
cli.add_command(bootstrap_cmd)
cli.add_command(peer_cmd)
cli.add_command(generate_cmd)
cli.add_command(status_cmd)
cli.add_command(demo_cmd)
cli.add_command(ledger)


def main() -> None:
    run_cli(cli)
