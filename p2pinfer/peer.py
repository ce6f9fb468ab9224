"""A serving peer: a network node, the models it serves, and the task server that runs them.

``async with ServingPeer(identity, config, models) as peer:`` calibrates any model that has no measured
tolerance yet (:func:`~p2pinfer.runtime.calibrate.ensure_tolerance`), joins the network, measures each model's decode
speed, announces the models with free slots, and answers offers and assignments until the block exits. It
also verifies other peers' results, books receipts in its ledger and re-checks gossiped fraud proofs
(:class:`~p2pinfer.request.verification.VerificationService`).

With ``gateway=(host, port)`` it also serves the OpenAI-compatible gateway (``peer.gateway_url`` once
started), and with ``control_socket=PATH`` the local control endpoint that ``p2pinfer status`` reads; both
run in the peer's own nursery (see :mod:`p2pinfer.gateway`).
"""

from __future__ import annotations

from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any, Sequence

import trio

from .identity import Identity
from .ledger import Ledger
from .log import get_logger
from .net import Node, NodeConfig
from .request.server import TaskServer, measure_decode_speed
from .request.possession import install_possession
from .request.tokenizer_service import TokenizerService
from .request.verification import VerificationService
from .runtime import LoadedModel, ensure_tolerance

log = get_logger("p2pinfer.peer")

DEFAULT_SLOTS = 2


class ServingPeer:
    def __init__(self, identity: Identity, config: NodeConfig, models: Sequence[LoadedModel], *,
                 slots: int = DEFAULT_SLOTS, measure_speed: bool = True, gateway: tuple[str, int] | None = None,
                 gateway_key: str | None = None, control_socket: Path | None = None,
                 ledger: Ledger | str | Path | None = None) -> None:
        self.identity = identity
        self.config = config
        self.models = list(models)
        self.slots = slots
        self.measure_speed = measure_speed
        self.gateway_bind = gateway
        self.gateway_key = gateway_key
        self.control_socket = control_socket
        self.node: Node | None = None
        self.server: TaskServer | None = None
        self.gateway: Any = None  # p2pinfer.gateway.Gateway, when gateway or control socket is on
        self.gateway_url: str | None = None
        self.verification: VerificationService | None = None
        self.ledger = ledger if isinstance(ledger, Ledger) else Ledger(ledger)
        self._owns_ledger = not isinstance(ledger, Ledger)
        self._stack: AsyncExitStack | None = None
        self._nursery: trio.Nursery | None = None

    @property
    def peer_id(self) -> str:
        return self.identity.peer_id

    async def __aenter__(self) -> "ServingPeer":
        for model in self.models:  # nothing is announced, bid for or verified before its tolerance is measured
            if model.tolerance is None:
                log.info("peer.model_calibrating", model=model.name, digest=model.digest.hex()[:16])
                tolerance = await trio.to_thread.run_sync(ensure_tolerance, model)
                log.info("peer.model_calibrated", model=model.name, digest=model.digest.hex()[:16],
                         tolerance=f"{tolerance:.3g}")
        speeds: dict[bytes, float] = {}
        if self.measure_speed:
            for model in self.models:
                speeds[model.digest] = await trio.to_thread.run_sync(measure_decode_speed, model)
                log.info("peer.model_ready", model=model.name, digest=model.digest.hex()[:16],
                         decode_tokens_per_s=round(speeds[model.digest], 1))
        stack = AsyncExitStack()
        await stack.__aenter__()
        try:
            if self._owns_ledger:
                stack.callback(self.ledger.close)  # closed last, after the node
            self.node = await stack.enter_async_context(Node(self.identity, self.config))
            self.server = TaskServer(self.node, self.identity, self.models, slots=self.slots, decode_speeds=speeds)
            self.server.install()
            install_possession(self.node, self.identity, self.models)  # answer challenges, check with our models
            self._nursery = await stack.enter_async_context(trio.open_nursery())
            self.verification = VerificationService(self.node, self.identity, self.models, self.ledger,
                                                    slots=self.slots, participation=self.server.participation)
            await self.verification.start(self._nursery)
            TokenizerService(self.node, self.identity, self.models).install()  # clients decode text themselves
            if self.gateway_bind is not None or self.control_socket is not None:
                await self._start_http(self._nursery)
        except BaseException:
            self.node = None
            if self._nursery is not None:
                self._nursery.cancel_scope.cancel()
                self._nursery = None
            await stack.__aexit__(None, None, None)
            raise
        self._stack = stack
        return self

    async def _start_http(self, nursery: trio.Nursery) -> None:
        from .control import serve_control_socket
        from .gateway import Gateway, is_loopback, serve_tcp

        assert self.node is not None
        self.gateway = Gateway(self.node, self.identity, peer=self)
        if self.gateway_bind is not None:
            host, port = self.gateway_bind
            self.gateway_url = await nursery.start(serve_tcp, self.gateway.asgi(api_key=self.gateway_key), host, port)
            self.gateway.urls["gateway"] = f"{self.gateway_url}/v1"
            self.gateway.urls["page"] = f"{self.gateway_url}/"
            log.info("gateway.started", url=f"{self.gateway_url}/v1", page=f"{self.gateway_url}/",
                     auth=self.gateway_key is not None)
            if not is_loopback(host):
                log.warning("gateway.public", host=host, auth=self.gateway_key is not None,
                            hint="anyone who can reach this address can use the gateway"
                                 + ("" if self.gateway_key else "; set --gateway-key"))
        if self.control_socket is not None:
            await serve_control_socket(nursery, self.gateway.asgi(api_key=None), self.control_socket,
                                       self.gateway.urls, who="peer", log=log)

    async def __aexit__(self, *exc_info: Any) -> bool:
        stack, self._stack = self._stack, None
        self.node = None
        if stack is None:
            return False
        if self._nursery is not None:  # stop verification and the HTTP servers first; the stack closes the node
            self._nursery.cancel_scope.cancel()
            self._nursery = None
        return bool(await stack.__aexit__(*exc_info))

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until cancelled (``await nursery.start(peer.run)`` returns once it is serving)."""
        async with self:
            task_status.started(self)
            await trio.sleep_forever()

