"""A NAT topology of Linux network namespaces on one machine, created and removed by the test itself.

::

                         "public" segment 198.51.100.0/24 (bridge in namespace <tag>-pub)
        +--------------+-------------------+-------------------+-------------------+
        | boot .10     | client .20        | router A WAN .101 | router B WAN .102 |
        |              |                   |  (MASQUERADE)     |  (MASQUERADE)     |
                                           | LAN 10.1.0.1/24   | LAN 10.2.0.1/24   |
                                           | home A 10.1.0.2   | home B 10.2.0.2   |
                                           | (lana 10.1.0.3)   |                   |

``Topology(lan_neighbour=True)`` adds ``lana``, a second machine on home A's LAN (a bridge in router A's
namespace then joins the two, as a home switch does): a server there reaches home A directly, on its private
address, while nothing from the public segment can.

NAT behaviour emulated by each router namespace (Linux netfilter, iptables):

* **Endpoint-independent mapping with port preservation**: ``MASQUERADE`` on the WAN interface; conntrack
  keeps an inside (ip, port) on the same outside port whenever that port is free, whatever the destination.
* **Address- and port-dependent filtering**: the FORWARD chain accepts inbound packets only when they
  belong to a connection conntrack already knows (``ESTABLISHED,RELATED``); every unsolicited inbound
  connection is dropped (silently, like a home router: the dialler waits for its timeout). A TCP SYN from
  the peer's exact (ip, port) that an inside host just sent a SYN to counts as part of that connection,
  so TCP simultaneous open (hole punching) works, as on most home routers.
* No hairpinning is needed: the two homes only meet through the public segment.
* On the public hosts, private addresses (10.0.0.0/8, which home peers learn about themselves) are routed
  to a neighbour that does not exist, so dialling one waits until the kernel gives up on ARP (about 3 s),
  like a dial to another network's private address on the internet.

The addresses are from TEST-NET-2 (RFC 5737) and RFC 1918; nothing leaves the namespaces.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
from dataclasses import dataclass, field

PUBLIC_NET = "198.51.100"
HOSTS_PUBLIC = {"boot": 10, "client": 20}
HOMES = {"a": ("10.1.0", 101), "b": ("10.2.0", 102)}
LAN_NEIGHBOURS = {"lana": ("a", 3)}  # role -> (home, host number on that home's LAN)
UNANSWERED_HOST = 250  # no namespace has this public address


class TopologyUnavailable(Exception):
    """Namespaces (or iptables) cannot be used here; the message says why."""


def _run(*args: str, ns: str | None = None) -> str:
    cmd = (["ip", "netns", "exec", ns] if ns else []) + list(args)
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {done.stderr.strip()[:300]}")
    return done.stdout


@dataclass
class Topology:
    tag: str = field(default_factory=lambda: "p2n" + secrets.token_hex(2))
    namespaces: list[str] = field(default_factory=list)
    lan_neighbour: bool = False  # add "lana" on home A's LAN

    # namespace names
    def ns(self, role: str) -> str:
        return f"{self.tag}-{role}"

    def ip(self, role: str) -> str:
        """The address a host has on its own segment (public hosts: public; home hosts: private)."""
        if role in HOSTS_PUBLIC:
            return f"{PUBLIC_NET}.{HOSTS_PUBLIC[role]}"
        if role in LAN_NEIGHBOURS:
            home, host = LAN_NEIGHBOURS[role]
            return f"{HOMES[home][0]}.{host}"
        return f"{HOMES[role[-1]][0]}.2"

    def router_wan_ip(self, home: str) -> str:
        return f"{PUBLIC_NET}.{HOMES[home][1]}"

    @staticmethod
    def check_available() -> None:
        """Raise :class:`TopologyUnavailable` when namespaces cannot be created here (the only skip reason).

        A missing ``iptables`` is not a reason to skip: the test fails and says to install it.
        """
        if os.geteuid() != 0:
            raise TopologyUnavailable("network namespaces need root (CI runs as root)")
        if shutil.which("ip") is None:
            raise TopologyUnavailable("`ip` (iproute2) is not installed, so no namespace can be created")
        if shutil.which("iptables") is None:
            raise RuntimeError("`iptables` is not installed: apt-get install -y --no-install-recommends iptables "
                               "(.ci/run does)")

    def _add_ns(self, role: str) -> str:
        name = self.ns(role)
        _run("ip", "netns", "add", name)
        self.namespaces.append(name)
        _run("ip", "link", "set", "lo", "up", ns=name)
        return name

    def _veth(self, a_ns: str, a_if: str, b_ns: str, b_if: str) -> None:
        tmp_a, tmp_b = f"{self.tag}{secrets.token_hex(2)}", f"{self.tag}{secrets.token_hex(2)}"
        _run("ip", "link", "add", tmp_a, "type", "veth", "peer", "name", tmp_b)
        _run("ip", "link", "set", tmp_a, "netns", a_ns)
        _run("ip", "link", "set", tmp_b, "netns", b_ns)
        _run("ip", "link", "set", tmp_a, "name", a_if, ns=a_ns)
        _run("ip", "link", "set", tmp_b, "name", b_if, ns=b_ns)
        _run("ip", "link", "set", a_if, "up", ns=a_ns)
        _run("ip", "link", "set", b_if, "up", ns=b_ns)

    def create(self) -> "Topology":
        self.check_available()
        try:
            self._add_ns("pub")
        except RuntimeError as exc:
            raise TopologyUnavailable(f"cannot create a network namespace: {exc}") from None
        try:
            pub = self.ns("pub")
            _run("ip", "link", "add", "br0", "type", "bridge", ns=pub)
            _run("ip", "link", "set", "br0", "up", ns=pub)
            for role, host in HOSTS_PUBLIC.items():
                name = self._add_ns(role)
                self._veth(name, "eth0", pub, f"p-{role}")
                _run("ip", "link", "set", f"p-{role}", "master", "br0", ns=pub)
                _run("ip", "addr", "add", f"{PUBLIC_NET}.{host}/24", "dev", "eth0", ns=name)
                # Private addresses of other networks lead nowhere, as on the internet: packets for them go to
                # a next hop that never answers (ARP fails), so a dial waits instead of failing at once.
                _run("ip", "route", "add", "10.0.0.0/8", "via", f"{PUBLIC_NET}.{UNANSWERED_HOST}", ns=name)
            for home, (lan, wan_host) in HOMES.items():
                router = self._add_ns(f"rtr{home}")
                inside = self._add_ns(f"home{home}")
                self._veth(router, "wan", pub, f"p-rtr{home}")
                _run("ip", "link", "set", f"p-rtr{home}", "master", "br0", ns=pub)
                _run("ip", "addr", "add", f"{PUBLIC_NET}.{wan_host}/24", "dev", "wan", ns=router)
                neighbours = [r for r, (h, _) in LAN_NEIGHBOURS.items() if h == home] if self.lan_neighbour else []
                if neighbours:  # a switch: the router's LAN side is a bridge, every machine of the LAN a port
                    _run("ip", "link", "add", "lan", "type", "bridge", ns=router)
                    _run("ip", "link", "set", "lan", "up", ns=router)
                    self._veth(router, "lan-home", inside, "eth0")
                    _run("ip", "link", "set", "lan-home", "master", "lan", ns=router)
                    for i, role in enumerate(neighbours):
                        other = self._add_ns(role)
                        self._veth(router, f"lan-n{i}", other, "eth0")
                        _run("ip", "link", "set", f"lan-n{i}", "master", "lan", ns=router)
                        _run("ip", "addr", "add", f"{self.ip(role)}/24", "dev", "eth0", ns=other)
                        _run("ip", "route", "add", "default", "via", f"{lan}.1", ns=other)
                else:
                    self._veth(router, "lan", inside, "eth0")
                _run("ip", "addr", "add", f"{lan}.1/24", "dev", "lan", ns=router)
                _run("ip", "addr", "add", f"{lan}.2/24", "dev", "eth0", ns=inside)
                _run("ip", "route", "add", "default", "via", f"{lan}.1", ns=inside)
                _run("sysctl", "-qw", "net.ipv4.ip_forward=1", ns=router)
                ipt = ("iptables", "-w")
                _run(*ipt, "-t", "nat", "-A", "POSTROUTING", "-o", "wan", "-j", "MASQUERADE", ns=router)
                _run(*ipt, "-P", "FORWARD", "DROP", ns=router)
                _run(*ipt, "-A", "FORWARD", "-i", "lan", "-o", "wan", "-j", "ACCEPT", ns=router)
                # Machine to machine on the LAN: switched, never filtered (a host with br_netfilter loaded
                # would otherwise pass bridged frames through this DROP policy).
                _run(*ipt, "-A", "FORWARD", "-i", "lan", "-o", "lan", "-j", "ACCEPT", ns=router)
                _run(*ipt, "-A", "FORWARD", "-i", "wan", "-o", "lan", "-m", "conntrack",
                     "--ctstate", "ESTABLISHED,RELATED", "-j", "ACCEPT", ns=router)
                # The router itself accepts nothing unsolicited from the WAN either.
                _run(*ipt, "-A", "INPUT", "-i", "wan", "-m", "conntrack", "--ctstate", "ESTABLISHED,RELATED",
                     "-j", "ACCEPT", ns=router)
                _run(*ipt, "-A", "INPUT", "-i", "wan", "-j", "DROP", ns=router)
        except BaseException:
            self.remove()
            raise
        return self

    def _forward_rules(self, home: str, port: int) -> list[tuple[str, ...]]:
        inside = f"{HOMES[home][0]}.2"
        return [("-t", "nat", "PREROUTING", "-i", "wan", "-p", "tcp", "--dport", str(port), "-j", "DNAT",
                 "--to-destination", f"{inside}:{port}"),
                ("-t", "filter", "FORWARD", "-i", "wan", "-o", "lan", "-p", "tcp", "-d", inside, "--dport", str(port),
                 "-j", "ACCEPT")]

    def forward_port(self, home: str, port: int, *, on: bool = True) -> None:
        """Port forwarding on ``home``'s router, as a volunteer sets it up: new TCP connections to its WAN
        address on ``port`` go to the home machine, same port, their source address kept (``on=False``
        removes it)."""
        for flag, table, chain, *rule in self._forward_rules(home, port):
            _run("iptables", "-w", flag, table, "-I" if on else "-D", chain, *rule, ns=self.ns(f"rtr{home}"))

    def remove(self) -> None:
        """Delete every namespace we created (their veths and rules go with them)."""
        for name in reversed(self.namespaces):
            subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=30)
        self.namespaces.clear()

    def exec_prefix(self, role: str) -> list[str]:
        """Command prefix that runs a program inside ``role``'s namespace."""
        return ["ip", "netns", "exec", self.ns(role)]

    def __enter__(self) -> "Topology":
        return self.create()

    def __exit__(self, *exc: object) -> None:
        self.remove()
