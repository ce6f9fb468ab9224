"""Which of our addresses are worth telling others about (pure rules, plus one interface lookup).

A wildcard listen address (``/ip4/0.0.0.0/tcp/4001``) is not an address anyone can dial; it stands for
every address of the machine. We replace it with the machine's interface addresses and never announce
an address that cannot be dialled from elsewhere: unspecified, link-local, multicast, and loopback (unless
the node listens on loopback only, i.e. a local test network where loopback is the whole network).
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable, Sequence

import psutil

from .addrs import parse_multiaddr

CIRCUIT = "/p2p-circuit"


def ip_of(addr: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        ma = parse_multiaddr(addr)
    except ValueError:
        return None
    names = [p.name for p in ma.protocols()]
    for proto in ("ip4", "ip6"):
        if proto in names:
            try:
                return ipaddress.ip_address(ma.value_for_protocol(proto))
            except ValueError:
                return None
    return None


def is_wildcard(addr: str) -> bool:
    ip = ip_of(addr)
    return ip is not None and ip.is_unspecified


def is_announceable(addr: str, *, allow_loopback: bool) -> bool:
    """True for an address another machine could dial (relayed and DNS addresses always qualify)."""
    if CIRCUIT in addr:
        return True
    ip = ip_of(addr)
    if ip is None:
        return addr.startswith(("/dns4/", "/dns6/", "/dns/"))
    if ip.is_unspecified or ip.is_link_local or ip.is_multicast:
        return False
    if ip.is_loopback:
        return allow_loopback
    return True


def interface_ips(family: int) -> list[str]:
    """This machine's addresses of ``family`` (socket.AF_INET or AF_INET6), in interface order."""
    out: list[str] = []
    for entries in psutil.net_if_addrs().values():
        for entry in entries:
            if entry.family == family:
                ip = entry.address.split("%", 1)[0]  # drop an IPv6 zone index
                if ip not in out:
                    out.append(ip)
    return out


def expand_wildcards(addrs: Iterable[str]) -> list[str]:
    """Replace each ``/ip4/0.0.0.0/...`` (or ``/ip6/::/...``) by one address per local interface address."""
    out: list[str] = []
    for addr in addrs:
        ip = ip_of(addr)
        if ip is None or not ip.is_unspecified:
            out.append(addr)
            continue
        family, proto = (socket.AF_INET, "ip4") if ip.version == 4 else (socket.AF_INET6, "ip6")
        rest = addr.split("/", 3)[3]  # "/ip4/0.0.0.0/tcp/4001" -> "tcp/4001"
        out.extend(f"/{proto}/{local}/{rest}" for local in interface_ips(family))
    return list(dict.fromkeys(out))


def listens_on_loopback_only(listen: Sequence[str]) -> bool:
    """A local network (tests, one machine): every listen address is a loopback one."""
    listen_ips = [ip_of(a) for a in listen]
    return bool(listen_ips) and all(ip is not None and ip.is_loopback for ip in listen_ips)


def announceable(addrs: Sequence[str], *, listen: Sequence[str]) -> list[str]:
    """``addrs`` with wildcards expanded and every address others cannot dial removed (order kept)."""
    loopback_only = listens_on_loopback_only(listen)
    return [a for a in expand_wildcards(addrs) if is_announceable(a, allow_loopback=loopback_only)]
