"""The ledger: crash safety under SIGKILL, rules, reputation and the quorum tally (pure parts)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from hypothesis import given, settings
from hypothesis import strategies as st

from p2pinfer.identity import Identity
from p2pinfer.ledger import Ledger
from p2pinfer.ledger.rules import PENALTY_SILENT, Entry, entry_for_no_show
from p2pinfer.quorum import majority, pick_verifiers, tally
from p2pinfer.reputation import EXCLUDE_BELOW, standing
from p2pinfer.wire import Verdict, sign

WRITER = r"""
import sys
from p2pinfer.ledger import Ledger
from p2pinfer.ledger.rules import Entry
ledger = Ledger(sys.argv[1])
i = 0
while True:
    i += 1
    ledger.add_entries([Entry(b"k" * 32, "credit.tokens", 1, i.to_bytes(32, "big"), i, "x" * 200)])
    print(i, flush=True)
"""


def test_committed_entries_survive_sigkill(tmp_path):
    path = tmp_path / "ledger.sqlite"
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], stdout=subprocess.PIPE, text=True)
    committed = 0
    try:
        deadline = time.monotonic() + 60
        while committed < 200 and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            committed = int(line)
        os.kill(proc.pid, signal.SIGKILL)  # mid-write: it keeps writing until the signal lands
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()
    assert committed >= 200
    with Ledger(path) as ledger:
        assert ledger.integrity_check() == "ok"
        ids = {int.from_bytes(e.request_id, "big") for e in ledger.entries()}
        assert set(range(1, committed + 1)) <= ids  # every entry reported committed is there


def _verdict(identity: Identity, accept: bool, rid: bytes = b"r" * 32, rh: bytes = b"h" * 32, bad=None):
    return sign(identity, Verdict(request_id=rid, result_hash=rh, accept=accept, first_bad_position=bad,
                                  reason="", max_deviation=0.0, issued_at_ms=1))


IDS = [Identity(bytes([i + 1]) * 32) for i in range(7)]


@settings(max_examples=60, deadline=None)
@given(votes=st.lists(st.sampled_from([True, False, None]), min_size=1, max_size=7))
def test_tally_needs_a_strict_majority_of_those_asked(votes):
    asked = [i.public_key for i in IDS[:len(votes)]]
    verdicts = [_verdict(IDS[n], v) for n, v in enumerate(votes) if v is not None]
    t = tally(verdicts, verifiers=asked, request_id=b"r" * 32, result_hash=b"h" * 32)
    accepts, rejects = votes.count(True), votes.count(False)
    assert (t.accepts, t.rejects) == (accepts, rejects)
    need = majority(len(votes))
    expected = "accepted" if accepts >= need else "rejected" if rejects >= need else "unverified"
    assert t.outcome == expected
    assert t.verified == (expected == "accepted")
    assert len(t.silent) == votes.count(None)
    if expected == "unverified":
        assert t.outvoted == ()
    else:
        assert len(t.outvoted) == (rejects if expected == "accepted" else accepts)


def test_tally_ignores_strangers_duplicates_and_other_results():
    asked = [i.public_key for i in IDS[:3]]
    verdicts = [_verdict(IDS[0], False), _verdict(IDS[0], False), _verdict(IDS[5], False),
                _verdict(IDS[1], False, rh=b"x" * 32), _verdict(IDS[2], True)]
    t = tally(verdicts, verifiers=asked, request_id=b"r" * 32, result_hash=b"h" * 32)
    assert (t.accepts, t.rejects, t.outcome) == (1, 1, "unverified")
    assert len(t.ignored) == 3


def test_verifiers_skip_everyone_who_executed():
    ranking = [i.public_key for i in IDS]
    assert pick_verifiers(ranking, {ranking[0], ranking[1]}, 3) == tuple(ranking[2:5])


def test_reputation_excludes_after_two_no_shows_and_forgets_after_a_day():
    key, now = b"p" * 32, 10**12
    one = [entry_for_no_show(key, b"a" * 32, now)]
    two = one + [entry_for_no_show(key, b"b" * 32, now)]
    assert not standing([], now_ms=now).excluded
    assert not standing(one, now_ms=now).excluded
    assert standing(two, now_ms=now).excluded and standing(two, now_ms=now).score < EXCLUDE_BELOW
    assert not standing(two, now_ms=now + 25 * 3600 * 1000).excluded
    assert standing([], now_ms=now, fraud_at_ms=now).excluded


def test_ledger_entries_are_idempotent_per_request_and_kind(tmp_path):
    with Ledger(tmp_path / "l.sqlite") as ledger:
        e = Entry(b"p" * 32, PENALTY_SILENT, -20, b"a" * 32, 1)
        ledger.add_entries([e])
        ledger.add_entries([e])
        assert ledger.balance(b"p" * 32) == -20
    with Ledger(tmp_path / "l.sqlite") as again:  # reopening runs no migration twice
        assert again.entry_count() == 1


def test_rejection_in_inherited_tokens_does_not_blame_the_final_executor():
    from p2pinfer.ledger.rules import PENALTY_REJECTED
    from p2pinfer.settlement import entries_for_tally

    asked = [i.public_key for i in IDS[:3]]
    executor = IDS[6].public_key

    def entries(first_bad: int, inherited: int):
        verdicts = [_verdict(IDS[n], False, bad=first_bad) for n in range(3)]
        t = tally(verdicts, verifiers=asked, request_id=b"r" * 32, result_hash=b"h" * 32)
        return [(e.peer, e.kind) for e in entries_for_tally(t, executor=executor, output_tokens=20,
                                                             inherited_tokens=inherited, request_id=b"r" * 32,
                                                             at_ms=1)]

    assert (executor, PENALTY_REJECTED) in entries(first_bad=12, inherited=10)   # its own tokens: blamed
    assert (executor, PENALTY_REJECTED) not in entries(first_bad=4, inherited=10)  # inherited: not blamed
    assert (executor, PENALTY_REJECTED) in entries(first_bad=4, inherited=0)
