"""``p2pinfer peer``: serve models to the network until Ctrl-C or SIGTERM."""

from __future__ import annotations

from pathlib import Path

import click

from ..gguf.default_model import ensure_default_model
from ..identity import Identity
from ..log import get_logger
from ..net import NodeConfig
from ..peer import DEFAULT_SLOTS, ServingPeer
from ..runtime import ModelStore, resolve_models
from .common import AppContext
from .gguf import ClickProgress
from .net import PEERS_FILE, check_bootstrap, listen_addrs, read_peers_file, run_until_signal

log = get_logger("p2pinfer.cli.peer")


@click.command("peer")
@click.option("--listen", "listen", multiple=True, metavar="MULTIADDR",
              help="Address to listen on (repeatable) [default: config `listen`, else /ip4/0.0.0.0/tcp/4001].")
@click.option("--key", "key_file", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="Peer key file [default: DATA_DIR/peer.key, created if missing].")
@click.option("--bootstrap", "bootstrap", multiple=True, metavar="MULTIADDR",
              help="Bootstrap node to join (repeatable); also read from the config and bootstrap/peers.txt.")
@click.option("--announce", "announce", multiple=True, metavar="MULTIADDR",
              help="Public address to advertise in addition to the listen addresses (e.g. behind NAT).")
@click.option("--model", "model_specs", multiple=True, metavar="DIR|DIGEST|NAME",
              help="Model to serve (repeatable): a model folder (imported into the store) or a stored model "
                   "[default: the bundled SmolLM2-135M-Instruct].")
@click.option("--slots", type=click.IntRange(1, 1024), default=DEFAULT_SLOTS, show_default=True,
              help="How many requests to run at once.")
@click.pass_obj
def peer_cmd(app: AppContext, listen: tuple[str, ...], key_file: Path | None, bootstrap: tuple[str, ...],
             announce: tuple[str, ...], model_specs: tuple[str, ...], slots: int) -> None:
    """Join the network and serve models: bid for requests, run the ones this peer wins.

    Prints our multiaddrs (ending in /p2p/<peer id>) on stdout, one per line, once listening.
    """
    identity = Identity.load_or_create(key_file or app.config.key_file)
    peers = check_bootstrap([*bootstrap, *app.config.bootstrap, *read_peers_file(PEERS_FILE)])
    if not peers:
        log.warning("peer.no_bootstrap", hint="pass --bootstrap MULTIADDR or list nodes in the config; "
                                              "running alone until someone connects to us")
    store = ModelStore(app.config.models_dir)
    specs = list(model_specs)
    if not specs:
        progress = ClickProgress("importing the default model (first start only)")
        try:
            record = ensure_default_model(store, progress=progress)
        finally:
            progress.close()
        specs = [record.digest_hex]
    models = resolve_models(store, specs)
    config = NodeConfig(listen=listen_addrs(app, listen), bootstrap=peers, role="peer", extra_addrs=announce)
    run_until_signal(lambda: ServingPeer(identity, config, models, slots=slots), config.listen)
