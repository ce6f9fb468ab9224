"""Pure rules of NAT traversal (no I/O, no clock of their own): when to try again, when a relay is lost,
which dial-backs count (where they came from: the internet, our own LAN, this machine) and when they prove
we are public (network groups), which relays can make us reachable, when our addresses changed enough to
announce.

:mod:`p2pinfer.net.nat` applies them; ``tests/nat/test_nat_rules.py`` checks them with hypothesis.
"""

from __future__ import annotations

import enum
import ipaddress
from collections import deque
from dataclasses import dataclass, field
from typing import Collection, Sequence


@dataclass(frozen=True)
class Backoff:
    """``first_s``, then doubling after each failure, never above ``max_s``."""

    first_s: float
    max_s: float

    def delay(self, failures: int) -> float:
        if failures <= 0:
            return self.first_s
        # min() before the power would overflow: 2.0 ** 2000 is an OverflowError
        return min(self.max_s, self.first_s * 2.0 ** min(failures, 64))


@dataclass(frozen=True)
class NatTiming:
    """Every interval of the reachability and relay upkeep, declared once (tests shorten them)."""

    recheck_first_s: float = 5.0        # never checked (nobody to ask yet): look for peers to ask this often
    recheck_interval_s: float = 120.0   # an unreachable peer re-checks this often
    relay_check_s: float = 10.0         # a relayed peer checks this often that it is still connected to its relay
    # A relay that did not answer is tried again after 2, 4, 8 s ...; after this many failed tries in a row it
    # is lost and another known relay is asked. One failed try used to count as lost: under load that flapped.
    relay_retry: Backoff = Backoff(2.0, 30.0)
    relay_tries_before_lost: int = 3
    # A relayed peer asks again whether it is public after all (dial-backs that failed on a loaded machine
    # told it NAT): after 60 s, then doubling to 30 min while nobody reaches it.
    public_recheck: Backoff = Backoff(60.0, 1800.0)
    public_confirmations: int = 3       # successful dial-backs within the last public_window rounds to flip
    public_window: int = 4
    reannounce_min_interval_s: float = 10.0  # address changes are announced at most this often (coalesced)
    # AutoNAT server: a home NAT drops the dial-back's SYN, so the TCP connect waits dial_back_connect_s; once
    # TCP is up the address reaches a machine, and its Noise handshake may take dial_back_handshake_s more
    # (one 3 s limit for both told a public peer on a loaded machine that it was behind NAT).
    dial_back_connect_s: float = 3.0
    dial_back_handshake_s: float = 10.0
    # Requester: after a server says "reached", how long to wait for its connection to show up on our own
    # listener (the server answers only after its handshake completed: an honest one is seen at once; the
    # limit is for a loaded machine). A lying server costs each round this long.
    dial_back_confirm_s: float = 10.0


class RelayAction(enum.Enum):
    KEEP = "keep"            # the relay answered: nothing changes
    RETRY = "retry"          # it did not, but a few failures in a row are a loaded machine or a blip: try again
    REPLACE = "replace"      # it failed too often: the relay is lost, look for another


@dataclass
class RelayHealth:
    """Consecutive failed tries to reach (and reserve on) our relay."""

    tries_before_lost: int
    retry: Backoff
    check_s: float
    failures: int = 0

    def record(self, ok: bool) -> RelayAction:
        if ok:
            self.failures = 0
            return RelayAction.KEEP
        self.failures += 1
        return RelayAction.REPLACE if self.failures >= self.tries_before_lost else RelayAction.RETRY

    def next_check_s(self) -> float:
        """Healthy: the regular check. Failing: back off (1st retry after retry.first_s, then doubling)."""
        return self.check_s if self.failures == 0 else self.retry.delay(self.failures - 1)


class AddressScope(enum.Enum):
    """How far an address reaches: what a connection from it proves about who can reach us."""

    MACHINE = "machine"      # loopback: this machine only
    LAN = "lan"              # a private network (RFC 1918, CGNAT, link-local, IPv6 ULA): that network only
    INTERNET = "internet"    # everything else


# Not Python's ``is_private``: that also covers the documentation ranges (TEST-NET-2, 198.51.100.0/24, is the
# namespace tests' "internet") and reserved blocks that are no LAN. These are the ranges a router keeps
# inside a site: a connection from one came over that private network, not over the internet.
LAN_NETWORKS = tuple(ipaddress.ip_network(n) for n in (
    "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16",  # RFC 1918 private use
    "100.64.0.0/10",                                  # RFC 6598 shared address space (carrier-grade NAT)
    "169.254.0.0/16",                                 # RFC 3927 IPv4 link-local
    "fc00::/7",                                       # RFC 4193 IPv6 unique local
    "fe80::/10",                                      # RFC 4291 IPv6 link-local
))


def _plain_ip(ip: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """An IP address without its zone index, an IPv4-mapped IPv6 one as IPv4. ValueError if not an IP."""
    addr = ipaddress.ip_address(ip.split("%", 1)[0])
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


def address_scope(ip: str) -> AddressScope:
    """The scope of an IP address (an IPv4-mapped IPv6 address is its IPv4 address; a zone index is
    ignored). Raises ValueError for text that is not an IP address."""
    addr = _plain_ip(ip)
    if addr.is_loopback:
        return AddressScope.MACHINE
    if any(addr in net for net in LAN_NETWORKS if net.version == addr.version):
        return AddressScope.LAN
    return AddressScope.INTERNET


def proves_public(seen_from_ip: str, *, loopback_network: bool, own_ips: Collection[str] = ()) -> bool:
    """Whether a dial-back connection that arrived from ``seen_from_ip`` proves that the peers we announce
    to can reach us.

    From the internet: yes. From a private network (a server on our own LAN, or anywhere inside the private
    network we sit in): no, it proves only that the LAN reaches us; a peer at home would otherwise drop its
    relay and announce addresses nobody beyond its router can dial. From this machine (loopback): only on a
    loopback network (we listen on loopback only, so loopback is all we announce and the whole network is
    this machine, as in tests); listening on other addresses, a same-machine dial-back says nothing about
    them. A connection from one of ``own_ips`` (this machine's interface addresses) is from this machine
    too, whatever its scope: a server beside us on a host with a public address dials that address from
    that address, and the kernel delivers it locally, past any firewall that guards the interface.
    Not an IP address (a transport oddity): no."""
    try:
        seen = _plain_ip(seen_from_ip)
        scope = address_scope(seen_from_ip)
    except ValueError:
        return False
    if any(seen == mine for mine in _plain_ips(own_ips)):
        scope = AddressScope.MACHINE
    if scope is AddressScope.MACHINE:
        return loopback_network
    return scope is AddressScope.INTERNET


def _plain_ips(ips: Collection[str]) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    out = []
    for ip in ips:
        try:
            out.append(_plain_ip(ip))
        except ValueError:
            continue
    return out


class DialBackAnswer(enum.Enum):
    REACHED = "reached"      # the server said it reached us AND we saw its connection arrive (confirmed)
    UNCONFIRMED = "unconfirmed"  # the server said it reached us, but no connection from it arrived: ignored
    LAN_ONLY = "lan-only"    # it reached us, from our own private network (or machine): proves no public reach
    FAILED = "failed"        # the server dialled and could not reach us
    NO_VERDICT = "no-verdict"  # refused, busy, no answer: says nothing about us


def dial_back_answer(server_says_reached: bool, server_says_failed: bool, seen_from_ip: str | None, *,
                     loopback_network: bool = False, own_ips: Collection[str] = ()) -> DialBackAnswer:
    """What one server's answer is worth. A "reached" counts only when our own listener saw a direct connection
    from that server's peer ID (Noise proves the ID) while we asked: any number of servers can claim to have
    reached us, only the peer itself can see that they did (a peer behind NAT sees nothing). And only when
    that connection came from where the peers we announce to are (:func:`proves_public`): a server on our
    own LAN reaches a peer behind its router all the same. Neither kind is a verdict against us."""
    if server_says_reached:
        if seen_from_ip is None:
            return DialBackAnswer.UNCONFIRMED
        if not proves_public(seen_from_ip, loopback_network=loopback_network, own_ips=own_ips):
            return DialBackAnswer.LAN_ONLY
        return DialBackAnswer.REACHED
    return DialBackAnswer.FAILED if server_says_failed else DialBackAnswer.NO_VERDICT


def reaches_internet(ips: Sequence[str], *, loopback_network: bool) -> bool:
    """Whether any of ``ips`` is an address the peers we announce to can dial: an internet one (on a loopback
    network, a loopback one too). A relay known only at LAN addresses cannot make us reachable (a relayed
    address through it is no more dialable from the internet than our own LAN address), and a peer that
    would announce only LAN addresses is not public, whoever dialled it back. Unparsable entries are
    skipped."""
    for ip in ips:
        try:
            scope = address_scope(ip)
        except ValueError:
            continue
        if scope is AddressScope.INTERNET or (scope is AddressScope.MACHINE and loopback_network):
            return True
    return False


IPV4_GROUP_PREFIX = 16   # Bitcoin's netgroups: one /16 is one operator's reach, however many addresses it holds
IPV6_GROUP_PREFIX = 32


def netgroup(ip: str) -> str:
    """The network group of an address: its IPv4 /16 or IPv6 /32 (an IPv4-mapped IPv6 address is IPv4).

    The same masks for every address, global or not: all of 127.0.0.0/16 (every node on one machine, as in
    tests) is one group, and so is one LAN. Servers in one group count as one server. Raises ValueError for
    text that is not an IP address."""
    addr = ipaddress.ip_address(ip.split("%", 1)[0])
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    prefix = IPV4_GROUP_PREFIX if addr.version == 4 else IPV6_GROUP_PREFIX
    return str(ipaddress.ip_network(f"{addr}/{prefix}", strict=False))


@dataclass(frozen=True)
class DialBack:
    """One server's answer in a round; ``group``: the network group the confirming connection came from."""

    answer: DialBackAnswer
    group: str | None = None


@dataclass
class PublicEvidence:
    """Dial-back answers collected by a relayed peer's re-check rounds.

    Only confirmed answers count (:func:`dial_back_answer`), and within one round all servers of one network
    group count once: colluding servers of one operator are worth one server. After a dial-back said we are
    behind NAT (``told_failed``) we turn public on ``needed`` group-confirmations within the last ``window``
    rounds, from at least two of those rounds (one moment of luck is not enough). While no server has given
    a verdict at all (``told_failed`` False: the join's servers were busy or silent) one confirmation is
    enough, as at the join. Failures do not veto: a loaded honest server, or one lying server, cannot keep a
    public peer relayed.
    """

    needed: int
    window: int
    told_failed: bool = True
    _rounds: deque[int] = field(default_factory=deque)  # confirming network groups per round, newest last
    rounds_without_reach: int = 0
    rounds_without_verdict: int = 0  # while not told_failed: rounds in a row that gave no verdict

    def record_round(self, answers: Sequence[DialBack | DialBackAnswer]) -> None:
        dial_backs = [a if isinstance(a, DialBack) else DialBack(a) for a in answers]
        groups = {d.group for d in dial_backs if d.answer is DialBackAnswer.REACHED}
        reached = len(groups)
        if any(d.answer is DialBackAnswer.FAILED for d in dial_backs):
            self.told_failed = True
        self._rounds.append(reached)
        while len(self._rounds) > max(self.window, 1):
            self._rounds.popleft()
        self.rounds_without_reach = 0 if reached else self.rounds_without_reach + 1
        self.rounds_without_verdict = 0 if reached else self.rounds_without_verdict + 1

    def reached(self) -> int:
        return sum(self._rounds)

    def confirmed(self) -> bool:
        if not self.told_failed:
            return self.reached() >= 1
        rounds_with_reach = sum(1 for r in self._rounds if r)
        return self.reached() >= self.needed and rounds_with_reach >= min(2, self.needed)

    def next_check_s(self, backoff: Backoff, no_verdict: Backoff | None = None) -> float:
        """Soon while some dial-backs reach us (to confirm), backing off while none does; while nobody has
        given a verdict yet, on the shorter ``no_verdict`` backoff (a busy moment, not evidence of NAT)."""
        if not self.told_failed and no_verdict is not None:
            return no_verdict.delay(self.rounds_without_verdict)
        return backoff.delay(self.rounds_without_reach)

    def reset(self, *, told_failed: bool = True) -> None:
        self._rounds.clear()
        self.rounds_without_reach = 0
        self.told_failed = told_failed
        self.rounds_without_verdict = 0 if told_failed else 1


def reannounce_wait(addrs_before: Sequence[str], addrs_now: Sequence[str], last_at: float | None,
                    now: float, min_interval_s: float, *, forced: bool = False) -> float | None:
    """None: nothing to announce (our announced addresses did not change, and nobody who must hear it lacks
    our announcement: ``forced``). Otherwise how long to wait before announcing: 0 now, or until
    ``min_interval_s`` after the previous re-announcement (forced ones included: the same rate limit)."""
    if tuple(addrs_before) == tuple(addrs_now) and not forced:
        return None
    if last_at is None:
        return 0.0
    return min(min_interval_s, max(0.0, min_interval_s - (now - last_at)))
