"""The order in which a client assigns the ranks of an election (``execution.attempt_order``).

A rank whose task stream never opened did not see the assignment; a higher rank then asks it for its status,
gets a true signed "not assigned" and refuses as ``not-winner``. The client must try the undelivered rank once
more, or a request among honest peers fails on one slow protocol negotiation.
"""

from __future__ import annotations

from p2pinfer.request.execution import Attempt, Progress, attempt_order
from p2pinfer.settlement import Fault

RANKING = ("peer-a", "peer-b", "peer-c")


def _run(progress: Progress, outcomes: dict[int, Attempt]) -> list[tuple[int, str]]:
    """Drive the generator as the client does: each yielded attempt appends its outcome."""
    order = []
    for attempt, peer in attempt_order(RANKING, progress, 0):
        order.append((attempt, peer))
        if len(order) > 10:
            break
        progress.attempts.append(outcomes.get(len(order) - 1, Attempt(peer, "refused:busy", 0)))
    return order


def test_every_rank_once_when_all_were_delivered() -> None:
    order = _run(Progress(), {i: Attempt(p, "refused:not-winner", 0) for i, p in enumerate(RANKING)})
    assert order == list(enumerate(RANKING))


def test_an_undelivered_rank_is_retried_once_after_a_higher_rank_refused_as_not_winner() -> None:
    outcomes = {0: Attempt("peer-a", "failed:dial-failed", 0, fault=Fault.UNPROVEN, delivered=False),
                1: Attempt("peer-b", "refused:not-winner", 0), 2: Attempt("peer-c", "refused:not-winner", 0),
                3: Attempt("peer-a", "failed:dial-failed", 0, fault=Fault.UNPROVEN, delivered=False)}
    order = _run(Progress(), outcomes)
    assert order == [*enumerate(RANKING), *enumerate(RANKING)]  # a second pass from rank 0, and only one


def test_no_retry_once_tokens_came_or_without_a_not_winner_refusal() -> None:
    undelivered = Attempt("peer-a", "failed:dial-failed", 0, fault=Fault.UNPROVEN, delivered=False)
    busy = {0: undelivered, 1: Attempt("peer-b", "refused:busy", 0), 2: Attempt("peer-c", "refused:busy", 0)}
    assert _run(Progress(), busy) == list(enumerate(RANKING))
    with_tokens = Progress(token_ids=[5, 6])
    refused = {0: undelivered, 1: Attempt("peer-b", "refused:not-winner", 0)}
    assert _run(with_tokens, refused) == list(enumerate(RANKING))
