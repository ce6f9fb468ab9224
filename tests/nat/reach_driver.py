"""A reachability-only p2pinfer node (no model) inside a namespace of the NAT topology (tests).

``python reach_driver.py liars N`` starts N bootstrap nodes (relays), each with its own key, whose AutoNAT
servers say "I reached you" without dialling (``tests/nat/liar.py``: one attacker's servers); it prints
``{"liars": [multiaddr, ...]}`` and runs until terminated.

``python reach_driver.py relay KEY_FILE LISTEN`` runs one bootstrap node (relay) with the key in KEY_FILE,
whose AutoNAT server says "dial failed" to everyone (so that a peer on loopback is relayed); it prints
``{"relay": [multiaddr, ...]}``, then ``{"holds": [peer ID, ...]}`` whenever the set of peers whose
announcements (offering a model) it holds changes, until terminated (a restart: run it again with the same key and address).

``python reach_driver.py boot LISTEN`` runs one honest bootstrap node (relay) on LISTEN; it prints
``{"boot": [multiaddr, ...]}`` and runs until terminated.

``python reach_driver.py peer [--announce=MULTIADDR] BOOTSTRAP...`` joins as a peer and prints
``{"rechecks": n, "state": ..., "reason": ..., "addrs": [...]}`` once joined (n = 0) and after every public
re-check round, until terminated. Intervals are short (``FAST``) so that rounds follow each other quickly.
Log lines go to stderr.
"""

from __future__ import annotations

import json
import sys
from contextlib import AsyncExitStack
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent))
from liar import make_liar, make_reached_liar  # noqa: E402

from p2pinfer import log  # noqa: E402
from p2pinfer.identity import Identity  # noqa: E402
from p2pinfer.net import Backoff, NatTiming, Node, NodeConfig  # noqa: E402
from p2pinfer.wire import now_ms  # noqa: E402

FAST = NatTiming(recheck_first_s=0.5, recheck_interval_s=2.0, relay_check_s=0.5, relay_retry=Backoff(0.5, 2.0),
                 public_recheck=Backoff(0.5, 2.0), reannounce_min_interval_s=1.0, dial_back_confirm_s=3.0)


def emit(**fields: object) -> None:
    print(json.dumps(fields), flush=True)


async def liars(count: int) -> None:
    async with AsyncExitStack() as stack:
        addrs = []
        for i in range(count):
            node = await stack.enter_async_context(Node(Identity.generate(), NodeConfig(
                listen=[f"/ip4/0.0.0.0/tcp/{4001 + i}"], role="bootstrap", nat_timing=FAST)))
            make_reached_liar(node)
            addrs.append(next(a for a in node.addrs if "/127.0.0.1/" not in a))
        emit(liars=addrs)
        await trio.sleep_forever()


async def relay(key_file: str, listen: str) -> None:
    config = NodeConfig(listen=[listen], role="bootstrap", nat_timing=FAST, dht_refresh_interval_s=5.0)
    async with Node(Identity.load(Path(key_file)), config) as node:
        make_liar(node)
        emit(relay=list(node.addrs))
        held: list[str] = []
        while True:
            now = sorted(a.peer_id for a in node.table.live(now_ms()) if a.models)
            if now != held:
                held = now
                emit(holds=held)
            await trio.sleep(0.05)


async def boot(listen: str) -> None:
    async with Node(Identity.generate(), NodeConfig(listen=[listen], role="bootstrap", nat_timing=FAST)) as node:
        emit(boot=list(node.addrs))
        await trio.sleep_forever()


async def peer(args: list[str]) -> None:
    announce = [a.split("=", 1)[1] for a in args if a.startswith("--announce=")]
    bootstrap = [a for a in args if not a.startswith("--announce=")]
    config = NodeConfig(listen=["/ip4/0.0.0.0/tcp/4001"], bootstrap=bootstrap, nat_timing=FAST,
                        announce_interval_s=600.0, extra_addrs=announce)
    async with Node(Identity.generate(), config) as node:
        seen = -1
        while True:
            rounds = node.nat.stats["public_rechecks"]
            if rounds != seen:
                seen = rounds
                emit(rechecks=rounds, state=node.nat.status.state.value, reason=node.nat.status.reason,
                     addrs=list(node.announce_addrs()))
            await trio.sleep(0.05)


if __name__ == "__main__":
    log.configure(level="info", stream=sys.stderr)
    if sys.argv[1] == "liars":
        trio.run(liars, int(sys.argv[2]))
    elif sys.argv[1] == "relay":
        trio.run(relay, sys.argv[2], sys.argv[3])
    elif sys.argv[1] == "boot":
        trio.run(boot, sys.argv[2])
    else:
        trio.run(peer, sys.argv[2:])
