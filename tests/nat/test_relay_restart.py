"""A relay that restarts (same key, same address) has lost every announcement it held; a relayed peer that
reserves on it again finds out and announces once, so clients joining through that relay (a bootstrap node)
see the peer at once rather than at its next periodic announcement (600 s here). A relay connection that
drops and comes back without a restart costs no announcement (``tests/nat/test_relay_upkeep.py``).

The relay is a real process (``tests/nat/reach_driver.py relay``: a restart frees its port, which a node
ended inside this process does not do at once); the home peer runs here, on 127.0.0.1, and is told "dial
failed" by the relay's AutoNAT server so that it is relayed. Every wait is on an event, with a limit far
above an honest delay.
"""

from __future__ import annotations

import socket
import sys
from contextlib import AsyncExitStack
from pathlib import Path

import trio

from p2pinfer.identity import Identity
from p2pinfer.net import Reachability
from p2pinfer.net.gossip import CAPACITY_TOPIC

from net.helpers import offer, start, wait_until
from .procs import Proc
from .test_relay_upkeep import DIGEST, QUIET

DRIVER = Path(__file__).resolve().parent / "reach_driver.py"
START_S = 120.0


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _relay(key: Path, listen: str, log: Path) -> Proc:
    return Proc([sys.executable, str(DRIVER), "relay", str(key), listen], log)


async def _holds(proc: Proc, peer_id: str) -> dict:  # type: ignore[type-arg]
    return await trio.to_thread.run_sync(lambda: proc.json_line(lambda d: peer_id in d.get("holds", ()), START_S,
                                                                f"the relay to hold {peer_id}'s announcement"))


async def test_a_restarted_relay_gets_the_announcement_at_once_and_a_peer_announces_once(tmp_path: Path) -> None:
    key = tmp_path / "relay.key"
    Identity.generate().save(key)
    listen = f"/ip4/127.0.0.1/tcp/{_free_port()}"
    procs: list[Proc] = []
    try:
        first = _relay(key, listen, tmp_path / "relay-1.log")
        procs.append(first)
        addrs = (await trio.to_thread.run_sync(lambda: first.json_line(lambda d: "relay" in d, START_S,
                                                                       "the relay's addresses")))["relay"]
        async with AsyncExitStack() as stack:
            home = await start(stack, bootstrap=addrs, **QUIET)
            assert home.nat.status.state is Reachability.RELAYED, home.nat.status
            # announce once the relay is known to subscribe (an earlier publish goes nowhere)
            await wait_until(lambda: bool(home.gossip.topic_peers()), what="home to see the relay's subscription")
            home.update_capacity(models=[offer(DIGEST)], free_slots=1, total_slots=1)
            await _holds(first, home.peer_id)
            reannounced = home.nat.stats["reannounced"]
            restored = home.nat.stats["relay_restored"]
            await trio.to_thread.run_sync(first.stop)
            # py-libp2p's GossipSub sends a newly subscribed peer the messages of its gossip window (3
            # heartbeats): a restart quicker than that gets home's announcement from there. A real restart takes
            # longer (a process start); wait until the window has moved on, as it would have by then.
            await wait_until(lambda: not home.router.mcache.window(CAPACITY_TOPIC),
                             what="home's announcement to leave GossipSub's gossip window")
            second = _relay(key, listen, tmp_path / "relay-2.log")
            procs.append(second)
            await trio.to_thread.run_sync(lambda: second.json_line(lambda d: "relay" in d, START_S, "the restart"))
            await wait_until(lambda: home.nat.stats["relay_restored"] > restored, timeout=START_S,
                             what="home to reserve on the restarted relay")
            await _holds(second, home.peer_id)  # long before home's next periodic announcement
            assert home.nat.stats["reannounced"] == reannounced + 1, home.nat.stats  # once
            assert home.nat.status.state is Reachability.RELAYED, home.nat.status
    finally:
        for proc in reversed(procs):
            await trio.to_thread.run_sync(proc.stop)
