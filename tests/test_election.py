"""Executor election: determinism, order invariance, rejection of bad bids, and measured fairness."""

from __future__ import annotations

import dataclasses
import hashlib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from p2pinfer import election, vrf
from p2pinfer.election import Ranked, elect, election_input, make_bid
from p2pinfer.stats import chi_square_sf, chi_square_uniform
from p2pinfer.wire.hashing import tagged_hash
from p2pinfer.wire.messages import Bid, Request


def _seed(label: str, i: int) -> bytes:
    return hashlib.sha256(f"{label}/{i}".encode()).digest()


SEEDS = [_seed("peer", i) for i in range(8)]
KEYS = [vrf.public_key(s) for s in SEEDS]
REQUEST_ID = _seed("request", 0)
OTHER_REQUEST_ID = _seed("request", 1)
GOOD_BIDS = [make_bid(s, REQUEST_ID) for s in SEEDS]


def _corrupt(bid: Bid, byte: int = 40) -> Bid:
    proof = bytearray(bid.proof)
    proof[byte] ^= 0x01
    return dataclasses.replace(bid, proof=bytes(proof))


BAD_BIDS = [
    _corrupt(GOOD_BIDS[0]),  # same key as a good bid, invalid proof
    GOOD_BIDS[1],  # identical resend
    make_bid(SEEDS[2], OTHER_REQUEST_ID),  # another request
    dataclasses.replace(make_bid(SEEDS[3], OTHER_REQUEST_ID), request_id=REQUEST_ID),  # proof for another input
    make_bid(_seed("outsider", 0), REQUEST_ID),  # valid, but (in some tests) not eligible
]
POOL = GOOD_BIDS + BAD_BIDS


def _summary(result: election.ElectionResult) -> tuple:
    return (result.ranking, result.accepted, result.rejected, result.executor, result.verifiers)


# ---- basics -------------------------------------------------------------------------------------------


def test_election_input_is_domain_separated_tagged_hash() -> None:
    assert election_input(REQUEST_ID) == tagged_hash("p2pinfer/election/v1", REQUEST_ID, b"")
    assert election_input(REQUEST_ID, b"beacon") == tagged_hash("p2pinfer/election/v1", REQUEST_ID, b"beacon")
    assert election_input(REQUEST_ID, b"beacon") != election_input(REQUEST_ID)
    with pytest.raises(ValueError):
        election_input(b"short")
    with pytest.raises(ValueError):
        election_input(REQUEST_ID, bytes(33))


def test_ranking_is_by_vrf_output_and_roles_follow_it() -> None:
    result = elect(REQUEST_ID, b"", GOOD_BIDS, verifiers=3)
    outputs = sorted((vrf.verify(k, b.proof, election_input(REQUEST_ID)), k) for k, b in zip(KEYS, GOOD_BIDS))
    assert result.ranking == tuple(Ranked(k, out) for out, k in outputs)
    assert result.executor == outputs[0][1]
    assert result.verifiers == tuple(k for _, k in outputs[1:4])
    assert result.complete and not result.rejected
    assert [b.public_key for b in result.accepted] == [r.public_key for r in result.ranking]
    assert election.rank_of(result, outputs[5][1]) == 5
    assert election.rank_of(result, b"\x00" * 32) is None


def test_same_bids_same_result_for_everyone() -> None:
    a = elect(REQUEST_ID, b"", POOL)
    b = elect(bytes(REQUEST_ID), b"", list(reversed(POOL)))
    assert _summary(a) == _summary(b)


def test_epoch_seed_changes_the_election() -> None:
    seeded = [make_bid(s, REQUEST_ID, b"epoch-7") for s in SEEDS]
    result = elect(REQUEST_ID, b"epoch-7", seeded)
    assert len(result.ranking) == len(SEEDS)
    unseeded = elect(REQUEST_ID, b"", seeded)  # bids proved for another epoch are not valid here
    assert not unseeded.ranking
    assert {r.reason for r in unseeded.rejected} == {"invalid-proof"}


def test_request_binds_the_model() -> None:
    request = Request(
        model=_seed("model", 0), prompt="hi", messages=None, max_tokens=8, temperature=0.0, top_p=1.0, top_k=0,
        stop=(), seed=None, nonce=bytes(16), client=KEYS[0], created_at_ms=1,
    )
    other_model = dataclasses.replace(request, model=_seed("model", 1))
    bids = [make_bid(s, request.request_id()) for s in SEEDS[:3]]
    assert len(election.elect_for_request(request, b"", bids).ranking) == 3
    assert not election.elect_for_request(other_model, b"", bids).ranking


# ---- bad bids -----------------------------------------------------------------------------------------


def test_bad_bids_are_dropped_with_reasons() -> None:
    eligible = KEYS  # the outsider is not eligible
    result = elect(REQUEST_ID, b"", POOL, eligible=eligible)
    assert [r.public_key for r in result.ranking] == [r.public_key for r in elect(REQUEST_ID, b"", GOOD_BIDS).ranking]
    reasons = sorted((r.bid.public_key, r.reason) for r in result.rejected)
    assert reasons == sorted(
        [
            (KEYS[0], "invalid-proof"),
            (KEYS[1], "duplicate-key"),
            (KEYS[2], "wrong-request"),
            (KEYS[3], "invalid-proof"),
            (BAD_BIDS[4].public_key, "not-eligible"),
        ]
    )
    invalid = next(r for r in result.rejected if r.bid == BAD_BIDS[0])
    assert "proof-invalid" in invalid.detail
    # The valid bid of a key survives a garbage bid with the same key, whatever the order.
    assert election.rank_of(result, KEYS[0]) is not None


def test_without_eligibility_list_any_valid_key_takes_part() -> None:
    result = elect(REQUEST_ID, b"", POOL)
    assert election.rank_of(result, BAD_BIDS[4].public_key) is not None


def test_malformed_bids_never_raise() -> None:
    short_proof = Bid(request_id=REQUEST_ID, public_key=KEYS[0], proof=b"\x00" * 10)
    small_order_key = dataclasses.replace(GOOD_BIDS[0], public_key=b"\x01" + bytes(31))
    garbage = [None, "bid", 42, short_proof, small_order_key, Bid(request_id=REQUEST_ID, public_key=b"", proof=b"")]
    result = elect(REQUEST_ID, b"", garbage + GOOD_BIDS[:2])
    assert len(result.ranking) == 2
    assert [r.reason for r in result.rejected].count("malformed") == 5
    assert any(r.reason == "invalid-proof" and "public-key" in r.detail for r in result.rejected)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    keys=st.lists(st.binary(min_size=32, max_size=32), max_size=4),
    proofs=st.lists(st.binary(min_size=80, max_size=80), min_size=4, max_size=4),
)
def test_random_bids_never_raise(keys: list[bytes], proofs: list[bytes]) -> None:
    bids = [Bid(request_id=REQUEST_ID, public_key=k, proof=p) for k, p in zip(keys + KEYS, proofs)]
    result = elect(REQUEST_ID, b"", bids)
    assert len(result.ranking) + len(result.rejected) == len(bids)
    assert not result.ranking  # random bytes are not proofs


def test_no_bids_no_executor() -> None:
    result = elect(REQUEST_ID, b"", [])
    assert result.executor is None and result.verifiers == () and not result.complete


def test_fewer_bids_than_roles() -> None:
    result = elect(REQUEST_ID, b"", GOOD_BIDS[:2], verifiers=3)
    assert result.executor is not None and len(result.verifiers) == 1 and not result.complete


# ---- the executor's check -----------------------------------------------------------------------------


def test_check_won() -> None:
    result = elect(REQUEST_ID, b"", GOOD_BIDS)
    election.check_won(result, result.ranking[0].public_key)
    election.check_won(result, result.ranking[2].public_key, attempt=2)
    with pytest.raises(election.NotElected) as info:
        election.check_won(result, result.ranking[1].public_key)
    assert info.value.reason == "not-winner"
    with pytest.raises(election.NotElected):
        election.check_won(result, result.ranking[0].public_key, attempt=1)
    with pytest.raises(election.NotElected):
        election.check_won(result, BAD_BIDS[4].public_key)


# ---- order invariance ---------------------------------------------------------------------------------


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_result_does_not_depend_on_arrival_order(data: st.DataObject) -> None:
    chosen = data.draw(st.lists(st.sampled_from(POOL), max_size=len(POOL) + 3))
    shuffled = data.draw(st.permutations(chosen))
    eligible = data.draw(st.sampled_from([None, KEYS]))
    assert _summary(elect(REQUEST_ID, b"", chosen, eligible=eligible)) == _summary(
        elect(REQUEST_ID, b"", shuffled, eligible=eligible)
    )


# ---- fairness -----------------------------------------------------------------------------------------


def test_chi_square_sf_known_values() -> None:
    # Critical values from standard chi-square tables.
    for statistic, dof, p in [(3.841, 1, 0.05), (6.635, 1, 0.01), (9.488, 4, 0.05), (11.345, 3, 0.01),
                              (13.277, 4, 0.01), (30.144, 19, 0.05), (36.191, 19, 0.01)]:
        assert chi_square_sf(statistic, dof) == pytest.approx(p, abs=2e-5)
    assert chi_square_sf(0.0, 5) == 1.0


@given(x=st.floats(0.01, 200.0), dof=st.integers(1, 40))
def test_chi_square_sf_recurrence(x: float, dof: int) -> None:
    # Q(x, k + 2) = Q(x, k) + (x/2)^(k/2) e^(-x/2) / Gamma(k/2 + 1) links the odd and even closed forms.
    import math

    step = math.exp((dof / 2) * math.log(x / 2) - x / 2 - math.lgamma(dof / 2 + 1))
    assert chi_square_sf(x, dof + 2) == pytest.approx(chi_square_sf(x, dof) + step, rel=1e-9, abs=1e-12)


def test_executor_choice_is_uniform_over_5000_elections() -> None:
    """5,000 deterministic elections among 5 fixed peers, through real proofs and elect(); the chi-square test
    of executor counts against uniform must not reject at 1%. Every peer also holds every rank about equally
    often (chi-square over the 5x5 rank table, 16 dof)."""
    peers, elections = 5, 5000
    keys = [vrf.SecretKey(_seed("fair-peer", i)) for i in range(peers)]
    index = {k.public_key: i for i, k in enumerate(keys)}
    wins = [0] * peers
    ranks = [[0] * peers for _ in range(peers)]
    for j in range(elections):
        request_id = _seed("fair-request", j)
        result = elect(request_id, b"", [make_bid(k, request_id) for k in keys])
        assert len(result.ranking) == peers
        wins[index[result.executor]] += 1
        for rank, ranked in enumerate(result.ranking):
            ranks[index[ranked.public_key]][rank] += 1
    statistic, p_value = chi_square_uniform(wins)
    assert p_value > 0.01, (wins, statistic, p_value)
    expected = elections / peers
    table_statistic = sum((c - expected) ** 2 / expected for row in ranks for c in row)
    assert chi_square_sf(table_statistic, (peers - 1) ** 2) > 0.01, ranks
