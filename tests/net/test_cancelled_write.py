"""A write cancelled on its way out must not break the connection it was on (two real hosts on 127.0.0.1).

Noise encrypts each message with the next nonce before the bytes reach the socket. py-libp2p 0.8.1's Yamux
writes a frame with a plain ``await secured_conn.write(frame)``: a cancellation (any caller's timeout) that
lands after the encryption and before the socket took the bytes leaves a nonce the other end never sees, and
the other end's next decryption fails ("Failed authentication of message"): it drops the whole connection,
every stream on it included. Under load this is what broke the pubsub streams of the ten-peer test.
"""

from __future__ import annotations

from contextlib import AsyncExitStack

import trio

from .helpers import start

ECHO = "/p2pinfer/test-echo-cancel/1"


async def test_a_cancelled_stream_write_leaves_the_connection_usable() -> None:
    async with AsyncExitStack() as stack:
        server = await start(stack, role="bootstrap")
        client = await start(stack, role="client", bootstrap=server.addrs)

        async def echo(peer_id: str, body: bytes) -> bytes:
            return body.upper()

        server.register_request_handler(ECHO, echo)
        assert await client.request(server.peer_id, ECHO, b"before", timeout=30) == b"BEFORE"
        [conn] = client.host.get_network().get_connections(server.host.get_id())
        # The caller's timeout fires while the write is on its way down (after 0, 1, 2... scheduling rounds,
        # so one of them lands between the encryption and the socket, whatever the exact path through the
        # locks): every such write is dropped, and the connection must live on.
        for rounds in range(40):
            stream = await client.open_stream(server.peer_id, ECHO, timeout=30)
            async with trio.open_nursery() as nursery:
                with trio.CancelScope() as scope:
                    async def cancel_after_rounds() -> None:
                        for _ in range(rounds):
                            await trio.lowlevel.checkpoint()
                        scope.cancel()

                    nursery.start_soon(cancel_after_rounds)
                    await stream.send(b"cancelled-%d" % rounds)
                    await trio.sleep_forever()  # rounds > the write's own: the write completed, we wait here
            await stream.reset()
            # The same connection still carries requests: nothing was lost between the two ends' ciphers.
            assert await client.request(server.peer_id, ECHO, b"after-%d" % rounds, timeout=30) == b"AFTER-%d" % rounds
            assert not conn.is_closed, f"the connection died after a write cancelled at round {rounds}"
            assert client.host.get_network().get_connections(server.host.get_id()) == [conn]
