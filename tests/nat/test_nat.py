"""NAT traversal in a real topology of Linux network namespaces (see tests/nat/topology.py).

A bootstrap/relay node and a client sit on a "public" segment; peer A and peer B each sit behind their own
router doing MASQUERADE and dropping unsolicited inbound connections. Every node is a real `p2pinfer`
process (CLI or SDK) inside its namespace. Asserted:

* AutoNAT is honest: the home peer is told it is not reachable (and so reserves a relay slot and announces
  its relayed address), a peer on the public segment is told it is public.
* The public client's requests reach the home peer through the relay.
* Two home peers connect directly by hole punching (DCUtR, TCP simultaneous open through both NATs), and
  the request then runs over the direct connection.

The only allowed skip: namespaces cannot be created here (not root, no `ip`/`iptables`); the reason is
printed (pytest -ra).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Iterator

import pytest

from .procs import Proc, addrs_of, cli, client
from .topology import Topology

START_S = 240.0   # a peer process imports its model and measures its speed first; the machine may be loaded
REQUEST_S = 180.0
LISTEN = "/ip4/0.0.0.0/tcp/4001"


class Network:
    boot_addr: str
    home_addrs: list[str]
    home_reachability: str
    home_id: str

    def __init__(self, topo: Topology, tmp: Path, models: Path) -> None:
        self.topo, self.tmp = topo, tmp
        self.procs: list[Proc] = []
        self.model_dir = models / "tiny-llama-trained"

    def start(self, proc: Proc) -> Proc:
        self.procs.append(proc)
        return proc

    def stop(self) -> None:
        for proc in reversed(self.procs):
            proc.stop()


@pytest.fixture(scope="module")
def network(topology: Topology, tmp_path_factory: pytest.TempPathFactory, shared_models: Path) -> Iterator[Network]:
    net = Network(topology, tmp_path_factory.mktemp("nat"), shared_models)
    try:
        boot = net.start(cli(topology, "boot", net.tmp / "boot", "bootstrap", "--listen", LISTEN))
        boot_addrs, _ = addrs_of(boot, START_S)
        net.boot_addr = next(a for a in boot_addrs if a.startswith(f"/ip4/{topology.ip('boot')}/tcp/4001/p2p/"))
        home = net.start(cli(topology, "homea", net.tmp / "homea", "peer", "--listen", LISTEN,
                             "--bootstrap", net.boot_addr, "--model", str(net.model_dir), "--slots", "2"))
        net.home_addrs, net.home_reachability = addrs_of(home, START_S)
        net.home_id = net.home_addrs[0].rsplit("/", 1)[1]
        yield net
    finally:
        net.stop()


def test_bootstrap_prints_only_dialable_addresses(network: Network, topology: Topology) -> None:
    boot_lines = network.procs[0].lines
    addrs = [l for l in boot_lines if l.startswith("/")]
    assert addrs and not any("/0.0.0.0/" in a or "/127.0.0.1/" in a for a in addrs), addrs
    assert any(l.startswith("reachability: ") for l in boot_lines)


def test_home_peer_learns_it_is_behind_nat_and_announces_a_relayed_address(network: Network,
                                                                           topology: Topology) -> None:
    assert network.home_reachability.startswith("reachability: relayed ("), network.home_reachability
    boot_id = network.boot_addr.rsplit("/", 1)[1]
    relayed = [a for a in network.home_addrs if "/p2p-circuit" in a]
    assert relayed == [f"{network.boot_addr}/p2p-circuit/p2p/{network.home_id}"], network.home_addrs
    assert boot_id in network.home_reachability


def test_public_client_is_served_by_home_peer_through_the_relay(network: Network, topology: Topology) -> None:
    proc = network.start(client(topology, "client", network.tmp / "client.log", network.boot_addr,
                                "tiny-llama-trained", "--requests", "2", "--max-tokens", "16"))
    for _ in range(2):
        result = proc.json_line(lambda d: "ok" in d, REQUEST_S, "a completion")
        assert result["ok"], f"{result}; {proc.describe()}\n{network.procs[1].describe()}"
        assert result["executor"] == network.home_id and result["tokens"] > 0


def test_public_peer_is_told_it_is_public(network: Network, topology: Topology) -> None:
    proc = network.start(cli(topology, "client", network.tmp / "public-peer", "peer",
                             "--listen", "/ip4/0.0.0.0/tcp/4002", "--bootstrap", network.boot_addr,
                             "--model", str(network.model_dir), "--slots", "1"))
    addrs, line = addrs_of(proc, START_S)
    assert line.startswith("reachability: public ("), line
    assert f"/ip4/{topology.ip('client')}/tcp/4002" in line  # the address the dial-back reached
    assert not any("/p2p-circuit" in a for a in addrs)
    proc.stop()


def test_two_home_peers_connect_directly_by_hole_punching(network: Network, topology: Topology) -> None:
    proc = network.start(client(topology, "homeb", network.tmp / "homeb-client.log", network.boot_addr,
                                "tiny-llama-trained", "--requests", "1", "--max-tokens", "16",
                                "--wait-direct", network.home_id))
    upgrade = proc.json_line(lambda d: "direct_to" in d, REQUEST_S, "the hole punch outcome")
    home = network.procs[1]
    assert upgrade["direct"], f"no direct connection from home B to home A; {proc.describe()}\n{home.describe()}"
    result = proc.json_line(lambda d: "ok" in d, REQUEST_S, "a completion")
    assert result["ok"] and result["executor"] == network.home_id and result["direct"], \
        f"{result}; {proc.describe()}\n{home.describe()}"


def test_home_peer_reserves_again_after_its_relay_restarts(network: Network, topology: Topology) -> None:
    boot = network.procs[0]
    boot.stop()
    log = network.tmp / "homea.log"
    restored_before = log.read_text().count("event=nat.relay_restored")
    # Same key (data dir) and port: the bootstrap node comes back under the same address.
    again = network.start(cli(topology, "boot", network.tmp / "boot", "bootstrap", "--listen", LISTEN))
    addrs_of(again, START_S)
    deadline = time.monotonic() + REQUEST_S
    while log.read_text().count("event=nat.relay_restored") == restored_before:
        assert time.monotonic() < deadline, f"home peer never re-reserved; {network.procs[1].describe()}"
        time.sleep(0.2)
    proc = network.start(client(topology, "client", network.tmp / "client-after-restart.log", network.boot_addr,
                                "tiny-llama-trained", "--wait-model", "--requests", "1", "--max-tokens", "8",
                                "--listen", "/ip4/0.0.0.0/tcp/4005"))
    result = proc.json_line(lambda d: "ok" in d, REQUEST_S, "a completion after the relay restart")
    assert result["ok"] and result["executor"] == network.home_id, f"{result}; {proc.describe()}"

