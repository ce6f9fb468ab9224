"""A real attacking host: its own key, its own libp2p host on 127.0.0.1, raw bytes on the wire.

Nothing here patches p2pinfer: the attacker speaks to the target over TCP like any other peer and only
misbehaves in what it writes.
"""

from __future__ import annotations

import struct
from contextlib import AsyncExitStack
from typing import Any

import multiaddr
import trio
from libp2p.abc import IHost, INetStream
from libp2p.custom_types import TProtocol

from p2pinfer.identity import Identity
from p2pinfer.net.addrs import parse_peer_multiaddr
from p2pinfer.net.host import build_host
from p2pinfer.net.keys import to_libp2p_id

YAMUX_HEADER = struct.Struct("!BBHII")  # version, type, flags, stream id, length
YAMUX_DATA = 0
NOISE_MAX_PAYLOAD = 60_000              # one Noise message carries at most 65 535 bytes


def rss_bytes() -> int:
    """Resident set size of this process (Linux)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


class Attacker:
    def __init__(self, host: IHost, identity: Identity) -> None:
        self.host = host
        self.identity = identity
        self.peer_id = identity.peer_id

    @classmethod
    async def start(cls, stack: AsyncExitStack, identity: Identity | None = None) -> "Attacker":
        identity = identity or Identity.generate()
        host = build_host(identity, ["/ip4/127.0.0.1/tcp/0"])
        await stack.enter_async_context(host.run([multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]))
        return cls(host, identity)

    async def connect(self, target_addr: str) -> str:
        info = parse_peer_multiaddr(target_addr)
        await self.host.connect(info.to_libp2p())
        return info.peer_id

    async def open(self, peer_id: str, protocol: str) -> INetStream:
        return await self.host.new_stream(to_libp2p_id(peer_id), [TProtocol(protocol)])

    async def send_junk(self, peer_id: str, protocol: str, junk: bytes, *, linger: float = 0.2) -> None:
        """Negotiate ``protocol`` properly, then write ``junk`` and close; errors on our side are ignored."""
        try:
            stream = await self.open(peer_id, protocol)
            await stream.write(junk)
            await trio.sleep(linger)
            await stream.close()
        except Exception:
            pass

    def connected_to(self, peer_id: str) -> bool:
        return to_libp2p_id(peer_id) in self.host.get_connected_peers()

    async def flood_past_window(self, stream: INetStream, total: int) -> int:
        """Write raw Yamux DATA frames for ``stream`` straight onto the secured connection, ignoring the
        receive window the target granted. Returns how many payload bytes went out before the target
        closed the connection."""
        yamux = stream.muxed_conn
        sid = stream.muxed_stream.stream_id  # type: ignore[attr-defined]
        payload = b"\xaa" * (NOISE_MAX_PAYLOAD - YAMUX_HEADER.size)
        frame = YAMUX_HEADER.pack(0, YAMUX_DATA, 0, sid, len(payload)) + payload
        sent = 0
        try:
            # py-libp2p's TCP write returns silently once our own side has closed the socket (after it read
            # the target's close), so the muxer's shutdown flag, not an exception, is what says "closed".
            while sent < total and not yamux.event_shutting_down.is_set():  # type: ignore[attr-defined]
                await yamux.secured_conn.write(frame)  # type: ignore[attr-defined]
                sent += len(payload)
        except Exception:
            pass
        return sent


async def start_rogue_pubsub(stack: AsyncExitStack, identity: Identity, target_addr: str) -> "Any":
    """A plain GossipSub peer (no validator: it forwards anything) connected to ``target_addr``."""
    from libp2p.peer.peerinfo import info_from_p2p_addr
    from libp2p.tools.anyio_service import background_trio_service

    from p2pinfer.net.gossip import CAPACITY_TOPIC, build_pubsub

    host = build_host(identity, ["/ip4/127.0.0.1/tcp/0"])
    await stack.enter_async_context(host.run([multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]))
    pubsub, router = build_pubsub(host)
    # The rogue's own seen-cache keys on (source, seqno), so it re-sends a message its queue dropped.
    pubsub._msg_id_constructor = lambda m: bytes(m.from_id) + bytes(m.seqno)
    await stack.enter_async_context(background_trio_service(pubsub))
    await stack.enter_async_context(background_trio_service(router))
    await pubsub.wait_until_ready()
    await pubsub.subscribe(CAPACITY_TOPIC)
    info = info_from_p2p_addr(multiaddr.Multiaddr(target_addr))
    await host.connect(info)
    with trio.fail_after(30):
        while info.peer_id not in pubsub.peer_topics.get(CAPACITY_TOPIC, ()):
            await trio.sleep(0.02)
    return pubsub


async def forward_as(pubsub: "Any", origin: Identity, topic: str, data: bytes) -> None:
    """Forward ``data`` as a GossipSub message *originated and signed by* ``origin`` (a Sybil key), the way
    any relay forwards other peers' messages: one connection carrying many identities."""
    import secrets as _secrets

    from libp2p.pubsub.pb import rpc_pb2
    from libp2p.pubsub.validators import PUBSUB_SIGNING_PREFIX

    from p2pinfer.net.keys import keypair_from_identity

    keypair = keypair_from_identity(origin)
    msg = rpc_pb2.Message(data=data, topicIDs=[topic], from_id=to_libp2p_id(origin.peer_id).to_bytes(),
                          seqno=_secrets.token_bytes(8))
    msg.signature = keypair.private_key.sign(PUBSUB_SIGNING_PREFIX.encode() + msg.SerializeToString())
    msg.key = keypair.public_key.serialize()
    await pubsub.push_msg(pubsub.my_id, msg)


async def relay_until_held(pubsub: "Any", origin: Identity, data: bytes, relay: "Any", *, tries: int = 6) -> bool:
    """Forward ``data`` as ``origin`` until ``relay`` (a Node) holds its announcement. py-libp2p's outbound
    RPC queue silently drops messages queued faster than it drains, so a flood is paced by acceptance."""
    from p2pinfer.net.gossip import CAPACITY_TOPIC

    for _ in range(tries):
        await forward_as(pubsub, origin, CAPACITY_TOPIC, data)
        with trio.move_on_after(5.0):
            while origin.peer_id not in relay.table:
                await trio.sleep(0.005)
            return True
    return False
