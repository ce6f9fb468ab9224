"""structlog configured in one place, for p2pinfer's own loggers only.

Humans get `key=value` lines (logfmt) on stderr; `--log-json` switches to one JSON object per line. Every
line carries exactly one event name, e.g. ``event=gossip.rejected reason=expired``.

p2pinfer is a library too: an application that embeds the SDK gets warnings and errors on stderr and nothing
else (never stdout) until it calls :func:`configure` (``configure(level="info")`` to see what the network
does). The configuration is p2pinfer's own, not structlog's global one, so an application that configures
structlog for itself neither changes ours nor is changed by it.
"""

from __future__ import annotations

import logging
import sys
import threading
from typing import Any, TextIO

import structlog

__all__ = ["DEFAULT_LEVEL", "configure", "get_logger"]

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}
DEFAULT_LEVEL = "warning"  # what a library says unasked: only what its user should act on


class _Settings:
    """The current configuration; ``generation`` changes on every :func:`configure` so loggers rebuild."""

    def __init__(self) -> None:
        self.generation = 0
        self.processors: list[Any] = []
        self.wrapper_class: Any = None
        self.stream: TextIO | None = None  # None: sys.stderr as it is when a line is written

    def logger(self) -> "_LineLogger":
        return _LineLogger(self.stream)


class _LineLogger:
    """Writes each rendered line whole to the configured stream, or to ``sys.stderr`` as it is right now."""

    def __init__(self, stream: TextIO | None) -> None:
        self._stream = stream

    def msg(self, message: str) -> None:
        stream = self._stream or sys.stderr
        with _lock:  # one line at a time, even from worker threads
            stream.write(message + "\n")
            stream.flush()

    log = debug = info = warn = warning = err = error = critical = exception = fatal = failure = msg


_settings = _Settings()
_lock = threading.Lock()


def configure(*, json: bool = False, level: str = DEFAULT_LEVEL, stream: TextIO | None = None) -> None:
    """Configure p2pinfer's logging for the whole process. Safe to call more than once (the last call wins).

    ``level`` is the minimum level written (debug, info, warning, error); ``stream`` defaults to stderr.
    """
    try:
        numeric_level = _LEVELS[level.lower()]
    except KeyError:
        raise ValueError(f"unknown log level {level!r}; use one of {', '.join(_LEVELS)}") from None
    renderer: Any
    if json:
        renderer = structlog.processors.JSONRenderer(sort_keys=True)
    else:
        renderer = structlog.processors.LogfmtRenderer(key_order=["timestamp", "level", "event"], drop_missing=True)
    with _lock:
        _settings.processors = [
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ]
        _settings.wrapper_class = structlog.make_filtering_bound_logger(numeric_level)
        _settings.stream = stream
        _settings.generation += 1


configure()  # the library default: warnings and errors, on stderr


class _Logger:
    """A lazy logger: it follows a later :func:`configure` (level, JSON, stream) and binds on first use."""

    __slots__ = ("_initial", "_bound", "_generation")

    def __init__(self, initial: dict[str, Any]) -> None:
        self._initial = initial
        self._bound: Any = None
        self._generation = -1

    def _current(self) -> Any:
        if self._generation != _settings.generation or self._bound is None:
            self._bound = structlog.wrap_logger(
                _settings.logger(), processors=_settings.processors, wrapper_class=_settings.wrapper_class,
                cache_logger_on_first_use=False, **self._initial)
            self._generation = _settings.generation
        return self._bound

    def bind(self, **values: Any) -> "_Logger":
        return _Logger({**self._initial, **values})

    def __getattr__(self, name: str) -> Any:
        return getattr(self._current(), name)


def get_logger(name: str | None = None, **initial: Any) -> Any:
    """A p2pinfer logger; ``name`` is recorded as ``component=...``.

    The logger reads the configuration each time it logs, so module-level loggers created at import time
    follow a later :func:`configure` (log level, JSON).
    """
    if name:
        initial = {"component": name, **initial}
    return _Logger(initial)
