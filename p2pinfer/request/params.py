"""Turning what a user asks for into a wire `Request`, with clear errors for bad parameters.

:class:`GenerationParams` is the one typed, validated form of the generation parameters: the SDK builds
requests from it and the OpenAI gateway maps its JSON onto it, so both accept exactly the same values.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass
from typing import Any, Iterable, Mapping

from ..wire import ChatMessage, Request, now_ms
from ..wire.messages import MAX_NEW_TOKENS, MAX_TEXT_BYTES, request_text_bytes
from .errors import BadParameters, PromptTooLarge

_ROLES = ("system", "user", "assistant")
MAX_TEMPERATURE = 2.0  # OpenAI's range; the SDK and the gateway share it
MAX_STOP = 8
MAX_STOP_BYTES = 64


@dataclass(frozen=True)
class GenerationParams:
    """Validated generation parameters (raise :class:`BadParameters` naming the parameter via ``parse``)."""

    max_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    stop: tuple[str, ...] = ()
    seed: int | None = None

    @classmethod
    def parse(cls, *, max_tokens: Any = 64, temperature: Any = 0.0, top_p: Any = 1.0, top_k: Any = 0,
              stop: Any = None, seed: Any = None) -> "GenerationParams":
        if not _is_int(max_tokens) or not 1 <= max_tokens <= MAX_NEW_TOKENS:
            raise BadParameters(f"max_tokens must be an integer from 1 to {MAX_NEW_TOKENS}, got {show(max_tokens)}",
                                param="max_tokens")
        temperature = _number("temperature", temperature, 0.0, MAX_TEMPERATURE)
        top_p = _number("top_p", top_p, 0.0, 1.0)
        if top_p == 0.0:
            raise BadParameters("top_p must be greater than 0 (use temperature=0 for greedy decoding)", param="top_p")
        if not _is_int(top_k) or top_k < 0 or top_k > 1 << 20:
            raise BadParameters(f"top_k must be a non-negative integer (0 disables it), got {show(top_k)}",
                                param="top_k")
        stops: Any
        if stop is None:
            stops = ()
        elif isinstance(stop, str):
            stops = (stop,)
        elif isinstance(stop, (list, tuple)):
            stops = tuple(stop)
        else:
            stops = None
        if stops is None or len(stops) > MAX_STOP or not all(
                isinstance(s, str) and 0 < len(s.encode("utf-8", "replace")) <= MAX_STOP_BYTES for s in stops):
            raise BadParameters(f"stop must be a string or at most {MAX_STOP} non-empty strings of at most "
                                f"{MAX_STOP_BYTES} bytes each", param="stop")
        if seed is not None and (not _is_int(seed) or not 0 <= seed < 2**64):
            raise BadParameters(f"seed must be an integer in [0, 2**64), got {show(seed)}", param="seed")
        return cls(max_tokens, temperature, top_p, top_k, stops, seed)

    def as_kwargs(self) -> dict[str, Any]:
        return asdict(self)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


MAX_SHOWN = 40


def show(value: Any) -> str:
    """A caller's value for an error message: its JSON text (or type name), shortened, on one line."""
    try:
        text = json.dumps(value, ensure_ascii=True)
    except (TypeError, ValueError, RecursionError):
        text = type(value).__name__
    return text if len(text) <= MAX_SHOWN else text[:MAX_SHOWN - 3] + "..."


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
    if stop is not None and not isinstance(stop, (str, list, tuple)):
        stop = tuple(stop)  # any iterable of strings, as before
    p = GenerationParams.parse(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                               stop=stop, seed=seed)
    request = Request(
        model=model_digest,
        prompt=prompt,
        messages=chat,
        max_tokens=p.max_tokens,
        temperature=p.temperature,
        top_p=p.top_p,
        top_k=p.top_k,
        stop=p.stop,
        seed=p.seed,
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
        raise BadParameters(f"{name} must be a number, got {type(value).__name__}", param=name)
    try:
        number = float(value)
    except OverflowError:  # an int too large for a float
        number = math.inf
    if not math.isfinite(number) or not lo <= number <= hi:
        raise BadParameters(f"{name} must be a number from {lo:g} to {hi:g}, got {show(value)}", param=name)
    value = number
    return value
