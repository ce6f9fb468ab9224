"""The request path end to end: real peers on 127.0.0.1, real VRF bids, real ONNX generation."""

from __future__ import annotations

import json

import pytest
import trio

from p2pinfer.election import elect, make_bid
from p2pinfer.identity import Identity, peer_id_from_public_key
from p2pinfer.localnet import local_network
from p2pinfer.net import Node, NodeConfig
from p2pinfer.request import protocol
from p2pinfer.request.client import AsyncClient, StreamChunk
from p2pinfer.request.errors import BadParameters, NoPeerServesModel
from p2pinfer.request.params import build_request
from p2pinfer.wire import Assignment, BidSet, Refusal, decode_signed, encode_signed, now_ms, sign

MODEL_NAME = "tiny-llama-trained"


@pytest.fixture(scope="module")
def reference(shared_models):
    return json.loads((shared_models / MODEL_NAME / "reference.json").read_text())


async def test_greedy_request_is_served_and_matches_the_reference(model, reference):
    case = reference["cases"][0]  # "import os\nimport sys"
    async with local_network([model], peers=4) as net:
        async with AsyncClient(bootstrap=net.bootstrap_addrs) as client:
            chunks = []
            completion = None
            async for item in client.stream_with_result(model=MODEL_NAME, prompt=case["prompt_text"],
                                                        max_tokens=16, temperature=0):
                if isinstance(item, StreamChunk):
                    chunks.append(item)
                else:
                    completion = item
    assert completion is not None
    assert list(completion.token_ids) == case["continuation_ids"]
    assert [t for c in chunks for t in c.token_ids] == case["continuation_ids"]
    assert "".join(c.text for c in chunks) == completion.text
    assert completion.finish_reason == "length"
    # The election evidence re-checks: anyone holding the bids computes the same executor.
    recheck = completion.election.recheck()
    assert peer_id_from_public_key(recheck.executor) == completion.executor
    assert len(completion.election.bids) == 4
    assert completion.executor in {p.peer_id for p in net.peers}
    result = completion.result.message
    assert list(result.prompt_ids) == case["prompt_ids"]
    assert completion.result.signer_peer_id == completion.executor


async def test_same_seeded_request_gives_the_same_text_from_any_executor(model):
    async with local_network([model], peers=4) as net:
        async with AsyncClient(bootstrap=net.bootstrap_addrs) as client:
            texts, executors = set(), set()
            for _ in range(16):
                completion = await client.generate(model=MODEL_NAME, prompt="def main(", max_tokens=24,
                                                   temperature=0.9, top_p=0.95, seed=1234)
                texts.add(completion.text)
                executors.add(completion.executor)
                if len(executors) >= 3:
                    break
    assert len(executors) >= 2, "fresh nonces should spread the requests over the peers"
    assert len(texts) == 1


async def test_executor_killed_mid_stream_fails_over_without_losing_or_repeating_tokens(model):
    params = dict(prompt="import os\n", max_tokens=200, temperature=0.8, seed=99)
    async with local_network([model], peers=4) as net:
        async with AsyncClient(bootstrap=net.bootstrap_addrs, stall_timeout=5.0) as client:
            uninterrupted = await client.generate(model=MODEL_NAME, **params)
            killed = None
            completion = None
            async for item in client.stream_with_result(model=MODEL_NAME, **params):
                if isinstance(item, StreamChunk) and killed is None:
                    killed = item.executor
                    await net.kill(killed)
                elif not isinstance(item, StreamChunk):
                    completion = item
    assert completion is not None and killed is not None
    assert completion.executor != killed
    assert completion.attempts[0].peer_id == killed and completion.attempts[0].outcome.startswith("failed")
    assert completion.attempts[-1].outcome == "completed"
    assert completion.token_ids == uninterrupted.token_ids
    assert completion.text == uninterrupted.text
    assert len(completion.token_ids) == 200


async def test_a_peer_that_did_not_win_refuses_the_task(model):
    async with local_network([model], peers=3) as net:
        async with AsyncClient(bootstrap=net.bootstrap_addrs) as client:
            request = build_request(model_digest=model.digest, client_key=client.identity.public_key,
                                    prompt="hello", max_tokens=4)
            request_id = request.request_id()
            bids = [make_bid(p.identity.seed, request_id) for p in net.peers]
            ranking = elect(request_id, b"", bids).ranking
            loser = peer_id_from_public_key(ranking[1].public_key)
            bid_set = sign(client.identity, BidSet(request_id=request_id, epoch_seed=b"", bids=tuple(bids),
                                                   excluded=(), issued_at_ms=now_ms()))
            assignment = Assignment(request=request, epoch_seed=b"", bids=tuple(bids), prefix_ids=(), attempt=0,
                                    bid_set=bid_set.to_bytes())
            frames = await client.node.open_stream(loser, protocol.TASK_PROTOCOL, timeout=10)
            await frames.send(encode_signed(client.identity, assignment))
            reply = decode_signed(await frames.receive(timeout=10))
            await frames.aclose()
    assert isinstance(reply.message, Refusal)
    assert reply.message.code == "not-winner"
    assert "ranks 1" in reply.message.message and "attempt 0" in reply.message.message


async def test_an_assignment_not_signed_by_the_requesting_client_is_refused(model):
    async with local_network([model], peers=2) as net:
        async with AsyncClient(bootstrap=net.bootstrap_addrs) as client:
            request = build_request(model_digest=model.digest, client_key=bytes(32), prompt="hi", max_tokens=4)
            bids = [make_bid(p.identity.seed, request.request_id()) for p in net.peers]
            winner = peer_id_from_public_key(elect(request.request_id(), b"", bids).executor)
            frames = await client.node.open_stream(winner, protocol.TASK_PROTOCOL, timeout=10)
            await frames.send(encode_signed(client.identity, Assignment(
                request=request, epoch_seed=b"", bids=tuple(bids), prefix_ids=(), attempt=0)))
            reply = decode_signed(await frames.receive(timeout=10))
    assert reply.message.code == "invalid" and "signed by the client" in reply.message.message


async def test_unknown_model_fails_fast_with_a_clear_error(model):
    async with local_network([model], peers=2) as net:
        async with AsyncClient(bootstrap=net.bootstrap_addrs, discovery_timeout=1.0) as client:
            start = trio.current_time()
            with pytest.raises(NoPeerServesModel, match="no-such-model.*models on offer: tiny-llama-trained"):
                await client.generate(model="no-such-model", prompt="x")
            assert trio.current_time() - start < 5.0
            with pytest.raises(NoPeerServesModel):
                await client.generate(model="ab" * 32, prompt="x")
            with pytest.raises(BadParameters, match="temperature"):
                await client.generate(model=MODEL_NAME, prompt="x", temperature=-1)


async def test_twenty_concurrent_requests_over_four_peers_all_complete(model):
    # Twenty requests queue for eight slots, and the five nodes share this one event loop with the
    # generations: every limit below is an upper bound far above any honest delay, so a loaded machine
    # makes the test slower, never a request fail (bids: all four peers answer).
    async with local_network([model], peers=4, slots=2, wait_s=120, stream_negotiation_timeout_s=120) as net:
        patient = NodeConfig(listen=("/ip4/127.0.0.1/tcp/0",), bootstrap=net.bootstrap_addrs, role="client",
                             stream_negotiation_timeout_s=120)
        async with Node(Identity.generate(), patient) as node, \
                AsyncClient.on_node(node, bid_timeout=60, bid_grace=60, busy_timeout=600, stall_timeout=120,
                                    discovery_timeout=60) as client:
            results = {}

            async def one(i: int) -> None:
                results[i] = await client.generate(model=MODEL_NAME, prompt=f"def f{i}(", max_tokens=48,
                                                   temperature=0.7, seed=i)

            async with trio.open_nursery() as nursery:
                for i in range(20):
                    nursery.start_soon(one, i)
            busiest = max(p.server.max_busy for p in net.peers)
            served = {c.executor for c in results.values()}
    assert len(results) == 20
    assert all(len(c.token_ids) > 0 for c in results.values())
    assert busiest == 2, "a peer should run up to its 2 slots at once"
    assert len(served) >= 3


async def test_a_client_on_a_serving_peers_own_node_is_served_by_that_peer_too(model, reference):
    """The gateway's case: libp2p cannot dial itself, so offers, the task and verification to the peer the
    client runs on go over a loopback stream, through the same handlers and signed messages."""
    case = reference["cases"][0]
    async with local_network([model], peers=1) as net:
        peer = net.peers[0]
        async with AsyncClient.on_node(peer.node) as client:
            alone = await client.generate(model=MODEL_NAME, prompt=case["prompt_text"], max_tokens=16)
    assert alone.executor == peer.peer_id
    assert list(alone.token_ids) == case["continuation_ids"]
    assert alone.verification.outcome == "unverified"  # nobody else holds the model to re-check it
    async with local_network([model], peers=3) as net:
        own = net.peers[0]
        async with AsyncClient.on_node(own.node) as client:
            executors = set()
            for i in range(16):
                completion = await client.generate(model=MODEL_NAME, prompt=f"def f{i}(", max_tokens=4)
                assert len(completion.election.bids) == 3  # its own peer bids like every other
                executors.add(completion.executor)
                if own.peer_id in executors and len(executors) >= 2:
                    break
    assert own.peer_id in executors and len(executors) >= 2
    assert completion.verification.outcome == "accepted"
