"""Turning what a user asks for into a wire `Request`, with clear errors for bad parameters."""

from __future__ import annotations

import math
import os
from typing import Any, Iterable, Mapping

from ..wire import ChatMessage, Request, now_ms
from ..wire.messages import MAX_NEW_TOKENS, MAX_TEXT_BYTES, request_text_bytes
from .errors import BadParameters, PromptTooLarge

_ROLES = ("system", "user", "assistant")


def build_request(
    *,
    model_digest: bytes,
    client_key: bytes,
    prompt: str | None = None,
    messages: Iterable[Mapping[str, Any]] | None = None,
    max_tokens: int = 64,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    stop: str | Iterable[str] | None = None,
    seed: int | None = None,
    nonce: bytes | None = None,
    created_at_ms: int | None = None,
) -> Request:
    """Validate user parameters and build the canonical request (raises :class:`BadParameters`)."""
    if (prompt is None) == (messages is None):
        raise BadParameters("give exactly one of prompt= (text) or messages= (chat)")
    if prompt is not None and not isinstance(prompt, str):
        raise BadParameters(f"prompt must be a string, got {type(prompt).__name__}")
    chat: tuple[ChatMessage, ...] | None = None
    if messages is not None:
        chat_list = []
        for i, m in enumerate(messages):
            if not isinstance(m, Mapping) or set(m) - {"role", "content", "name"} or "role" not in m or "content" not in m:
                raise BadParameters(f"messages[{i}] must be a mapping with 'role' and 'content'")
            if m["role"] not in _ROLES:
                raise BadParameters(f"messages[{i}].role must be one of {', '.join(_ROLES)}, got {m['role']!r}")
            if not isinstance(m["content"], str):
                raise BadParameters(f"messages[{i}].content must be a string")
            chat_list.append(ChatMessage(role=m["role"], content=m["content"]))
        if not chat_list:
            raise BadParameters("messages must not be empty")
        chat = tuple(chat_list)
    _check_text(prompt, None if chat is None else [m.content for m in chat])
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or not 1 <= max_tokens <= MAX_NEW_TOKENS:
        raise BadParameters(f"max_tokens must be an integer from 1 to {MAX_NEW_TOKENS}, got {max_tokens!r}")
    temperature = _number("temperature", temperature, 0.0, 10.0)
    top_p = _number("top_p", top_p, 0.0, 1.0)
    if top_p == 0.0:
        raise BadParameters("top_p must be greater than 0 (use temperature=0 for greedy decoding)")
    if not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 0:
        raise BadParameters(f"top_k must be a non-negative integer (0 disables it), got {top_k!r}")
    stops: tuple[str, ...]
    if stop is None:
        stops = ()
    elif isinstance(stop, str):
        stops = (stop,)
    else:
        stops = tuple(stop)
    if len(stops) > 8 or not all(isinstance(s, str) and 0 < len(s.encode()) <= 64 for s in stops):
        raise BadParameters("stop must be at most 8 non-empty strings of at most 64 bytes each")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**64):
        raise BadParameters(f"seed must be an integer in [0, 2**64), got {seed!r}")
    request = Request(
        model=model_digest,
        prompt=prompt,
        messages=chat,
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        stop=stops,
        seed=seed,
        nonce=nonce if nonce is not None else os.urandom(16),
        client=client_key,
        created_at_ms=now_ms() if created_at_ms is None else created_at_ms,
    )
    try:
        request.validate()
    except ValueError as exc:  # sizes the checks above do not cover (e.g. a huge prompt)
        raise BadParameters(f"request is invalid: {exc}") from None
    return request


def _check_text(prompt: str | None, contents: list[str] | None) -> None:
    """Refuse, before anything is sent, text that is not Unicode or larger than one request may carry."""
    for i, text in enumerate([prompt] if prompt is not None else contents or []):
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            where = "prompt" if prompt is not None else f"messages[{i}].content"
            raise BadParameters(f"{where} is not valid Unicode text (a lone surrogate at character {exc.start}); "
                                "send UTF-8 text") from None
    size = request_text_bytes(prompt, contents)
    if size > MAX_TEXT_BYTES:
        what = "the prompt is" if prompt is not None else "the chat messages together are"
        raise PromptTooLarge(f"{what} {size} bytes of UTF-8 text; one request carries at most {MAX_TEXT_BYTES} "
                             f"bytes ({MAX_TEXT_BYTES // 1024} KiB); shorten it or split the work into several "
                             "requests")


def _number(name: str, value: Any, lo: float, hi: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise BadParameters(f"{name} must be a number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value) or not lo <= value <= hi:
        raise BadParameters(f"{name} must be between {lo} and {hi}, got {value}")
    return value
