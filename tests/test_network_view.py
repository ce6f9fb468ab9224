"""What the network page says about elections and verdicts (pure; real keys, real VRF proofs, real signatures)."""

from __future__ import annotations

import os
from dataclasses import replace

from p2pinfer import vrf
from p2pinfer.election import make_bid
from p2pinfer.gateway.network_view import (ElectionCache, address_scope, checked_receipt_verdicts, describe_election,
                                           describe_verdicts, request_from_election, request_from_receipt,
                                           vrf_position)
from p2pinfer.identity import Identity
from p2pinfer.request.server import SeenElection
from p2pinfer.wire import BidSet, Receipt, Verdict, encode_signed, now_ms


def _bids(identities, request_id):
    return [make_bid(vrf.SecretKey(i.seed), request_id) for i in identities]


def test_the_ranking_is_re_derived_and_every_proof_checked():
    peers = [Identity.generate() for _ in range(4)]
    request_id = os.urandom(32)
    bids = _bids(peers, request_id)
    first = describe_election(request_id, b"", bids, executor=None)
    ranking = first["ranking"]
    assert first["proof"] == "checked" and len(ranking) == 4 and first["invalid_bids"] == []
    assert [r["position"] for r in ranking] == sorted(r["position"] for r in ranking)
    assert all(0 <= r["position"] < 1 for r in ranking)
    executor, verifier = ranking[0]["peer_id"], ranking[1]["peer_id"]
    roles = describe_election(request_id, b"", bids, executor, [verifier])["ranking"]
    assert [r["role"] for r in roles] == ["executor", "verifier", "bidder", "bidder"]

    # A bid whose proof was made for another request does not count, and the page says so.
    forged = replace(make_bid(vrf.SecretKey(Identity.generate().seed), os.urandom(32)), request_id=request_id)
    seen = describe_election(request_id, b"", [*bids, forged], executor)
    assert seen["proof"] == "invalid-bids" and len(seen["ranking"]) == 4 and len(seen["invalid_bids"]) == 1


def test_an_election_is_checked_once():
    peers = [Identity.generate() for _ in range(3)]
    request_id = os.urandom(32)
    cache = ElectionCache(size=2)
    a = cache.describe(request_id, b"", _bids(peers, request_id), None)
    assert cache.describe(request_id, b"", (), None) is a  # the bids of a request never change
    for _ in range(3):
        other = os.urandom(32)
        cache.describe(other, b"", _bids(peers, other), None)
    assert cache.describe(request_id, b"", (), None)["ranking"] == []  # forgotten: bounded


def test_only_verdicts_signed_by_a_named_verifier_about_this_result_are_shown():
    client, executor, verifier, stranger = (Identity.generate() for _ in range(4))
    request_id, result_hash = os.urandom(32), os.urandom(32)

    def verdict(signer, accept=True, about=result_hash):
        return encode_signed(signer, Verdict(request_id=request_id, result_hash=about, accept=accept,
                                             first_bad_position=None if accept else 3, reason="" if accept else
                                             "log-prob of token 7 claimed -1.0, recomputed -2.0 (deviation 1.0 > "
                                             "tolerance 0.001)", max_deviation=0.0, issued_at_ms=now_ms()))

    receipt = Receipt(request_id=request_id, model=os.urandom(32), client=client.public_key,
                      executor=executor.public_key, verifiers=(verifier.public_key,), result_hash=result_hash,
                      output_tokens=5, outcome="accepted", issued_at_ms=now_ms(),
                      verdicts=(verdict(verifier), verdict(stranger, accept=False), verdict(verifier, about=bytes(32)),
                                b"\x00garbage"))
    checked = checked_receipt_verdicts(receipt)
    assert [v.signer for v in checked] == [verifier.public_key]
    rows = describe_verdicts(checked, [verifier.peer_id, stranger.peer_id])
    assert rows[0]["verdict"] == "accept" and rows[1] == {"peer_id": stranger.peer_id, "verdict": "none",
                                                           "reason": "no verdict counted"}
    rejecting = describe_verdicts(checked_receipt_verdicts(replace(
        receipt, verifiers=(stranger.public_key,), verdicts=(verdict(stranger, accept=False),))), [stranger.peer_id])
    assert rejecting[0]["verdict"] == "reject" and rejecting[0]["reason"].endswith("(deviation 1.0 > tolerance 0.001)")
    assert rejecting[0]["first_bad_position"] == 3


def test_vrf_position_is_the_output_as_a_fraction():
    assert vrf_position(bytes(64)) == 0.0
    assert 0.99 < vrf_position(b"\xff" * 64) < 1.0


def test_address_scope_is_the_widest_kind_announced():
    assert address_scope(["/ip4/127.0.0.1/tcp/4001"]) == "loopback"
    assert address_scope(["/ip4/127.0.0.1/tcp/1", "/ip4/192.168.1.9/tcp/1"]) == "private"
    assert address_scope(["/ip4/192.168.1.9/tcp/1", "/ip4/8.8.8.8/tcp/1"]) == "public"
    assert address_scope(["/dns4/boot.example.org/tcp/4001"]) == "public"
    assert address_scope(["/ip4/10.0.0.2/tcp/1", "/ip4/8.8.4.4/tcp/1/p2p/12D3KooWx/p2p-circuit"]) == "relayed"
    assert address_scope(["/ip6/::1/tcp/1", "garbage", "/ip4/not-an-ip/tcp/1"]) == "loopback"
    assert address_scope([]) == "none"


def _election(peers, excluded=()):
    request_id = os.urandom(32)
    return BidSet(request_id=request_id, epoch_seed=b"", bids=tuple(_bids(peers, request_id)),
                  excluded=tuple(excluded), issued_at_ms=now_ms())


def test_a_receipt_shows_the_ranking_of_its_own_signed_bid_set_and_only_its_clients():
    client, stranger, *peers = (Identity.generate() for _ in range(6))
    bid_set = _election(peers, excluded=[peers[3].public_key])
    described = describe_election(bid_set.request_id, b"", bid_set.bids, None, excluded=bid_set.excluded)
    assert described["proof"] == "checked" and described["excluded"] == 1 and described["invalid_bids"] == []
    ranking = described["ranking"]
    assert len(ranking) == 3 and peers[3].peer_id not in [r["peer_id"] for r in ranking]  # excluded: left out
    executor = next(p for p in peers if p.peer_id == ranking[0]["peer_id"])
    verifier = next(p for p in peers if p.peer_id == ranking[1]["peer_id"])
    receipt = Receipt(request_id=bid_set.request_id, model=os.urandom(32), client=client.public_key,
                      executor=executor.public_key, verifiers=(verifier.public_key,), result_hash=os.urandom(32),
                      output_tokens=5, outcome="accepted", issued_at_ms=now_ms(),
                      bid_set=encode_signed(client, bid_set))
    row = request_from_receipt(receipt, verifier.peer_id, {}, {}, ElectionCache())
    assert row["role"] == "verifier" and row["election"]["proof"] == "checked"
    assert [r["role"] for r in row["election"]["ranking"]] == ["executor", "verifier", "bidder"]
    # A set signed by anyone but the receipt's client, or for another request, or garbage, proves nothing.
    for forged in (encode_signed(stranger, bid_set), encode_signed(client, replace(bid_set, request_id=bytes(32))),
                   b"\x00garbage"):
        row = request_from_receipt(replace(receipt, bid_set=forged), verifier.peer_id, {}, {}, ElectionCache())
        assert row["election"]["proof"] == "not-seen" and row["election"]["ranking"] == []


def test_a_request_this_peer_only_bid_on_shows_the_checked_ranking_and_no_outcome():
    client, *peers = (Identity.generate() for _ in range(4))
    bid_set = _election(peers)
    model = os.urandom(32)
    seen = SeenElection(bid_set, client.public_key, model, executed=False)
    row = request_from_election(seen, peers[2].peer_id, {model: "tiny"}, ElectionCache())
    assert row["role"] == "bidder" and row["via"] == "bid-set" and row["outcome"] == "unknown"
    assert row["model"] == "tiny" and row["client"] == client.peer_id and row["executor"] is None
    assert row["election"]["proof"] == "checked" and len(row["election"]["ranking"]) == 3
    assert row["tokens"] is None and row["verdicts"] == []
