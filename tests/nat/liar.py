"""Real nodes whose AutoNAT server lies, each with its own key (real bytes on the wire; the operator changed
its own software, not ours):

* :func:`make_liar` answers every dial-back request "I dialled and failed". That is how a public peer gets
  told it is behind NAT in these tests (as a loaded machine whose dial-backs time out, or an attacker, would
  answer).
* :func:`make_reached_liar` answers "I reached you" at the first address asked about, without dialling: an
  attacker's servers telling a peer behind NAT that it is public, so that it announces an address nobody can
  dial.
* :func:`make_silent` refuses every request ("busy"): no verdict, as a loaded honest server answers.

The nodes are otherwise honest bootstrap nodes and relays."""

from __future__ import annotations

from libp2p.host.autonat.autonat import AUTONAT_PROTOCOL_ID
from libp2p.host.autonat.pb.autonat_pb2 import Message
from libp2p.utils.varint import encode_varint_prefixed, read_varint_prefixed_bytes_limited

from p2pinfer.net import Node


async def _answer(stream, status: int, text: str, *, echo_first_addr: bool = False) -> None:  # type: ignore[no-untyped-def]
    try:
        request = Message()
        request.ParseFromString(await read_varint_prefixed_bytes_limited(stream, 64 * 1024))
        response = Message()
        response.type = Message.DIAL_RESPONSE
        response.dialResponse.status = status
        response.dialResponse.statusText = text
        if echo_first_addr and request.dial.peer.addrs:
            response.dialResponse.addr = request.dial.peer.addrs[0]
        await stream.write(encode_varint_prefixed(response.SerializeToString()))
    finally:
        await stream.close()


async def _say_dial_failed(stream) -> None:  # type: ignore[no-untyped-def]
    await _answer(stream, Message.E_DIAL_ERROR, "dial failed")


async def _say_reached(stream) -> None:  # type: ignore[no-untyped-def]
    await _answer(stream, Message.OK, "", echo_first_addr=True)


async def _say_busy(stream) -> None:  # type: ignore[no-untyped-def]
    await _answer(stream, Message.E_DIAL_REFUSED, "busy")


def make_liar(node: Node) -> Node:
    """From now on ``node`` tells everyone who asks that it could not dial them back."""
    node.host.set_stream_handler(AUTONAT_PROTOCOL_ID, _say_dial_failed)
    return node


def make_reached_liar(node: Node) -> Node:
    """From now on ``node`` tells everyone who asks that it reached them, and never dials."""
    node.host.set_stream_handler(AUTONAT_PROTOCOL_ID, _say_reached)
    return node


def make_silent(node: Node) -> Node:
    """From now on ``node`` refuses every dial-back request (busy): no verdict."""
    node.host.set_stream_handler(AUTONAT_PROTOCOL_ID, _say_busy)
    return node
