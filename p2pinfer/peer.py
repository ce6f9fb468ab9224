"""A serving peer: a network node, the models it serves, and the task server that runs them.

``async with ServingPeer(identity, config, models) as peer:`` joins the network, measures each model's decode
speed, announces the models with free slots, and answers offers and assignments until the block exits.
"""

from __future__ import annotations

from typing import Any, Sequence

import trio

from .identity import Identity
from .log import get_logger
from .net import Node, NodeConfig
from .request.server import TaskServer, measure_decode_speed
from .runtime import LoadedModel

log = get_logger("p2pinfer.peer")

DEFAULT_SLOTS = 2


class ServingPeer:
    def __init__(self, identity: Identity, config: NodeConfig, models: Sequence[LoadedModel], *,
                 slots: int = DEFAULT_SLOTS, measure_speed: bool = True) -> None:
        self.identity = identity
        self.config = config
        self.models = list(models)
        self.slots = slots
        self.measure_speed = measure_speed
        self.node: Node | None = None
        self.server: TaskServer | None = None

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
        except BaseException:
            await self.node.__aexit__(None, None, None)
            raise
        return self

    async def __aexit__(self, *exc_info: Any) -> bool:
        node, self.node = self.node, None
        if node is not None:
            return await node.__aexit__(*exc_info)
        return False

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until cancelled (``await nursery.start(peer.run)`` returns once it is serving)."""
        async with self:
            task_status.started(self)
            await trio.sleep_forever()
