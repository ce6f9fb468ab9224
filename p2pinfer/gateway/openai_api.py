"""The OpenAI API's shapes: request bodies in, response objects, stream chunks and error bodies out.

Pure functions, no I/O. What is accepted (see docs/gateway.md):

* ``model``, ``messages`` (chat; text content or ``text`` content parts; roles system, developer (as system),
  user, assistant) or ``prompt`` (completions; a string, or a list holding one string);
* ``max_tokens`` / ``max_completion_tokens``, ``temperature`` (OpenAI's default 1), ``top_p``, ``stop``,
  ``seed``, ``stream``, ``stream_options.include_usage``, ``n`` (up to 4), ``logprobs`` / ``top_logprobs``
  (up to 8; see :mod:`.openai_extras`), ``user``; ``top_k`` as an extension;
* features the network cannot provide (penalties, logit bias, tools, JSON mode, echo) are refused with a 400 naming the parameter when set to anything but their neutral value. Other
  unknown keys are ignored, as clients add vendor fields.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Mapping

from ..request.errors import BadParameters
from ..request.params import GenerationParams

DEFAULT_COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
DEFAULT_CHAT_MAX_TOKENS = 512       # OpenAI's is "until the context is full"; ours is bounded
MAX_MODEL_NAME = 128                # announced model names are at most 128 bytes; a hex digest is 64
FINISH_REASONS = {"eos": "stop", "stop": "stop", "length": "length"}


class ApiError(Exception):
    """An error answered in OpenAI's format: ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None, code: str = "invalid_value") -> ApiError:
    return ApiError(400, message, param=param, code=code)


MAX_SHOWN = 40  # characters of a client's value quoted back in an error message


def show(value: Any) -> str:
    """A client's value for an error message: its JSON text, shortened, on one line."""
    try:
        text = json.dumps(value, ensure_ascii=True)
    except (TypeError, ValueError):
        text = type(value).__name__
    return text if len(text) <= MAX_SHOWN else text[:MAX_SHOWN - 3] + "..."


@dataclass(frozen=True)
class GenerationSpec:
    """A validated OpenAI request, ready for :meth:`AsyncClient.stream_with_result`."""

    endpoint: str  # "chat" or "completions"
    model: str
    stream: bool
    include_usage: bool
    params: dict[str, Any] = field(default_factory=dict)  # prompt= or messages=, max_tokens=, ...
    n: int = 1  # choices; each is its own network request (see openai_extras)
    logprobs: bool = False  # log-probs wanted (returned once the quorum accepted)
    top_logprobs: int = 0  # alternatives per token, up to 8


# Parameters whose only supported value is the neutral one: name -> test that the value is neutral.
_NEUTRAL: dict[str, Any] = {
    "best_of": lambda v: v in (None, 1),
    "echo": lambda v: v in (None, False),
    "presence_penalty": lambda v: v in (None, 0, 0.0),
    "frequency_penalty": lambda v: v in (None, 0, 0.0),
    "logit_bias": lambda v: v in (None, {}),
    "tools": lambda v: v in (None, []),
    "functions": lambda v: v in (None, []),
    "tool_choice": lambda v: v in (None, "none", "auto"),
    "function_call": lambda v: v in (None, "none", "auto"),
    "response_format": lambda v: v is None or (isinstance(v, Mapping) and v.get("type") == "text"),
    "suffix": lambda v: v in (None, ""),
    "audio": lambda v: v is None,
    "modalities": lambda v: v in (None, ["text"]),
}


def parse_body(raw: bytes) -> dict[str, Any]:
    """The body as a JSON object (the checks and limits live in :mod:`p2pinfer.gateway.input`)."""
    from .input import parse_json_body
    return parse_json_body(raw)


def parse_chat_request(body: Mapping[str, Any]) -> GenerationSpec:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad_request("'messages' must be a non-empty array of {role, content} objects", "messages")
    chat = [_chat_message(i, m) for i, m in enumerate(messages)]
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    param = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
    return _spec("chat", body, {"messages": chat}, max_tokens, param, DEFAULT_CHAT_MAX_TOKENS)


def parse_completion_request(body: Mapping[str, Any]) -> GenerationSpec:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise bad_request("'prompt' must be a string (token arrays and several prompts are not supported)",
                          "prompt")
    return _spec("completions", body, {"prompt": prompt}, body.get("max_tokens"), "max_tokens",
                 DEFAULT_COMPLETION_MAX_TOKENS)


def _chat_message(i: int, message: Any) -> dict[str, str]:
    if not isinstance(message, Mapping):
        raise bad_request(f"messages[{i}] must be an object with 'role' and 'content'", f"messages[{i}]")
    role = message.get("role")
    if role == "developer":
        role = "system"
    if role not in ("system", "user", "assistant"):
        raise bad_request(f"messages[{i}].role {show(role)} is not supported; use system, developer, user or "
                          "assistant (tool messages are not supported)", f"messages[{i}].role")
    content = message.get("content")
    if isinstance(content, list):
        parts = []
        for j, part in enumerate(content):
            if not isinstance(part, Mapping) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise bad_request(f"messages[{i}].content[{j}] must be a text part; images, audio and files "
                                  "are not supported", f"messages[{i}].content")
            parts.append(part["text"])
        content = "".join(parts)
    if content is None and role == "assistant":
        content = ""
    if not isinstance(content, str):
        raise bad_request(f"messages[{i}].content must be a string or an array of text parts",
                          f"messages[{i}].content")
    if message.get("tool_calls") or message.get("function_call"):
        raise bad_request(f"messages[{i}]: tool and function calls are not supported", f"messages[{i}]")
    return {"role": role, "content": content}


def _spec(endpoint: str, body: Mapping[str, Any], params: dict[str, Any], max_tokens: Any, max_param: str,
          default_max: int) -> GenerationSpec:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad_request("'model' is required: a model name from GET /v1/models (or its hex digest)", "model",
                          code="missing_model")
    if len(model) > MAX_MODEL_NAME:
        raise bad_request(f"'model' is {len(model)} characters; model names and digests are at most {MAX_MODEL_NAME}",
                          "model")
    for name, neutral in _NEUTRAL.items():
        if name in body and not neutral(body[name]):
            raise bad_request(f"'{name}' is not supported by the p2pinfer gateway; leave it out", name,
                              code="unsupported_parameter")
    if max_tokens is None:
        max_tokens = default_max
    seed = body.get("seed")
    if _is_int(seed) and -(2**63) <= seed < 0:
        seed += 2**64  # OpenAI seeds are signed 64-bit; ours are unsigned: the same 64 bits
    temperature = body.get("temperature")
    top_p = body.get("top_p")
    try:  # the SDK's typed parameters: the gateway accepts exactly what the SDK accepts
        typed = GenerationParams.parse(max_tokens=max_tokens, temperature=1.0 if temperature is None else temperature,
                                       top_p=1.0 if top_p is None else top_p, top_k=0 if body.get("top_k") is None else body["top_k"],
                                       stop=body.get("stop"), seed=seed)
    except BadParameters as exc:
        param = max_param if exc.param == "max_tokens" else (exc.param or "")
        raise bad_request(f"'{param}': {exc}" if param else str(exc), param or None) from None
    stream = body.get("stream")
    if stream not in (None, True, False):
        raise bad_request("'stream' must be true or false", "stream")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, Mapping):
        raise bad_request("'stream_options' must be an object", "stream_options")
    if options is not None and not stream:
        raise bad_request("'stream_options' is only allowed when 'stream' is true", "stream_options")
    include_usage = bool(options and options.get("include_usage"))
    params.update(typed.as_kwargs())
    from .openai_extras import parse_choices, parse_logprobs  # (imports this module)

    logprobs, top_logprobs = parse_logprobs(endpoint, body)
    return GenerationSpec(endpoint=endpoint, model=model, stream=bool(stream), include_usage=include_usage,
                          params=params, n=parse_choices(body), logprobs=logprobs, top_logprobs=top_logprobs)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# ---- responses ----------------------------------------------------------------------------------------

def finish_reason(ours: str) -> str:
    return FINISH_REASONS.get(ours, "stop")


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def choice_object(spec: GenerationSpec, index: int, text: str, finish: str,
                  logprobs: dict[str, Any] | None = None) -> dict[str, Any]:
    """One choice of a whole (non-streamed) response."""
    if spec.endpoint == "chat":
        return {"index": index, "message": {"role": "assistant", "content": text, "refusal": None},
                "logprobs": logprobs, "finish_reason": finish}
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}


def completion_object(spec: GenerationSpec, id: str, created: int, text: str, finish: str,
                      usage_: dict[str, int], extra: dict[str, Any], *,
                      choices: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """The whole (non-streamed) response; ``extra`` goes under the ``p2pinfer`` key. ``choices`` (from
    :func:`choice_object`) replaces the single choice made of ``text`` and ``finish``."""
    kind = "chat.completion" if spec.endpoint == "chat" else "text_completion"
    return {"id": id, "object": kind, "created": created, "model": spec.model,
            "choices": choices if choices is not None else [choice_object(spec, 0, text, finish)],
            "usage": usage_, "system_fingerprint": None, "p2pinfer": extra}


def chunk_object(spec: GenerationSpec, id: str, created: int, *, text: str | None = None, role: bool = False,
                 finish: str | None = None, usage_: dict[str, int] | None = None,
                 extra: dict[str, Any] | None = None, index: int = 0,
                 logprobs: dict[str, Any] | None = None) -> dict[str, Any]:
    """One streamed chunk. With ``usage_`` it is the usage chunk (no choices), as OpenAI sends it last."""
    if spec.endpoint == "chat":
        kind = "chat.completion.chunk"
        delta: dict[str, Any] = {}
        if role:
            delta["role"] = "assistant"
        if text is not None:
            delta["content"] = text
        choice: dict[str, Any] = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
    else:
        kind = "text_completion"
        choice = {"index": index, "text": text or "", "logprobs": logprobs, "finish_reason": finish}
    chunk: dict[str, Any] = {"id": id, "object": kind, "created": created, "model": spec.model,
                             "system_fingerprint": None, "choices": [] if usage_ is not None else [choice]}
    if spec.include_usage:
        chunk["usage"] = usage_  # null on every chunk but the last, as OpenAI does
    if extra is not None:
        chunk["p2pinfer"] = extra
    return chunk


def sse(obj: Mapping[str, Any]) -> bytes:
    """One server-sent event carrying a JSON object."""
    return b"data: " + json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


SSE_DONE = b"data: [DONE]\n\n"


def model_list(models: Mapping[str, bytes], created: int) -> dict[str, Any]:
    """``GET /v1/models``: one entry per model name, with its content digest."""
    return {"object": "list", "data": [
        {"id": name, "object": "model", "created": created, "owned_by": "p2pinfer", "digest": digest.hex()}
        for name, digest in sorted(models.items())]}
