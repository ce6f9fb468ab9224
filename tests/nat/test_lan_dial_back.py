"""A server on the home peer's own LAN reaches it directly; that must not make it "public".

Namespace topology of ``tests/nat/topology.py`` with ``lan_neighbour``: a bootstrap node (relay) and a client
on the public segment; home peer A behind its router (MASQUERADE, unsolicited inbound dropped); and a second
bootstrap node ``lana`` (10.1.0.3) on home A's LAN, an honest server like any other. Home A joins through
both. The public node's dial-back is dropped by the NAT; the LAN node's reaches 10.1.0.2 at once, and home A
sees it arrive (inbound, direct, Noise-proven). Before the fix that one dial-back made home A ``public``: it
dropped its relay and announced only 10.1.0.2, which nobody beyond its router can dial, so the public
client could not reach it (and it would have been counted a no-show). Now a dial-back that came from the
peer's own private network proves only LAN reachability (``event=nat.dial_back_lan_only reason=lan-only``):
home A stays relayed, on the relay the internet can dial (the public node, not the LAN one), and the public
client is served through it.

Every process is a real ``p2pinfer`` CLI or SDK node in its namespace. Needs root, ``ip`` and ``iptables``;
skips, with the reason, only when namespaces cannot be created.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Iterator

import pytest

from .conftest import namespace_topology
from .procs import Proc, addrs_of, cli, client
from .topology import Topology

DRIVER = Path(__file__).resolve().parent / "reach_driver.py"
START_S = 240.0   # a peer process imports its model and measures its speed first; the machine may be loaded
REQUEST_S = 180.0
LISTEN = "/ip4/0.0.0.0/tcp/4001"


@pytest.fixture(scope="module")
def lan_topology() -> Iterator[Topology]:
    yield from namespace_topology(Topology(lan_neighbour=True))


def _addr_on(proc: Proc, ip: str) -> str:
    addrs, _ = addrs_of(proc, START_S)
    return next(a for a in addrs if a.startswith(f"/ip4/{ip}/tcp/4001/p2p/"))


def test_a_dial_back_from_the_peers_own_lan_does_not_make_it_public(lan_topology: Topology, tmp_path: Path,
                                                                    shared_models: Path) -> None:
    topo = lan_topology
    procs: list[Proc] = []
    try:
        boot = cli(topo, "boot", tmp_path / "boot", "bootstrap", "--listen", LISTEN)
        procs.append(boot)
        lan_boot = cli(topo, "lana", tmp_path / "lana", "bootstrap", "--listen", LISTEN)
        procs.append(lan_boot)
        boot_addr, lan_addr = _addr_on(boot, topo.ip("boot")), _addr_on(lan_boot, topo.ip("lana"))
        lan_id = lan_addr.rsplit("/", 1)[1]
        # The LAN node first: the order a peer lists its bootstrap nodes in must not pick its relay.
        home = cli(topo, "homea", tmp_path / "homea", "peer", "--listen", LISTEN, "--bootstrap", lan_addr,
                   "--bootstrap", boot_addr, "--model", str(shared_models / "tiny-llama-trained"), "--slots", "2")
        procs.append(home)
        home_addrs, reachability = addrs_of(home, START_S)
        home_id = home_addrs[0].rsplit("/", 1)[1]
        assert reachability.startswith("reachability: relayed ("), f"{reachability}; {home.describe()}"
        assert "1 peer could not dial us back, 1 on our own network could" in reachability, reachability
        log = (tmp_path / "homea.log").read_text()
        # The LAN node did reach home A, and home A saw it: set aside, with its reason.
        lan_only = [line for line in log.splitlines() if "event=nat.dial_back_lan_only" in line]
        assert any(lan_id in line and "reason=lan-only" in line and f"seen_from={topo.ip('lana')}" in line
                   for line in lan_only), home.describe()
        # Relayed through the node the internet can dial (a relayed peer announces its relayed address only).
        assert [a for a in home_addrs if "/p2p-circuit" in a] == [f"{boot_addr}/p2p-circuit/p2p/{home_id}"], \
            home_addrs
        # A client on the public segment is served by home A, through its relay.
        user = client(topo, "client", tmp_path / "client.log", boot_addr, "tiny-llama-trained",
                      "--requests", "1", "--max-tokens", "16")
        procs.append(user)
        result = user.json_line(lambda d: "ok" in d, REQUEST_S, "a completion")
        assert result["ok"] and result["executor"] == home_id and result["tokens"] > 0, \
            f"{result}; {user.describe()}\n{home.describe()}"
    finally:
        for proc in reversed(procs):
            proc.stop()


def _driver(topology: Topology, role: str, log: Path, *args: str) -> Proc:
    return Proc(topology.exec_prefix(role) + [sys.executable, str(DRIVER), *args], log)


def _two_bootstraps(topo: Topology, tmp_path: Path, procs: list[Proc], port: int) -> tuple[str, str]:
    """The public bootstrap node and the one on home A's LAN, started (appended to ``procs``, which the caller
    stops): their addresses on their own segments."""
    nodes = {}
    for role in ("boot", "lana"):  # both start before either is waited for
        nodes[role] = _driver(topo, role, tmp_path / f"{role}.log", "boot", f"/ip4/0.0.0.0/tcp/{port}")
        procs.append(nodes[role])

    def address(role: str, what: str) -> str:
        return next(a for a in nodes[role].json_line(lambda d: "boot" in d, START_S, what)["boot"]
                    if f"/ip4/{topo.ip(role)}/" in a)

    return address("boot", "the public node"), address("lana", "the LAN node")


def test_round_after_round_the_lan_server_reaches_the_peer_and_it_stays_relayed(lan_topology: Topology,
                                                                                tmp_path: Path) -> None:
    # The re-checks of a relayed peer (short intervals here: reach_driver's FAST timing) ask the internet's
    # servers first and never count the LAN server's dial-backs. The old rule (3 confirmations within 4
    # rounds) flipped on the LAN server alone by the third round.
    topo = lan_topology
    procs: list[Proc] = []
    try:
        boot_addr, lan_addr = _two_bootstraps(topo, tmp_path, procs, 4011)
        home = _driver(topo, "homea", tmp_path / "home.log", "peer", lan_addr, boot_addr)
        procs.append(home)
        joined = home.json_line(lambda d: d.get("rechecks") == 0, START_S, "home to join")
        assert joined["state"] == "relayed", f"{joined}; {home.describe()}"
        assert joined["addrs"] and all(a.startswith(f"{boot_addr}/p2p-circuit") for a in joined["addrs"]), joined
        later = home.json_line(lambda d: d.get("rechecks", 0) >= 4, START_S, "four re-check rounds")
        assert later["state"] == "relayed", f"{later}; {home.describe()}"
        assert later["addrs"] and all(a.startswith(f"{boot_addr}/p2p-circuit") for a in later["addrs"]), later
        log = (tmp_path / "home.log").read_text()
        # The LAN server reached home A at the join and in the rounds (the last round's line may be in flight).
        assert log.count("event=nat.dial_back_lan_only") >= 4, home.describe()
        assert "event=nat.public_recheck" in log and " lan_only=1 " in log, home.describe()
    finally:
        for proc in reversed(procs):
            proc.stop()


def test_a_peer_behind_port_forwarding_is_made_public_by_a_dial_back_from_the_internet_once_it_announces_it(
        lan_topology: Topology, tmp_path: Path) -> None:
    # The same home with port 4001 forwarded on its router (DNAT, source kept): the public node's dial-back
    # to the router's address arrives from 198.51.100.10, which proves the internet reaches home A; the LAN
    # node's, as ever, proves nothing and vetoes nothing. But public, home A would announce its interface
    # address only (10.1.0.2): without --announce it stays relayed and says what to add; with it, public.
    topo = lan_topology
    procs: list[Proc] = []
    topo.forward_port("a", 4001)
    try:
        boot_addr, lan_addr = _two_bootstraps(topo, tmp_path, procs, 4012)
        forwarded = f"/ip4/{topo.router_wan_ip('a')}/tcp/4001"
        home = _driver(topo, "homea", tmp_path / "home.log", "peer", lan_addr, boot_addr)
        procs.append(home)
        joined = home.json_line(lambda d: d.get("rechecks") == 0, START_S, "home to join")
        assert joined["state"] == "relayed", f"{joined}; {home.describe()}"
        assert f"add --announce {forwarded} if it is this machine's" in joined["reason"], joined
        assert joined["addrs"] and all(a.startswith(f"{boot_addr}/p2p-circuit") for a in joined["addrs"]), joined
        log = (tmp_path / "home.log").read_text()
        assert "event=nat.public_unannounced" in log and "reason=no-internet-address" in log, home.describe()
        home.stop()
        home = _driver(topo, "homea", tmp_path / "home-announcing.log", "peer", f"--announce={forwarded}",
                       lan_addr, boot_addr)
        procs.append(home)
        joined = home.json_line(lambda d: d.get("rechecks") == 0, START_S, "home to join, announcing")
        assert joined["state"] == "public", f"{joined}; {home.describe()}"
        assert forwarded in joined["reason"] and forwarded in joined["addrs"], joined
        log = (tmp_path / "home-announcing.log").read_text()
        assert "event=nat.dial_back_lan_only" in log and " reached=1 " in log, home.describe()
    finally:
        for proc in reversed(procs):
            proc.stop()
        topo.forward_port("a", 4001, on=False)


def test_a_server_on_the_same_machine_does_not_make_a_peer_public(lan_topology: Topology, tmp_path: Path) -> None:
    # A volunteer runs a bootstrap node and a peer on one host with a public address ("client",
    # 198.51.100.20). The bootstrap node dials the peer back at that address, from that address: the kernel
    # delivers it locally, past any firewall on the interface, so it proves nothing about the internet.
    topo = lan_topology
    procs: list[Proc] = []
    try:
        beside = _driver(topo, "client", tmp_path / "beside.log", "boot", "/ip4/0.0.0.0/tcp/4014")
        procs.append(beside)
        beside_addr = next(a for a in beside.json_line(lambda d: "boot" in d, START_S, "the node beside")["boot"]
                           if f"/ip4/{topo.ip('client')}/" in a)
        peer = _driver(topo, "client", tmp_path / "peer.log", "peer", beside_addr)
        procs.append(peer)
        joined = peer.json_line(lambda d: d.get("rechecks") == 0, START_S, "the peer to join")
        assert joined["state"] == "relayed", f"{joined}; {peer.describe()}"
        assert "only 1 peer on our own network reached us" in joined["reason"], joined
        log = (tmp_path / "peer.log").read_text()
        assert "event=nat.dial_back_lan_only" in log and f"seen_from={topo.ip('client')} " in log, peer.describe()
    finally:
        for proc in reversed(procs):
            proc.stop()
