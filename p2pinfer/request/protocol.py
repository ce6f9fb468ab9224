"""Protocol IDs and limits of the request path (see proto/README.md, section 1)."""

from __future__ import annotations

BID_PROTOCOL = "/p2pinfer/bid/1"    # one-shot: signed TaskOffer -> signed VrfBid | Refusal
TASK_PROTOCOL = "/p2pinfer/task/1"  # stream: signed Assignment -> TokenChunk* then InferenceResult | Refusal
BID_SET_PROTOCOL = "/p2pinfer/bid-set/1"  # one-shot: the client's signed BidSet -> empty ack (to every bidder)

MAX_OFFER_FRAME = 4 * 1024          # an offer or a bid is a few hundred bytes
MAX_TASK_FRAME = 1 << 20            # an assignment carries the prompt; a result its fingerprints

MAX_BID_SET_FRAME = 16 * 1024      # a signed BidSet (wire.messages.MAX_BID_SET_BYTES)
BID_SET_TIMEOUT_S = 2.0             # the client waits this long for bidders to take the bid set, then assigns
FAILOVER_PROBE_TIMEOUT_S = 3.0      # an executor at attempt k tries this long to reach a silent lower rank

OFFER_TTL_MS = 30_000               # an offer is valid this long after it is made
REQUEST_MAX_AGE_MS = 10 * 60_000    # an executor refuses requests created longer ago than this
REQUEST_MAX_SKEW_MS = 30_000        # ... or this far in its future

VERIFY_PROTOCOL = "/p2pinfer/verify/1"    # one-shot: signed VerifyTask -> signed Verdict | Refusal
RECEIPT_PROTOCOL = "/p2pinfer/receipt/1"  # one-shot: signed Receipt -> empty ack
MAX_VERIFY_FRAME = 2 << 20                # a verify task carries the request and the signed result
MAX_RECEIPT_FRAME = 64 * 1024             # a receipt carries up to 16 signed verdicts and the signed BidSet
VERIFY_TIMEOUT_S = 60.0                   # a verifier that has not answered by then counts as silent
