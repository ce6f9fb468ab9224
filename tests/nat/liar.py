"""A real relay node whose AutoNAT server lies: it answers every dial-back request "I dialled and failed".

That is how a public peer gets told it is behind NAT in these tests: real bytes on the wire from a host with
its own key (as a loaded machine whose dial-backs time out, or an attacker, would answer). The node is
otherwise an honest bootstrap node and relay (its own software, changed by its operator, not ours)."""

from __future__ import annotations

from libp2p.host.autonat.autonat import AUTONAT_PROTOCOL_ID
from libp2p.host.autonat.pb.autonat_pb2 import Message
from libp2p.utils.varint import encode_varint_prefixed, read_varint_prefixed_bytes_limited

from p2pinfer.net import Node


async def _say_dial_failed(stream) -> None:  # type: ignore[no-untyped-def]
    try:
        await read_varint_prefixed_bytes_limited(stream, 64 * 1024)
        response = Message()
        response.type = Message.DIAL_RESPONSE
        response.dialResponse.status = Message.E_DIAL_ERROR
        response.dialResponse.statusText = "dial failed"
        await stream.write(encode_varint_prefixed(response.SerializeToString()))
    finally:
        await stream.close()


def make_liar(node: Node) -> Node:
    """From now on ``node`` tells everyone who asks that it could not dial them back."""
    node.host.set_stream_handler(AUTONAT_PROTOCOL_ID, _say_dial_failed)
    return node
