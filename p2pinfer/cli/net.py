"""``p2pinfer bootstrap``, and what every long-running node command shares: run until Ctrl-C or SIGTERM."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any, Callable, Sequence

import click
import trio

from ..errors import P2PInferError
from ..identity import Identity
from ..log import get_logger
from ..net import Node, NodeConfig, parse_peer_multiaddr
from .common import AppContext

log = get_logger("p2pinfer.cli.net")

DEFAULT_LISTEN = ("/ip4/0.0.0.0/tcp/4001",)
# bootstrap/peers.txt of the source tree; installed copies read the one shipped next to the package if any.
PEERS_FILE = Path(__file__).resolve().parents[2] / "bootstrap" / "peers.txt"

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


def check_bootstrap(addrs: Sequence[str]) -> list[str]:
    for addr in addrs:
        try:
            parse_peer_multiaddr(addr)
        except ValueError as exc:
            raise P2PInferError(f"bad --bootstrap address: {exc}") from None
    return list(dict.fromkeys(addrs))


async def _run_until_signal(factory: Callable[[], Any], on_started: Callable[[Node], None]) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:

            async def stop_on_signal() -> None:
                async for signum in signals:
                    log.info("node.signal", signal=signal.Signals(signum).name)
                    nursery.cancel_scope.cancel()
                    return

            nursery.start_soon(stop_on_signal)
            async with factory() as running:
                on_started(running if isinstance(running, Node) else running.node)
                await trio.sleep_forever()


def run_until_signal(factory: Callable[[], Any], listen: Sequence[str]) -> None:
    """Run ``factory()`` (a Node, or something holding one as ``.node``) until SIGINT/SIGTERM.

    Prints the node's multiaddrs (one per line, ending in /p2p/<peer id>) on stdout once it listens.
    """

    def started(node: Node) -> None:
        for addr in node.addrs:
            click.echo(addr)

    try:
        try:
            trio.run(_run_until_signal, factory, started)
        except BaseExceptionGroup as group:  # a start-up error surfaces wrapped by the nursery: unwrap it
            error: BaseException = group
            while isinstance(error, BaseExceptionGroup) and len(error.exceptions) == 1:
                error = error.exceptions[0]
            if isinstance(error, (P2PInferError, OSError, ValueError)):
                raise error from None
            raise
    except P2PInferError:
        raise
    except OSError as exc:
        raise P2PInferError(f"cannot listen on {', '.join(listen)}: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise P2PInferError(str(exc)) from None


def listen_addrs(app: AppContext, listen: tuple[str, ...]) -> tuple[str, ...]:
    return listen or app.config.listen or DEFAULT_LISTEN


def node_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """The options every long-running node command takes: --listen, --key, --bootstrap, --announce."""
    for option in reversed([
        click.option("--listen", "listen", multiple=True, metavar="MULTIADDR",
                     help="Address to listen on (repeatable) [default: config `listen`, else /ip4/0.0.0.0/tcp/4001]."),
        click.option("--key", "key_file", type=click.Path(path_type=Path, dir_okay=False), default=None,
                     help="Peer key file [default: DATA_DIR/peer.key, created if missing]."),
        click.option("--bootstrap", "bootstrap", multiple=True, metavar="MULTIADDR",
                     help="Bootstrap node to join (repeatable); also read from the config and bootstrap/peers.txt."),
        click.option("--announce", "announce", multiple=True, metavar="MULTIADDR",
                     help="Public address to advertise in addition to the listen addresses (e.g. behind NAT)."),
    ]):
        command = option(command)
    return command


@click.command("bootstrap")
@node_options
@click.option("--page", "page", metavar="HOST:PORT", default=None,
              help="Serve the network page (the peers this node knows, live) at http://HOST:PORT/ (a bare port means "
                   "127.0.0.1); no OpenAI routes. See docs/gateway.md.")
@click.option("--page-key", "page_key", metavar="KEY", envvar="P2PINFER_PAGE_KEY", default=None,
              help="Require this bearer key for the page's data (open http://HOST:PORT/#key=KEY).")
@click.pass_obj
def bootstrap_cmd(app: AppContext, listen: tuple[str, ...], key_file: Path | None,
                  bootstrap: tuple[str, ...], announce: tuple[str, ...], page: str | None,
                  page_key: str | None) -> None:
    """Run a bootstrap node: a DHT server and gossip relay that serves no models.

    Prints the multiaddrs (ending in /p2p/<peer id>) that others should use, one per line. Serves a local
    control socket in the data dir, which `p2pinfer status` reads.
    """
    from ..bootstrap_node import BootstrapNode
    from ..control import control_socket_path
    from ..gateway.http import parse_bind

    page_bind = parse_bind(page) if page else None
    identity = Identity.load_or_create(key_file or app.config.key_file)
    peers = check_bootstrap([*bootstrap, *app.config.bootstrap, *read_peers_file(PEERS_FILE)])
    config = NodeConfig(listen=listen_addrs(app, listen), bootstrap=peers, role="bootstrap", extra_addrs=announce)
    app.config.data_dir.mkdir(parents=True, exist_ok=True)
    control = control_socket_path(app.config.data_dir)
    run_until_signal(lambda: BootstrapNode(identity, config, control_socket=control, page=page_bind,
                                           page_key=page_key), config.listen)
