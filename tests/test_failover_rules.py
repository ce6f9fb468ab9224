"""The pure rules of verify-task binding and of failover past a silent rank (p2pinfer.request.evidence),
property-based over real signed elections, results and answers (no I/O)."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from p2pinfer.request.evidence import (StatusAnswer, VerifyRefusal, classify_status_answer, token_chain,
                                       verify_task_problem)
from p2pinfer.wire import (InferenceResult, Refusal, TaskStatus, TokenChunk, VerifyTask, decode_signed,
                           encode_signed, sign)

from elections import BID_SET, BY_KEY, CLIENT, OTHER_CLIENT, POOL, RANKING, REQUEST, RID

ELECTION = BID_SET.message_id
OUTPUT = (11, 12, 13, 14)


def result(rank: int, *, inherited: int = 0, witnessed=(), election: bytes = ELECTION, attempt: int | None = None):
    executor = BY_KEY[RANKING[rank]]
    return decode_signed(encode_signed(executor, InferenceResult(
        request_id=RID, model=REQUEST.model, numeric_class="fp32-cpu", executor=executor.public_key, prompt_ids=(1,),
        output_ids=OUTPUT, finish_reason="length", fingerprint_format="f", fingerprint=b"", commitment=bytes(32),
        started_at_ms=1, finished_at_ms=2, inherited_tokens=inherited, election=election,
        attempt=rank if attempt is None else attempt, witnessed=tuple(witnessed))))


def task(r, *, evidence=(), quorum: int = 3, bid_set: bytes = BID_SET.to_bytes()) -> VerifyTask:
    return VerifyTask(request=REQUEST, result=r.to_bytes(), inherited_tokens=r.message.inherited_tokens,
                      issued_at_ms=1, bid_set=bid_set, evidence=tuple(evidence), quorum=quorum)


def refusal(rank: int) -> bytes:
    return encode_signed(BY_KEY[RANKING[rank]], Refusal(request_id=RID, code="busy", message=""))


def chunk(rank: int, tokens) -> bytes:
    return encode_signed(BY_KEY[RANKING[rank]], TokenChunk(request_id=RID, index=0, token_ids=tuple(tokens), text="",
                                                           chain=token_chain(RID, tokens)))


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rank=st.integers(0, 3), me=st.integers(0, 6), quorum=st.integers(0, 4),
       how=st.lists(st.sampled_from(["refused", "took", "witnessed", "nothing"]), min_size=3, max_size=3))
def test_a_verifier_judges_only_as_a_verifier_rank_with_every_lower_rank_accounted_for(rank, me, quorum, how):
    """Judged exactly when the verifier is one of the `quorum` ranks after the executor's rank and every lower
    rank left signed evidence (a refusal, or tokens) or the executor signed that it asked it."""
    lower = how[:rank]
    evidence = [refusal(i) if h == "refused" else chunk(i, ()) for i, h in enumerate(lower) if h in ("refused", "took")]
    witnessed = [RANKING[i] for i, h in enumerate(lower) if h == "witnessed"]
    check = verify_task_problem(task(result(rank, witnessed=witnessed), evidence=evidence, quorum=quorum), result(
        rank, witnessed=witnessed), RANKING[me])
    is_verifier = rank < me <= rank + quorum
    accounted = "nothing" not in lower
    if not is_verifier:
        assert check.problem is VerifyRefusal.NOT_A_VERIFIER
    elif not accounted:
        assert check.problem is VerifyRefusal.NO_FAILOVER_EVIDENCE
    else:
        assert check.problem is None, check


def test_a_verify_task_names_the_election_its_result_signs():
    r = result(0)
    me = RANKING[1]
    assert verify_task_problem(task(r), r, me).problem is None
    assert verify_task_problem(task(r, bid_set=b""), r, me).problem is VerifyRefusal.NO_ELECTION
    assert verify_task_problem(task(r, bid_set=b"\x00junk"), r, me).problem is VerifyRefusal.BAD_ELECTION
    forged = sign(OTHER_CLIENT, BID_SET.message).to_bytes()  # the same election, signed by another than the client
    assert verify_task_problem(task(r, bid_set=forged), r, me).problem is VerifyRefusal.BAD_ELECTION
    other = result(0, election=b"\x01" * 32)
    assert verify_task_problem(task(other), other, me).problem is VerifyRefusal.RESULT_NOT_OF_ELECTION
    # the executor of rank 1 claiming attempt 0, and rank 0 claiming attempt 1
    for wrong in (result(1, attempt=0), result(0, attempt=1)):
        assert verify_task_problem(task(wrong), wrong, RANKING[3]).problem is VerifyRefusal.EXECUTOR_NOT_AT_RANK
    # inherited tokens need the earlier executor's signed chain over exactly them
    inherited = result(1, inherited=2)
    assert verify_task_problem(task(inherited, evidence=[chunk(0, OUTPUT[:2])]), inherited, RANKING[2]).problem is None
    assert verify_task_problem(task(inherited, evidence=[chunk(0, (11, 99))]), inherited,
                               RANKING[2]).problem is VerifyRefusal.BAD_FAILOVER_EVIDENCE
    # evidence from a rank that is not lower (the verifier itself) proves nothing
    assert verify_task_problem(task(result(1), evidence=[refusal(2)]), result(1),
                               RANKING[2]).problem is VerifyRefusal.BAD_FAILOVER_EVIDENCE
    # no inherited tokens at attempt 0
    zero = result(0, inherited=1)
    assert verify_task_problem(task(zero), zero, me).problem is VerifyRefusal.BAD_FAILOVER_EVIDENCE


LOWER = BY_KEY[RANKING[0]]


@given(junk=st.binary(max_size=300))
def test_junk_status_answers_are_no_answer(junk):
    assert classify_status_answer(junk, lower=LOWER.public_key, request_id=RID, election=ELECTION) == \
        (StatusAnswer.SILENT, None)


def test_what_a_status_answer_proves():
    def classify(body):
        return classify_status_answer(body, lower=LOWER.public_key, request_id=RID, election=ELECTION)[0]

    took, refused = chunk(0, ()), refusal(0)
    assert classify_status_answer(took, lower=LOWER.public_key, request_id=RID, election=ELECTION) == \
        (StatusAnswer.FAILED, took)
    assert classify(refused) is StatusAnswer.FAILED
    for state in ("not-assigned", "pending"):
        assert classify(encode_signed(LOWER, TaskStatus(request_id=RID, election=ELECTION, state=state))) is \
            StatusAnswer.NOT_FAILED
    assert classify(None) is StatusAnswer.SILENT
    # signed by another key, for another request, or for another election: not that rank's answer
    assert classify(refusal(1)) is StatusAnswer.SILENT
    assert classify(encode_signed(LOWER, Refusal(request_id=b"\x01" * 32, code="busy", message=""))) is \
        StatusAnswer.SILENT
    assert classify(encode_signed(LOWER, TaskStatus(request_id=RID, election=b"\x02" * 32, state="not-assigned"))) \
        is StatusAnswer.SILENT
