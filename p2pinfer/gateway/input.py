"""What the gateway reads from an HTTP client, and the limits it holds it to (pure, no I/O).

The gateway's limits follow from what one network request can carry (``p2pinfer.wire.messages``):

* text: a prompt, or all chat messages' contents together, is at most ``MAX_TEXT_BYTES`` (256 KiB) of UTF-8.
  That bound makes the largest ``Assignment`` fit its 1 MiB frame (tests/test_request_size_limits.py checks
  it), so a prompt the gateway accepts never fails locally in the network. A larger one gets **413**
  ``prompt_too_large`` naming the limit, before anything is sent.
* body: at most :data:`MAX_BODY` bytes are read: the largest text in JSON's most expensive escaping
  (``\\u00XX``, six bytes per byte) plus room for the other parameters. A larger body gets **413**
  ``body_too_large`` naming both limits.
* JSON: UTF-8, standard JSON (no ``NaN``/``Infinity``, numbers that fit a double), nested at most
  :data:`MAX_JSON_DEPTH` deep, no unpaired UTF-16 surrogates in strings; anything else gets **400**
  ``invalid_json`` saying what was wrong. Error messages never quote Python exception text, and quote the
  client's values only shortened (:func:`~p2pinfer.gateway.openai_api.show`).
"""

from __future__ import annotations

import json
import math
from typing import Any

from ..wire.messages import MAX_TEXT_BYTES, request_text_bytes
from .openai_api import MAX_SHOWN, ApiError, GenerationSpec, bad_request

MAX_BODY = 6 * MAX_TEXT_BYTES + 64 * 1024  # bytes read from one HTTP request at most (1.56 MiB)
MAX_JSON_DEPTH = 64                         # OpenAI request bodies nest 4 deep (messages[].content[].text)


def body_too_large() -> ApiError:
    return ApiError(413, f"the request body is larger than {MAX_BODY} bytes, the most this gateway reads (a request "
                         f"carries at most {MAX_TEXT_BYTES} bytes of prompt text); shorten the prompt",
                    code="body_too_large")


def parse_json_body(raw: bytes) -> dict[str, Any]:
    """The request body as a JSON object, or an :class:`ApiError` (400/413) saying what is wrong with it."""
    if len(raw) > MAX_BODY:
        raise body_too_large()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise bad_request(f"the request body is not UTF-8 text (invalid byte at offset {exc.start}); send JSON "
                          "encoded as UTF-8", code="invalid_json") from None
    try:
        body = json.loads(text, parse_constant=_refuse_constant, parse_float=_finite_float)
    except ApiError:
        raise
    except json.JSONDecodeError as exc:
        raise bad_request(f"the request body is not valid JSON (line {exc.lineno}, column {exc.colno}); send "
                          "a JSON object", code="invalid_json") from None
    except RecursionError:
        raise _too_deep() from None
    except ValueError:  # an integer literal longer than Python converts (4300 digits)
        raise bad_request("the request body holds a number too large to be a parameter; send a JSON object with "
                          "parameters in range", code="invalid_json") from None
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object", code="invalid_json")
    _check_tree(body)
    return body


def check_text_size(spec: GenerationSpec) -> None:
    """413 when the prompt (or the chat messages together) is more than one network request carries."""
    prompt = spec.params.get("prompt")
    messages = spec.params.get("messages")
    contents = None if messages is None else [m["content"] for m in messages]
    size = request_text_bytes(prompt, contents)
    if size > MAX_TEXT_BYTES:
        what, param = ("the prompt is", "prompt") if prompt is not None else ("the messages together are", "messages")
        raise ApiError(413, f"{what} {size} bytes of UTF-8 text; a request carries at most {MAX_TEXT_BYTES} bytes "
                            f"({MAX_TEXT_BYTES // 1024} KiB); shorten it or split the work into several requests",
                       param=param, code="prompt_too_large")


def _refuse_constant(name: str) -> Any:
    raise bad_request(f"the request body holds {name}, which is not a JSON number; send finite numbers",
                      code="invalid_json")


def _finite_float(literal: str) -> float:
    value = float(literal)
    if not math.isfinite(value):
        raise bad_request(f"the number {literal[:MAX_SHOWN]} is out of range; send finite numbers", code="invalid_json")
    return value


def _too_deep() -> ApiError:
    return bad_request(f"the request body is nested more than {MAX_JSON_DEPTH} levels deep; OpenAI requests need 4",
                       code="invalid_json")


def _check_tree(body: Any) -> None:
    """Depth and Unicode of every value, iteratively (a deep body must not exhaust the Python stack)."""
    stack: list[tuple[Any, int]] = [(body, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, str):
            _check_text(value)
        elif isinstance(value, (dict, list)):
            if depth > MAX_JSON_DEPTH:
                raise _too_deep()
            items = value.items() if isinstance(value, dict) else enumerate(value)
            for key, item in items:
                if isinstance(key, str):
                    _check_text(key)
                stack.append((item, depth + 1))


def _check_text(text: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise bad_request(f"the request body holds an unpaired UTF-16 surrogate (\\u{ord(text[exc.start]):04x}), "
                          "which is not Unicode text; send valid UTF-8", code="invalid_json") from None
