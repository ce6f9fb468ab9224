"""The p2pinfer wire protocol: canonical msgpack, message schemas, signed envelopes, replay protection."""

from .codec import DEFAULT_MAX_SIZE, decode, encode
from .envelope import Signed, decode_signed, encode_signed, sign, signing_input
from .errors import (
    ExtensionTypeError,
    MalformedError,
    NestingError,
    NonCanonicalError,
    OversizedError,
    ReplayError,
    SchemaError,
    SignatureError,
    UnknownTypeError,
    VersionError,
    WireError,
)
from .hashing import tagged_hash
from .messages import (
    MESSAGE_TYPES,
    PROTOCOL_VERSION,
    Assignment,
    Bid,
    BidSet,
    CapacityAnnouncement,
    ChatMessage,
    FraudProof,
    InferenceResult,
    Message,
    ModelOffer,
    PossessionChallenge,
    PossessionProof,
    Receipt,
    Refusal,
    Request,
    TaskOffer,
    TaskStatus,
    TaskStatusQuery,
    TokenChunk,
    Verdict,
    VerifyTask,
    VrfBid,
    signing_domain,
)
from .replay import ReplayGuard, check_window, now_ms

__all__ = [name for name in dir() if not name.startswith("_")]
