"""A bootstrap node with what a volunteer operator wants to look at: its control socket and, optionally, the
network page.

``async with BootstrapNode(identity, config, control_socket=..., page=("127.0.0.1", 8081)) as boot:`` runs
the libp2p node (DHT server and gossip relay, no models) plus ``DATA_DIR/control.sock`` (so ``p2pinfer
status`` works on a bootstrap node too) and, with ``page``, the network page at ``/`` of that address. The
page's endpoint serves no OpenAI routes: a public bootstrap node must not spend the network's capacity for
whoever reaches its page.
"""

from __future__ import annotations

from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import trio

from .identity import Identity
from .log import get_logger
from .net import Node, NodeConfig

log = get_logger("p2pinfer.bootstrap")


class BootstrapNode:
    def __init__(self, identity: Identity, config: NodeConfig, *, control_socket: Path | None = None,
                 page: tuple[str, int] | None = None, page_key: str | None = None) -> None:
        self.identity = identity
        self.config = config
        self.control_socket = control_socket
        self.page_bind = page
        self.page_key = page_key
        self.node: Node | None = None
        self.page_url: str | None = None
        self._stack: AsyncExitStack | None = None

    async def __aenter__(self) -> "BootstrapNode":
        stack = AsyncExitStack()
        await stack.__aenter__()
        try:
            self.node = await stack.enter_async_context(Node(self.identity, self.config))
            if self.control_socket is not None or self.page_bind is not None:
                nursery = await stack.enter_async_context(trio.open_nursery())
                stack.callback(nursery.cancel_scope.cancel)  # runs first on exit: stop serving, then the node
                await self._serve(nursery)
        except BaseException:
            await stack.__aexit__(None, None, None)
            raise
        self._stack = stack
        return self

    async def _serve(self, nursery: trio.Nursery) -> None:
        from .control import serve_control_socket
        from .gateway import Gateway, is_loopback, serve_tcp

        assert self.node is not None
        views = Gateway(self.node, self.identity)
        if self.page_bind is not None:
            host, port = self.page_bind
            self.page_url = await nursery.start(serve_tcp, views.asgi(api_key=self.page_key, page_only=True),
                                                host, port)
            views.urls["page"] = f"{self.page_url}/"
            log.info("page.started", url=f"{self.page_url}/", auth=self.page_key is not None)
            if not is_loopback(host) and self.page_key is None:
                log.warning("page.public", host=host, hint="anyone who can reach this address sees this node's "
                                                           "view of the network; set --page-key to restrict it")
        if self.control_socket is not None:
            await serve_control_socket(nursery, views.asgi(api_key=None, page_only=True), self.control_socket,
                                       views.urls, who="node", log=log)

    async def __aexit__(self, *exc_info: Any) -> bool:
        stack, self._stack = self._stack, None
        self.node = None
        if stack is None:
            return False
        return bool(await stack.__aexit__(*exc_info))
