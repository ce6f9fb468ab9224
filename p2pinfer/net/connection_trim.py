"""One connection per peer pair, the same one at both ends: :mod:`p2pinfer.net.duplicates` on the swarm.

Upstream behaviour (py-libp2p 0.8.1): when a connection takes a peer past ``max_connections_per_peer`` (1,
see :mod:`p2pinfer.net.host`), ``Swarm._trim_connections`` closes the excess, but never a connection younger
than its 20 s grace period, and otherwise the one with the fewest streams, oldest by the *local* clock. Two
peers that dial each other at once therefore hold two connections each, against our limit of one, for as
long as nothing else happens; and when a trim does run, each end may close a different one. With the grace
period at 0 both connections died in every round of a simultaneous dial (tests/net/test_simultaneous_dial.py).

:func:`install_duplicate_trim` replaces that method on one host's swarm (no global patching):

* Direct duplicates are settled by :func:`~p2pinfer.net.duplicates.duplicates_to_close`, which both ends
  compute alike, at once (no grace period needed: both ends close the same connection).
* A losing connection leaves the swarm's table at once, so every new stream goes to the kept one. It is
  closed only once the other end answers a ping over the kept connection, and when the streams it already
  carries have ended (a request the race placed on it still completes), after at most :data:`DRAIN_LIMIT_S`.
  The ping matters on a loaded machine: the other end may still be setting up (upgrading) the kept
  connection while it dials us, and uses the losing one meanwhile; closed at once, the loser left it with no
  connection in use, so its next stream dialled again, and that dial was closed as a duplicate in turn, over
  and over until its upgrade finished. An answer on the kept connection proves the other end runs it, so it
  has applied the same rule and put its new streams there: the pair converges, no redial. Pubsub's
  long-lived streams do not hold it open: once the kept connection answered, pubsub moves its stream there
  (:func:`on_duplicate_settled`, :class:`p2pinfer.net.gossip.PatientPubsub`), before the loser closes, so no
  write is lost on it.
  If the kept connection goes away first, the losing one is taken back into use at once (in
  ``remove_conn``, before anyone is told of a disconnection): the other end may never have completed the
  kept one (its inbound upgrade timed out on a loaded machine), and then uses the loser.
* Anything left over (several direct connections dialled by the same peer, relayed ones) goes to
  py-libp2p's own trim as before.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import trio
from libp2p.abc import IHost, INetConn
from libp2p.peer.id import ID
from libp2p.rcmgr import Direction

from libp2p.host.ping import ID as PING_PROTOCOL
from libp2p.host.ping import perform_ping_roundtrip
from libp2p.protocol_muxer.multiselect_client import MultiselectClient
from libp2p.protocol_muxer.multiselect_communicator import MultiselectCommunicator

from ..log import get_logger
from .duplicates import Dialer, duplicates_to_close
from .publicaddrs import CIRCUIT

log = get_logger("p2pinfer.net.connection_trim")

# How long a losing connection may go on carrying the streams that were opened on it before both ends agreed:
# longer than any honest request (a slow peer's generation of the longest answer), and it bounds nothing an
# attacker could grow: streams count against the per-peer stream limits on whichever connection they are.
DRAIN_LIMIT_S = 120.0
DRAIN_POLL_S = 0.25
# Between pings over the kept connection that were not answered (the other end is still setting it up).
CONFIRM_RETRY_S = 1.0
# Streams that live as long as the connection: they would hold a loser open until the drain limit.
LONG_LIVED_PROTOCOL_PREFIXES = ("/meshsub/",)


LoserHook = Callable[[INetConn], None]


def on_duplicate_settled(host: IHost, hook: LoserHook) -> None:
    """Call ``hook(conn)`` when a losing connection ``conn`` is about to drain (still open, out of use, the
    kept connection answered at the other end): the moment to move long-lived streams off it, before it
    closes (a write on it while it closes would be lost)."""
    swarm: Any = host.get_network()
    hooks: list[LoserHook] = getattr(swarm, "_p2pinfer_loser_hooks", [])
    hooks.append(hook)
    swarm._p2pinfer_loser_hooks = hooks


def install_duplicate_trim(host: IHost) -> None:
    """Settle duplicate connections on ``host``'s swarm by the shared rule (see the module docstring)."""
    swarm: Any = host.get_network()
    upstream_trim = swarm._trim_connections
    upstream_remove = swarm.remove_conn
    local = swarm.get_peer_id().to_bytes()
    draining: dict[ID, list[INetConn]] = {}  # losing connections still open, per peer

    def trim_connections(peer_id: ID) -> None:
        conns = [c for c in swarm.connections.get(peer_id, []) if not c.is_closed]
        losers = [conns[i] for i in duplicates_to_close(local, peer_id.to_bytes(), [dialer_of(c) for c in conns])]
        if losers:
            swarm.connections[peer_id] = [c for c in swarm.connections[peer_id] if c not in losers]
            for conn in losers:
                log.debug("connection.duplicate_closing", peer=peer_id.to_base58(), dialer=dialer_of(conn).value,
                          streams=len(conn.get_streams()))
                swarm.cleanup_connection_health(peer_id, conn)
                draining.setdefault(peer_id, []).append(conn)
                swarm.manager.run_task(drain_then_close, peer_id, conn)
        if len(swarm.connections.get(peer_id, [])) > swarm.connection_config.max_connections_per_peer:
            upstream_trim(peer_id)

    def remove_conn(swarm_conn: Any) -> None:
        """py-libp2p's, then: when the last connection in use to a peer is gone while a losing one is still
        open, that one is used again. In the same step, before anyone is told of the disconnection, so the
        peer never looks disconnected (pubsub would drop it and forget its subscriptions)."""
        upstream_remove(swarm_conn)
        peer_id = swarm_conn.muxed_conn.peer_id
        if any(not c.is_closed for c in swarm.connections.get(peer_id, [])):
            return
        for conn in draining.get(peer_id, []):
            if conn is not swarm_conn and not conn.is_closed:
                forget_draining(peer_id, conn)
                swarm.connections.setdefault(peer_id, []).append(conn)
                swarm.initialize_connection_health(peer_id, conn)
                log.debug("connection.duplicate_restored", peer=peer_id.to_base58())
                return

    def forget_draining(peer_id: ID, conn: INetConn) -> None:
        rest = [c for c in draining.get(peer_id, []) if c is not conn]
        if rest:
            draining[peer_id] = rest
        else:
            draining.pop(peer_id, None)

    def in_use(peer_id: ID, conn: INetConn) -> bool:
        return conn in swarm.connections.get(peer_id, [])

    async def other_end_runs_kept(peer_id: ID, loser: INetConn) -> None:
        """Returns once the other end answered a ping over the connection kept in ``loser``'s place (or the
        loser is closed or back in use)."""
        while not loser.is_closed and not in_use(peer_id, loser):
            kept = [c for c in swarm.connections.get(peer_id, []) if not c.is_closed]
            if kept and await answers_ping(kept[0]):
                return
            await trio.sleep(CONFIRM_RETRY_S)

    async def drain_then_close(peer_id: ID, conn: INetConn) -> None:
        try:
            with trio.move_on_after(DRAIN_LIMIT_S):
                await other_end_runs_kept(peer_id, conn)
                if not conn.is_closed and not in_use(peer_id, conn):
                    for hook in list(getattr(swarm, "_p2pinfer_loser_hooks", [])):
                        try:
                            hook(conn)
                        except Exception as exc:  # a hook must never keep a loser open
                            log.debug("connection.loser_hook_failed", error=repr(exc)[:200])
                while not conn.is_closed and carries_work(conn) and not in_use(peer_id, conn):
                    await trio.sleep(DRAIN_POLL_S)
        finally:
            forget_draining(peer_id, conn)
            if conn not in swarm.connections.get(peer_id, []):  # not taken back into use meanwhile
                with trio.CancelScope(shield=True), trio.move_on_after(5):
                    try:
                        await conn.close()
                    except Exception as exc:
                        log.debug("connection.duplicate_close_failed", error=repr(exc)[:200])

    swarm._trim_connections = trim_connections
    swarm.remove_conn = remove_conn


async def answers_ping(conn: INetConn) -> bool:
    """One ping over ``conn`` itself (not whichever connection the swarm would pick): True when the other end
    answered, which it does only once it runs the connection (its upgrade done, the connection registered)."""
    try:
        stream = await conn.new_stream()  # type: ignore[attr-defined]
    except Exception as exc:
        log.debug("connection.confirm_failed", error=repr(exc)[:200])
        return False
    try:
        await MultiselectClient().select_one_of([PING_PROTOCOL], MultiselectCommunicator(stream))
        stream.set_protocol(PING_PROTOCOL)
        await perform_ping_roundtrip(stream)
        await stream.close()
        return True
    except Exception as exc:  # reset, closed, timed out: not (yet) running at the other end
        log.debug("connection.confirm_failed", error=repr(exc)[:200])
        with trio.CancelScope(shield=True):
            try:
                await stream.reset()
            except Exception:
                pass
        return False


def dialer_of(conn: INetConn) -> Dialer:
    """Who opened ``conn``, seen from this end."""
    try:
        if any(CIRCUIT in str(a) for a in conn.get_transport_addresses()):
            return Dialer.RELAYED
    except Exception:
        return Dialer.UNKNOWN
    direction = getattr(conn, "direction", Direction.UNKNOWN)
    if direction == Direction.OUTBOUND:
        return Dialer.US
    if direction == Direction.INBOUND:
        return Dialer.THEM
    return Dialer.UNKNOWN


def carries_work(conn: INetConn) -> bool:
    """True while ``conn`` has a stream other than a long-lived one (or one still being negotiated)."""
    for stream in conn.get_streams():
        protocol = str(stream.get_protocol() or "")
        if not protocol.startswith(LONG_LIVED_PROTOCOL_PREFIXES):
            return True
    return False
