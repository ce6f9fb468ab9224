"""The verification quorum end to end: real peers on 127.0.0.1, real models, real signatures and ledgers."""

from __future__ import annotations

import pytest
import trio

from p2pinfer.identity import Identity
from p2pinfer.ledger import Ledger
from p2pinfer.ledger.rules import (CREDIT_TOKENS, CREDIT_VERIFICATION, PENALTY_AGAINST_QUORUM, PENALTY_FRAMING,
                                   PENALTY_REJECTED)
from p2pinfer.localnet import local_network
from p2pinfer.request.client import AsyncClient, StreamChunk
from p2pinfer.request.errors import ResultRejected
from p2pinfer.runtime import load_model

MODEL = "tiny-llama-trained"


@pytest.fixture(scope="module")
def honest(shared_models):
    return load_model(shared_models / MODEL, name=MODEL, providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def perturbed(shared_models, honest):
    """The cheating model: one layer perturbed 1%, announced under the honest model's digest."""
    return load_model(shared_models / "tiny-llama-trained-perturbed", digest=honest.digest, name=MODEL,
                      providers=["CPUExecutionProvider"])


async def wait_for(predicate, timeout: float = 10.0) -> None:
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(0.02)


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
        await wait_for(lambda: all(p.verification.counters["fraud.proven"] >= 1 for p in others))
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
