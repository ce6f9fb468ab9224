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
from ..datadir import DataDirLock
from ..net import Node, NodeConfig, RelayLimits, parse_peer_multiaddr
from ..net.addrs import parse_multiaddr
from ..net.publicaddrs import is_wildcard
from .common import AppContext

log = get_logger("p2pinfer.cli.net")

DEFAULT_LISTEN = ("/ip4/0.0.0.0/tcp/4001",)
# The bootstrap list ships inside the package (package data), so installed copies read it too.
PEERS_FILE = Path(__file__).resolve().parents[1] / "peers.txt"

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


def run_until_signal(factory: Callable[[], Any], listen: Sequence[str], *, data_dir: Path | None = None) -> None:
    """Run ``factory()`` (a Node, or something holding one as ``.node``) until SIGINT/SIGTERM.

    Prints the node's multiaddrs (one per line, ending in /p2p/<peer id>) on stdout once it listens, then
    one line ``reachability: public|relayed|unreachable (reason)``. With ``data_dir``, holds that dir's
    lock while running (a second process on the same dir is refused).
    """

    def started(node: Node) -> None:
        for addr in node.addrs:
            click.echo(addr)
        click.echo(node.reachability)

    lock = DataDirLock(data_dir) if data_dir is not None else None
    if lock is not None:
        lock.acquire()
    try:
        _run_and_translate_errors(factory, started, listen)
    finally:
        if lock is not None:
            lock.release()


def _run_and_translate_errors(factory: Callable[[], Any], started: Callable[[Node], None],
                              listen: Sequence[str]) -> None:
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


def announce_addrs(app: AppContext, announce: tuple[str, ...]) -> tuple[str, ...]:
    """``--announce``, else the config's ``announce``; each must be a multiaddr without ``/p2p/``."""
    addrs = announce or app.config.announce
    for addr in addrs:
        try:
            parse_multiaddr(addr)
        except ValueError as exc:
            raise P2PInferError(f"bad --announce address: {exc}") from None
        if "/p2p/" in addr:
            raise P2PInferError(f"bad --announce address {addr!r}: leave out /p2p/<peer id>, it is added for you")
        if is_wildcard(addr):
            raise P2PInferError(f"bad --announce address {addr!r}: a wildcard address cannot be dialled; give "
                                f"the public IP or DNS name, e.g. /dns4/boot.example.org/tcp/4001")
    return tuple(addrs)


def relay_limits(app: AppContext, max_reservations: int | None, circuit_duration: int | None,
                 circuit_bytes: int | None) -> RelayLimits:
    """Relay limits from the options, else the config's ``[relay]`` section, else the defaults."""
    section = app.config.extra.get("relay", {})
    known = {"max_reservations", "max_circuits_per_peer", "circuit_duration_s", "circuit_bytes", "reservation_ttl_s"}
    if not isinstance(section, dict) or set(section) - known:
        raise P2PInferError(f"config [relay]: only {', '.join(sorted(known))} are known")
    values = {k: v for k, v in section.items()}
    for key, option in (("max_reservations", max_reservations), ("circuit_duration_s", circuit_duration),
                        ("circuit_bytes", circuit_bytes)):
        if option is not None:
            values[key] = option
    for key, value in values.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise P2PInferError(f"relay limit {key} must be a positive whole number, not {value!r}")
    return RelayLimits(**values)


def relay_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """Options of a node that relays for others (bootstrap nodes do by default)."""
    for option in reversed([
        click.option("--relay/--no-relay", "relay", default=True, show_default=True,
                     help="Relay connections for peers behind NAT (Circuit Relay v2)."),
        click.option("--relay-max-reservations", type=click.IntRange(1, 100_000), default=None,
                     help=f"Peers that may hold a relay reservation at once [default: config [relay], else "
                          f"{RelayLimits().max_reservations}]."),
        click.option("--relay-circuit-duration", type=click.IntRange(1, 86_400), default=None, metavar="SECONDS",
                     help=f"A relayed connection is closed after this long [default: "
                          f"{RelayLimits().circuit_duration_s}]."),
        click.option("--relay-circuit-bytes", type=click.IntRange(1, 1 << 40), default=None, metavar="BYTES",
                     help=f"... or after this many bytes [default: {RelayLimits().circuit_bytes}]."),
    ]):
        command = option(command)
    return command


def node_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """The options every long-running node command takes: --listen, --key, --bootstrap, --announce."""
    for option in reversed([
        click.option("--listen", "listen", multiple=True, metavar="MULTIADDR",
                     help="Address to listen on (repeatable) [default: config `listen`, else /ip4/0.0.0.0/tcp/4001]."),
        click.option("--key", "key_file", type=click.Path(path_type=Path, dir_okay=False), default=None,
                     help="Peer key file [default: DATA_DIR/peer.key, created if missing]."),
        click.option("--bootstrap", "bootstrap", multiple=True, metavar="MULTIADDR",
                     help="Bootstrap node to join (repeatable); also read from the config and the shipped peers.txt."),
        click.option("--announce", "announce", multiple=True, metavar="MULTIADDR",
                     help="Public address to advertise (repeatable), e.g. /dns4/boot.example.org/tcp/4001 or "
                          "/ip4/<public ip>/tcp/4001 behind port forwarding [default: config `announce`]."),
    ]):
        command = option(command)
    return command


@click.command("bootstrap")
@node_options
@relay_options
@click.pass_obj
def bootstrap_cmd(app: AppContext, listen: tuple[str, ...], key_file: Path | None,
                  bootstrap: tuple[str, ...], announce: tuple[str, ...], relay: bool,
                  relay_max_reservations: int | None, relay_circuit_duration: int | None,
                  relay_circuit_bytes: int | None) -> None:
    """Run a bootstrap node: a DHT server, gossip relay and connection relay (for peers behind NAT) that
    serves no models.

    Prints the multiaddrs (ending in /p2p/<peer id>) that others should use, one per line, then its
    reachability line.
    """
    limits = relay_limits(app, relay_max_reservations, relay_circuit_duration, relay_circuit_bytes)
    extra = announce_addrs(app, announce)
    identity = Identity.load_or_create(key_file or app.config.key_file)
    own = [a for a in read_peers_file(PEERS_FILE) if a.rstrip("/").endswith(identity.peer_id)]
    peers = check_bootstrap([a for a in [*bootstrap, *app.config.bootstrap, *read_peers_file(PEERS_FILE)]
                             if a not in own])
    config = NodeConfig(listen=listen_addrs(app, listen), bootstrap=peers, role="bootstrap", extra_addrs=extra,
                        relay_hop=relay, relay_limits=limits)
    run_until_signal(lambda: Node(identity, config), config.listen, data_dir=app.config.data_dir)
