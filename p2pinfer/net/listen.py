"""Refusing a listen port that is already taken, before py-libp2p gets to share it.

py-libp2p 0.8.1 opens every TCP listener with ``SO_REUSEPORT`` (``libp2p/transport/tcp/tcp.py``), because
DCUtR hole punching dials *from* the listen port (TCP simultaneous open) and Linux only lets two sockets
share a port when both set that flag. The side effect: a second peer started on a port already in use
starts anyway, shares the port with the first, and the kernel splits incoming connections between them.

We keep ``SO_REUSEPORT`` on the listener (hole punching needs it) and, just before listening, bind a probe
socket *without* it to every fixed port we are about to use. A port held by anyone (another p2pinfer, or any
other program) makes that bind fail, and the node refuses to start with the port named. The probe is closed
right away; the window between probe and listen is a few milliseconds, which only two peers started at the
same instant on the same port could slip through.
"""

from __future__ import annotations

import errno
import socket
from collections.abc import Sequence

from ..errors import P2PInferError
from .addrs import parse_multiaddr


class ListenError(P2PInferError):
    """A listen address cannot be used (port taken, address not ours, privileged port)."""


def tcp_listen_target(addr: str) -> tuple[int, str, int] | None:
    """``(family, ip, port)`` of a ``/ip4|ip6/<ip>/tcp/<port>`` listen address, None for other kinds."""
    ma = parse_multiaddr(addr)
    names = [p.name for p in ma.protocols()]
    if "tcp" not in names:
        return None
    for family, proto in ((socket.AF_INET, "ip4"), (socket.AF_INET6, "ip6")):
        if proto in names:
            return family, str(ma.value_for_protocol(proto)), int(ma.value_for_protocol("tcp"))
    return None


def check_listen_ports(listen: Sequence[str]) -> None:
    """Raise :class:`ListenError` naming the port if any fixed TCP port in ``listen`` is taken.

    Port 0 (let the OS choose) is never checked. ``SO_REUSEADDR`` is set on the probe so that connections
    of a previous run still in TIME_WAIT do not block a restart; Linux still refuses it next to a listener.
    """
    for addr in listen:
        target = tcp_listen_target(addr)
        if target is None or target[2] == 0:
            continue
        family, ip, port = target
        probe = socket.socket(family, socket.SOCK_STREAM)
        try:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((ip, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise ListenError(
                    f"TCP port {port} ({addr}) is already in use, perhaps by another p2pinfer peer; stop that "
                    f"process or listen elsewhere, e.g. --listen /{'ip4' if family == socket.AF_INET else 'ip6'}"
                    f"/{ip}/tcp/{port + 1}") from None
            if exc.errno == errno.EADDRNOTAVAIL:
                raise ListenError(
                    f"cannot listen on {addr}: {ip} is not an address of this machine; use one of its own "
                    f"addresses or 0.0.0.0 (and --announce for the public one)") from None
            if exc.errno == errno.EACCES:
                raise ListenError(
                    f"cannot listen on {addr}: port {port} needs privileges; use a port above 1023") from None
            raise ListenError(f"cannot listen on {addr}: {exc.strerror or exc}") from None
        finally:
            probe.close()
