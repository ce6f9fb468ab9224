"""A bidder that takes the assignment and never answers cannot block the failover (issue #13).

Real peers with a real model on 127.0.0.1. The attacker is a real host with its own key that holds the model:
it answers the possession challenge, bids honestly (its VRF bid, its acceptance of the signed bid set) and
verifies like anyone; only as the elected executor it reads the assignment and then says nothing, and it does
not answer the next rank's status query either (silent, or junk). Before the failover status query, the next
rank found it reachable (it answers the bid-set protocol) with no signed word, refused, and so did every rank
after it: the request failed. Now the next rank asks the attacker itself, signs that it got nothing, and takes
over; the quorum accepts, and the attacker is neither credited nor (silence proves nothing) penalized.
"""

from __future__ import annotations

import pytest
import trio

from p2pinfer.localnet import local_network
from p2pinfer.request.client import AsyncClient
from p2pinfer.request.protocol import MAX_TASK_FRAME, TASK_PROTOCOL, TASK_STATUS
from p2pinfer.settlement import Fault

MODEL = "tiny-llama-trained"
STALL_S = 6.0        # the client's stall timeout: how long it waits for the silent executor's first word
MAX_REQUESTS = 60    # the attacker holds rank 0 of 1 in 5 elections: 60 requests miss it with p = 1.5e-6
GENEROUS_S = 120.0   # one request, silent attacker included, on a loaded machine


@pytest.mark.parametrize("status_answer", ["silent", "junk"])
async def test_a_silent_assigned_executor_cannot_block_the_failover(honest, status_answer) -> None:
    assigned: list[bytes] = []

    async def take_and_stay_silent(frames) -> None:
        assigned.append(await frames.receive(timeout=30.0))  # the assignment, read and never answered
        await trio.sleep_forever()

    async def status(peer_id: str, body: bytes) -> bytes:
        if status_answer == "junk":
            return b"\x93\x01\x02\x03 not a signed answer"
        await trio.sleep_forever()
        raise AssertionError("unreachable")

    async with local_network([honest], peers=4) as net:  # the next rank executes, 3 verify
        attacker = await net.add_peer([honest])
        # the attacker's own node and key: only its task and status handlers misbehave
        attacker.node.register_handler(TASK_PROTOCOL, take_and_stay_silent, max_frame=MAX_TASK_FRAME, timeout=None)
        attacker.node.register_request_handler(TASK_STATUS, status)
        key = attacker.identity.public_key
        async with AsyncClient(bootstrap=net.bootstrap_addrs, stall_timeout=STALL_S) as client:
            for i in range(MAX_REQUESTS):
                with trio.fail_after(GENEROUS_S):
                    completion = await client.generate(model=MODEL, prompt=f"def s{i}(", max_tokens=6)
                if completion.election.ranking[0] == attacker.peer_id:
                    break
            else:
                raise AssertionError(f"the attacker never held rank 0 in {MAX_REQUESTS} elections")
            assert assigned, "the attacker was never assigned the request"
            first, *rest = completion.attempts
            assert first.peer_id == attacker.peer_id and first.outcome.startswith("failed:")
            assert first.fault is Fault.UNPROVEN  # silence is nobody's provable fault
            assert completion.executor == completion.election.ranking[1]
            result = completion.result.message
            assert result.attempt == 1 and result.witnessed == (key,)  # the next rank signs that it asked
            assert completion.verified and completion.verification.tally.accepts == 3
            executor = net.peer(completion.executor)
            assert executor.server.counters["failover.witnessed_silent"] == 1
            # For this request: not credited, and not penalized either (its silence proves nothing anyone could
            # re-check). (It may hold verification credits from the earlier requests it verified honestly.)
            rid = completion.request_id
            executor_key = completion.result.signer
            assert any(e.request_id == rid for e in client.ledger.entries(executor_key))  # the next rank is credited
            for ledger in [client.ledger, *(p.ledger for p in net.peers)]:
                assert [e for e in ledger.entries(key) if e.request_id == rid] == []
