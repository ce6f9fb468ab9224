"""Verify tasks are bound to the election (issue #13): a verifier judges a result only as one of the verifier
ranks of the election that result names.

A real network on 127.0.0.1 with real models; the attacker is a client host with its own key that also signs
results with an executor key of its own (a real bidder it ranked first by trying keys), and sends verify tasks
over the wire itself. Before this rule every task below was judged: a prefill per task, a verdict row in the
verifier's ledger.
"""

from __future__ import annotations

import trio

from p2pinfer.identity import Identity
from p2pinfer.localnet import local_network
from p2pinfer.request.client import AsyncClient
from p2pinfer.request.evidence import VerifyRefusal
from p2pinfer.request.params import build_request
from p2pinfer.request.protocol import MAX_VERIFY_FRAME, VERIFY_PROTOCOL
from p2pinfer.runtime import generate
from p2pinfer.wire import InferenceResult, Refusal, Verdict, VerifyTask, decode_signed, encode_signed, now_ms
from p2pinfer.wire.messages import MAX_VERDICT_BYTES

from elections import key_at_rank, ranking_keys, real_bids, signed_bid_set

MODEL = "tiny-llama-trained"


def signed_result(executor: Identity, model, request, out, *, election: bytes, attempt: int = 0,
                  witnessed=()) -> bytes:
    now = now_ms()
    return encode_signed(executor, InferenceResult(
        request_id=request.request_id(), model=model.digest, numeric_class=model.numeric_class,
        executor=executor.public_key, prompt_ids=tuple(out.prompt_ids), output_ids=tuple(out.output_ids),
        finish_reason=out.finish_reason, fingerprint_format=out.fingerprint_format, fingerprint=out.fingerprint_bytes,
        commitment=out.commitment, started_at_ms=now, finished_at_ms=now, election=election, attempt=attempt,
        witnessed=tuple(witnessed)))


async def test_a_verifier_judges_only_as_a_verifier_rank_of_the_election_the_result_names(honest):
    async with local_network([honest], peers=4) as net:
        async with AsyncClient(bootstrap=net.bootstrap_addrs) as attacker:
            me, node = attacker.identity, attacker.node
            request = build_request(model_digest=honest.digest, client_key=me.public_key, prompt="def f(",
                                    max_tokens=6)
            rid = request.request_id()
            bids = await real_bids(node, me, request, [p.peer_id for p in net.peers])
            executor, executor_bid = key_at_rank(rid, bids, 0)
            bid_set = signed_bid_set(me, request, [*bids, executor_bid])
            ranking = ranking_keys(bid_set)
            assert ranking[0] == executor.public_key
            by_key = {p.identity.public_key: p for p in net.peers}
            verifier, outsider = by_key[ranking[1]], by_key[ranking[4]]  # rank 1 verifies; rank 4 is no verifier
            out = await trio.to_thread.run_sync(lambda: generate(honest, honest.prompt_ids(prompt="def f("),
                                                                 max_tokens=6, stop_at_eos=False))
            result = signed_result(executor, honest, request, out, election=bid_set.message_id)

            async def send(peer, *, result=result, bid_set_bytes=bid_set.to_bytes(), quorum=3, evidence=()):
                task = encode_signed(me, VerifyTask(request=request, result=result, inherited_tokens=0,
                                                    issued_at_ms=now_ms(), bid_set=bid_set_bytes, evidence=evidence,
                                                    quorum=quorum))
                reply = await node.request(peer.peer_id, VERIFY_PROTOCOL, task, timeout=60, max_frame=MAX_VERIFY_FRAME)
                signed = decode_signed(reply, expect=(Verdict, Refusal), max_size=MAX_VERDICT_BYTES)
                assert signed.signer == peer.identity.public_key  # a signed answer, from the peer asked
                return signed.message

            forger = Identity.generate()
            stranger, _ = key_at_rank(rid, bids, 0)  # a key that is not in the set
            rank1, rank1_bid = key_at_rank(rid, bids, 1)  # a bidder the honest peer ranked 0 beats
            with_rank1 = signed_bid_set(me, request, [*bids, rank1_bid])
            cases = [
                # a peer outside the verifier ranks (rank 4 with a quorum of 3)
                (outsider, dict(), VerifyRefusal.NOT_A_VERIFIER),
                # ... and one that a quorum of 0 leaves out
                (verifier, dict(quorum=0), VerifyRefusal.NOT_A_VERIFIER),
                # no bid set at all
                (verifier, dict(bid_set_bytes=b""), VerifyRefusal.NO_ELECTION),
                # a bid set signed by another key than the request's client
                (verifier, dict(bid_set_bytes=signed_bid_set(forger, request, [*bids, executor_bid]).to_bytes()),
                 VerifyRefusal.BAD_ELECTION),
                # a bid set that is not a signed BidSet
                (verifier, dict(bid_set_bytes=b"\x93junk" * 10), VerifyRefusal.BAD_ELECTION),
                # a result whose executor is not in the election (another executor than the set's rank 0)
                (verifier, dict(result=signed_result(stranger, honest, request, out, election=bid_set.message_id)),
                 VerifyRefusal.EXECUTOR_NOT_AT_RANK),
                # a result that names another election than the set
                (verifier, dict(result=signed_result(executor, honest, request, out, election=bytes(32))),
                 VerifyRefusal.RESULT_NOT_OF_ELECTION),
                # an executor that claims attempt 0 while an honest peer holds rank 0 of its election
                (verifier, dict(bid_set_bytes=with_rank1.to_bytes(),
                                result=signed_result(rank1, honest, request, out, election=with_rank1.message_id)),
                 VerifyRefusal.EXECUTOR_NOT_AT_RANK),
            ]
            for peer, overrides, reason in cases:
                answer = await send(peer, **overrides)
                assert isinstance(answer, Refusal), (reason, answer)
                assert answer.message.startswith(f"{reason}:"), (reason, answer.message)
                assert peer.verification.counters[f"verify.unbound.{reason}"] >= 1

            # attempt 1 with no signed word from rank 0 (an honest peer that never failed), and the executor
            # did not sign that it asked rank 0 either: refused too
            ranking1 = ranking_keys(with_rank1)
            assert ranking1[1] == rank1.public_key and ranking1[0] in by_key
            late = signed_result(rank1, honest, request, out, election=with_rank1.message_id, attempt=1)
            answer = await send(by_key[ranking1[2]], result=late, bid_set_bytes=with_rank1.to_bytes())
            assert isinstance(answer, Refusal) and answer.message.startswith(f"{VerifyRefusal.NO_FAILOVER_EVIDENCE}:")

            # No prefill ran anywhere, nothing was recorded or booked against anyone.
            for p in net.peers:
                assert p.verification.counters["verify.accept"] + p.verification.counters["verify.reject"] == 0
                assert p.ledger.verdicts() == [] and p.ledger.entries() == []
            assert attacker.ledger.entries() == []

            # The same task to the election's own verifier rank is judged (the check is not a blanket refusal).
            answer = await send(verifier)
            assert isinstance(answer, Verdict) and answer.accept and answer.election == bid_set.message_id
            assert verifier.verification.counters["verify.accept"] == 1
