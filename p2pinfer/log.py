"""structlog configured in one place.

Humans get `key=value` lines (logfmt) on stderr; `--log-json` switches to one JSON object per line. Every
line carries exactly one event name, e.g. ``event=gossip.rejected reason=expired``.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, TextIO

import structlog

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


def configure(*, json: bool = False, level: str = "info", stream: TextIO | None = None) -> None:
    """Configure structlog for the whole process. Safe to call more than once (the last call wins)."""
    try:
        numeric_level = _LEVELS[level.lower()]
    except KeyError:
        raise ValueError(f"unknown log level {level!r}; use one of {', '.join(_LEVELS)}") from None
    renderer: Any
    if json:
        renderer = structlog.processors.JSONRenderer(sort_keys=True)
    else:
        renderer = structlog.processors.LogfmtRenderer(key_order=["timestamp", "level", "event"], drop_missing=True)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric_level),
        logger_factory=structlog.PrintLoggerFactory(file=stream or sys.stderr),
        cache_logger_on_first_use=False,
    )


def get_logger(name: str | None = None, **initial: Any) -> Any:
    """A bound structlog logger; ``name`` is recorded as ``logger=...``."""
    if name:
        initial = {"logger": name, **initial}
    return _LazyLogger(initial)


class _LazyLogger:
    """Binds its values at each call, not at creation: structlog's ``get_logger().bind(...)`` assembles the
    logger with the configuration of that moment, so module-level loggers created at import time would
    ignore a later :func:`configure` (level and renderer)."""

    __slots__ = ("_initial",)

    def __init__(self, initial: dict[str, Any]) -> None:
        self._initial = initial

    def bind(self, **values: Any) -> "_LazyLogger":
        return _LazyLogger({**self._initial, **values})

    def new(self, **values: Any) -> "_LazyLogger":
        return _LazyLogger(values)

    def __getattr__(self, name: str) -> Any:
        return getattr(structlog.get_logger().bind(**self._initial), name)
