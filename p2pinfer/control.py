"""The local control endpoint of a running peer: HTTP over a Unix socket in the data directory.

``p2pinfer peer`` serves ``DATA_DIR/control.sock`` (mode 0600, so only the user running the peer can use it;
no key needed). It answers the same routes as the gateway, without the gateway's key:
``GET /v1/p2pinfer/status`` (what ``p2pinfer status`` prints) and ``GET /metrics`` among them. It runs
whether or not ``--gateway`` is given.
"""

from __future__ import annotations

import http.client
import json
import socket
from pathlib import Path
from typing import Any

from .errors import P2PInferError

CONTROL_SOCKET_NAME = "control.sock"
STATUS_PATH = "/v1/p2pinfer/status"


class NoPeerRunning(P2PInferError):
    """No peer answers on the control socket of this data directory."""


def control_socket_path(data_dir: Path) -> Path:
    return Path(data_dir) / CONTROL_SOCKET_NAME


def socket_in_use(path: Path) -> bool:
    """Whether a process accepts connections on the Unix socket ``path`` (False for a stale file)."""
    if not path.exists():
        return False
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(1.0)
    try:
        sock.connect(str(path))
    except OSError:
        return False
    finally:
        sock.close()
    return True


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: Path, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = str(path)

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self._path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


def control_get(data_dir: Path, path: str = STATUS_PATH, *, timeout: float = 5.0) -> tuple[int, bytes]:
    """GET ``path`` from the peer running with ``data_dir`` (blocking; for the CLI)."""
    sock_path = control_socket_path(data_dir)
    hint = (f"start one with `p2pinfer --data-dir {data_dir} peer`, or pass the --data-dir the running peer "
            "uses")
    if not sock_path.exists():
        raise NoPeerRunning(f"no p2pinfer peer is running with data dir {data_dir} (no {sock_path}); {hint}")
    connection = _UnixHTTPConnection(sock_path, timeout)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, response.read()
    except (ConnectionRefusedError, FileNotFoundError):
        raise NoPeerRunning(f"no p2pinfer peer is running with data dir {data_dir} ({sock_path} is left over "
                            f"from one that stopped); {hint}") from None
    except (OSError, http.client.HTTPException) as exc:
        raise P2PInferError(f"the peer's control socket {sock_path} did not answer: {exc}") from None
    finally:
        connection.close()


def read_status(data_dir: Path, *, timeout: float = 5.0) -> dict[str, Any]:
    status, body = control_get(data_dir, STATUS_PATH, timeout=timeout)
    if status != 200:
        raise P2PInferError(f"the peer answered {status} for {STATUS_PATH}: {body[:200]!r}")
    try:
        return json.loads(body)
    except ValueError:
        raise P2PInferError(f"the peer's status is not valid JSON: {body[:200]!r}") from None


async def serve_control_socket(nursery: Any, app: Any, path: Path, urls: dict[str, str], *, who: str,
                               log: Any) -> None:
    """Serve ``app`` on the control socket ``path`` in ``nursery`` and record its URL in ``urls["control"]``.

    The node runs on without it (logged with a hint) when another process of the same data dir holds the
    socket, or when it cannot be made (e.g. a data dir path too long for a Unix socket). ``who`` names the
    running process in those hints ("peer", "node"); ``log`` is its logger.
    """
    from .gateway import serve_unix  # not at import time: ``p2pinfer status`` imports this module

    if socket_in_use(path):
        log.warning("control.in_use", path=str(path),
                    hint=f"another {who} runs with this data dir; `p2pinfer status` shows that one")
        return
    try:
        url = await nursery.start(serve_unix, app, path)
    except OSError as exc:
        log.warning("control.unavailable", path=str(path), error=str(exc)[:200],
                    hint=f"`p2pinfer status` will not reach this {who}; use a shorter --data-dir")
    else:
        urls["control"] = url
        log.info("control.started", path=str(path))
