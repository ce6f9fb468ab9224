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
    """A structlog logger; ``name`` is recorded as ``component=...``.

    The logger is a lazy proxy that reads the configuration each time it logs, so module-level loggers
    created at import time follow a later :func:`configure` (log level, JSON).
    """
    if name:
        initial = {"component": name, **initial}  # ("logger" is reserved by structlog.get_logger)
    return structlog.get_logger(**initial)
