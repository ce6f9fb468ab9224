"""``p2pinfer bootstrap`` and ``p2pinfer peer``: run a network node until Ctrl-C or SIGTERM."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Callable, Sequence

import click
import trio

from ..errors import P2PInferError
from ..identity import Identity
from ..log import get_logger
from ..net import Node, NodeConfig, parse_peer_multiaddr
from ..wire import ModelOffer
from .common import AppContext

log = get_logger("p2pinfer.cli.net")

DEFAULT_LISTEN = ("/ip4/0.0.0.0/tcp/4001",)
# bootstrap/peers.txt of the source tree; installed copies read the one shipped next to the package if any.
PEERS_FILE = Path(__file__).resolve().parents[2] / "bootstrap" / "peers.txt"

# What a peer serves: (models, free slots, total slots). The runtime plugs in its own provider later.
CapacityProvider = Callable[[], tuple[Sequence[ModelOffer], int, int]]


def read_peers_file(path: Path) -> list[str]:
    """One multiaddr ending in ``/p2p/<peer id>`` per line; ``#`` starts a comment; blank lines are ignored."""
    if not path.exists():
        return []
    out = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        try:
            parse_peer_multiaddr(line)
        except ValueError as exc:
            raise P2PInferError(f"{path}:{number}: {exc}") from None
        out.append(line)
    return out


def _check_bootstrap(addrs: Sequence[str]) -> list[str]:
    for addr in addrs:
        try:
            parse_peer_multiaddr(addr)
        except ValueError as exc:
            raise P2PInferError(f"bad --bootstrap address: {exc}") from None
    return list(dict.fromkeys(addrs))


async def _run_until_signal(node_factory: Callable[[], Node], on_started: Callable[[Node], None]) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:

            async def stop_on_signal() -> None:
                async for signum in signals:
                    log.info("node.signal", signal=signal.Signals(signum).name)
                    nursery.cancel_scope.cancel()
                    return

            nursery.start_soon(stop_on_signal)
            async with node_factory() as node:
                on_started(node)
                await trio.sleep_forever()


def run_node(identity: Identity, config: NodeConfig, capacity: CapacityProvider | None = None) -> None:
    """Run a node in this process until SIGINT/SIGTERM; prints its multiaddrs (one per line) on stdout."""

    def started(node: Node) -> None:
        for addr in node.addrs:
            click.echo(addr)
        if capacity is not None:
            models, free, total = capacity()
            node.update_capacity(models=models, free_slots=free, total_slots=total)

    try:
        trio.run(_run_until_signal, lambda: Node(identity, config), started)
    except OSError as exc:
        raise P2PInferError(f"cannot listen on {', '.join(config.listen)}: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise P2PInferError(str(exc)) from None


def _listen(app: AppContext, listen: tuple[str, ...]) -> tuple[str, ...]:
    return listen or app.config.listen or DEFAULT_LISTEN


@click.command("bootstrap")
@click.option("--listen", "listen", multiple=True, metavar="MULTIADDR",
              help="Address to listen on (repeatable) [default: config `listen`, else /ip4/0.0.0.0/tcp/4001].")
@click.option("--key", "key_file", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="Peer key file [default: DATA_DIR/peer.key, created if missing].")
@click.option("--bootstrap", "bootstrap", multiple=True, metavar="MULTIADDR",
              help="Other bootstrap nodes to join (repeatable); also read from the config and bootstrap/peers.txt.")
@click.option("--announce", "announce", multiple=True, metavar="MULTIADDR",
              help="Public address to advertise in addition to the listen addresses (e.g. behind NAT).")
@click.pass_obj
def bootstrap_cmd(app: AppContext, listen: tuple[str, ...], key_file: Path | None,
                  bootstrap: tuple[str, ...], announce: tuple[str, ...]) -> None:
    """Run a bootstrap node: a DHT server and gossip relay that serves no models.

    Prints the multiaddrs (ending in /p2p/<peer id>) that others should use, one per line.
    """
    identity = Identity.load_or_create(key_file or app.config.key_file)
    peers = _check_bootstrap([*bootstrap, *app.config.bootstrap, *read_peers_file(PEERS_FILE)])
    config = NodeConfig(listen=_listen(app, listen), bootstrap=peers, role="bootstrap", extra_addrs=announce)
    run_node(identity, config)


def make_peer_command(capacity: CapacityProvider | None = None) -> click.Command:
    """The ``peer`` command; ``capacity`` says which models it announces (none by default)."""

    @click.command("peer")
    @click.option("--listen", "listen", multiple=True, metavar="MULTIADDR",
                  help="Address to listen on (repeatable) [default: config `listen`, else /ip4/0.0.0.0/tcp/4001].")
    @click.option("--key", "key_file", type=click.Path(path_type=Path, dir_okay=False), default=None,
                  help="Peer key file [default: DATA_DIR/peer.key, created if missing].")
    @click.option("--bootstrap", "bootstrap", multiple=True, metavar="MULTIADDR",
                  help="Bootstrap node to join through (repeatable); also read from the config and "
                       "bootstrap/peers.txt.")
    @click.option("--announce", "announce", multiple=True, metavar="MULTIADDR",
                  help="Public address to advertise in addition to the listen addresses (e.g. behind NAT).")
    @click.pass_obj
    def peer_cmd(app: AppContext, listen: tuple[str, ...], key_file: Path | None,
                 bootstrap: tuple[str, ...], announce: tuple[str, ...]) -> None:
        """Join the network as a peer: DHT server, capacity gossip, announces what it serves.

        Prints our multiaddrs (ending in /p2p/<peer id>) on stdout, one per line.
        """
        identity = Identity.load_or_create(key_file or app.config.key_file)
        peers = _check_bootstrap([*bootstrap, *app.config.bootstrap, *read_peers_file(PEERS_FILE)])
        if not peers:
            log.warning("peer.no_bootstrap", hint="pass --bootstrap MULTIADDR or list nodes in the config; "
                                                  "running alone until someone connects to us")
        config = NodeConfig(listen=_listen(app, listen), bootstrap=peers, role="peer", extra_addrs=announce)
        run_node(identity, config, capacity)

    return peer_cmd


peer_cmd = make_peer_command()
