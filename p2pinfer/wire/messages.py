"""Every message of the p2pinfer protocol, defined once.

Each message type is a frozen dataclass with a ``TYPE`` (its name on the wire, which is also part of its
signing domain ``p2pinfer/v1/<TYPE>``) and fields with wire specs. proto/schema.json is generated from this
module (``python -m p2pinfer.wire.spec``) and a test keeps the two identical.

Conventions: digests and hashes are 32-byte SHA-256; public keys are raw 32-byte Ed25519 keys; times are
integer milliseconds since the Unix epoch (UTC); token IDs are non-negative integers below 2**32.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from .hashing import tagged_hash
from .schema import Bool, Bytes, Enum, Float, Int, List, Optional, Record, SchemaError, Str, Struct, spec
from . import codec

PROTOCOL_VERSION = 1

DIGEST = Bytes.exactly(32)
PUBLIC_KEY = Bytes.exactly(32)
VRF_PROOF = Bytes.exactly(80)
TIME_MS = Int(0, (1 << 53) - 1)
TOKEN_ID = Int(0, (1 << 32) - 1)

MAX_NEW_TOKENS = 4096
MAX_PROMPT_TOKENS = 32768
MAX_TEXT_BYTES = 256 * 1024                  # a request's text: its prompt, or all its chat messages together
MAX_BIDS = 64
MAX_FINGERPRINT_BYTES = 512 * 1024
EPOCH_SEED = Bytes(0, 32)
MAX_VERDICT_BYTES = 1024                      # a signed Verdict envelope is ~400 bytes
MAX_SIGNED_RESULT_BYTES = 1 << 20             # a signed InferenceResult (prompt, output, fingerprints)
MAX_BID_SET_BYTES = 16 * 1024                 # a signed BidSet: 64 bids of ~150 bytes and 64 keys
MAX_EVIDENCE_BYTES = 66 * 1024                # one signed TokenChunk or Refusal of an earlier rank
MAX_VERIFY_EVIDENCE_BYTES = 256 * 1024        # all failover evidence in one VerifyTask together
MAX_QUORUM = 16                               # verifiers one request may ask (a receipt names at most 16)


class Message(Record):
    """A top-level protocol message: it can be signed and sent on its own."""

    TYPE: ClassVar[str]

    @property
    def domain(self) -> str:
        return signing_domain(self.TYPE)

    def encode(self) -> bytes:
        """The canonical payload bytes (what the signature covers)."""
        self.validate()
        return codec.encode(self.to_wire())


def signing_domain(message_type: str, version: int = PROTOCOL_VERSION) -> str:
    return f"p2pinfer/v{version}/{message_type}"


# ---- shared structs -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelOffer(Record):
    """One model a peer serves, as announced in its capacity announcements."""

    digest: bytes = spec(DIGEST)
    name: str = spec(Str(128, 1))
    numeric_class: str = spec(Str(32, 1))
    context_length: int = spec(Int(1, 1 << 20))
    max_new_tokens: int = spec(Int(1, MAX_NEW_TOKENS))
    decode_tokens_per_s: float = spec(Float(0.0, 1e7))

    FIELD_DOCS: ClassVar[dict[str, str]] = {
        "digest": "SHA-256 model digest (ONNX bytes, external weights, tokenizer); see docs/models.md",
        "name": "human-readable model name, e.g. smollm2-135m-instruct",
        "numeric_class": "numeric class the model runs in, e.g. fp32-cpu; verifiers must match it",
        "decode_tokens_per_s": "measured decode speed on this peer",
    }


@dataclass(frozen=True)
class ChatMessage(Record):
    role: str = spec(Enum(("system", "user", "assistant")))
    content: str = spec(Str(MAX_TEXT_BYTES))


@dataclass(frozen=True)
class Request(Record):
    """What a client asks for. Its request ID is the tagged hash of its canonical encoding."""

    model: bytes = spec(DIGEST)
    prompt: str | None = spec(Optional(Str(MAX_TEXT_BYTES)))
    messages: tuple[ChatMessage, ...] | None = spec(Optional(List(Struct(ChatMessage), 256)))
    max_tokens: int = spec(Int(1, MAX_NEW_TOKENS))
    temperature: float = spec(Float(0.0, 10.0))
    top_p: float = spec(Float(0.0, 1.0))
    top_k: int = spec(Int(0, 1 << 20))
    stop: tuple[str, ...] = spec(List(Str(64, 1), 8))
    seed: int | None = spec(Optional(Int()))
    nonce: bytes = spec(Bytes.exactly(16))
    client: bytes = spec(PUBLIC_KEY)
    created_at_ms: int = spec(TIME_MS)

    FIELD_DOCS: ClassVar[dict[str, str]] = {
        "prompt": "plain-text prompt; exactly one of prompt and messages is set",
        "messages": "chat messages, rendered with the model's chat template; their contents together are at "
                    "most 262144 bytes (UTF-8), like a prompt",
        "top_k": "0 disables top-k",
        "seed": "if set, sampling noise derives from it instead of the request ID (reproducible across requests)",
        "nonce": "16 random bytes, so that identical requests get distinct IDs",
        "client": "the client's Ed25519 public key (it signs the offer and the receipt)",
    }

    def request_id(self) -> bytes:
        return tagged_hash("p2pinfer/v1/request-id", codec.encode(self.to_wire()))

    def text_bytes(self) -> int:
        """UTF-8 bytes of the prompt, or of all chat messages' contents together (at most MAX_TEXT_BYTES)."""
        return request_text_bytes(self.prompt, None if self.messages is None else [m.content for m in self.messages])

    @classmethod
    def from_wire(cls, value: object, path: str = "") -> "Request":
        # The largest Assignment (this text, 64 bids, a full failover prefix) must fit its 1 MiB frame, and a
        # VerifyTask (this request and a signed result) its 2 MiB frame: so the text is bounded as a whole.
        request: Request = super().from_wire(value, path)
        if request.text_bytes() > MAX_TEXT_BYTES:
            raise SchemaError(f"prompt text of {request.text_bytes()} bytes, expected at most {MAX_TEXT_BYTES}",
                              path=path or cls.__name__)
        return request


def request_text_bytes(prompt: str | None, contents: "list[str] | tuple[str, ...] | None") -> int:
    """What :data:`MAX_TEXT_BYTES` bounds: UTF-8 bytes of the prompt or of all message contents together."""
    total = 0 if prompt is None else len(prompt.encode("utf-8", "surrogatepass"))
    return total + sum(len(c.encode("utf-8", "surrogatepass")) for c in contents or ())


@dataclass(frozen=True)
class Bid(Record):
    """A VRF bid: anyone can check that ``proof`` is ``public_key``'s VRF proof for the election input."""

    request_id: bytes = spec(DIGEST)
    public_key: bytes = spec(PUBLIC_KEY)
    proof: bytes = spec(VRF_PROOF)


# ---- messages -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CapacityAnnouncement(Message):
    TYPE: ClassVar[str] = "capacity"

    peer_id: str = spec(Str(64, 1))
    addrs: tuple[str, ...] = spec(List(Str(256, 1), 16))
    models: tuple[ModelOffer, ...] = spec(List(Struct(ModelOffer), 32))
    free_slots: int = spec(Int(0, 1024))
    total_slots: int = spec(Int(0, 1024))
    software: str = spec(Str(64))
    seq: int = spec(Int())
    issued_at_ms: int = spec(TIME_MS)
    expires_at_ms: int = spec(TIME_MS)

    FIELD_DOCS: ClassVar[dict[str, str]] = {
        "peer_id": "libp2p peer ID; must be the ID of the envelope's signer",
        "addrs": "multiaddrs the peer listens on",
        "seq": "strictly increasing per peer; an announcement not newer than the last one seen is dropped",
    }


@dataclass(frozen=True)
class TaskOffer(Message):
    """Client -> candidate peers: will you bid for this request?"""

    TYPE: ClassVar[str] = "offer"

    request_id: bytes = spec(DIGEST)
    model: bytes = spec(DIGEST)
    max_tokens: int = spec(Int(1, MAX_NEW_TOKENS))
    epoch_seed: bytes = spec(EPOCH_SEED)
    expires_at_ms: int = spec(TIME_MS)


@dataclass(frozen=True)
class VrfBid(Message):
    """Candidate -> client: my VRF proof for this request's election."""

    TYPE: ClassVar[str] = "bid"

    bid: Bid = spec(Struct(Bid))
    model: bytes = spec(DIGEST)
    free_slots: int = spec(Int(0, 1024))


@dataclass(frozen=True)
class Refusal(Message):
    """Any peer -> its caller: I will not do this, and why."""

    TYPE: ClassVar[str] = "refusal"

    request_id: bytes = spec(DIGEST)
    code: str = spec(Enum(("busy", "not-serving", "not-winner", "invalid", "expired", "internal")))
    message: str = spec(Str(512))


@dataclass(frozen=True)
class Assignment(Message):
    """Client -> elected executor: run this request. ``bids`` lets the executor check that it won."""

    TYPE: ClassVar[str] = "assign"

    request: Request = spec(Struct(Request))
    epoch_seed: bytes = spec(EPOCH_SEED)
    bids: tuple[Bid, ...] = spec(List(Struct(Bid), MAX_BIDS, 1))
    prefix_ids: tuple[int, ...] = spec(List(TOKEN_ID, MAX_NEW_TOKENS))
    attempt: int = spec(Int(0, MAX_BIDS))
    bid_set: bytes = spec(Bytes(0, MAX_BID_SET_BYTES), default=b"")
    evidence: tuple[bytes, ...] = spec(List(Bytes(1, MAX_EVIDENCE_BYTES), MAX_BIDS), default=())

    FIELD_DOCS: ClassVar[dict[str, str]] = {
        "prefix_ids": "output tokens already received from an earlier executor (failover); continue after them; "
                      "empty at attempt 0",
        "attempt": "0 for the election winner, k for the k-th fallback in ranking order",
        "bid_set": "the client's signed BidSet (sent to every bidder before execution); its bids are `bids`",
        "evidence": "for attempt k: a signed Refusal or the last signed TokenChunk of each lower rank that "
                    "answered; the chunks' token chains prove prefix_ids",
    }


@dataclass(frozen=True)
class TokenChunk(Message):
    """Executor -> client: the next generated tokens."""

    TYPE: ClassVar[str] = "tokens"

    request_id: bytes = spec(DIGEST)
    index: int = spec(Int(0, MAX_NEW_TOKENS))
    token_ids: tuple[int, ...] = spec(List(TOKEN_ID, 256, 0))
    text: str = spec(Str(64 * 1024))
    chain: bytes = spec(Bytes(0, 32), default=b"")

    FIELD_DOCS: ClassVar[dict[str, str]] = {
        "index": "position in the output of the first token of this chunk",
        "token_ids": "the executor's first frame has none: its signed acceptance of the assignment (failover "
                     "evidence that it took the task); later frames with none are keep-alives, sent after "
                     "HEARTBEAT_S (5 s) without a new token",
        "chain": "token chain over every output token up to the end of this chunk (see docs/election.md): the "
                 "executor's signature on the whole prefix, so a failover can prove what it inherited",
    }


@dataclass(frozen=True)
class InferenceResult(Message):
    """Executor -> client (and verifiers): the complete output with its logit fingerprints."""

    TYPE: ClassVar[str] = "result"

    request_id: bytes = spec(DIGEST)
    model: bytes = spec(DIGEST)
    numeric_class: str = spec(Str(32, 1))
    executor: bytes = spec(PUBLIC_KEY)
    prompt_ids: tuple[int, ...] = spec(List(TOKEN_ID, MAX_PROMPT_TOKENS, 1))
    output_ids: tuple[int, ...] = spec(List(TOKEN_ID, MAX_NEW_TOKENS))
    finish_reason: str = spec(Enum(("stop", "length", "eos")))
    fingerprint_format: str = spec(Str(32, 1))
    fingerprint: bytes = spec(Bytes(0, MAX_FINGERPRINT_BYTES))
    commitment: bytes = spec(DIGEST)
    started_at_ms: int = spec(TIME_MS)
    finished_at_ms: int = spec(TIME_MS)
    inherited_tokens: int = spec(Int(0, MAX_NEW_TOKENS), default=0)
    election: bytes = spec(Bytes(0, 32), default=b"")
    attempt: int = spec(Int(0, MAX_BIDS), default=0)
    witnessed: tuple[bytes, ...] = spec(List(PUBLIC_KEY, MAX_BIDS), default=())

    FIELD_DOCS: ClassVar[dict[str, str]] = {
        "witnessed": "lower ranks this executor asked for their status itself (/p2pinfer/task-status/1) before a "
                     "failover, for which the client had no signed evidence: each answered with its signed "
                     "refusal or tokens, or nothing within the bound (this executor's signed testimony)",
        "inherited_tokens": "leading output tokens continued from earlier executors (the assignment's prefix_ids)",
        "election": "message ID of the client's signed BidSet this executor won (the parameters are signed "
                    "through request_id, the hash of the whole request)",
        "attempt": "the rank this executor held in that election",
        "prompt_ids": "the exact token IDs the executor fed the model (chat template applied)",
        "fingerprint": "per generated position: top-k token IDs and fixed-point log-probs (see docs/models.md)",
        "commitment": "tagged hash over the fingerprint bytes",
    }


@dataclass(frozen=True)
class Verdict(Message):
    """Verifier -> client: the result I re-checked is (not) what the model computes."""

    TYPE: ClassVar[str] = "verdict"

    request_id: bytes = spec(DIGEST)
    result_hash: bytes = spec(DIGEST)
    accept: bool = spec(Bool())
    first_bad_position: int | None = spec(Optional(Int(0, MAX_PROMPT_TOKENS + MAX_NEW_TOKENS)))
    reason: str = spec(Str(256))
    max_deviation: float = spec(Float(0.0, 1e9))
    issued_at_ms: int = spec(TIME_MS)
    executor: bytes = spec(Bytes(0, 32), default=b"")
    output_tokens: int = spec(Int(0, MAX_NEW_TOKENS), default=0)
    inherited_tokens: int = spec(Int(0, MAX_NEW_TOKENS), default=0)
    election: bytes = spec(Bytes(0, 32), default=b"")

    FIELD_DOCS: ClassVar[dict[str, str]] = {
        "executor": "the signer of the result judged; output_tokens, inherited_tokens and election are copied "
                    "from that signed result, so a receipt's bookings rest on what the verifiers saw",
    }


@dataclass(frozen=True)
class Receipt(Message):
    """Client -> everyone involved: this work was done, with this outcome. Input to ledgers."""

    TYPE: ClassVar[str] = "receipt"

    request_id: bytes = spec(DIGEST)
    model: bytes = spec(DIGEST)
    client: bytes = spec(PUBLIC_KEY)
    executor: bytes = spec(PUBLIC_KEY)
    verifiers: tuple[bytes, ...] = spec(List(PUBLIC_KEY, 16))
    result_hash: bytes = spec(DIGEST)
    output_tokens: int = spec(Int(0, MAX_NEW_TOKENS))
    outcome: str = spec(Enum(("accepted", "rejected", "unverified", "failed")))
    issued_at_ms: int = spec(TIME_MS)
    inherited_tokens: int = spec(Int(0, MAX_NEW_TOKENS), default=0)
    verdicts: tuple[bytes, ...] = spec(List(Bytes(0, MAX_VERDICT_BYTES), 16), default=())
    blamed: tuple[bytes, ...] = spec(List(PUBLIC_KEY, 16), default=())
    bid_set: bytes = spec(Bytes(0, MAX_BID_SET_BYTES), default=b"")

    FIELD_DOCS: ClassVar[dict[str, str]] = {
        "verifiers": "the verifiers the client asked, in ranking order (answered or not)",
        "result_hash": "message ID of the executor's signed InferenceResult",
        "outcome": "the quorum's decision: accepted / rejected by a majority of the verifiers asked, "
                   "unverified (no majority either way), failed (no result)",
        "inherited_tokens": "output tokens the executor continued from an earlier executor (failover); a "
                            "rejection at a position below this is not the executor's fault",
        "verdicts": "the signed Verdict envelopes the decision rests on",
        "blamed": "keys the client penalizes for this request (cheating executor, outvoted verifiers)",
        "bid_set": "the client's signed BidSet: the election, so anyone can check that the verifiers are the "
                   "ranks right after the executor",
    }


@dataclass(frozen=True)
class VerifyTask(Message):
    """Client -> verifier: re-check this signed result of this request and answer a signed Verdict."""

    TYPE: ClassVar[str] = "verify"

    request: Request = spec(Struct(Request))
    result: bytes = spec(Bytes(1, MAX_SIGNED_RESULT_BYTES))
    inherited_tokens: int = spec(Int(0, MAX_NEW_TOKENS))
    issued_at_ms: int = spec(TIME_MS)
    bid_set: bytes = spec(Bytes(0, MAX_BID_SET_BYTES), default=b"")
    evidence: tuple[bytes, ...] = spec(List(Bytes(1, MAX_EVIDENCE_BYTES), MAX_BIDS), default=())
    quorum: int = spec(Int(0, MAX_QUORUM), default=0)

    FIELD_DOCS: ClassVar[dict[str, str]] = {
        "request": "the request the result answers (its hash must be the result's request_id)",
        "result": "the executor's signed InferenceResult envelope, as received",
        "inherited_tokens": "output tokens the executor continued from an earlier executor (failover)",
        "bid_set": "the client's signed BidSet: the election the result names; the verifier must be one of the "
                   "`quorum` ranks right after the executor's rank (the result's attempt)",
        "evidence": "for a result of attempt k: the signed Refusal or last signed TokenChunk of each lower rank "
                    "that answered the client (as in the Assignment); at most 262144 bytes together",
        "quorum": "how many verifiers the client asks: the ranks attempt+1 .. attempt+quorum",
    }

    @classmethod
    def from_wire(cls, value: object, path: str = "") -> "VerifyTask":
        # The largest task (request, signed result, bid set, evidence) must fit the verify frame.
        task: VerifyTask = super().from_wire(value, path)
        total = sum(len(e) for e in task.evidence)
        if total > MAX_VERIFY_EVIDENCE_BYTES:
            raise SchemaError(f"failover evidence of {total} bytes, expected at most {MAX_VERIFY_EVIDENCE_BYTES}",
                              path=path or cls.__name__)
        return task


@dataclass(frozen=True)
class FraudProof(Message):
    """Anyone -> everyone (gossip ``/p2pinfer/fraud/1``): this signed result was rejected by these verdicts.

    It proves nothing by signatures alone: colluding verifiers can sign false rejections. A peer that holds
    the model re-runs the verification before acting on it (see docs/incentives.md).
    """

    TYPE: ClassVar[str] = "fraud"

    request: Request = spec(Struct(Request))
    result: bytes = spec(Bytes(1, MAX_SIGNED_RESULT_BYTES))
    verdicts: tuple[bytes, ...] = spec(List(Bytes(1, MAX_VERDICT_BYTES), 16, 1))
    inherited_tokens: int = spec(Int(0, MAX_NEW_TOKENS))
    issued_at_ms: int = spec(TIME_MS)

    FIELD_DOCS: ClassVar[dict[str, str]] = {
        "result": "the executor's signed InferenceResult envelope",
        "verdicts": "signed Verdict envelopes rejecting that result (a majority of the verifiers asked)",
        "inherited_tokens": "output tokens inherited from an earlier executor; the executor is blamed only for "
                            "a first bad position at or after this",
    }


@dataclass(frozen=True)
class BidSet(Message):
    """Client -> every bidder, before execution: the final, complete set of bids of one election.

    Each bidder checks that its own bid is in it (or its key is listed in ``excluded``) and keeps it: a set
    that omits or alters its bid is signed evidence against the client. The executor requires the same set.
    """

    TYPE: ClassVar[str] = "bid-set"

    request_id: bytes = spec(DIGEST)
    epoch_seed: bytes = spec(EPOCH_SEED)
    bids: tuple[Bid, ...] = spec(List(Struct(Bid), MAX_BIDS))
    excluded: tuple[bytes, ...] = spec(List(PUBLIC_KEY, MAX_BIDS))
    issued_at_ms: int = spec(TIME_MS)

    FIELD_DOCS: ClassVar[dict[str, str]] = {
        "bids": "every valid bid the client received, eligible or not",
        "excluded": "keys among the bidders this client leaves out (its ledger: proven fraud, rejected results, "
                    "low reputation); the ranking is elect(bids) without them",
    }


@dataclass(frozen=True)
class PossessionChallenge(Message):
    """Challenger -> a peer that announces a model: show that you hold its weights (docs/network.md)."""

    TYPE: ClassVar[str] = "possess"

    model: bytes = spec(DIGEST)
    nonce: bytes = spec(Bytes.exactly(32))
    positions: int = spec(Int(2, 32))
    expires_at_ms: int = spec(TIME_MS)

    FIELD_DOCS: ClassVar[dict[str, str]] = {
        "nonce": "fresh random bytes; the challenged token sequence is derived from them",
        "positions": "length of the derived token sequence the peer must prefill",
    }


@dataclass(frozen=True)
class PossessionProof(Message):
    """Challenged peer -> challenger: the top-k log-probs of a prefill over the challenged tokens."""

    TYPE: ClassVar[str] = "possessed"

    challenge: bytes = spec(DIGEST)
    model: bytes = spec(DIGEST)
    fingerprint: bytes = spec(Bytes(1, 16 * 1024))

    FIELD_DOCS: ClassVar[dict[str, str]] = {
        "challenge": "SHA-256 of the signed PossessionChallenge envelope being answered",
        "fingerprint": "packed fingerprint (runtime.fingerprint) of the rows after each challenged token",
    }


@dataclass(frozen=True)
class ModelFile(Record):
    """One entry of a model digest: a file's path in the model folder, its size and SHA-256."""

    path: str = spec(Str(256, 1))
    size: int = spec(Int(0, (1 << 53) - 1))
    sha256: bytes = spec(DIGEST)


MAX_MODEL_FILES = 64
MAX_FILE_CHUNK = 512 * 1024


@dataclass(frozen=True)
class TokenizerQuery(Message):
    """Client -> any peer serving a model: send me the model's digest entries (``path`` empty), or
    ``MAX_FILE_CHUNK`` bytes of one of its tokenizer files from ``offset``."""

    TYPE: ClassVar[str] = "tokenizer-query"

    model: bytes = spec(DIGEST)
    path: str = spec(Str(256))
    offset: int = spec(Int(0, (1 << 53) - 1))


@dataclass(frozen=True)
class TokenizerManifest(Message):
    """Peer -> client: every entry of the model digest, in digest order; the client recomputes the digest."""

    TYPE: ClassVar[str] = "tokenizer-manifest"

    model: bytes = spec(DIGEST)
    entries: tuple[ModelFile, ...] = spec(List(Struct(ModelFile), MAX_MODEL_FILES, 1))


@dataclass(frozen=True)
class FileChunk(Message):
    """Peer -> client: bytes ``offset .. offset + len(data)`` of a tokenizer file of a model."""

    TYPE: ClassVar[str] = "file-chunk"

    model: bytes = spec(DIGEST)
    path: str = spec(Str(256, 1))
    offset: int = spec(Int(0, (1 << 53) - 1))
    data: bytes = spec(Bytes(0, MAX_FILE_CHUNK))


@dataclass(frozen=True)
class TaskStatusQuery(Message):
    """Failover candidate (rank k) -> a lower rank of the same election: what became of this request?

    Asked only for a lower rank the client holds no signed word from (docs/election.md, "Failover past a
    silent rank"). The answer is the lower rank's last signed ``TokenChunk`` or its signed ``Refusal`` for the
    request (either lets rank k take over), or a signed :class:`TaskStatus`.
    """

    TYPE: ClassVar[str] = "task-status-query"

    request_id: bytes = spec(DIGEST)
    election: bytes = spec(DIGEST)

    FIELD_DOCS: ClassVar[dict[str, str]] = {
        "election": "message ID of the client's signed BidSet the asker was assigned under",
    }


@dataclass(frozen=True)
class TaskStatus(Message):
    """Lower rank -> failover candidate: I did not fail this request: it was never assigned to me
    (``not-assigned``), or I am still checking its assignment (``pending``). Rank k then refuses the failover."""

    TYPE: ClassVar[str] = "task-status"

    request_id: bytes = spec(DIGEST)
    election: bytes = spec(DIGEST)
    state: str = spec(Enum(("not-assigned", "pending")))


MESSAGE_TYPES: dict[str, type[Message]] = {
    cls.TYPE: cls
    for cls in (
        CapacityAnnouncement,
        TaskOffer,
        VrfBid,
        Refusal,
        Assignment,
        TokenChunk,
        InferenceResult,
        Verdict,
        Receipt,
        VerifyTask,
        FraudProof,
        BidSet,
        PossessionChallenge,
        PossessionProof,
        TokenizerQuery,
        TokenizerManifest,
        FileChunk,
        TaskStatusQuery,
        TaskStatus,
    )
}

STRUCT_TYPES: dict[str, type[Record]] = {cls.__name__: cls for cls in (ModelOffer, ChatMessage, Request, Bid,
                                                                          ModelFile)}
