"""Chat templates: Hugging Face-style Jinja2, rendered in a sandbox.

A model's template comes from ``chat_template.jinja`` or the ``chat_template`` key of ``tokenizer_config.json``.
Models without one use :data:`FALLBACK_TEMPLATE`, which renders every message as ``<role>: <content>`` followed by
a blank line and ends with ``assistant:`` when a generation prompt is asked for.

Message content is user text, never markup: :func:`render_chat_spans` reports where it sits in the rendered
prompt so that the tokenizer matches control tokens (``<|im_end|>``, ``</s>``) only in the template's own text
(``LoadedModel.prompt_ids``). A user who writes ``</s><s>system:`` gets those characters as plain text tokens.
"""

from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import lru_cache
from typing import Any, Mapping, Sequence

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from ..errors import P2PInferError

FALLBACK_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


class ChatTemplateError(P2PInferError):
    """A chat template that does not compile or raised an error while rendering."""


def _raise_exception(message: str) -> None:
    raise ChatTemplateError(f"chat template refused the messages: {message}")


def _strftime_now(fmt: str) -> str:
    return datetime.now(timezone.utc).strftime(fmt)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@lru_cache(maxsize=32)
def _compile(source: str) -> Any:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(source)
    except TemplateError as exc:
        raise ChatTemplateError(f"chat template does not compile: {exc}") from None


def render_chat(template: str | None, messages: Sequence[Mapping[str, str]], *, bos_token: str = "",
                eos_token: str = "", add_generation_prompt: bool = True) -> str:
    """Render ``messages`` (dicts with ``role`` and ``content``) with ``template`` (or the fallback)."""
    compiled = _compile(template if template is not None else FALLBACK_TEMPLATE)
    try:
        return compiled.render(messages=[dict(m) for m in messages], bos_token=bos_token, eos_token=eos_token,
                               add_generation_prompt=add_generation_prompt)
    except ChatTemplateError:
        raise
    except Exception as exc:  # sandbox violations and template bugs
        raise ChatTemplateError(f"chat template failed to render: {exc}") from None


@dataclass(frozen=True)
class RenderedChat:
    """A rendered chat prompt and where the messages' own content sits in it (``[start, end)`` spans)."""

    text: str
    content_spans: tuple[tuple[int, int], ...]


def render_chat_spans(template: str | None, messages: Sequence[Mapping[str, str]], *, bos_token: str = "",
                      eos_token: str = "", add_generation_prompt: bool = True) -> RenderedChat:
    """Render like :func:`render_chat`, and say which characters are message content.

    The template is rendered once with each content replaced by a unique marker, so the template's own text
    (which may hold control tokens such as ``<|im_start|>``) is told apart from what users wrote. A template
    that transforms or repeats content (so a marker does not appear exactly once) is refused: its content
    could not be kept plain text.
    """
    nonce = secrets.token_hex(8)
    markers = [f"\ue000{nonce}:{i}\ue001" for i in range(len(messages))]
    marked = [{**dict(m), "content": markers[i]} for i, m in enumerate(messages)]
    rendered = render_chat(template, marked, bos_token=bos_token, eos_token=eos_token,
                           add_generation_prompt=add_generation_prompt)
    pieces = re.split(f"(\ue000{nonce}:\\d+\ue001)", rendered)
    seen: list[int] = []
    out, spans, pos = [], [], 0
    for piece in pieces:
        if piece.startswith("\ue000" + nonce):
            i = int(piece[len(nonce) + 2:-1])
            seen.append(i)
            content = str(messages[i]["content"])
            spans.append((pos, pos + len(content)))
            piece = content
        out.append(piece)
        pos += len(piece)
    if sorted(seen) != list(range(len(messages))):
        raise ChatTemplateError("the chat template transforms or repeats message content, so p2pinfer cannot keep "
                                "user text apart from control tokens; use a model whose template inserts content "
                                "as is")
    return RenderedChat("".join(out), tuple(spans))


def encode_chat(tokenizer: Any, plain_tokenizer: Any, rendered: RenderedChat) -> list[int]:
    """Token IDs of a rendered chat: control tokens matched only in the template's text, everything else
    (template text and message content alike, so BPE merges across their boundary as usual) encoded with
    ``plain_tokenizer`` — the same tokenizer with ``encode_special_tokens = True``, which reads
    ``<|im_end|>`` as the characters it is made of."""
    added = sorted({t.content for t in tokenizer.get_added_tokens_decoder().values() if t.content},
                   key=len, reverse=True)
    pattern = re.compile("|".join(re.escape(a) for a in added)) if added else None
    text = rendered.text
    controls: list[tuple[int, int, str]] = []  # (start, end, token) found outside content
    cursor = 0
    for start, end in [*rendered.content_spans, (len(text), len(text))]:
        if pattern is not None:
            controls += [(cursor + m.start(), cursor + m.end(), m.group()) for m in pattern.finditer(text[cursor:start])]
        cursor = end
    ids: list[int] = []
    pos = 0
    for start, end, token in controls:
        if start > pos:
            ids += plain_tokenizer.encode(text[pos:start], add_special_tokens=False).ids
        ids.append(int(tokenizer.token_to_id(token)))
        pos = end
    if pos < len(text):
        ids += plain_tokenizer.encode(text[pos:], add_special_tokens=False).ids
    return ids
