"""Protocols and limits of the request path (see proto/README.md, section 1).

Each protocol is one :class:`~p2pinfer.net.protocol.Protocol` descriptor (ID, frame limit, message types);
the ``*_PROTOCOL`` / ``MAX_*_FRAME`` names are derived from them, so the serving and the asking side read
the same numbers.
"""

from __future__ import annotations

from ..net.protocol import Exchange, Protocol
from ..wire import (
    Assignment,
    BidSet,
    InferenceResult,
    Receipt,
    Refusal,
    TaskOffer,
    TokenChunk,
    Verdict,
    VerifyTask,
    VrfBid,
)

BID = Protocol("/p2pinfer/bid/1", 4 * 1024, (TaskOffer,), (VrfBid, Refusal), Exchange.ONE_SHOT,
               "signed TaskOffer -> signed VrfBid | Refusal; an offer or a bid is a few hundred bytes")
TASK = Protocol("/p2pinfer/task/1", 1 << 20, (Assignment,), (TokenChunk, InferenceResult, Refusal), Exchange.STREAM,
                "signed Assignment -> TokenChunk* then InferenceResult | Refusal; the assignment carries the prompt")
VERIFY = Protocol("/p2pinfer/verify/1", 2 << 20, (VerifyTask,), (Verdict, Refusal), Exchange.ONE_SHOT,
                  "signed VerifyTask -> signed Verdict | Refusal; carries the request and the signed result")
RECEIPT = Protocol("/p2pinfer/receipt/1", 64 * 1024, (Receipt,), (), Exchange.ONE_SHOT,
                   "signed Receipt -> empty ack; a receipt carries up to 16 signed verdicts and the signed BidSet")
BID_SET = Protocol("/p2pinfer/bid-set/1", 16 * 1024, (BidSet,), (), Exchange.ONE_SHOT,
                   "the client's signed BidSet -> empty ack; sent to every bidder before execution")

BID_PROTOCOL = BID.id
TASK_PROTOCOL = TASK.id
MAX_OFFER_FRAME = BID.max_frame
MAX_TASK_FRAME = TASK.max_frame

BID_SET_PROTOCOL = BID_SET.id
MAX_BID_SET_FRAME = BID_SET.max_frame  # a signed BidSet (wire.messages.MAX_BID_SET_BYTES)
BID_SET_TIMEOUT_S = 2.0             # the client waits this long for bidders to take the bid set, then assigns
FAILOVER_PROBE_TIMEOUT_S = 3.0      # an executor at attempt k tries this long to reach a silent lower rank

OFFER_TTL_MS = 30_000               # an offer is valid this long after it is made
REQUEST_MAX_AGE_MS = 10 * 60_000    # an executor refuses requests created longer ago than this
REQUEST_MAX_SKEW_MS = 30_000        # ... or this far in its future

VERIFY_PROTOCOL = VERIFY.id
RECEIPT_PROTOCOL = RECEIPT.id
MAX_VERIFY_FRAME = VERIFY.max_frame
MAX_RECEIPT_FRAME = RECEIPT.max_frame
VERIFY_TIMEOUT_S = 60.0                   # a verifier that has not answered by then counts as silent
