"""A candidate that never bids costs a request at most the grace period, not the bid timeout.

Real peers with a real model on 127.0.0.1. The tarpit is a real host with its own key that holds the model
(it answers the possession challenge with its own real proof), is offered the request like everyone, and
then never answers the offer: its stream stays open and silent. The client's bid timeout is set far above
anything the test allows, so a client that waited for the tarpit could not finish within the test's bound;
the election must close by the grace rule with the tarpit counted silent.
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
GENEROUS_S = 60.0       # far above an honest request on a loaded machine, far below the bid timeout


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
                with trio.fail_after(GENEROUS_S):
                    completion = await client.generate(model=MODEL, prompt=f"def s{i}(", max_tokens=4)
                assert completion.executor in honest_ids
                assert tarpit.peer_id not in completion.election.ranking
            assert offered, "the tarpit was never offered the request"
            silent_rounds = [b for b in client.rounds if tarpit.peer_id in b.silent]
            assert silent_rounds, [(b.closed, b.silent) for b in client.rounds]
            # The election closed because enough bids were in, not because the tarpit's timeout ran out.
            assert all(b.closed is Closed.GRACE_AFTER_QUORUM for b in silent_rounds)
            assert all(len(b.bids) >= 4 for b in silent_rounds)
