"""Attacks on what the request path books and who executes, on a real network (127.0.0.1, real ONNX models).

Each attacker is a real libp2p host with its own Ed25519 key that speaks the wire protocol itself (signed
offers, bid sets, assignments, receipts, fraud proofs): nothing of our code is patched. Each test fails on
the request path before the settlement restructure (issue #13 attacks 2-5, issue #12 attack 5).
"""

from __future__ import annotations

import httpx
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from net.helpers import wait_until
from test_gateway import gateway_peer
from p2pinfer.election import elect
from p2pinfer.identity import Identity, peer_id_from_public_key
from p2pinfer.ledger import Ledger
from p2pinfer.localnet import local_network
from p2pinfer.net import NetError
from p2pinfer.net.gossip import FRAUD_TOPIC
from p2pinfer.request import protocol
from p2pinfer.request.client import AsyncClient, StreamChunk
from p2pinfer.request.errors import BadParameters, ResultRejected
from p2pinfer.request.evidence import check_unfair_bid_set, decode_bid_set, ranking_of
from p2pinfer.request.params import build_request
from p2pinfer.settlement import Entry, EntryKind
from p2pinfer.wire import (Assignment, Bid, BidSet, FraudProof, InferenceResult, Receipt, Refusal, TaskOffer,
                           TaskStatus, TaskStatusQuery, TokenChunk, Verdict, VrfBid, decode_signed, encode_signed,
                           now_ms, sign)

MODEL = "tiny-llama-trained"


class Attacker:
    """A client that speaks the wire protocol by hand, with its own key, from its own libp2p host."""

    def __init__(self, client: AsyncClient, net) -> None:
        self.client, self.net = client, net
        self.identity: Identity = client.identity
        self.node = client.node

    def request(self, model, **params):
        return build_request(model_digest=model.digest, client_key=self.identity.public_key, **params)

    async def bids(self, request, peers=None) -> list[Bid]:
        rid = request.request_id()
        offer = encode_signed(self.identity, TaskOffer(request_id=rid, model=request.model,
                                                       max_tokens=request.max_tokens, epoch_seed=b"",
                                                       expires_at_ms=now_ms() + 20_000))
        out = []
        for p in peers or self.net.peers:
            reply = decode_signed(await self.node.request(p.peer_id, protocol.BID_PROTOCOL, offer, timeout=10))
            assert isinstance(reply.message, VrfBid)
            out.append(reply.message.bid)
        return out

    def bid_set(self, request, bids, excluded=()):
        return sign(self.identity, BidSet(request_id=request.request_id(), epoch_seed=b"", bids=tuple(bids),
                                          excluded=tuple(excluded), issued_at_ms=now_ms()))

    async def announce(self, bid_set, peers=None) -> None:
        for p in peers or self.net.peers:
            await self.node.request(p.peer_id, protocol.BID_SET_PROTOCOL, bid_set.to_bytes(), timeout=10)

    async def assign(self, peer_id: str, request, bid_set, *, attempt: int, prefix=(), evidence=(),
                     stop_after_chunks: int | None = None):
        """Send an assignment; returns (refusal or None, signed chunks, signed result or None)."""
        assignment = Assignment(request=request, epoch_seed=b"", bids=bid_set.message.bids, prefix_ids=tuple(prefix),
                                attempt=attempt, bid_set=bid_set.to_bytes(), evidence=tuple(evidence))
        frames = await self.node.open_stream(peer_id, protocol.TASK_PROTOCOL, timeout=30,
                                             max_frame=protocol.MAX_TASK_FRAME)
        chunks: list[bytes] = []
        try:
            await frames.send(encode_signed(self.identity, assignment))
            while True:
                body = await frames.receive(timeout=60)
                assert body is not None, "the executor closed the stream without an answer"
                signed = decode_signed(body, max_size=protocol.MAX_TASK_FRAME)
                if isinstance(signed.message, Refusal):
                    return signed.message, chunks, None
                if isinstance(signed.message, TokenChunk):
                    chunks.append(body)
                    with_tokens = sum(1 for c in chunks if decode_signed(c).message.token_ids)
                    if stop_after_chunks is not None and with_tokens >= stop_after_chunks:
                        return None, chunks, None  # walk away: a failover follows
                    continue
                assert isinstance(signed.message, InferenceResult)
                return None, chunks, signed
        finally:
            await frames.reset()


def ranked_peer_ids(request, bid_set) -> list[str]:
    return [peer_id_from_public_key(r.public_key) for r in ranking_of(bid_set.message).ranking]


# ---- #13 attack 2: framing an executor through prefix_ids ---------------------------------------------


async def test_prefix_ids_need_the_earlier_executors_signature_and_fraud_proofs_use_the_signed_count(honest):
    async with local_network([honest], peers=4) as net:
        async with AsyncClient(bootstrap=net.bootstrap_addrs) as client:
            a = Attacker(client, net)
            request = a.request(honest, prompt="import os\n", max_tokens=120, temperature=0.8, seed=3)
            bid_set = a.bid_set(request, await a.bids(request))
            await a.announce(bid_set)
            ranking = ranked_peer_ids(request, bid_set)
            # junk tokens "inherited" at attempt 0: refused, nothing runs
            refusal, _, _ = await a.assign(ranking[0], request, bid_set, attempt=0, prefix=[7, 7, 7])
            assert refusal is not None and refusal.code == "invalid" and "attempt 0" in refusal.message
            # junk tokens at attempt 1 without the winner's signature on them: refused
            refusal, _, _ = await a.assign(ranking[1], request, bid_set, attempt=1, prefix=[7, 7, 7])
            assert refusal is not None and "signed by an earlier executor" in refusal.message
            # a real failover: the winner streams, the client walks away, rank 1 continues from signed tokens
            _, chunks, _ = await a.assign(ranking[0], request, bid_set, attempt=0, stop_after_chunks=1)
            acceptance, last = decode_signed(chunks[0]).message, decode_signed(chunks[-1]).message
            assert acceptance.token_ids == () and acceptance.index == 0  # the executor's signed acceptance
            assert last.index == 0
            prefix = list(last.token_ids)  # the first chunk with tokens holds the first tokens
            refusal, _, result = await a.assign(ranking[1], request, bid_set, attempt=1, prefix=prefix,
                                                evidence=[chunks[-1]])
            assert refusal is None and result is not None
            assert result.message.inherited_tokens == len(prefix) and result.message.attempt == 1
            assert result.message.election == bid_set.message_id
            # Framing: colluding "verifiers" reject at position 0 and the proof claims nothing was inherited.
            colluders = [Identity.generate() for _ in range(2)]
            verdicts = tuple(sign(c, Verdict(request_id=request.request_id(), result_hash=result.message_id,
                                             accept=False, first_bad_position=0, reason="made up",
                                             max_deviation=1.0, issued_at_ms=now_ms())).to_bytes()
                             for c in colluders)
            proof = encode_signed(a.identity, FraudProof(request=request, result=result.to_bytes(),
                                                         verdicts=verdicts, inherited_tokens=0,
                                                         issued_at_ms=now_ms()))
            await a.node.publish(FRAUD_TOPIC, proof)
            await wait_until(lambda: any(p.verification.counters["fraud.dropped.invalid"] >= 1 for p in net.peers))
            await trio.sleep(0.5)
            framed = result.signer
            for p in net.peers:
                assert p.verification.counters["fraud.proven"] == 0
                assert not p.ledger.excluded([framed], now_ms=now_ms())
                assert p.ledger.entries(framed) == []


# ---- #13 attack 3: forged receipts --------------------------------------------------------------------


async def test_forged_receipts_book_nothing(honest):
    async with local_network([honest], peers=4) as net:
        async with AsyncClient(bootstrap=net.bootstrap_addrs) as client:
            a = Attacker(client, net)
            completion = await client.generate(model=MODEL, prompt="def f(", max_tokens=6, verify="off")
            executor_key = completion.result.signer
            executor = net.peer(completion.executor)
            bid_set = completion.election.bid_set
            assert bid_set is not None
            throwaway = [Identity.generate() for _ in range(3)]

            def verdicts(signers, accept):
                return tuple(sign(s, Verdict(request_id=completion.request_id, result_hash=completion.result.message_id,
                                             accept=accept, first_bad_position=None if accept else 0,
                                             reason="", max_deviation=0.0, issued_at_ms=now_ms(),
                                             executor=executor_key, output_tokens=6, inherited_tokens=0,
                                             election=bid_set.message_id)).to_bytes() for s in signers)

            future = now_ms() + 10 * 365 * 24 * 3600 * 1000

            def receipt(executor, verifiers, votes, outcome, output=6):
                return encode_signed(a.identity, Receipt(
                    request_id=completion.request_id, model=completion.model, client=a.identity.public_key,
                    executor=executor, verifiers=tuple(verifiers), result_hash=completion.result.message_id,
                    output_tokens=output, outcome=outcome, issued_at_ms=future, inherited_tokens=0,
                    verdicts=votes, blamed=(), bid_set=bid_set.to_bytes()))

            keys = [t.public_key for t in throwaway]
            # 1. the executor "rejected" by verifiers the receipt names itself, signing with throwaway keys
            with pytest.raises(NetError):
                await a.node.request(executor.peer_id, protocol.RECEIPT_PROTOCOL,
                                     receipt(executor_key, keys, verdicts(throwaway, False), "rejected"), timeout=10)
            # 2. reputation farming: credits for work the receiving peer never took part in
            bystander = next(p for p in net.peers if p.peer_id != completion.executor)
            for _ in range(5):
                with pytest.raises(NetError):
                    await a.node.request(bystander.peer_id, protocol.RECEIPT_PROTOCOL,
                                         receipt(bystander.identity.public_key, keys, verdicts(throwaway, True),
                                                 "accepted", output=4000), timeout=10)
            for p in net.peers:
                assert p.ledger.entries() == [], p.peer_id  # verify="off": nothing real to book either
                assert not p.ledger.excluded([q.identity.public_key for q in net.peers], now_ms=now_ms())
            assert executor.verification.counters["receipt.refused.wrong-verifiers"] == 1
            assert bystander.verification.counters["receipt.refused.not-a-participant"] == 5


# ---- #13 attack 4: the client picks the executor ------------------------------------------------------


async def test_the_executor_is_the_elections(honest):
    async with local_network([honest], peers=4) as net:
        async with AsyncClient(bootstrap=net.bootstrap_addrs) as client:
            a = Attacker(client, net)
            request = a.request(honest, prompt="x = ", max_tokens=4)
            bids = await a.bids(request)
            fair = a.bid_set(request, bids)
            ranking = ranked_peer_ids(request, fair)
            # hostile bytes on the bid-set protocol: a clear error, the peer stays up
            with pytest.raises(NetError):
                await a.node.request(ranking[0], protocol.BID_SET_PROTOCOL, b"\x00garbage", timeout=10)
            # attempt=2 with no failover: rank 2 finds ranks 0 and 1 alive and refuses
            await a.announce(fair)
            refusal, _, result = await a.assign(ranking[2], request, fair, attempt=2)
            assert result is None and refusal.code == "not-winner" and "reachable" in refusal.message
            assert net.peer(ranking[2]).server.counters["refused.skipped-rank"] == 1

            # dropping the winner's bid: the winner is sent the set and keeps it as signed evidence
            request = a.request(honest, prompt="y = ", max_tokens=4)
            bids = await a.bids(request)
            winner_key = elect(request.request_id(), b"", bids).executor
            rigged = a.bid_set(request, [b for b in bids if b.public_key != winner_key])
            await a.announce(rigged)
            omitted = net.peer(peer_id_from_public_key(winner_key))
            assert omitted.server.counters["bid_set.unfair"] == 1
            evidence = omitted.server.unfair_bid_sets[-1]
            # anyone can re-check it: the client's signed offer and set, the omitted peer's signed bid
            assert decode_bid_set(evidence.bid_set).signer == a.identity.public_key
            assert decode_signed(evidence.offer).signer == a.identity.public_key
            assert check_unfair_bid_set(evidence) == "our bid was omitted"

            # zeroing the winner's proof: the same, as an altered bid
            request = a.request(honest, prompt="z = ", max_tokens=4)
            bids = await a.bids(request)
            winner_key = elect(request.request_id(), b"", bids).executor
            zeroed = [Bid(request_id=b.request_id, public_key=b.public_key, proof=bytes(80))
                      if b.public_key == winner_key else b for b in bids]
            victim = net.peer(peer_id_from_public_key(winner_key))
            before = victim.server.counters["bid_set.unfair"]
            await a.announce(a.bid_set(request, zeroed))
            assert victim.server.counters["bid_set.unfair"] == before + 1
            assert check_unfair_bid_set(victim.server.unfair_bid_sets[-1]) == "our bid was altered"


async def test_a_failover_candidate_asks_a_lower_rank_without_evidence_itself(honest):
    """The client keeps no word from rank 0 (it walks away after the first tokens and withholds them): rank 1
    asks rank 0 itself over /p2pinfer/task-status/1, gets its signed tokens and takes over; the tokens go to
    no one else than a higher rank of that election."""
    async with local_network([honest], peers=4) as net:
        async with AsyncClient(bootstrap=net.bootstrap_addrs) as client:
            a = Attacker(client, net)
            request = a.request(honest, prompt="w = ", max_tokens=8)
            rid = request.request_id()
            bid_set = a.bid_set(request, await a.bids(request))
            await a.announce(bid_set)
            ranking = ranked_peer_ids(request, bid_set)
            first, second = net.peer(ranking[0]), net.peer(ranking[1])
            refusal, chunks, result = await a.assign(ranking[0], request, bid_set, attempt=0, stop_after_chunks=1)
            assert refusal is None and result is None and chunks
            # the client asking (no rank of the election) gets no tokens, only an error
            query = encode_signed(a.identity, TaskStatusQuery(request_id=rid, election=bid_set.message_id))
            with pytest.raises(NetError, match="higher rank"):
                await a.node.request(ranking[0], protocol.TASK_STATUS, query, timeout=10)
            # a peer that was never assigned says so, signed
            answer = decode_signed(await a.node.request(ranking[2], protocol.TASK_STATUS, query, timeout=10))
            assert answer.signer == net.peer(ranking[2]).identity.public_key
            assert isinstance(answer.message, TaskStatus) and answer.message.state == "not-assigned"
            # rank 1 at attempt 1 with no evidence at all: it asks rank 0, which hands over its signed tokens
            refusal, _, result = await a.assign(ranking[1], request, bid_set, attempt=1)
            assert refusal is None and result is not None
            assert result.message.attempt == 1 and result.message.witnessed == (first.identity.public_key,)
            assert first.server.counters["status.answered"] == 1
            assert second.server.counters["failover.witnessed_silent"] == 0  # it answered: not silent


async def test_witnessed_silence_and_status_answers_are_in_the_metrics(honest):
    """A rank that takes a task over past a lower rank that died, and the status queries it answers, show in
    its gateway's /metrics (read over HTTP, as Prometheus would)."""
    async with local_network([honest], peers=1) as net, gateway_peer(net, [honest]) as taker:
        lower = net.peers[0]
        async with AsyncClient(bootstrap=net.bootstrap_addrs) as client:
            a = Attacker(client, net)
            both = [lower, taker]
            for i in range(64):  # until the VRF ranks the gateway peer second (one chance in two each time)
                request = a.request(honest, prompt=f"v{i} = ", max_tokens=4)
                bid_set = a.bid_set(request, await a.bids(request, both))
                if ranked_peer_ids(request, bid_set) == [lower.peer_id, taker.peer_id]:
                    break
            else:
                raise AssertionError("the gateway peer was never ranked second in 64 requests")
            await a.announce(bid_set, both)
            await net.kill(lower.peer_id)
            refusal, _, result = await a.assign(taker.peer_id, request, bid_set, attempt=1)
            assert refusal is None and result is not None
            assert result.message.witnessed == (lower.identity.public_key,)
            # status queries: one for an election this peer never held, one from no rank of it, one junk
            stranger = encode_signed(a.identity, TaskStatusQuery(request_id=b"\x01" * 32, election=b"\x02" * 32))
            answer = decode_signed(await a.node.request(taker.peer_id, protocol.TASK_STATUS, stranger, timeout=10))
            assert answer.message.state == "not-assigned"
            query = encode_signed(a.identity, TaskStatusQuery(request_id=request.request_id(),
                                                              election=bid_set.message_id))
            with pytest.raises(NetError, match="higher rank"):
                await a.node.request(taker.peer_id, protocol.TASK_STATUS, query, timeout=10)
            with pytest.raises(NetError, match="invalid status query"):
                await a.node.request(taker.peer_id, protocol.TASK_STATUS, b"\x00junk", timeout=10)
        text = await trio.to_thread.run_sync(lambda: httpx.get(f"{taker.gateway_url}/metrics").text)
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(text) for s in family.samples}
    assert samples[("p2pinfer_failover_witnessed_silent_total", ())] == 1
    status = {dict(labels)["answer"]: value for (name, labels), value in samples.items()
              if name == "p2pinfer_status_queries_total"}
    assert status == {"not-assigned": 1, "not-entitled": 1, "invalid": 1, "answered": 0, "pending": 0,
                      "rate_limited": 0}


# ---- #13 attack 5: a rejected executor is excluded at once, whatever its history ----------------------


async def test_a_rejected_executor_with_a_good_history_is_excluded_at_once(honest, perturbed):
    async with local_network([honest], peers=4, peer_models=[[perturbed], [honest], [honest], [honest]]) as net:
        cheater = net.peers[0]
        key = cheater.identity.public_key
        for _ in range(30):  # until the VRF makes the cheater the executor
            ledger = Ledger(None)
            # 30 verified results before: a score of (30+2)/(30+20+3) = 0.60 kept it eligible after a rejection
            ledger.add_entries([Entry(key, EntryKind.CREDIT_TOKENS, 10, i.to_bytes(32, "big"), now_ms() - 1000)
                                for i in range(30)])
            async with AsyncClient(bootstrap=net.bootstrap_addrs, ledger=ledger) as client:
                try:
                    completion = await client.generate(model=MODEL, prompt="def main(", max_tokens=10,
                                                       verify="wait")
                except ResultRejected as exc:
                    assert exc.verification.executor_blamed
                    assert ledger.excluded([key], now_ms=now_ms()) == {key}
                    for _ in range(3):
                        completion = await client.generate(model=MODEL, prompt="class A:", max_tokens=4)
                        assert cheater.peer_id in completion.election.excluded
                        assert cheater.peer_id not in completion.election.ranking
                        # the exclusion is in the signed bid set every bidder saw
                        assert key in completion.election.bid_set.message.excluded
                    ledger.close()
                    return
                assert completion.executor != cheater.peer_id
            ledger.close()
        pytest.fail("the cheater never won an election")


# ---- #12 attack 5: the client's own failure is never booked against peers ------------------------------


async def test_the_clients_own_failures_are_never_booked(honest):
    async with local_network([honest], peers=3) as net:
        async with AsyncClient(bootstrap=net.bootstrap_addrs, stall_timeout=10.0) as client:
            # a prompt too large for the task frame: refused here, naming the limit, before any peer is asked
            huge = [{"role": "user", "content": "x" * 250_000} for _ in range(6)]
            for _ in range(3):
                with pytest.raises(BadParameters, match="at most|limit"):
                    await client.generate(model=MODEL, messages=huge, max_tokens=4)
            assert sum(p.server.counters["offers"] for p in net.peers) == 0
            # the client cancels mid-stream: nobody's fault but ours
            with trio.move_on_after(60) as scope:
                async for item in client.stream(model=MODEL, prompt="import os\n", max_tokens=300,
                                                temperature=0.8, seed=5):
                    scope.cancel()
            # the executor dies mid-stream: a closed connection proves nothing against it
            killed = None
            completion = None
            async for item in client.stream_with_result(model=MODEL, prompt="import sys\n", max_tokens=200,
                                                        temperature=0.8, seed=9):
                if isinstance(item, StreamChunk) and killed is None:
                    killed = item.executor
                    await net.kill(killed)
                elif not isinstance(item, StreamChunk):
                    completion = item
            assert completion is not None and completion.executor != killed
            assert completion.attempts[0].outcome.startswith("failed")
            penalties = [e for e in client.ledger.entries() if e.is_penalty]
            assert penalties == []
