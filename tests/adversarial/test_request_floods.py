"""Free work on demand: an attacker host with its own keys floods a serving peer with verify tasks and offers.

Everything is real: the peers and the attacker are libp2p hosts on 127.0.0.1 (Noise, Yamux), the attacker
signs with keys of its own (as a client and as an "executor" of results it made up with the real model), and
the target runs real prefills and books into its real ledger. Nothing in our code is patched.
"""

from __future__ import annotations

import trio

from p2pinfer.identity import Identity
from p2pinfer.localnet import LOOPBACK, local_network
from p2pinfer.net import Node, NodeConfig
from p2pinfer.request.client import AsyncClient
from p2pinfer.request.limits import OFFER_RATE, OVER_LIMIT_DELAY_S, RECEIPT_RATE, VERIFY_RATE
from p2pinfer.request.params import build_request
from p2pinfer.request.protocol import (BID_PROTOCOL, MAX_OFFER_FRAME, MAX_RECEIPT_FRAME, MAX_VERIFY_FRAME,
                                       OFFER_TTL_MS, RECEIPT_PROTOCOL, VERIFY_PROTOCOL)
from p2pinfer.runtime import generate
from p2pinfer.net import RemoteError
from p2pinfer.wire import (InferenceResult, Receipt, Refusal, TaskOffer, Verdict, VerifyTask, VrfBid, decode_signed,
                           encode_signed, now_ms)
from p2pinfer.wire.messages import MAX_VERDICT_BYTES

from elections import key_at_rank, real_bids, signed_bid_set

MODEL = "tiny-llama-trained"


class Attacker:
    """A client host with its own key, plus a second key it signs made-up results with."""

    def __init__(self, node: Node, executor: Identity) -> None:
        self.node = node
        self.identity = node.identity
        self.executor = executor

    async def verify_task(self, model, prompt: str, target: str, max_tokens: int = 8) -> bytes:
        """A VerifyTask for a real generation of the attacker's own (so the verifier runs a real prefill), in a
        real election where the attacker's executor key ranks first and the target second (its verifier)."""
        request = build_request(model_digest=model.digest, client_key=self.identity.public_key, prompt=prompt,
                                max_tokens=max_tokens)
        bids = await real_bids(self.node, self.identity, request, [target])
        self.executor, executor_bid = key_at_rank(request.request_id(), bids, 0)
        bid_set = signed_bid_set(self.identity, request, [*bids, executor_bid])
        out = await trio.to_thread.run_sync(lambda: generate(model, model.prompt_ids(prompt=prompt),
                                                             max_tokens=max_tokens, stop_at_eos=False))
        now = now_ms()
        result = InferenceResult(
            request_id=request.request_id(), model=model.digest, numeric_class=model.numeric_class,
            executor=self.executor.public_key, prompt_ids=tuple(out.prompt_ids), output_ids=tuple(out.output_ids),
            finish_reason=out.finish_reason, fingerprint_format=out.fingerprint_format,
            fingerprint=out.fingerprint_bytes, commitment=out.commitment, started_at_ms=now, finished_at_ms=now,
            election=bid_set.message_id)
        return encode_signed(self.identity, VerifyTask(request=request, result=encode_signed(self.executor, result),
                                                      inherited_tokens=0, issued_at_ms=now,
                                                      bid_set=bid_set.to_bytes(), quorum=1))

    def offer(self, model) -> bytes:
        request = build_request(model_digest=model.digest, client_key=self.identity.public_key, prompt="x",
                                max_tokens=4)
        return encode_signed(self.identity, TaskOffer(request_id=request.request_id(), model=model.digest,
                                                      max_tokens=4, epoch_seed=bytes(32),
                                                      expires_at_ms=now_ms() + OFFER_TTL_MS // 2))


def answers(replies: list[bytes], signer: bytes, expect) -> list:
    out = []
    for reply in replies:
        signed = decode_signed(reply, expect=expect, max_size=max(MAX_VERDICT_BYTES, MAX_OFFER_FRAME))
        assert signed.signer == signer
        out.append(signed.message)
    return out


async def flood(attacker: Attacker, peer_id: str, protocol: str, body: bytes, *, streams: int, each: int,
                max_frame: int) -> list[bytes]:
    """Send ``body`` ``streams * each`` times: ``streams`` concurrent streams, ``each`` requests per stream."""
    replies: list[bytes] = []

    async def one_stream() -> None:
        frames = await attacker.node.open_stream(peer_id, protocol, timeout=30.0, max_frame=max_frame)
        async with frames:
            for _ in range(each):
                replies.append(await frames.call(body, timeout=60.0))

    async with trio.open_nursery() as nursery:
        for _ in range(streams):
            nursery.start_soon(one_stream)
    return replies


def attacker_node(net) -> Node:
    return Node(Identity.generate(), NodeConfig(listen=LOOPBACK, bootstrap=tuple(net.bootstrap_addrs), role="client"))


async def test_replayed_verify_task_costs_one_prefill_and_one_ledger_row(model):
    async with local_network([model], peers=1) as net:
        target = net.peers[0]
        async with attacker_node(net) as node:
            attacker = Attacker(node, Identity.generate())
            task = await attacker.verify_task(model, "def main(", target.peer_id)
            replies = await flood(attacker, target.peer_id, VERIFY_PROTOCOL, task, streams=40, each=5,
                                  max_frame=MAX_VERIFY_FRAME)
        messages = answers(replies, target.identity.public_key, (Verdict, Refusal))
        assert len(messages) == 200
        verdicts = [m for m in messages if isinstance(m, Verdict)]
        refusals = [m for m in messages if isinstance(m, Refusal)]
        assert len(verdicts) == 1
        assert {r.code for r in refusals} <= {"invalid", "busy"}
        # Within the rate (the first VERIFY_RATE.burst tasks) the replay guard answers; beyond, the rate limit.
        assert sum("replay" in r.message for r in refusals) >= VERIFY_RATE.burst - 1
        counters = target.verification.counters
        assert counters["verify.accept"] + counters["verify.reject"] == 1  # one prefill
        assert len(target.ledger.verdicts()) == 1                          # one ledger row
        # The target still serves an honest client afterwards.
        async with AsyncClient(bootstrap=net.bootstrap_addrs) as client:
            completion = await client.generate(model=MODEL, prompt="import os\n", max_tokens=4, verify="off")
            assert completion.executor == target.peer_id


async def test_verifier_refuses_busy_instead_of_queueing_and_a_refused_task_may_come_back(model):
    async with local_network([model], peers=1, slots=1) as net:
        target = net.peers[0]
        async with attacker_node(net) as node:
            attacker = Attacker(node, Identity.generate())
            task = await attacker.verify_task(model, "class A:", target.peer_id)
            # The target's one verification slot is taken (as by another client's prefill in flight).
            await target.verification.slots.acquire()
            try:
                with trio.fail_after(30):  # an answer, not a wait for the slot (the slot is never freed here)
                    reply = await node.request(target.peer_id, VERIFY_PROTOCOL, task, timeout=30.0,
                                               max_frame=MAX_VERIFY_FRAME)
            finally:
                target.verification.slots.release()
            [refusal] = answers([reply], target.identity.public_key, (Verdict, Refusal))
            assert isinstance(refusal, Refusal) and refusal.code == "busy" and "slots" in refusal.message
            assert target.verification.counters["verify.accept"] + target.verification.counters["verify.reject"] == 0
            # Busy did not spend the replay guard: the same task is judged once a slot is free.
            reply = await node.request(target.peer_id, VERIFY_PROTOCOL, task, timeout=30.0, max_frame=MAX_VERIFY_FRAME)
            [verdict] = answers([reply], target.identity.public_key, (Verdict, Refusal))
            assert isinstance(verdict, Verdict)


async def test_offer_flood_from_one_peer_is_rate_limited_and_honest_clients_still_get_bids(model):
    async with local_network([model], peers=1) as net:
        target = net.peers[0]
        async with attacker_node(net) as node:
            attacker = Attacker(node, Identity.generate())
            offer = attacker.offer(model)
            started = trio.current_time()
            async with trio.open_nursery() as nursery:
                results: list[list[bytes]] = []

                async def attack() -> None:
                    results.append(await flood(attacker, target.peer_id, BID_PROTOCOL, offer, streams=8, each=10,
                                               max_frame=MAX_OFFER_FRAME))

                nursery.start_soon(attack)
                # An honest client (another peer ID, so another bucket) is served during the flood.
                async with AsyncClient(bootstrap=net.bootstrap_addrs) as client:
                    completion = await client.generate(model=MODEL, prompt="import os\n", max_tokens=4,
                                                       verify="off")
                    assert completion.executor == target.peer_id
            elapsed = trio.current_time() - started
        messages = answers(results[0], target.identity.public_key, (VrfBid, Refusal))
        assert len(messages) == 80
        bids = [m for m in messages if isinstance(m, VrfBid)]
        busy = [m for m in messages if isinstance(m, Refusal) and m.code == "busy"]
        assert len(bids) + len(busy) == 80
        assert len(bids) <= OFFER_RATE.burst + OFFER_RATE.per_second * elapsed
        limited = [m for m in busy if "offers/s" in m.message]  # others: the slot was taken by the honest task
        assert len(limited) >= 80 - OFFER_RATE.burst - OFFER_RATE.per_second * elapsed
        assert target.server.counters["offers.rate_limited"] == len(limited)
        # Over-limit answers are delayed: 8 streams got them no faster than one per stream per delay.
        assert elapsed >= OVER_LIMIT_DELAY_S * (len(limited) / 8) * 0.9


async def test_receipt_flood_is_rate_limited_so_the_ledger_grows_at_a_bounded_rate(model):
    async with local_network([model], peers=1) as net:
        target = net.peers[0]
        async with attacker_node(net) as node:
            me = node.identity

            def receipt(i: int) -> bytes:  # distinct receipts naming the target, each a new ledger row
                return encode_signed(me, Receipt(
                    request_id=i.to_bytes(32, "big"), model=model.digest, client=me.public_key,
                    executor=target.identity.public_key, verifiers=(), result_hash=bytes(32), output_tokens=0,
                    outcome="failed", issued_at_ms=now_ms()))

            stored, refused, unbooked = [], [], []
            started = trio.current_time()

            async def one_stream(first: int) -> None:
                frames = await node.open_stream(target.peer_id, RECEIPT_PROTOCOL, timeout=30.0,
                                                max_frame=MAX_RECEIPT_FRAME)
                async with frames:
                    for i in range(first, first + 10):
                        try:
                            await frames.call(receipt(i), timeout=60.0)
                            stored.append(i)
                        except RemoteError as exc:
                            if "receipts/s" in str(exc):
                                refused.append(i)
                            else:  # within the rate, a receipt for work the target never did books nothing
                                assert "not booked: not-a-participant" in str(exc)
                                unbooked.append(i)

            async with trio.open_nursery() as nursery:
                for stream in range(12):
                    nursery.start_soon(one_stream, stream * 10)
            elapsed = trio.current_time() - started
        rows = len(list(target.ledger.receipts()))
        assert rows == len(stored) and len(stored) + len(refused) + len(unbooked) == 120
        assert rows <= RECEIPT_RATE.burst + RECEIPT_RATE.per_second * elapsed
        assert refused and target.verification.counters["receipt.rate_limited"] == len(refused)
