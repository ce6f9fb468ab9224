"""``p2pinfer keys``: create and inspect peer keys."""

from __future__ import annotations

from pathlib import Path

import click

from ..identity import Identity
from ..log import get_logger
from .common import AppContext


@click.group()
def keys() -> None:
    """Create and inspect peer identity keys."""


@keys.command("new")
@click.option("--out", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="Where to write the key [default: DATA_DIR/peer.key].")
@click.option("--force", is_flag=True, help="Overwrite an existing key file (its identity is lost).")
@click.pass_obj
def keys_new(app: AppContext, out: Path | None, force: bool) -> None:
    """Create a new Ed25519 peer key (mode 0600) and print its peer ID."""
    path = out or app.config.key_file
    identity = Identity.generate()
    identity.save(path, overwrite=force)
    get_logger("p2pinfer.keys").info("keys.created", path=str(path), peer_id=identity.peer_id)
    click.echo(f"wrote {path}")
    click.echo(f"peer id:    {identity.peer_id}")
    click.echo(f"public key: {identity.public_key.hex()}")


@keys.command("show")
@click.argument("file", type=click.Path(path_type=Path, dir_okay=False), required=False)
@click.pass_obj
def keys_show(app: AppContext, file: Path | None) -> None:
    """Print the peer ID and public key of FILE [default: DATA_DIR/peer.key]."""
    identity = Identity.load(file or app.config.key_file)
    click.echo(f"peer id:    {identity.peer_id}")
    click.echo(f"public key: {identity.public_key.hex()}")
