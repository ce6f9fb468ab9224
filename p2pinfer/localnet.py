"""A small p2pinfer network inside one process, on 127.0.0.1: one bootstrap node and N serving peers.

For tests, benchmarks and demos. Every node is a real libp2p host on a real loopback socket; each runs in
its own cancel scope, so a peer can be stopped abruptly (:meth:`LocalNetwork.kill`) while the others go on.

::

    async with local_network(models, peers=4) as net:
        async with AsyncClient(bootstrap=net.bootstrap_addrs) as client:
            ...
"""

from __future__ import annotations

from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import AsyncIterator, Sequence

import trio

from .identity import Identity
from .net import Node, NodeConfig
from .peer import DEFAULT_SLOTS, ServingPeer
from .runtime import LoadedModel
from .wording import plural

LOOPBACK = ("/ip4/127.0.0.1/tcp/0",)


@dataclass
class LocalNetwork:
    bootstrap: Node
    peers: list[ServingPeer]
    _scopes: dict[str, trio.CancelScope] = field(default_factory=dict)
    _stopped: dict[str, trio.Event] = field(default_factory=dict)
    _nursery: trio.Nursery | None = None
    _config: NodeConfig | None = None
    _slots: int = DEFAULT_SLOTS

    async def add_peer(self, models: Sequence[LoadedModel], *, identity: Identity | None = None,
                       ledger: Path | None = None, wait_s: float = 30.0) -> ServingPeer:
        """Start one more serving peer; returns once the bootstrap node holds its announcement."""
        assert self._nursery is not None and self._config is not None
        identity = identity or Identity.generate()
        serving = ServingPeer(identity, self._config, models, slots=self._slots, measure_speed=False, ledger=ledger)
        self.peers.append(serving)
        self._scopes[serving.peer_id] = trio.CancelScope()
        self._stopped[serving.peer_id] = trio.Event()
        await self._nursery.start(_run_peer, serving, self._scopes[serving.peer_id], self._stopped[serving.peer_id])
        await _wait_for_announcements(self, wait_s)
        return serving

    @property
    def bootstrap_addrs(self) -> list[str]:
        return self.bootstrap.addrs

    def peer(self, peer_id: str) -> ServingPeer:
        for p in self.peers:
            if p.peer_id == peer_id:
                return p
        raise KeyError(peer_id)

    async def kill(self, peer_id: str) -> None:
        """Stop a peer now: its connections close mid-stream, as when its process dies."""
        self._scopes[peer_id].cancel()
        await self._stopped[peer_id].wait()

    def alive(self, peer_id: str) -> bool:
        return not self._stopped[peer_id].is_set()


@asynccontextmanager
async def local_network(models: Sequence[LoadedModel], *, peers: int = 4, slots: int = DEFAULT_SLOTS,
                        identities: Sequence[Identity] | None = None,
                        peer_models: Sequence[Sequence[LoadedModel]] | None = None,
                        measure_speed: bool = False, wait_s: float = 30.0,
                        ledger_dir: Path | None = None,
                        stream_negotiation_timeout_s: float = 10.0) -> AsyncIterator[LocalNetwork]:
    """Start a bootstrap node and ``peers`` serving peers; yields once every peer sees all the others.

    Each peer keeps its ledger in memory, or in ``ledger_dir/<peer id>.sqlite`` when ``ledger_dir`` is given.
    ``stream_negotiation_timeout_s`` is every node's :class:`~p2pinfer.net.NodeConfig` setting (tests that
    load one process with many requests raise it).
    """
    identities = list(identities or [Identity.generate() for _ in range(peers)])
    served = list(peer_models or [models] * peers)
    patience = {"stream_negotiation_timeout_s": stream_negotiation_timeout_s}
    async with Node(Identity.generate(), NodeConfig(listen=LOOPBACK, role="bootstrap", **patience)) as bootstrap:
        net = LocalNetwork(bootstrap=bootstrap, peers=[])
        config = NodeConfig(listen=LOOPBACK, bootstrap=tuple(bootstrap.addrs), role="peer", **patience)
        async with trio.open_nursery() as nursery:
            net._nursery, net._config, net._slots = nursery, config, slots
            for identity, its_models in zip(identities, served):
                ledger = None if ledger_dir is None else Path(ledger_dir) / f"{identity.peer_id}.sqlite"
                serving = ServingPeer(identity, config, its_models, slots=slots, measure_speed=measure_speed,
                                      ledger=ledger)
                net.peers.append(serving)
                net._scopes[serving.peer_id] = trio.CancelScope()
                net._stopped[serving.peer_id] = trio.Event()
                await nursery.start(_run_peer, serving, net._scopes[serving.peer_id],
                                    net._stopped[serving.peer_id])
            await _wait_for_announcements(net, wait_s)
            try:
                yield net
            finally:
                nursery.cancel_scope.cancel()


async def _run_peer(serving: ServingPeer, scope: trio.CancelScope, stopped: trio.Event,
                    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    try:
        with scope:
            async with serving:
                task_status.started()
                await trio.sleep_forever()
    finally:
        stopped.set()


async def _wait_for_announcements(net: LocalNetwork, timeout: float) -> None:
    """Wait until the bootstrap node holds a live announcement of every peer (so clients can sync it)."""
    from .wire import now_ms

    wanted = {p.peer_id for p in net.peers if net.alive(p.peer_id)}
    with trio.move_on_after(timeout):
        while not wanted <= {a.peer_id for a in net.bootstrap.table.live(now_ms())}:
            await trio.sleep(0.02)
        return
    missing = wanted - {a.peer_id for a in net.bootstrap.table.live(now_ms())}
    raise TimeoutError(f"{len(missing)} of {plural(len(wanted), 'peer')} were not announced within {timeout} s")
