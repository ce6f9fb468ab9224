"""Servers of one attacker tell a peer really behind NAT that it is public: it does not believe them.

Namespace topology of ``tests/nat/topology.py``: three bootstrap nodes (relays) on the public segment, each
with its own key, run by one attacker: their AutoNAT servers answer every dial-back request "I reached you"
without dialling (``tests/nat/liar.py``; real bytes on the wire). Home peer A sits behind its router (NAT,
unsolicited inbound dropped). Before the fix the peer believed the first such answer and announced its
direct address, which nobody can dial (clients fail, and it could be taken for a no-show); now a "reached"
counts only when the connection arrived on its own listener, so it stays relayed, round after round.

Needs root, ``ip`` and ``iptables``; skips, with the reason, only when namespaces cannot be created.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from .procs import Proc
from .topology import Topology

DRIVER = Path(__file__).resolve().parent / "reach_driver.py"
START_S = 180.0   # a loaded machine: imports, three nodes, the join's dial-back round
ROUNDS_S = 180.0


def _driver(topology: Topology, role: str, log: Path, *args: str) -> Proc:
    return Proc(topology.exec_prefix(role) + [sys.executable, str(DRIVER), *args], log)


def test_one_attackers_servers_cannot_make_a_peer_behind_nat_announce_its_direct_address(
        topology: Topology, tmp_path: Path) -> None:
    procs: list[Proc] = []
    try:
        liars = _driver(topology, "client", tmp_path / "liars.log", "liars", "3")
        procs.append(liars)
        liar_addrs = liars.json_line(lambda d: "liars" in d, START_S, "the liars' addresses")["liars"]
        assert len(liar_addrs) == 3 and all(f"/ip4/{topology.ip('client')}/" in a for a in liar_addrs), liar_addrs
        home = _driver(topology, "homea", tmp_path / "home.log", "peer", *liar_addrs)
        procs.append(home)
        joined = home.json_line(lambda d: d.get("rechecks") == 0, START_S, "home to join")
        assert joined["state"] == "relayed" and "never arrived" in joined["reason"], f"{joined}; {home.describe()}"
        assert joined["addrs"] and all("/p2p-circuit" in a for a in joined["addrs"]), joined
        # Every re-check round the three say "reached" again; nothing arrives, nothing counts.
        later = home.json_line(lambda d: d.get("rechecks", 0) >= 4, ROUNDS_S, "four re-check rounds")
        assert later["state"] == "relayed", f"{later}; {home.describe()}"
        assert later["addrs"] and all("/p2p-circuit" in a for a in later["addrs"]), later
        log = (tmp_path / "home.log").read_text()
        # Each claim is logged (the join and the rounds: 3 each; the last round's lines may still be in flight).
        assert log.count("event=nat.dial_back_unconfirmed") >= 3 * 4, home.describe()
    finally:
        for proc in reversed(procs):
            proc.stop()
