"""Direct connections other peers opened to us, as our own listener saw them: the evidence that a dial-back
really reached us.

An AutoNAT server's "I reached you" is only its word; colluding servers (one operator, many keys) can all say
it to a peer behind NAT, which would then announce a direct address nobody can dial. But a real dial-back is
a TCP connection that *we* accept on our listen port, followed by a Noise handshake in which the server
proves its peer ID. :func:`watch_inbound` wraps the host's upgrader so that every such handshake (inbound,
not dialled by us, not relayed) is offered to :class:`InboundHandshakes`, which keeps it only for the servers
we are waiting on (bounded: at most a few entries per server asked, nothing for anyone else).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator, Sequence

import trio
from libp2p.abc import IHost

MAX_SEEN_PER_PEER = 4  # a server dials back at most MAX_DIAL_BACK_ADDRS addresses per request


class InboundWatch:
    """The servers one round of dial-back requests waits on, and the IPs their connections came from."""

    def __init__(self, peer_ids: Sequence[str]) -> None:
        self.seen: dict[str, list[str]] = {p: [] for p in peer_ids}
        self.changed = trio.Event()

    def offer(self, peer_id: str, ip: str) -> None:
        ips = self.seen.get(peer_id)
        if ips is None or len(ips) >= MAX_SEEN_PER_PEER:
            return
        ips.append(ip)
        self.changed.set()
        self.changed = trio.Event()

    async def wait_for(self, peer_id: str, timeout: float) -> str | None:
        """The IP ``peer_id``'s connection came from (as our socket saw it), waiting up to ``timeout`` for it."""
        with trio.move_on_after(timeout):
            while not self.seen.get(peer_id):
                await self.changed.wait()
        ips = self.seen.get(peer_id)
        return ips[0] if ips else None


class InboundHandshakes:
    """The watches open now; every inbound direct handshake is offered to each."""

    def __init__(self) -> None:
        self._watches: list[InboundWatch] = []
        self.seen = 0  # inbound direct handshakes (all peers), for tests and logs

    @contextmanager
    def watching(self, peer_ids: Sequence[str]) -> Iterator[InboundWatch]:
        watch = InboundWatch(peer_ids)
        self._watches.append(watch)
        try:
            yield watch
        finally:
            self._watches.remove(watch)

    def record(self, peer_id: str, ip: str) -> None:
        self.seen += 1
        for watch in self._watches:
            watch.offer(peer_id, ip)


def watch_inbound(host: IHost, handshakes: InboundHandshakes) -> None:
    """Offer every inbound, direct, secured connection of ``host`` to ``handshakes``.

    py-libp2p 0.8.1 has no event for a connection that is secured but never multiplexed (a dial-back closes
    right after the handshake), so the upgrader's ``upgrade_security`` is wrapped on this host's instance.
    Only connections our TCP listener accepted count: ``is_initiator`` is False on the raw connection (a
    hole punch dials out and then plays the responder: not counted), and relayed connections never pass here
    (the circuit transport secures them elsewhere) and say ``RELAYED`` if they ever did."""
    upgrader: Any = host.get_network().upgrader  # type: ignore[attr-defined]
    original = upgrader.upgrade_security

    async def upgrade_security(raw_conn: Any, is_initiator: bool, peer_id: Any = None) -> Any:
        secured = await original(raw_conn, is_initiator, peer_id)
        if not is_initiator and getattr(raw_conn, "is_initiator", True) is False:
            try:
                kind = raw_conn.get_connection_type()
                remote = raw_conn.get_remote_address()
                if getattr(kind, "name", "") == "DIRECT" and remote:
                    handshakes.record(secured.get_remote_peer().to_base58(), str(remote[0]))
            except Exception:  # an odd connection is no evidence; never break the upgrade for it
                pass
        return secured

    upgrader.upgrade_security = upgrade_security
