"""Serving an ASGI app under trio with hypercorn's trio worker: TCP (the gateway) or a Unix socket (control)."""

from __future__ import annotations

import ipaddress
import logging
from pathlib import Path
from typing import Any

import trio
from hypercorn.config import Config as HypercornConfig

from ..errors import P2PInferError
from ..log import get_logger

log = get_logger("p2pinfer.gateway.http")


class GatewayConfigError(P2PInferError):
    """A --gateway address that cannot be used."""


def parse_bind(text: str) -> tuple[str, int]:
    """``HOST:PORT``, ``[IPv6]:PORT`` or a bare ``PORT`` (which means 127.0.0.1) -> (host, port)."""
    text = text.strip()
    host, port_text = "127.0.0.1", text
    if text.startswith("["):
        host, sep, port_text = text[1:].partition("]:")
        if not sep:
            raise GatewayConfigError(f"gateway address {text!r}: write an IPv6 address as [ADDR]:PORT")
    elif ":" in text:
        host, _, port_text = text.rpartition(":")
    try:
        port = int(port_text)
    except ValueError:
        raise GatewayConfigError(f"gateway address {text!r}: expected HOST:PORT, e.g. 127.0.0.1:8080") from None
    if not 0 <= port <= 65535:
        raise GatewayConfigError(f"gateway address {text!r}: the port must be from 0 to 65535")
    if not host:
        raise GatewayConfigError(f"gateway address {text!r}: the host is empty; use 127.0.0.1:{port}")
    return host, port


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class _ToStructlog(logging.Handler):
    """hypercorn logs through stdlib logging; its warnings and errors go to our structured log."""

    def emit(self, record: logging.LogRecord) -> None:
        level = "error" if record.levelno >= logging.ERROR else "warning"
        getattr(log, level)("gateway.server_log", message=record.getMessage()[:500])


def _hypercorn_config(bind: str) -> HypercornConfig:
    config = HypercornConfig()
    config.bind = [bind]
    config.accesslog = None
    error_logger = logging.getLogger("p2pinfer.hypercorn")
    if not error_logger.handlers:
        error_logger.addHandler(_ToStructlog())
        error_logger.setLevel(logging.WARNING)
        error_logger.propagate = False
    config.errorlog = error_logger
    config.graceful_timeout = 1.0
    config.keep_alive_timeout = 30.0
    return config


async def serve_tcp(app: Any, host: str, port: int, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    """Serve ``app`` on ``host:port`` until cancelled; ``nursery.start`` returns the URL (the real port)."""
    bind = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        config = _hypercorn_config(bind)
        sockets = config.create_sockets()
    except OSError as exc:
        raise GatewayConfigError(f"cannot listen on {bind} for the gateway: {exc.strerror or exc}; "
                                 "choose another --gateway address") from None
    await _serve(app, config, sockets, task_status)


async def serve_unix(app: Any, path: Path, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    """Serve ``app`` on a Unix socket readable by this user only; removes the socket file when done."""
    config = _hypercorn_config(f"unix:{path}")
    config.umask = 0o177  # the socket file is rw for this user only: the control API has no key
    sockets = config.create_sockets()
    try:
        await _serve(app, config, sockets, task_status)
    finally:
        try:
            path.unlink()
        except OSError:
            pass


async def _serve(app: Any, config: HypercornConfig, sockets: Any, task_status: Any) -> None:
    from hypercorn.trio.run import worker_serve
    from hypercorn.utils import wrap_app

    for sock in sockets.insecure_sockets:
        sock.listen(config.backlog)

    async def started_hook(*, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        await worker_serve(wrap_app(app, config.wsgi_max_body_size, "asgi"), config, sockets=sockets,
                           task_status=task_status)

    async with trio.open_nursery() as nursery:
        binds = await nursery.start(started_hook)
        task_status.started(binds[0] if binds else "")
