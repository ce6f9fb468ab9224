"""``p2pinfer peer``: serve models to the network until Ctrl-C or SIGTERM."""

from __future__ import annotations

from pathlib import Path

import click

from ..control import control_socket_path
from ..errors import ConfigError
from ..identity import Identity
from ..ledger import LEDGER_FILE
from ..log import get_logger
from ..net import NodeConfig
from ..peer import DEFAULT_SLOTS, ServingPeer
from ..runtime import ModelStore, resolve_models
from .common import AppContext
from .gguf import ClickProgress, ensure_default_model_with_progress
from .net import (PEERS_FILE, announce_addrs, check_bootstrap, listen_addrs, node_options, read_peers_file,
                  run_until_signal)

log = get_logger("p2pinfer.cli.peer")


@click.command("peer")
@node_options
@click.option("--model", "model_specs", multiple=True, metavar="DIR|DIGEST|NAME",
              help="Model to serve (repeatable): a model folder (imported into the store) or a stored model "
                   "[default: the bundled SmolLM2-135M-Instruct].")
@click.option("--slots", type=click.IntRange(1, 1024), default=DEFAULT_SLOTS, show_default=True,
              help="How many requests to run at once.")
@click.option("--gateway", "gateway", metavar="HOST:PORT", default=None,
              help="Serve the OpenAI-compatible API here, e.g. 127.0.0.1:8080 (a bare port means 127.0.0.1) "
                   "[default: config [gateway] listen, else off]. See docs/gateway.md.")
@click.option("--gateway-key", "gateway_key", metavar="KEY", envvar="P2PINFER_GATEWAY_KEY", default=None,
              help="Require this bearer key on the gateway (also $P2PINFER_GATEWAY_KEY or config [gateway] key).")
@click.pass_obj
def peer_cmd(app: AppContext, listen: tuple[str, ...], key_file: Path | None, bootstrap: tuple[str, ...],
             announce: tuple[str, ...], model_specs: tuple[str, ...], slots: int, gateway: str | None,
             gateway_key: str | None) -> None:
    """Join the network and serve models: bid for requests, run the ones this peer wins.

    Prints our multiaddrs (ending in /p2p/<peer id>) on stdout, one per line, once listening. Serves a local
    control socket in the data dir, which `p2pinfer status` reads.
    """
    gateway_bind, gateway_key = gateway_settings(app, gateway, gateway_key)
    announce = announce_addrs(app, announce)
    identity = Identity.load_or_create(key_file or app.config.key_file)
    peers = check_bootstrap([*bootstrap, *app.config.bootstrap, *read_peers_file(PEERS_FILE)])
    if not peers:
        log.warning("peer.no_bootstrap", hint="pass --bootstrap MULTIADDR or list nodes in the config; "
                                              "running alone until someone connects to us")
    store = ModelStore(app.config.models_dir)
    specs = list(model_specs)
    if not specs:
        record = ensure_default_model_with_progress(store, first="first start")
        specs = [record.digest_hex]
    bars: list[ClickProgress] = []

    def calibrating_bar(name: str) -> ClickProgress:  # a model is served only once its tolerance is measured
        bars.append(ClickProgress(f"calibrating {name}'s tolerance (first start only)"))
        return bars[-1]

    try:
        models = resolve_models(store, specs, calibration_progress=calibrating_bar)
    finally:
        for bar in bars:
            bar.close()
    config = NodeConfig(listen=listen_addrs(app, listen), bootstrap=peers, role="peer", extra_addrs=announce)
    control = control_socket_path(app.config.data_dir)
    app.config.data_dir.mkdir(parents=True, exist_ok=True)
    ledger = app.config.data_dir / LEDGER_FILE  # receipts, verdicts, credits and penalties survive restarts
    run_until_signal(lambda: ServingPeer(identity, config, models, slots=slots, gateway=gateway_bind,
                                         gateway_key=gateway_key, control_socket=control, ledger=ledger),
                     config.listen, data_dir=app.config.data_dir)


def gateway_settings(app: AppContext, gateway: str | None, key: str | None) -> tuple[tuple[str, int] | None, str | None]:
    """The gateway's (host, port) and key from the options, else the config's ``[gateway]`` section."""
    from ..gateway.http import parse_bind  # light: no hypercorn import until the gateway is served

    section = app.config.extra.get("gateway", {})
    if not isinstance(section, dict) or set(section) - {"listen", "key"}:
        raise ConfigError("config [gateway]: only `listen = \"127.0.0.1:8080\"` and `key = \"...\"` are known")
    gateway = gateway or section.get("listen")
    key = key or section.get("key")
    if gateway is not None and not isinstance(gateway, str) or key is not None and not isinstance(key, str):
        raise ConfigError("config [gateway]: listen and key must be strings")
    if key is not None and not key.strip():
        raise ConfigError("the gateway key is empty; give a non-empty --gateway-key or leave it out")
    return (parse_bind(gateway) if gateway else None), key
