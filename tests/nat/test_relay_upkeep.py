"""A relayed peer keeps its relay without flooding gossip, moves to another relay when its own is gone, and
a public peer once told it was behind NAT finds out it is public again. Real nodes on 127.0.0.1.

A peer on loopback is public; it is told otherwise by a real relay node whose AutoNAT server answers every
dial-back request "dial failed" (``tests/nat/liar.py``: real bytes from a host with its own key, as a
loaded machine's failed dial-backs would say). Every wait is on an event, with a limit far above an honest
delay; the short intervals are the node's own configuration (``NodeConfig.nat_timing``).
"""

from __future__ import annotations

from contextlib import AsyncExitStack

from p2pinfer.net import Backoff, NatTiming, Node, Reachability
from p2pinfer.net.addrs import strip_p2p
from p2pinfer.wire import now_ms

import trio

from net.helpers import config, offer, start, wait_until
from p2pinfer.identity import Identity
from .liar import make_liar

FAST = NatTiming(recheck_first_s=0.5, recheck_interval_s=2.0, relay_check_s=0.5, relay_retry=Backoff(0.5, 2.0),
                 relay_tries_before_lost=3, public_recheck=Backoff(0.5, 2.0), public_confirmations=3,
                 public_window=4, reannounce_min_interval_s=1.0)
DIGEST = b"\x07" * 32
QUIET = {"announce_interval_s": 600.0, "nat_timing": FAST}  # announcements only when something changes


def _refreshed(home: Node) -> list[str]:
    """The relays py-libp2p's reservation refresher keeps re-reserving on for ``home``: the table it reads."""
    return sorted(pid.to_base58() for pid in home.nat.relay_transport._reservations)


def _announced_addrs(watcher: Node, peer: Node) -> tuple[str, ...] | None:
    entry = watcher.table.get(peer.peer_id, now_ms())
    return tuple(entry.addrs) if entry is not None and entry.models else None


class _Stop:
    def __init__(self) -> None:
        self.asked, self.done = trio.Event(), trio.Event()


async def _serve_until(stop: _Stop, *, task_status=trio.TASK_STATUS_IGNORED) -> None:  # type: ignore[no-untyped-def]
    """A bootstrap node in a task of its own, so that it can end while the others run on."""
    try:
        async with Node(Identity.generate(), config(role="bootstrap")) as node:
            task_status.started(node)
            await stop.asked.wait()
    finally:
        stop.done.set()


async def _relayed_home(stack: AsyncExitStack, relays: list[Node]) -> Node:
    """A peer (public on loopback, but told otherwise) that reserved on one of ``relays`` and announced."""
    home = await start(stack, bootstrap=[a for r in relays for a in r.addrs], **QUIET)
    assert home.nat.status.state is Reachability.RELAYED, home.nat.status
    await wait_until(lambda: bool(home.gossip.topic_peers()), what="home to see a gossip peer")
    home.update_capacity(models=[offer(DIGEST)], free_slots=1, total_slots=1)
    relay = next(r for r in relays if r.peer_id == home.nat.reserved_on[0])
    await wait_until(lambda: _announced_addrs(relay, home) == home.nat.relayed_addrs,
                     what="the relay to hold home's relayed announcement")
    return home


async def test_a_relay_connection_that_drops_and_comes_back_costs_no_announcement() -> None:
    async with AsyncExitStack() as stack:
        relay = make_liar(await start(stack, role="bootstrap"))
        home = await _relayed_home(stack, [relay])
        sent = home.counters.get("announcements.sent", 0)
        for _ in range(3):  # the relay closes our connection (a restart, a network blip), three times
            restored = home.nat.stats["relay_restored"]
            await relay.host.disconnect(home.host.get_id())
            await wait_until(lambda: home.nat.stats["relay_restored"] > restored, what="home to reserve again")
            assert home.nat.status.state is Reachability.RELAYED, home.nat.status
        # Same relay, same address: nothing to tell the network (the old code announced on every restore).
        assert home.counters.get("announcements.sent", 0) == sent
        assert _announced_addrs(relay, home) == home.nat.relayed_addrs


async def test_a_relay_that_is_gone_is_replaced_by_another_and_announced_once() -> None:
    async with AsyncExitStack() as stack:
        runners = await stack.enter_async_context(trio.open_nursery())
        stops = [_Stop() for _ in range(2)]
        relays = [make_liar(await runners.start(_serve_until, stop)) for stop in stops]
        stack.callback(lambda: [stop.asked.set() for stop in stops])  # the relays end before their nursery
        home = await _relayed_home(stack, relays)
        first = next(i for i, r in enumerate(relays) if r.peer_id == home.nat.reserved_on[0])
        other = relays[1 - first]
        reannounced = home.nat.stats["reannounced"]
        stops[first].asked.set()  # the relay ends: its port is closed, every dial is refused
        await stops[first].done.wait()
        await wait_until(lambda: home.nat.reserved_on == (other.peer_id,), what="home to reserve on the other relay")
        expected = (f"{strip_p2p(other.addrs[0])}/p2p/{other.peer_id}/p2p-circuit",)
        assert home.nat.relayed_addrs == expected, home.nat.relayed_addrs
        assert home.nat.status.state is Reachability.RELAYED and other.peer_id in home.nat.status.reason
        await wait_until(lambda: _announced_addrs(other, home) == expected, what="the new address to be announced")
        assert home.nat.stats["reannounced"] == reannounced + 1
        assert home.nat.stats["relay_replaced"] == 1
        assert _refreshed(home) == [other.peer_id]  # the lost relay's reservation is no longer refreshed


async def test_a_public_peer_told_it_is_behind_nat_finds_out_and_announces_once() -> None:
    async with AsyncExitStack() as stack:
        liar = make_liar(await start(stack, role="bootstrap"))
        home = await _relayed_home(stack, [liar])
        honest = await start(stack, role="bootstrap")
        reannounced = home.nat.stats["reannounced"]
        await home.connect(honest.addrs[0], timeout=60)  # now someone who dials honestly is connected
        await wait_until(lambda: home.nat.status.state is Reachability.PUBLIC, what="home to find out it is public")
        assert "re-check" in home.nat.status.reason and home.nat.relayed_addrs == ()
        assert home.nat.stats["public_rechecks"] >= 2  # several dial-backs from more than one round, not one
        await wait_until(lambda: (_announced_addrs(honest, home) or ("/p2p-circuit",)) == home.announce_addrs(),
                         what="home's direct addresses to be announced")
        assert not any("/p2p-circuit" in a for a in home.announce_addrs())
        assert home.nat.stats["reannounced"] == reannounced + 1
        assert _refreshed(home) == []  # public: the liar's relay slot is no longer refreshed for us

