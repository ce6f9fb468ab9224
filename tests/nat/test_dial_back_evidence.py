"""Which dial-back answers a peer believes, with real nodes on 127.0.0.1.

* Servers of one attacker (each its own key, real AutoNAT bytes on the wire, ``tests/nat/liar.py``) that say
  "I reached you" without dialling are not believed, at the join or in any re-check: only a connection that
  arrived on the peer's own listener counts. (On loopback the peer *is* reachable, which makes the point: the
  claim is not evidence, only the connection is. The namespace test with a peer really behind NAT is in
  ``tests/nat/test_nat_liars.py``.)
* Servers that give no verdict (busy) leave a peer relayed (its relayed address works whatever the truth);
  it asks again on the short backoff of unanswered checks, not on the 60 s .. 30 min schedule of a peer told
  "behind NAT", and the first confirmed dial-back makes it public.

Every wait is on an event, with a limit far above an honest delay; the short intervals are the node's own
configuration (``NodeConfig.nat_timing``).
"""

from __future__ import annotations

import socket
from contextlib import AsyncExitStack
from dataclasses import replace

from p2pinfer.net import Backoff, NatTiming, Reachability
from p2pinfer.net.nat_rules import DialBackAnswer

from net.helpers import start, wait_until
from .liar import make_reached_liar, make_silent

# The public re-check of a peer told "behind NAT" is far away (10 min): only the no-verdict rule can make a
# peer public within these tests' limits.
SLOW_PUBLIC = NatTiming(recheck_first_s=0.5, recheck_interval_s=2.0, relay_check_s=0.5, relay_retry=Backoff(0.5, 2.0),
                        public_recheck=Backoff(600.0, 1800.0), reannounce_min_interval_s=1.0)
# With no honest server among the asked, a lie costs a round only this wait for a connection that never comes.
LIARS_ONLY = {"announce_interval_s": 600.0, "nat_timing": replace(SLOW_PUBLIC, dial_back_confirm_s=1.0)}
QUIET = {"announce_interval_s": 600.0, "nat_timing": SLOW_PUBLIC}


async def test_reached_claims_from_colluding_servers_that_never_dialled_are_not_believed() -> None:
    async with AsyncExitStack() as stack:
        liars = [make_reached_liar(await start(stack, role="bootstrap")) for _ in range(3)]
        home = await start(stack, bootstrap=[a for r in liars for a in r.addrs], **LIARS_ONLY)
        # Three servers said "reached"; none dialled, so nothing arrived: no verdict, not public.
        assert home.nat.status.state is Reachability.RELAYED, home.nat.status
        assert "never arrived" in home.nat.status.reason, home.nat.status
        assert all("/p2p-circuit" in a for a in home.announce_addrs()), home.announce_addrs()
        # They go on saying it, round after round (the old rule flipped on 3 within 4 rounds).
        await wait_until(lambda: home.nat.stats["public_rechecks"] >= 4, timeout=120,
                         what="four re-check rounds with the liars")
        assert home.nat.status.state is Reachability.RELAYED, home.nat.status
        assert home.nat.public_evidence.reached() == 0
        assert all("/p2p-circuit" in a for a in home.announce_addrs()), home.announce_addrs()


async def test_unconfirmed_claims_are_reported_as_such() -> None:
    async with AsyncExitStack() as stack:
        liar = make_reached_liar(await start(stack, role="bootstrap"))
        honest = await start(stack, role="bootstrap")
        # 5 s for the honest connection to show up (it arrives before the server answers), 5 s lost to the liar
        timing = replace(SLOW_PUBLIC, dial_back_confirm_s=5.0)
        home = await start(stack, bootstrap=[*liar.addrs, *honest.addrs], announce_interval_s=600.0, nat_timing=timing)
        answers = await home.nat._ask_dial_backs(home.nat.direct_peers(), home.nat.dial_back_candidates())
        assert answers[liar.peer_id][0].answer is DialBackAnswer.UNCONFIRMED
        assert answers[honest.peer_id][0].answer is DialBackAnswer.REACHED
        assert answers[honest.peer_id][0].group == "127.0.0.0/16"  # the honest server's socket address


async def test_no_verdict_keeps_the_relay_and_the_first_confirmed_dial_back_makes_the_peer_public() -> None:
    async with AsyncExitStack() as stack:
        busy = make_silent(await start(stack, role="bootstrap"))
        home = await start(stack, bootstrap=busy.addrs, **QUIET)
        assert home.nat.status.state is Reachability.RELAYED, home.nat.status  # works, whatever the truth
        assert "no dial-back verdict" in home.nat.status.reason, home.nat.status
        assert all("/p2p-circuit" in a for a in home.announce_addrs()), home.announce_addrs()
        assert not home.nat.public_evidence.told_failed
        honest = await start(stack, role="bootstrap")
        await home.connect(honest.addrs[0], timeout=60)
        # The next check comes on the unanswered backoff (seconds here), not after public_recheck (600 s).
        await wait_until(lambda: home.nat.status.state is Reachability.PUBLIC, timeout=120,
                         what="home to be dialled back and turn public")
        assert home.nat.relayed_addrs == () and "re-check" in home.nat.status.reason
        assert not any("/p2p-circuit" in a for a in home.announce_addrs())


async def test_a_dial_back_from_this_machine_proves_nothing_to_a_peer_that_listens_beyond_loopback() -> None:
    # Loopback is the whole network only for a node that listens on loopback alone (as every other test
    # here): then a loopback dial-back counts. One listening on every interface would announce its interface
    # addresses, which a server on the same machine never dialled: it proves only that this machine reaches
    # us, like a server on our own LAN (the namespace test: tests/nat/test_lan_dial_back.py).
    # py-libp2p records no loopback observed address, so the server (which dials only addresses on the IP it
    # sees us at) gets our loopback address from --announce; the port is fixed for that.
    port = _free_port()
    async with AsyncExitStack() as stack:
        server = await start(stack, role="bootstrap")
        home = await start(stack, bootstrap=server.addrs, listen=[f"/ip4/0.0.0.0/tcp/{port}"],
                           extra_addrs=[f"/ip4/127.0.0.1/tcp/{port}"], **QUIET)
        assert not home.nat.loopback_network and server.nat.loopback_network
        # The server reached us (on 127.0.0.1), and we saw it arrive from 127.0.0.1: not a verdict.
        assert home.nat.status.state is Reachability.RELAYED, home.nat.status
        assert "only 1 peer on our own network reached us" in home.nat.status.reason, home.nat.status
        assert all("/p2p-circuit" in a for a in home.announce_addrs()), home.announce_addrs()
        answers = await home.nat._ask_dial_backs(home.nat.direct_peers(), home.nat.dial_back_candidates())
        assert answers[server.peer_id][0].answer is DialBackAnswer.LAN_ONLY, answers
        assert home.nat.inbound.seen >= 2  # both dial-backs really arrived


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])
