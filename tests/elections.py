"""Real elections for tests that act as a client by hand: real VRF bids from real peers over the bid
protocol, the client's signed bid set, and (for attackers) an executor key of their own that ranks where
they want it. Nothing of p2pinfer is patched: a key that wins is found by trying fresh keys, as a grinding
attacker would (docs/election.md, "Grinding")."""

from __future__ import annotations

from typing import Sequence

from p2pinfer import vrf
from p2pinfer.election import make_bid
from p2pinfer.identity import Identity
from p2pinfer.net import Node
from p2pinfer.request.params import build_request
from p2pinfer.request import protocol
from p2pinfer.request.evidence import ranking_of
from p2pinfer.wire import Bid, BidSet, Request, Signed, TaskOffer, VrfBid, decode_signed, encode_signed, now_ms, sign


async def real_bids(node: Node, identity: Identity, request: Request, peer_ids: Sequence[str]) -> list[Bid]:
    """Offer ``request`` to each peer (signed by ``identity``); their VRF bids."""
    offer = encode_signed(identity, TaskOffer(request_id=request.request_id(), model=request.model,
                                              max_tokens=request.max_tokens, epoch_seed=b"",
                                              expires_at_ms=now_ms() + 20_000))
    bids = []
    for peer_id in peer_ids:
        reply = decode_signed(await node.request(peer_id, protocol.BID_PROTOCOL, offer, timeout=30))
        assert isinstance(reply.message, VrfBid), reply.message
        bids.append(reply.message.bid)
    return bids


def key_at_rank(request_id: bytes, bids: Sequence[Bid], rank: int, tries: int = 10_000) -> tuple[Identity, Bid]:
    """A fresh identity whose own bid takes rank ``rank`` among ``bids`` and itself."""
    for _ in range(tries):
        identity = Identity.generate()
        bid = make_bid(vrf.SecretKey(identity.seed), request_id, b"")
        ranked = [r.public_key for r in ranking_of(BidSet(request_id=request_id, epoch_seed=b"",
                                                          bids=(*bids, bid), excluded=(), issued_at_ms=0)).ranking]
        if ranked.index(identity.public_key) == rank:
            return identity, bid
    raise AssertionError(f"no key ranked {rank} in {tries} tries")


def signed_bid_set(client: Identity, request: Request, bids: Sequence[Bid]) -> Signed[BidSet]:
    return sign(client, BidSet(request_id=request.request_id(), epoch_seed=b"", bids=tuple(bids), excluded=(),
                               issued_at_ms=now_ms()))


def ranking_keys(bid_set: Signed[BidSet]) -> list[bytes]:
    return [r.public_key for r in ranking_of(bid_set.message).ranking]


# ---- one fixed, signed election for the pure (no I/O) rule tests ------------------------------------------
# Seven bidders, a client and another client, all with fixed keys, so that a property test's failure replays.
POOL = [Identity(bytes([i + 1]) * 32) for i in range(7)]
CLIENT = Identity(b"\xcc" * 32)
OTHER_CLIENT = Identity(b"\xdd" * 32)
REQUEST = build_request(model_digest=b"\x07" * 32, client_key=CLIENT.public_key, prompt="hi", max_tokens=8,
                        nonce=b"\x00" * 16, created_at_ms=1_790_000_000_000)
RID = REQUEST.request_id()
BIDS = tuple(make_bid(i.seed, RID) for i in POOL)
BID_SET = sign(CLIENT, BidSet(request_id=RID, epoch_seed=b"", bids=BIDS, excluded=(), issued_at_ms=1))
RANKING = [r.public_key for r in ranking_of(BID_SET.message).ranking]
BY_KEY = {i.public_key: i for i in POOL}
