"""The verification quorum end to end: real peers on 127.0.0.1, real models, real signatures and ledgers."""

from __future__ import annotations

import pytest
import trio

from net.helpers import wait_until
from p2pinfer.identity import Identity
from p2pinfer.ledger import Ledger
from p2pinfer.ledger.rules import (CREDIT_TOKENS, CREDIT_VERIFICATION, PENALTY_AGAINST_QUORUM, PENALTY_FRAMING,
                                   PENALTY_REJECTED)
from p2pinfer.localnet import local_network
from p2pinfer.request.client import AsyncClient, StreamChunk
from p2pinfer.request.errors import ResultRejected

from elections import key_at_rank, ranking_keys, real_bids, signed_bid_set

MODEL = "tiny-llama-trained"


def kinds(ledger: Ledger, key: bytes) -> list[str]:
    return [e.kind for e in ledger.entries(key)]


async def test_honest_result_is_accepted_and_credited(honest):
    async with local_network([honest], peers=4) as net:
        async with AsyncClient(bootstrap=net.bootstrap_addrs) as client:
            completion = await client.generate(model=MODEL, prompt="import os\n", max_tokens=12)
            v = completion.verification
            assert v is not None and v.outcome == "accepted" and completion.verified
            assert len(v.verifiers) == 3 and completion.executor not in v.verifiers
            assert v.tally.accepts == 3
            assert {p.peer_id for p in net.peers} == {completion.executor, *v.verifiers}
            executor_key = completion.result.signer
            assert client.ledger.balance(executor_key) == 12
            for verdict in v.verdicts:
                assert kinds(client.ledger, verdict.signer) == [CREDIT_VERIFICATION]
            # every peer involved got the signed receipt and booked the same entries
            executor = next(p for p in net.peers if p.peer_id == completion.executor)
            assert kinds(executor.ledger, executor_key)[0] == CREDIT_TOKENS
            assert list(executor.ledger.receipts()) == [v.receipt.to_bytes()]


async def test_cheating_executor_is_rejected_penalized_and_excluded(honest, perturbed):
    async with local_network([honest], peers=4, peer_models=[[perturbed], [honest], [honest], [honest]]) as net:
        cheater = net.peers[0]
        caught = None
        for _ in range(30):  # until the VRF makes the cheater the executor (each try with a fresh ledger:
            # a cheater elected as verifier first is outvoted, and excluded before it ever executes)
            client = AsyncClient(bootstrap=net.bootstrap_addrs)
            async with client:
                try:
                    completion = await client.generate(model=MODEL, prompt="def main(", max_tokens=10,
                                                       verify="wait")
                except ResultRejected as exc:
                    caught = exc
                    await check_excluded_afterwards(client, cheater)
                    break
                assert completion.executor != cheater.peer_id and completion.verified
        assert caught is not None, "the cheater never won an election"
        v = caught.verification
        assert v.outcome == "rejected" and not v.verified and v.executor_blamed
        assert v.tally.rejects == 3 and v.fraud_proof is not None
        # peers holding the model re-checked the gossiped fraud proof and booked it as proven
        others = net.peers[1:]
        await wait_until(lambda: all(p.verification.counters["fraud.proven"] >= 1 for p in others))
        for p in others:
            assert p.ledger.excluded([cheater.identity.public_key], now_ms=_now()) == {cheater.identity.public_key}


def _now() -> int:
    from p2pinfer.wire import now_ms
    return now_ms()


async def check_excluded_afterwards(client: AsyncClient, cheater) -> None:
    key = cheater.identity.public_key
    assert kinds(client.ledger, key) == [PENALTY_REJECTED]
    for _ in range(6):  # excluded from every later election by this client
        completion = await client.generate(model=MODEL, prompt="class A:", max_tokens=4)
        assert completion.executor != cheater.peer_id
        assert cheater.peer_id in completion.election.excluded
        assert cheater.peer_id not in completion.election.ranking
        assert completion.verified


async def test_one_lying_verifier_among_three_is_outvoted_and_penalized(honest, perturbed):
    """A peer whose model differs rejects honest results; the two honest verifiers outvote it."""
    async with local_network([honest], peers=4, peer_models=[[perturbed], [honest], [honest], [honest]]) as net:
        liar = net.peers[0]
        for _ in range(20):  # until the liar is among the verifiers (not the executor)
            async with AsyncClient(bootstrap=net.bootstrap_addrs) as client:
                completion = await client.generate(model=MODEL, prompt="import sys\n", max_tokens=8)
                v = completion.verification
                if completion.executor == liar.peer_id:
                    assert v.outcome == "rejected"
                    continue
                assert liar.peer_id in v.verifiers
                assert v.outcome == "accepted" and completion.verified
                assert (v.tally.accepts, v.tally.rejects) == (2, 1)
                assert v.tally.outvoted == (liar.identity.public_key,)
                assert kinds(client.ledger, liar.identity.public_key) == [PENALTY_AGAINST_QUORUM]
                assert client.ledger.excluded([liar.identity.public_key], now_ms=_now())
                # the honest executor is credited in full, by the client and by itself
                assert client.ledger.balance(completion.result.signer) == 8
                executor = net.peer(completion.executor)
                rid = completion.request_id
                await wait_until(lambda: [(e.kind, e.amount) for e in executor.ledger.entries(completion.result.signer)
                                        if e.request_id == rid] == [(CREDIT_TOKENS, 8)])
                # the executor books the liar's penalty from the signed receipt; the liar itself never books a
                # penalty against itself from someone else's receipt (or any client could make it exclude itself)
                await wait_until(lambda: PENALTY_AGAINST_QUORUM in kinds(executor.ledger, liar.identity.public_key))
                await wait_until(lambda: liar.verification.counters["receipt.stored"] >= 1)
                assert PENALTY_AGAINST_QUORUM not in kinds(liar.ledger, liar.identity.public_key)
                return
        pytest.fail("the liar was never elected verifier")


async def test_fraud_proof_forged_by_colluding_verifiers_is_recognized_as_false(honest):
    from p2pinfer.net.gossip import FRAUD_TOPIC
    from p2pinfer.wire import FraudProof, Verdict, encode_signed, now_ms, sign

    colluders = [Identity.generate(), Identity.generate()]
    async with local_network([honest], peers=3) as net:
        async with AsyncClient(bootstrap=net.bootstrap_addrs) as client:
            completion = await client.generate(model=MODEL, prompt="def run(", max_tokens=8)
            assert completion.verified
            result = completion.result
            # two verifiers that never ran anything sign "reject" and gossip a fraud proof
            verdicts = tuple(sign(c, Verdict(request_id=result.message.request_id, result_hash=result.message_id,
                                             accept=False, first_bad_position=0, reason="made up",
                                             max_deviation=1.0, issued_at_ms=now_ms())).to_bytes()
                             for c in colluders)
            request = completion.request
            proof = encode_signed(colluders[0], FraudProof(request=request, result=result.to_bytes(),
                                                           verdicts=verdicts, inherited_tokens=0,
                                                           issued_at_ms=now_ms()))
            await client.node.publish(FRAUD_TOPIC, proof)
            await wait_until(lambda: all(p.verification.counters["fraud.disproven"] == 1 for p in net.peers))
            executor_key = result.signer
            for p in net.peers:
                assert p.verification.counters["fraud.proven"] == 0
                assert PENALTY_REJECTED not in kinds(p.ledger, executor_key)
                assert not p.ledger.excluded([executor_key], now_ms=_now())
                for c in colluders:  # the framers are penalized instead, and shunned
                    assert kinds(p.ledger, c.public_key) == [PENALTY_FRAMING]
                    assert p.ledger.excluded([c.public_key], now_ms=_now())


async def test_sampled_honest_result_accepted_and_off_sampler_tokens_rejected(honest):
    from p2pinfer.identity import peer_id_from_public_key
    from p2pinfer.request.verification import ask_verifiers
    from p2pinfer.runtime import SamplingParams, generate, sampling_seed
    from p2pinfer.quorum import tally
    from p2pinfer.wire import InferenceResult, now_ms, sign

    async with local_network([honest], peers=4) as net:
        async with AsyncClient(bootstrap=net.bootstrap_addrs) as client:
            completion = await client.generate(model=MODEL, prompt="import os\n", max_tokens=16, temperature=0.9,
                                               top_p=0.95, seed=7)
            assert completion.verified and completion.verification.tally.accepts == 3
            # A "lazy" executor that samples with other noise (here: another seed) than the request's seeded
            # sampler: honest log-probs, but tokens the seeded sampler would not pick.
            request = completion.request
            rid = request.request_id()
            params = SamplingParams(temperature=request.temperature, top_k=request.top_k, top_p=request.top_p)
            prompt_ids = list(completion.result.message.prompt_ids)
            off = await trio.to_thread.run_sync(lambda: generate(
                honest, prompt_ids, max_tokens=16, params=params, seed_material=sampling_seed(rid, 8)))
            assert off.output_ids != list(completion.token_ids)
            # The cheat is a real bidder of a real election (its own key, ranked first), so the peers are its
            # verifiers: they judge its result (verify tasks are bound to the election).
            bids = await real_bids(client.node, client.identity, request, [p.peer_id for p in net.peers])
            cheat, cheat_bid = key_at_rank(rid, bids, 0)
            bid_set = signed_bid_set(client.identity, request, [*bids, cheat_bid])
            forged = sign(cheat, InferenceResult(
                request_id=rid, model=honest.digest, numeric_class=honest.numeric_class, executor=cheat.public_key,
                prompt_ids=tuple(prompt_ids), output_ids=tuple(off.output_ids), finish_reason=off.finish_reason,
                fingerprint_format=off.fingerprint_format, fingerprint=off.fingerprint_bytes,
                commitment=off.commitment, started_at_ms=now_ms(), finished_at_ms=now_ms(),
                election=bid_set.message_id))
            keys = ranking_keys(bid_set)[1:4]
            verdicts, refusals = await ask_verifiers(client.node, client.identity, request, forged, keys, 0, 30.0,
                                                     bid_set=bid_set)
            assert not refusals
            t = tally(verdicts, verifiers=keys, request_id=rid, result_hash=forged.message_id)
            assert t.outcome == "rejected" and t.rejects == 3
            assert all("sampl" in v.message.reason or "token" in v.message.reason for v in verdicts), \
                [v.message.reason for v in verdicts]
            assert {v.signer for v in verdicts} == set(keys)
