"""A candidate that never bids costs a request at most the grace period, not the bid timeout.

Real peers with a real model on 127.0.0.1. The tarpit is a real host with its own key that holds the model
(it answers the possession challenge with its own real proof), is offered the request like everyone, and
then never answers the offer: its stream stays open and silent. The election must close by the grace rule
(``Closed.GRACE_AFTER_QUORUM``: enough bids were in) with the tarpit counted silent; a client that waited
for the tarpit would close by ``Closed.TIMEOUT`` after the bid timeout, and the test refuses that. The
proof is the closing reason, not a wall-clock bound, so a loaded machine makes the test slower, never
failing it (what the grace rule saves in seconds is measured by benchmarks/silent_candidate.py).
"""

from __future__ import annotations

import pytest
import trio

from p2pinfer.localnet import local_network
from p2pinfer.request.bid_window import Closed
from p2pinfer.request.protocol import BID_PROTOCOL

from .watched_client import WatchedClient

MODEL = "tiny-llama-trained"
BID_TIMEOUT_S = 120.0   # what waiting for the tarpit would cost
HANG_LIMIT_S = 900.0    # only bounds how long a broken test hangs (far above bid timeout + honest request)


async def test_a_silent_bidder_does_not_hold_the_election(honest) -> None:
    offered: list[str] = []

    async def never_bid(peer_id: str, body: bytes) -> bytes:
        offered.append(peer_id)
        await trio.sleep_forever()
        raise AssertionError("unreachable")

    async with local_network([honest], peers=4) as net:  # executor + 3 verifiers: the quorum-sized set
        tarpit = await net.add_peer([honest])
        tarpit.node.register_request_handler(BID_PROTOCOL, never_bid)  # the attacker's own node, its own key
        honest_ids = {p.peer_id for p in net.peers} - {tarpit.peer_id}
        async with WatchedClient(bootstrap=net.bootstrap_addrs, bid_timeout=BID_TIMEOUT_S) as client:
            for i in range(3):
                with trio.fail_after(HANG_LIMIT_S):
                    completion = await client.generate(model=MODEL, prompt=f"def s{i}(", max_tokens=4)
                assert completion.executor in honest_ids
                assert tarpit.peer_id not in completion.election.ranking
            assert offered, "the tarpit was never offered the request"
            silent_rounds = [b for b in client.rounds if tarpit.peer_id in b.silent]
            assert silent_rounds, [(b.closed, b.silent) for b in client.rounds]
            # The election closed because enough bids were in, not because the tarpit's timeout ran out.
            assert all(b.closed is Closed.GRACE_AFTER_QUORUM for b in silent_rounds)
            assert all(len(b.bids) >= 4 for b in silent_rounds)
