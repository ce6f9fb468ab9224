"""The pure rules of NAT upkeep (p2pinfer/net/nat_rules.py), property-based."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from p2pinfer.net.nat_rules import (
    LAN_NETWORKS,
    AddressScope,
    Backoff,
    DialBack,
    DialBackAnswer,
    NatTiming,
    PublicEvidence,
    RelayAction,
    RelayHealth,
    address_scope,
    dial_back_answer,
    netgroup,
    proves_public,
    reannounce_wait,
    reaches_internet,
)

seconds = st.floats(min_value=0.01, max_value=3600, allow_nan=False, allow_infinity=False)
ipv4s = st.ip_addresses(v=4)
ipv6s = st.ip_addresses(v=6)


@given(seconds, seconds, st.integers(min_value=0, max_value=10_000))
def test_backoff_starts_at_first_doubles_and_never_passes_the_cap(first: float, cap: float, failures: int) -> None:
    backoff = Backoff(first, max(first, cap))
    assert backoff.delay(0) == first
    assert first <= backoff.delay(failures) <= backoff.max_s
    assert backoff.delay(failures) <= backoff.delay(failures + 1)  # never shorter after another failure
    if failures < 60 and first * 2 ** (failures + 1) <= backoff.max_s:
        assert backoff.delay(failures + 1) == 2 * backoff.delay(failures)


@given(st.lists(st.booleans(), max_size=40), st.integers(min_value=1, max_value=6))
def test_a_relay_is_lost_only_after_enough_failures_in_a_row(tries: list[bool], needed: int) -> None:
    health = RelayHealth(needed, Backoff(2.0, 30.0), check_s=10.0)
    in_a_row = 0
    for ok in tries:
        action = health.record(ok)
        in_a_row = 0 if ok else in_a_row + 1
        assert action is (RelayAction.KEEP if ok else
                          RelayAction.REPLACE if in_a_row >= needed else RelayAction.RETRY)
        # Healthy: the regular check; failing: the retry backoff, first retry soonest.
        assert health.next_check_s() == (10.0 if ok else Backoff(2.0, 30.0).delay(in_a_row - 1))


def test_the_default_timing_tolerates_transient_failures() -> None:
    timing = NatTiming()
    assert timing.relay_tries_before_lost >= 3 and timing.public_confirmations >= 3
    health = RelayHealth(timing.relay_tries_before_lost, timing.relay_retry, timing.relay_check_s)
    assert health.record(False) is RelayAction.RETRY  # one failure is not a lost relay (it used to be)


GROUPS = ["198.51.0.0/16", "203.0.0.0/16", "2001:db8::/32"]
dial_backs = st.builds(DialBack, st.sampled_from(list(DialBackAnswer)), st.sampled_from(GROUPS))
rounds_of = st.lists(st.lists(dial_backs, max_size=5), max_size=30)


def _groups_reached(round_: list[DialBack]) -> int:
    return len({d.group for d in round_ if d.answer is DialBackAnswer.REACHED})


@given(rounds_of, st.integers(min_value=1, max_value=5), st.integers(min_value=1, max_value=6))
def test_public_needs_enough_confirmed_network_groups_from_more_than_one_round(rounds: list[list[DialBack]],
                                                                               needed: int, window: int) -> None:
    evidence = PublicEvidence(needed, window)
    for i, answered in enumerate(rounds):
        evidence.record_round(answered)
        recent = rounds[max(0, i + 1 - window):i + 1]
        reached = [_groups_reached(r) for r in recent]
        assert evidence.reached() == sum(reached)
        assert evidence.confirmed() == (sum(reached) >= needed and sum(1 for r in reached if r) >= min(2, needed))


@given(rounds_of, st.integers(min_value=1, max_value=20))
def test_colluding_servers_of_one_group_are_worth_one_server(rounds: list[list[DialBack]], copies: int) -> None:
    """Any number of extra confirmed answers from a group already confirming in that round change nothing."""
    plain, colluding = PublicEvidence(3, 4), PublicEvidence(3, 4)
    for answered in rounds:
        plain.record_round(answered)
        extra = [d for d in answered if d.answer is DialBackAnswer.REACHED] * copies
        colluding.record_round([*answered, *extra])
        assert colluding.reached() == plain.reached() and colluding.confirmed() == plain.confirmed()


@given(rounds_of, st.integers(min_value=0, max_value=20))
def test_unconfirmed_claims_never_count(rounds: list[list[DialBack]], claims: int) -> None:
    """An attacker's "reached" that never arrived is worth nothing, however many servers send it."""
    plain, lied_to = PublicEvidence(3, 4), PublicEvidence(3, 4)
    for answered in rounds:
        plain.record_round(answered)
        lied_to.record_round([*answered, *[DialBack(DialBackAnswer.UNCONFIRMED, "10.0.0.0/16")] * claims])
    assert lied_to.reached() == plain.reached() and lied_to.confirmed() == plain.confirmed()
    only_lies = PublicEvidence(1, 1, told_failed=False)  # even the most trusting rule
    for _ in rounds:
        only_lies.record_round([DialBack(DialBackAnswer.UNCONFIRMED)] * claims)
    assert not only_lies.confirmed()


@given(rounds_of, st.integers(min_value=0, max_value=20))
def test_dial_backs_from_our_own_lan_never_count(rounds: list[list[DialBack]], neighbours: int) -> None:
    """However many servers on our own LAN reach us, round after round, nothing changes; not even the most
    trusting rule (no verdict yet, one confirmation enough) turns public on them."""
    plain, with_lan = PublicEvidence(3, 4), PublicEvidence(3, 4)
    for answered in rounds:
        plain.record_round(answered)
        with_lan.record_round([*answered, *[DialBack(DialBackAnswer.LAN_ONLY)] * neighbours])
    assert with_lan.reached() == plain.reached() and with_lan.confirmed() == plain.confirmed()
    only_lan = PublicEvidence(1, 1, told_failed=False)
    for _ in rounds:
        only_lan.record_round([DialBack(DialBackAnswer.LAN_ONLY)] * neighbours)
    assert not only_lan.confirmed() and not only_lan.told_failed  # and not a verdict of NAT either


SEEN_FROM = ["198.51.100.10", "2001:db8::7", "10.1.0.3", "192.168.1.20", "fd00::5", "127.0.0.1", "::1", "odd"]


@given(st.booleans(), st.booleans(), st.one_of(st.none(), st.sampled_from(SEEN_FROM)), st.booleans())
def test_a_reached_answer_counts_only_when_its_connection_arrived_from_beyond_our_lan(
        says_reached: bool, says_failed: bool, seen: str | None, loopback_network: bool) -> None:
    answer = dial_back_answer(says_reached, says_failed, seen, loopback_network=loopback_network)
    if says_reached and seen is None:
        assert answer is DialBackAnswer.UNCONFIRMED
    elif says_reached:
        assert seen is not None
        assert answer is (DialBackAnswer.REACHED if proves_public(seen, loopback_network=loopback_network)
                          else DialBackAnswer.LAN_ONLY)
    else:
        assert answer is (DialBackAnswer.FAILED if says_failed else DialBackAnswer.NO_VERDICT)
    # Only a connection we saw arrive from the internet (or, on a loopback test network, from this machine)
    # makes a "reached" count; nothing else is ever a "failed".
    if answer is DialBackAnswer.REACHED:
        assert seen in ("198.51.100.10", "2001:db8::7") or (loopback_network and seen in ("127.0.0.1", "::1"))
    assert (answer is DialBackAnswer.FAILED) == (not says_reached and says_failed)


def _in_a_lan_network(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    return any(ip in net for net in LAN_NETWORKS if net.version == ip.version)


@given(st.one_of(ipv4s, ipv6s))
def test_an_address_is_lan_exactly_inside_the_private_ranges_and_machine_exactly_on_loopback(
        ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> None:
    scope = address_scope(str(ip))
    plain = ip.ipv4_mapped if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None else ip
    assert (scope is AddressScope.MACHINE) == plain.is_loopback
    assert (scope is AddressScope.LAN) == (not plain.is_loopback and _in_a_lan_network(plain))
    if isinstance(ip, ipaddress.IPv4Address):
        assert address_scope(f"::ffff:{ip}") is scope  # IPv4-mapped IPv6 is the IPv4 address


@given(st.one_of(ipv4s, ipv6s), st.booleans())
def test_only_internet_dial_backs_prove_public_and_loopback_ones_only_on_a_loopback_network(
        ip: ipaddress.IPv4Address | ipaddress.IPv6Address, loopback_network: bool) -> None:
    scope = address_scope(str(ip))
    expected = scope is AddressScope.INTERNET or (scope is AddressScope.MACHINE and loopback_network)
    assert proves_public(str(ip), loopback_network=loopback_network) is expected


def _mapped_as_v4(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    return ip.ipv4_mapped if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None else ip


@given(st.one_of(ipv4s, ipv6s), st.lists(st.one_of(ipv4s, ipv6s), max_size=3), st.booleans())
def test_a_dial_back_from_one_of_our_own_addresses_is_from_this_machine(
        ip: ipaddress.IPv4Address | ipaddress.IPv6Address, others: list[ipaddress.IPv4Address | ipaddress.IPv6Address],
        loopback_network: bool) -> None:
    own = [str(o) for o in others]
    mine = proves_public(str(ip), loopback_network=loopback_network, own_ips=[*own, str(ip)])
    assert mine is loopback_network  # from this machine: only on a loopback network
    if all(_mapped_as_v4(o) != _mapped_as_v4(ip) for o in others):  # not ours: the own addresses change nothing
        assert (proves_public(str(ip), loopback_network=loopback_network, own_ips=own)
                is proves_public(str(ip), loopback_network=loopback_network))
    answer = dial_back_answer(True, False, str(ip), loopback_network=False, own_ips=[str(ip), "not-an-ip"])
    assert answer is DialBackAnswer.LAN_ONLY


def test_the_scopes_of_the_test_networks_and_a_home_lan() -> None:
    # The namespace topology's "internet" is TEST-NET-2, which Python's is_private counts as private: not here.
    assert address_scope("198.51.100.10") is AddressScope.INTERNET
    assert address_scope("10.1.0.3") is AddressScope.LAN            # a neighbour on home A's LAN
    assert address_scope("192.168.178.20") is AddressScope.LAN
    assert address_scope("172.31.255.1") is AddressScope.LAN and address_scope("172.32.0.1") is AddressScope.INTERNET
    assert address_scope("100.64.3.4") is AddressScope.LAN          # carrier-grade NAT
    assert address_scope("fe80::1%eth0") is AddressScope.LAN        # link-local, with its zone index
    assert address_scope("fd12:3456::1") is AddressScope.LAN
    assert address_scope("127.0.0.1") is address_scope("::1") is AddressScope.MACHINE
    assert not proves_public("10.1.0.3", loopback_network=True)
    assert not proves_public("not-an-ip", loopback_network=True)
    with pytest.raises(ValueError):
        address_scope("not-an-ip")


@given(st.lists(st.sampled_from(SEEN_FROM), max_size=4), st.booleans())
def test_a_relay_or_our_own_addresses_reach_the_internet_only_with_an_address_beyond_our_lan(
        ips: list[str], loopback_network: bool) -> None:
    reaches = reaches_internet(ips, loopback_network=loopback_network)
    assert reaches == any(proves_public(ip, loopback_network=loopback_network) for ip in ips)


@given(st.lists(st.lists(st.sampled_from([DialBackAnswer.NO_VERDICT, DialBackAnswer.UNCONFIRMED]), max_size=4),
                max_size=10))
def test_without_any_verdict_one_confirmation_is_enough_and_checks_come_sooner(
        silent_rounds: list[list[DialBackAnswer]]) -> None:
    evidence = PublicEvidence(3, 4)
    evidence.reset(told_failed=False)  # the join's servers gave no verdict
    no_verdict, public = Backoff(5.0, 120.0), Backoff(60.0, 1800.0)
    for i, answered in enumerate(silent_rounds):
        evidence.record_round(answered)
        assert not evidence.confirmed()
        assert evidence.next_check_s(public, no_verdict) == no_verdict.delay(i + 2) <= 120.0
    evidence.record_round([DialBack(DialBackAnswer.REACHED, GROUPS[0])])
    assert evidence.confirmed()
    told = PublicEvidence(3, 4)
    told.reset(told_failed=False)
    told.record_round([DialBack(DialBackAnswer.FAILED)])  # a verdict against us: the careful rule from now on
    told.record_round([DialBack(DialBackAnswer.REACHED, GROUPS[0])])
    assert told.told_failed and not told.confirmed()
    assert told.next_check_s(public, no_verdict) == public.delay(0)


@given(rounds_of)
def test_failures_never_veto_and_the_check_backs_off_only_while_nothing_reaches_us(
        rounds: list[list[DialBack]]) -> None:
    evidence = PublicEvidence(3, 4)
    backoff = Backoff(60.0, 1800.0)
    quiet = 0
    for answered in rounds:
        evidence.record_round(answered)
        quiet = 0 if _groups_reached(answered) else quiet + 1
        assert evidence.next_check_s(backoff) == backoff.delay(quiet)
    with_failures = PublicEvidence(3, 4)  # extra failed answers in every round change nothing
    plain = PublicEvidence(3, 4)
    for answered in rounds:
        plain.record_round(answered)
        with_failures.record_round([*answered, DialBack(DialBackAnswer.FAILED), DialBack(DialBackAnswer.FAILED)])
    assert with_failures.confirmed() == plain.confirmed()
    evidence.reset()
    assert not evidence.confirmed() and evidence.reached() == 0


def test_one_lucky_round_is_not_enough_but_three_rounds_of_one_honest_server_are() -> None:
    evidence = PublicEvidence(3, 4)
    evidence.record_round([DialBack(DialBackAnswer.REACHED, g) for g in GROUPS])
    assert not evidence.confirmed()  # three groups at once: one moment, one round
    honest = DialBack(DialBackAnswer.REACHED, GROUPS[0])
    lying = [honest, DialBack(DialBackAnswer.FAILED), DialBack(DialBackAnswer.UNCONFIRMED)]  # one honest, two liars
    evidence = PublicEvidence(3, 4)
    for _ in range(2):
        evidence.record_round(lying)
        assert not evidence.confirmed()
    evidence.record_round(lying)
    assert evidence.confirmed()


@given(ipv4s, st.integers(min_value=0, max_value=2**16 - 1))
def test_ipv4_addresses_share_a_group_exactly_when_they_share_their_slash_16(ip: ipaddress.IPv4Address,
                                                                            low: int) -> None:
    same = ipaddress.IPv4Address((int(ip) & ~0xFFFF) | low)
    assert netgroup(str(ip)) == netgroup(str(same))
    other = ipaddress.IPv4Address(int(ip) ^ 0x10000)  # another /16
    assert netgroup(str(ip)) != netgroup(str(other))
    assert netgroup(f"::ffff:{ip}") == netgroup(str(ip))  # IPv4-mapped IPv6 is the IPv4 address


@given(ipv6s, st.integers(min_value=0, max_value=2**96 - 1))
def test_ipv6_addresses_share_a_group_exactly_when_they_share_their_slash_32(ip: ipaddress.IPv6Address,
                                                                            low: int) -> None:
    if ip.ipv4_mapped is not None:
        return
    same = ipaddress.IPv6Address((int(ip) & ~(2**96 - 1)) | low)
    if same.ipv4_mapped is None:
        assert netgroup(str(ip)) == netgroup(str(same))
    other = ipaddress.IPv6Address(int(ip) ^ 2**96)
    if other.ipv4_mapped is None:
        assert netgroup(str(ip)) != netgroup(str(other))


def test_the_group_rule_for_loopback_and_lan_test_addresses() -> None:
    # One machine (every test node on 127.0.0.1) or one LAN is one group: its servers count once.
    assert netgroup("127.0.0.1") == netgroup("127.0.5.9") == "127.0.0.0/16"
    assert netgroup("198.51.100.10") == netgroup("198.51.100.20")  # the namespace topology's public segment
    assert netgroup("::1") == "::/32"
    with pytest.raises(ValueError):
        netgroup("not-an-ip")


addrs = st.lists(st.sampled_from(["/ip4/1.2.3.4/tcp/1", "/ip4/5.6.7.8/tcp/2/p2p/R/p2p-circuit"]), max_size=3)


@given(addrs, addrs, st.one_of(st.none(), seconds), st.floats(min_value=0, max_value=7200), seconds)
def test_reannounce_only_on_changed_addresses_and_at_most_once_per_interval(
        before: list[str], now_addrs: list[str], last_at: float | None, elapsed: float, interval: float) -> None:
    now = (last_at or 0.0) + elapsed  # trio's clock never goes back
    wait = reannounce_wait(before, now_addrs, last_at, now, interval)
    if before == now_addrs:
        assert wait is None
        return
    assert wait is not None and 0.0 <= wait <= interval
    if last_at is None or now - last_at >= interval:  # now - last_at, not elapsed: the sum rounds
        assert wait == 0.0
    else:
        assert abs(now + wait - (last_at + interval)) < 1e-6
