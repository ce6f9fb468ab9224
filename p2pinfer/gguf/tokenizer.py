"""Rebuilding a Hugging Face ``tokenizer.json`` from GGUF tokenizer metadata, with ``tokenizers``.

Supported:

* ``tokenizer.ggml.model = "gpt2"``: byte-level BPE, with the pre-tokenizers llama.cpp names
  ``default``/``gpt2``, ``smollm`` and ``llama-bpe`` (Llama 3); merges come from ``tokenizer.ggml.merges``.
* ``tokenizer.ggml.model = "llama"``: SentencePiece BPE (Llama 2, Mistral, TinyLlama). The GGUF holds
  pieces and scores but no merges; as transformers does, merges are derived from the scores (a pair of
  pieces merges into their concatenation, ranked by that piece's score), with byte fallback, and
  ``"▁"`` for spaces (plus a leading one when ``tokenizer.ggml.add_space_prefix``, default true).

Other tokenizer models (``bert``, ``t5``, ``rwkv``, ...) are refused with :class:`UnsupportedTokenizerError`.

Token types follow llama.cpp: 1 = normal, 2 = unknown, 3 = control (special added tokens, never split),
4 = user-defined (added tokens), 5 = unused, 6 = byte. ``tokenizer.ggml.add_bos_token`` decides whether
``encode`` prepends BOS (llama.cpp's defaults when absent: true for "llama", false for "gpt2").
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from tokenizers import (AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers,
                        processors)

from .errors import GGUFImportError, UnsupportedTokenizerError
from .reader import GGUFModel

TOKEN_TYPE_NORMAL = 1
TOKEN_TYPE_UNKNOWN = 2
TOKEN_TYPE_CONTROL = 3
TOKEN_TYPE_USER_DEFINED = 4
TOKEN_TYPE_BYTE = 6

# llama.cpp's LLAMA_VOCAB_PRE_TYPE_LLAMA3 split pattern (also Hugging Face's Llama 3 tokenizer.json).
_LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
                   r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


@dataclass(frozen=True)
class TokenizerFiles:
    """What the importer writes next to the model: ``tokenizer.json`` text and tokenizer_config fields."""

    tokenizer_json: str
    bos_token: str | None
    eos_token: str | None
    pad_token: str | None
    unk_token: str | None
    bos_token_id: int | None
    eos_token_id: int | None
    pad_token_id: int | None
    add_bos_token: bool
    chat_template: str | None


def _pre_tokenizer(pre: str, path_name: str):
    byte_level_gpt2 = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=True)
    if pre in ("default", "gpt2", "gpt-2"):
        return byte_level_gpt2
    if pre == "smollm":
        # llama.cpp: "\p{N}" (every digit on its own), then the GPT-2 pattern; the same as SmolLM2's own
        # tokenizer.json (Digits(individual_digits) + ByteLevel).
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level_gpt2])
    if pre in ("llama-bpe", "llama3"):
        return pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_LLAMA3_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ])
    raise UnsupportedTokenizerError(
        f"{path_name}: BPE pre-tokenizer {pre!r} (tokenizer.ggml.pre) is not supported; supported: "
        f"default, gpt2, smollm, llama-bpe")


def _sentencepiece_merges(tokens: list[str], types: list[int], scores: list[float]) -> list[tuple[str, str]]:
    """BPE merges implied by a SentencePiece BPE vocabulary: (left, right) for every normal piece that is
    the concatenation of two normal pieces, best-scoring merged piece first (ties: lower ids first)."""
    normal = {tok: i for i, tok in enumerate(tokens) if types[i] == TOKEN_TYPE_NORMAL}
    ranked = []
    for merged, merged_id in normal.items():
        for cut in range(1, len(merged)):
            left, right = merged[:cut], merged[cut:]
            if left in normal and right in normal:
                ranked.append((-scores[merged_id], merged_id, normal[left], normal[right], left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def _sentencepiece_tokenizer(model: GGUFModel, tokens: list[str], types: list[int]) -> Tokenizer:
    name = model.path.name
    scores = [float(x) for x in model.get("tokenizer.ggml.scores", [])]
    if len(scores) != len(tokens):
        raise UnsupportedTokenizerError(f"{name}: SentencePiece vocabulary without one score per token")
    unknown = [tokens[i] for i, t in enumerate(types) if t == TOKEN_TYPE_UNKNOWN]
    unk_id = model.get("tokenizer.ggml.unknown_token_id")
    unk = tokens[int(unk_id)] if unk_id is not None and 0 <= int(unk_id) < len(tokens) else (unknown or [None])[0]
    byte_fallback = any(t == TOKEN_TYPE_BYTE for t in types)
    vocab = {tok: i for i, tok in enumerate(tokens)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=_sentencepiece_merges(tokens, types, scores), unk_token=unk,
                               fuse_unk=True, byte_fallback=byte_fallback))
    space_prefix = bool(model.get("tokenizer.ggml.add_space_prefix", True))
    steps = [normalizers.Prepend("▁")] if space_prefix else []
    tok.normalizer = normalizers.Sequence(steps + [normalizers.Replace(" ", "▁")])
    decode_steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if space_prefix:
        decode_steps.append(decoders.Strip(" ", 1, 0))
    tok.decoder = decoders.Sequence(decode_steps)
    return tok


def _byte_level_tokenizer(model: GGUFModel, tokens: list[str]) -> Tokenizer:
    name = model.path.name
    merges_raw = model.string_array("tokenizer.ggml.merges")
    if not merges_raw:
        raise UnsupportedTokenizerError(f"{name}: byte-level BPE vocabulary without merges (tokenizer.ggml.merges)")
    pre = str(model.get("tokenizer.ggml.pre", "default"))
    pre_tokenizer = _pre_tokenizer(pre, name)
    vocab = {tok: i for i, tok in enumerate(tokens)}
    merges = []
    for m in merges_raw:
        left, sep, right = m.partition(" ")
        if not sep:
            raise UnsupportedTokenizerError(f"{name}: malformed BPE merge {m!r}")
        merges.append((left, right))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False,
                               ignore_merges=pre in ("llama-bpe", "llama3")))
    tok.pre_tokenizer = pre_tokenizer
    tok.decoder = decoders.ByteLevel()
    return tok


def build_tokenizer(model: GGUFModel) -> TokenizerFiles:
    """The tokenizer of a GGUF file as ``tokenizer.json`` text plus its special tokens."""
    try:
        return _build_tokenizer(model)
    except GGUFImportError:
        raise
    except Exception as exc:  # metadata of the wrong type, or merges the `tokenizers` library refuses
        raise UnsupportedTokenizerError(f"{model.path.name}: the tokenizer metadata is inconsistent "
                                        f"({type(exc).__name__}: {str(exc)[:160]})") from None


def _build_tokenizer(model: GGUFModel) -> TokenizerFiles:
    name = model.path.name
    kind = model.get("tokenizer.ggml.model")
    if kind is None:
        raise UnsupportedTokenizerError(f"{name}: the GGUF has no tokenizer (tokenizer.ggml.model is missing)")
    if kind not in ("gpt2", "llama"):
        raise UnsupportedTokenizerError(
            f"{name}: tokenizer model {kind!r} is not supported; only byte-level BPE ('gpt2') and "
            f"SentencePiece BPE ('llama') vocabularies can be imported")
    tokens = model.string_array("tokenizer.ggml.tokens")
    types = [int(t) for t in model.get("tokenizer.ggml.token_type", [TOKEN_TYPE_NORMAL] * len(tokens))]
    if not tokens or len(types) != len(tokens):
        raise UnsupportedTokenizerError(f"{name}: tokenizer tokens or token types are missing or inconsistent")
    if len(set(tokens)) != len(tokens):
        raise UnsupportedTokenizerError(f"{name}: the vocabulary has duplicate tokens")
    tok = _byte_level_tokenizer(model, tokens) if kind == "gpt2" else _sentencepiece_tokenizer(model, tokens, types)
    # llama.cpp parses control and unknown tokens in text as themselves (never split into pieces)
    special = [AddedToken(tokens[i], special=True, normalized=False)
               for i, t in enumerate(types) if t in (TOKEN_TYPE_CONTROL, TOKEN_TYPE_UNKNOWN)]
    user = [AddedToken(tokens[i], special=False, normalized=False)
            for i, t in enumerate(types) if t == TOKEN_TYPE_USER_DEFINED]
    if special:
        tok.add_special_tokens(special)
    if user:
        tok.add_tokens(user)

    def token_id(key: str) -> int | None:
        value = model.get(key)
        return None if value is None or not 0 <= int(value) < len(tokens) else int(value)

    bos, eos = token_id("tokenizer.ggml.bos_token_id"), token_id("tokenizer.ggml.eos_token_id")
    pad, unk = token_id("tokenizer.ggml.padding_token_id"), token_id("tokenizer.ggml.unknown_token_id")
    add_bos = bool(model.get("tokenizer.ggml.add_bos_token", kind == "llama"))
    if add_bos and bos is not None:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{tokens[bos]}:0 $A:0", pair=f"{tokens[bos]}:0 $A:0 {tokens[bos]}:1 $B:1",
            special_tokens=[(tokens[bos], bos)])
    elif kind == "gpt2":
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    # Normalise the JSON text (key order, indentation) so the file does not depend on how a given
    # `tokenizers` version happens to order its output.
    text = json.dumps(json.loads(tok.to_str()), indent=2, sort_keys=True, ensure_ascii=False) + "\n"
    template = model.get("tokenizer.chat_template")
    return TokenizerFiles(
        tokenizer_json=text,
        bos_token=None if bos is None else tokens[bos], eos_token=None if eos is None else tokens[eos],
        pad_token=None if pad is None else tokens[pad], unk_token=None if unk is None else tokens[unk],
        bos_token_id=bos, eos_token_id=eos, pad_token_id=pad, add_bos_token=add_bos,
        chat_template=None if template is None else str(template),
    )
