"""Generate the language-neutral spec files in proto/ from the message definitions.

``python -m p2pinfer.wire.spec proto/`` writes ``proto/schema.json`` and ``proto/vectors/*.json``. The test
suite checks that both are exactly what this module produces, and that the vectors verify byte for byte,
so proto/ can never drift from the code.

JSON conventions used in proto/: ``bin`` values are lowercase hex strings; ``float64`` values are JSON
numbers; ``optional`` values may be null; structs are JSON objects.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from ..identity import Identity
from . import codec, messages
from .envelope import sign, signing_input
from .messages import (
    MESSAGE_TYPES,
    PROTOCOL_VERSION,
    STRUCT_TYPES,
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
    TokenChunk,
    Verdict,
    VerifyTask,
    VrfBid,
    signing_domain,
)
from .schema import Bytes, Float, List, Optional, Record, Spec, Struct

# ---- JSON <-> records ---------------------------------------------------------------------------------


def spec_to_json(s: Spec, value: Any) -> Any:
    if value is None:
        return None
    if isinstance(s, Optional):
        return spec_to_json(s.inner, value)
    if isinstance(s, Bytes):
        return value.hex()
    if isinstance(s, List):
        return [spec_to_json(s.item, v) for v in value]
    if isinstance(s, Struct):
        return record_to_json(value)
    return value


def spec_from_json(s: Spec, value: Any) -> Any:
    if value is None:
        return None
    if isinstance(s, Optional):
        return spec_from_json(s.inner, value)
    if isinstance(s, Bytes):
        return bytes.fromhex(value)
    if isinstance(s, Float):
        return float(value)
    if isinstance(s, List):
        return tuple(spec_from_json(s.item, v) for v in value)
    if isinstance(s, Struct):
        return record_from_json(s.cls, value)
    return value


def record_to_json(record: Record) -> dict[str, Any]:
    return {name: spec_to_json(s, getattr(record, name)) for name, s in record.wire_fields()}


def record_from_json(cls: type[Record], obj: dict[str, Any]) -> Any:
    return cls(**{name: spec_from_json(s, obj[name]) for name, s in cls.wire_fields()})


# ---- schema.json -----------------------------------------------------------------------------------------


def schema_document() -> dict[str, Any]:
    return {
        "protocol_version": PROTOCOL_VERSION,
        "envelope": {
            "encoding": "canonical msgpack map",
            "fields": [
                {"name": "v", "type": "int", "doc": f"protocol version, {PROTOCOL_VERSION}"},
                {"name": "type", "type": "str", "doc": "message type, a key of `messages`"},
                {"name": "payload", "type": "bin", "doc": "canonical msgpack encoding of the message"},
                {"name": "signer", "type": "bin", "min_len": 32, "max_len": 32, "doc": "Ed25519 public key"},
                {"name": "sig", "type": "bin", "min_len": 64, "max_len": 64,
                 "doc": "Ed25519 signature of uvarint(len(domain)) || domain || uvarint(len(payload)) || payload"},
            ],
            "max_bytes": codec.DEFAULT_MAX_SIZE,
            "max_depth": codec.DEFAULT_MAX_DEPTH,
        },
        "structs": {name: cls.describe() for name, cls in STRUCT_TYPES.items()},
        "messages": {
            name: {"domain": signing_domain(name), "class": cls.__name__, **cls.describe()}
            for name, cls in MESSAGE_TYPES.items()
        },
    }


# ---- vectors -----------------------------------------------------------------------------------------------

VECTOR_SEED = bytes(range(32))
_CLIENT = Identity(bytes([7]) * 32)
_REQUEST = Request(
    model=bytes.fromhex("5e" * 32),
    prompt=None,
    messages=(ChatMessage(role="user", content="What is 2+2?"),),
    max_tokens=32,
    temperature=0.7,
    top_p=0.95,
    top_k=40,
    stop=("\n\n",),
    seed=None,
    nonce=bytes(range(16)),
    client=_CLIENT.public_key,
    created_at_ms=1_790_000_000_000,
)
_RID = _REQUEST.request_id()
_BID = Bid(request_id=_RID, public_key=Identity(VECTOR_SEED).public_key, proof=bytes(range(80)))


_EXAMPLE_RESULT = InferenceResult(
    request_id=_RID, model=_REQUEST.model, numeric_class="fp32-cpu", executor=_BID.public_key,
    prompt_ids=(1, 9690, 198), output_ids=(504, 3139, 2), finish_reason="eos",
    fingerprint_format="topk8-q16/1", fingerprint=bytes(range(48)), commitment=bytes.fromhex("c0" * 32),
    started_at_ms=1_790_000_000_100, finished_at_ms=1_790_000_000_900, inherited_tokens=0,
    election=bytes.fromhex("e1" * 32), attempt=0,
)
_EXAMPLE_VERDICT = Verdict(request_id=_RID, result_hash=bytes.fromhex("ab" * 32), accept=False, first_bad_position=3,
                           reason="log-prob of token 504 off by 0.07 nats (tolerance 0.001)", max_deviation=0.07,
                           issued_at_ms=1_790_000_001_000, executor=_BID.public_key, output_tokens=3,
                           inherited_tokens=0, election=bytes.fromhex("e1" * 32))


_EXAMPLE_BID_SET = BidSet(request_id=_RID, epoch_seed=b"", bids=(_BID,), excluded=(), issued_at_ms=1_790_000_000_050)


def example_messages() -> list[Message]:
    """One fixed example of every message type (with plausible, not computed, hashes and proofs)."""
    return [
        CapacityAnnouncement(
            peer_id=Identity(VECTOR_SEED).peer_id,
            addrs=("/ip4/127.0.0.1/tcp/4001",),
            models=(ModelOffer(digest=bytes.fromhex("5e" * 32), name="smollm2-135m-instruct", numeric_class="fp32-cpu",
                               context_length=8192, max_new_tokens=1024, decode_tokens_per_s=41.5),),
            free_slots=2, total_slots=2, software="p2pinfer/0.1.0", seq=7,
            issued_at_ms=1_790_000_000_000, expires_at_ms=1_790_000_060_000,
        ),
        TaskOffer(request_id=_RID, model=_REQUEST.model, max_tokens=32, epoch_seed=b"", expires_at_ms=1_790_000_010_000),
        VrfBid(bid=_BID, model=_REQUEST.model, free_slots=1),
        Refusal(request_id=_RID, code="busy", message="all 2 slots are in use"),
        Assignment(request=_REQUEST, epoch_seed=b"", bids=(_BID,), prefix_ids=(), attempt=0,
                   bid_set=_signed_example(_EXAMPLE_BID_SET)),
        TokenChunk(request_id=_RID, index=0, token_ids=(504, 3139), text="The answer",
                   chain=bytes.fromhex("c4" * 32)),
        _EXAMPLE_RESULT,
        _EXAMPLE_VERDICT,
        Receipt(request_id=_RID, model=_REQUEST.model, client=_CLIENT.public_key, executor=_BID.public_key,
                verifiers=(bytes.fromhex("11" * 32),), result_hash=bytes.fromhex("ab" * 32), output_tokens=3,
                outcome="rejected", issued_at_ms=1_790_000_002_000, inherited_tokens=0,
                verdicts=(_signed_example(_EXAMPLE_VERDICT),), blamed=(_BID.public_key,)),
        VerifyTask(request=_REQUEST, result=_signed_example(_EXAMPLE_RESULT), inherited_tokens=0,
                   issued_at_ms=1_790_000_001_000),
        FraudProof(request=_REQUEST, result=_signed_example(_EXAMPLE_RESULT),
                   verdicts=(_signed_example(_EXAMPLE_VERDICT),), inherited_tokens=0,
                   issued_at_ms=1_790_000_002_000),
        _EXAMPLE_BID_SET,
        PossessionChallenge(model=_REQUEST.model, nonce=bytes.fromhex("c4" * 32), positions=8,
                            expires_at_ms=1_790_000_010_000),
        PossessionProof(challenge=bytes.fromhex("d7" * 32), model=_REQUEST.model, fingerprint=bytes.fromhex("0102" * 8)),
        messages.TokenizerQuery(model=_REQUEST.model, path="tokenizer.json", offset=524288),
        messages.TokenizerManifest(model=_REQUEST.model, entries=(
            messages.ModelFile(path="model.onnx", size=149633, sha256=bytes.fromhex("3c" * 32)),
            messages.ModelFile(path="tokenizer.json", size=3522763, sha256=bytes.fromhex("d0" * 32)))),
        messages.FileChunk(model=_REQUEST.model, path="tokenizer_config.json", offset=0, data=b'{"bos_token": "<s>"}'),
        messages.TaskStatusQuery(request_id=_RID, election=bytes.fromhex("e1" * 32)),
        messages.TaskStatus(request_id=_RID, election=bytes.fromhex("e1" * 32), state="not-assigned"),
    ]


def _signed_example(message: Message) -> bytes:
    return sign(Identity(VECTOR_SEED), message).to_bytes()


def vector_document(message: Message, seed: bytes = VECTOR_SEED) -> dict[str, Any]:
    identity = Identity(seed)
    signed = sign(identity, message)
    return {
        "type": message.TYPE,
        "domain": signing_domain(message.TYPE),
        "key_seed": seed.hex(),
        "public_key": identity.public_key.hex(),
        "peer_id": identity.peer_id,
        "message": record_to_json(message),
        "payload": signed.payload.hex(),
        "signing_input": signing_input(message.TYPE, signed.payload).hex(),
        "signature": signed.signature.hex(),
        "envelope": signed.to_bytes().hex(),
    }


def invalid_vectors() -> list[dict[str, str]]:
    """Inputs every implementation must reject, with the reason code ours gives."""
    vector = vector_document(example_messages()[3])
    good = bytes.fromhex(vector["envelope"])
    tampered = bytearray(good)
    tampered[good.index(bytes.fromhex(vector["signature"])) + 10] ^= 0x01  # one bit of the signature
    return [
        {"name": "truncated", "hex": good[:-5].hex(), "reason": "malformed"},
        {"name": "trailing-bytes", "hex": (good + b"\xc0").hex(), "reason": "malformed"},
        {"name": "extension-type", "hex": "d40100", "reason": "extension-type"},
        {"name": "timestamp-extension", "hex": "d6ff00000001", "reason": "extension-type"},
        {"name": "non-minimal-int", "hex": "cc01", "reason": "non-canonical"},
        {"name": "float32", "hex": "ca3fc00000", "reason": "non-canonical"},
        {"name": "unsorted-map-keys", "hex": "82a16201a16102", "reason": "non-canonical"},
        {"name": "deep-nesting", "hex": ("91" * 20 + "c0"), "reason": "too-deep"},
        {"name": "tampered-envelope", "hex": bytes(tampered).hex(), "reason": "bad-signature"},
    ]


def _type_text(d: dict[str, Any]) -> str:
    t = d["type"]
    if t == "int":
        return f"int [{d['min']}, {d['max']}]"
    if t in ("bin", "str"):
        lo, hi = d["min_len"], d["max_len"]
        return f"{t} ({lo} bytes)" if lo == hi else f"{t} ({lo}..{hi} bytes)"
    if t == "float64":
        return f"float64 [{d.get('min', '-inf')}, {d.get('max', 'inf')}], finite"
    if t == "enum":
        return "str, one of " + ", ".join(f"`{v}`" for v in d["values"])
    if t == "optional":
        return f"nil or {_type_text(d['of'])}"
    if t == "array":
        return f"array ({d['min_items']}..{d['max_items']}) of {_type_text(d['of'])}"
    if t == "struct":
        return f"struct {d['name']}"
    return t


def messages_markdown() -> str:
    """proto/messages.md: the schema as tables, for people."""
    doc = schema_document()
    out = [
        "# Message schemas (generated)",
        "",
        "Generated by `python -m p2pinfer.wire.spec proto` from `p2pinfer/wire/messages.py`; do not edit by hand.",
        "Every record is a canonical msgpack map containing exactly these keys (optional ones as nil).",
        "",
    ]
    sections = [("Struct", name, body) for name, body in doc["structs"].items()]
    sections += [("Message", name, body) for name, body in doc["messages"].items()]
    for kind, name, body in sections:
        title = f"## {kind} `{name}`" + (f" ({body['class']}, domain `{body['domain']}`)" if kind == "Message" else "")
        out += [title, "", "| field | type | notes |", "|---|---|---|"]
        for field in body["fields"]:
            out.append(f"| `{field['name']}` | {_type_text(field)} | {field['doc']} |")
        out.append("")
    return "\n".join(out)


def write_spec(proto_dir: Path) -> list[Path]:
    proto_dir = Path(proto_dir)
    (proto_dir / "vectors").mkdir(parents=True, exist_ok=True)
    written = []
    path = proto_dir / "schema.json"
    path.write_text(json.dumps(schema_document(), indent=2) + "\n")
    written.append(path)
    path = proto_dir / "messages.md"
    path.write_text(messages_markdown())
    written.append(path)
    for message in example_messages():
        path = proto_dir / "vectors" / f"{message.TYPE}.json"
        path.write_text(json.dumps(vector_document(message), indent=2) + "\n")
        written.append(path)
    path = proto_dir / "vectors" / "invalid.json"
    path.write_text(json.dumps(invalid_vectors(), indent=2) + "\n")
    written.append(path)
    return written


if __name__ == "__main__":
    for written_path in write_spec(Path(sys.argv[1] if len(sys.argv) > 1 else "proto")):
        sys.stderr.write(f"wrote {written_path}\n")
