"""Chat templates: Hugging Face-style Jinja2, rendered in a sandbox.

A model's template comes from ``chat_template.jinja`` or the ``chat_template`` key of ``tokenizer_config.json``.
Models without one use :data:`FALLBACK_TEMPLATE`, which renders every message as ``<role>: <content>`` followed by
a blank line and ends with ``assistant:`` when a generation prompt is asked for.
"""

from __future__ import annotations

import json
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
