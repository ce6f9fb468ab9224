"""A serving peer: a network node, the models it serves, and the task server that runs them.

``async with ServingPeer(identity, config, models) as peer:`` joins the network, measures each model's decode
speed, announces the models with free slots, and answers offers and assignments until the block exits. It
also verifies other peers' results, books receipts in its ledger and re-checks gossiped fraud proofs
(:class:`~p2pinfer.request.verification.VerificationService`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import trio

from .identity import Identity
from .ledger import Ledger
from .log import get_logger
from .net import Node, NodeConfig
from .request.server import TaskServer, measure_decode_speed
from .request.verification import VerificationService
from .runtime import LoadedModel

log = get_logger("p2pinfer.peer")

DEFAULT_SLOTS = 2


class ServingPeer:
    def __init__(self, identity: Identity, config: NodeConfig, models: Sequence[LoadedModel], *,
                 slots: int = DEFAULT_SLOTS, measure_speed: bool = True,
                 ledger: Ledger | str | Path | None = None) -> None:
        self.identity = identity
        self.config = config
        self.models = list(models)
        self.slots = slots
        self.measure_speed = measure_speed
        self.node: Node | None = None
        self.server: TaskServer | None = None
        self.verification: VerificationService | None = None
        self.ledger = ledger if isinstance(ledger, Ledger) else Ledger(ledger)
        self._owns_ledger = not isinstance(ledger, Ledger)
        self._nursery_cm: Any = None
        self._nursery: trio.Nursery | None = None

    @property
    def peer_id(self) -> str:
        return self.identity.peer_id

    async def __aenter__(self) -> "ServingPeer":
        speeds: dict[bytes, float] = {}
        if self.measure_speed:
            for model in self.models:
                speeds[model.digest] = await trio.to_thread.run_sync(measure_decode_speed, model)
                log.info("peer.model_ready", model=model.name, digest=model.digest.hex()[:16],
                         decode_tokens_per_s=round(speeds[model.digest], 1))
        self.node = await Node(self.identity, self.config).__aenter__()
        try:
            self.server = TaskServer(self.node, self.identity, self.models, slots=self.slots, decode_speeds=speeds)
            self.server.install()
            self._nursery_cm = trio.open_nursery()
            nursery = self._nursery = await self._nursery_cm.__aenter__()
            self.verification = VerificationService(self.node, self.identity, self.models, self.ledger,
                                                    slots=self.slots)
            await self.verification.start(nursery)
        except BaseException:
            await self._close(None, None, None)
            raise
        return self

    async def __aexit__(self, *exc_info: Any) -> bool:
        return await self._close(*exc_info)

    async def _close(self, *exc_info: Any) -> bool:
        try:
            cm, self._nursery_cm = self._nursery_cm, None
            if cm is not None:
                self._nursery.cancel_scope.cancel()
                await cm.__aexit__(None, None, None)
        finally:
            node, self.node = self.node, None
            try:
                if node is not None:
                    return await node.__aexit__(*exc_info)
            finally:
                if self._owns_ledger:
                    self.ledger.close()
        return False

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until cancelled (``await nursery.start(peer.run)`` returns once it is serving)."""
        async with self:
            task_status.started(self)
            await trio.sleep_forever()

