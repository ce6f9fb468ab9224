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
    TaskStatus,
    TaskStatusQuery,
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
                  "signed VerifyTask -> signed Verdict | Refusal; carries the request, the signed result, the "
                  "signed BidSet and the failover evidence")
RECEIPT = Protocol("/p2pinfer/receipt/1", 64 * 1024, (Receipt,), (), Exchange.ONE_SHOT,
                   "signed Receipt -> empty ack; a receipt carries up to 16 signed verdicts and the signed BidSet")
BID_SET = Protocol("/p2pinfer/bid-set/1", 16 * 1024, (BidSet,), (), Exchange.ONE_SHOT,
                   "the client's signed BidSet -> empty ack; sent to every bidder before execution")
TASK_STATUS = Protocol("/p2pinfer/task-status/1", 68 * 1024, (TaskStatusQuery,), (TokenChunk, Refusal, TaskStatus),
                       Exchange.ONE_SHOT, "signed TaskStatusQuery -> the lower rank's last signed TokenChunk or its "
                       "signed Refusal for the request, or a signed TaskStatus; asked by a failover candidate")

BID_PROTOCOL = BID.id
TASK_PROTOCOL = TASK.id
MAX_OFFER_FRAME = BID.max_frame
MAX_TASK_FRAME = TASK.max_frame

BID_SET_PROTOCOL = BID_SET.id
MAX_BID_SET_FRAME = BID_SET.max_frame  # a signed BidSet (wire.messages.MAX_BID_SET_BYTES)
BID_SET_TIMEOUT_S = 2.0             # the client waits this long for bidders to take the bid set, then assigns
# A failover candidate (attempt k) waits this long for a lower rank's answer on TASK_STATUS before it signs
# that the rank was silent and takes over. An honest answer is a lookup and one signature (milliseconds), so
# this is a generous bound for a loaded peer, not a tight deadline; the client waits this much longer than its
# stall timeout for the first frame of an attempt k > 0 (execution.py), so the bound fits the request's budget.
FAILOVER_STATUS_TIMEOUT_S = 10.0
# The client waits this long (at most its stall timeout) for an executor's first frame, its signed acceptance,
# which an honest executor sends right after checking the election (a few ms of VRF checks in a worker thread).
# An elected peer that reads the assignment and says nothing costs a request this long (plus the status wait
# at the next rank), not the whole stall timeout; a slow honest executor that misses it loses the task to the
# next rank (its acceptance, handed to that rank, lets it take over) and is never penalized.
ACCEPT_TIMEOUT_S = 10.0

OFFER_TTL_MS = 30_000               # an offer is valid this long after it is made
REQUEST_MAX_AGE_MS = 10 * 60_000    # an executor refuses requests created longer ago than this
REQUEST_MAX_SKEW_MS = 30_000        # ... or this far in its future

VERIFY_PROTOCOL = VERIFY.id
RECEIPT_PROTOCOL = RECEIPT.id
MAX_VERIFY_FRAME = VERIFY.max_frame
MAX_RECEIPT_FRAME = RECEIPT.max_frame
VERIFY_TIMEOUT_S = 60.0                   # a verifier that has not answered by then counts as silent
HEARTBEAT_S = 5.0                         # an executor with no new token for this long sends a chunk with none,
                                          # so a slow step (a near tie's float64 pass) is not taken for a stall
