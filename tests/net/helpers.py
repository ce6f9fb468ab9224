"""Helpers for network tests: real nodes on 127.0.0.1 with ephemeral ports, bounded polling."""

from __future__ import annotations

from contextlib import AsyncExitStack
from typing import Callable

import trio

from p2pinfer.identity import Identity
from p2pinfer.net import Node, NodeConfig
from p2pinfer.wire import ModelOffer

LOCAL = ("/ip4/127.0.0.1/tcp/0",)


def config(**kwargs: object) -> NodeConfig:
    kwargs.setdefault("listen", LOCAL)
    kwargs.setdefault("dht_refresh_interval_s", 5.0)
    return NodeConfig(**kwargs)  # type: ignore[arg-type]


async def start(stack: AsyncExitStack, identity: Identity | None = None, **kwargs: object) -> Node:
    return await stack.enter_async_context(Node(identity or Identity.generate(), config(**kwargs)))


async def wait_until(predicate: Callable[[], bool], timeout: float = 60.0, what: str = "condition") -> None:
    """Poll ``predicate`` every 20 ms; fail the test with ``what`` if it is not true within ``timeout``.

    The default is far above any honest delay: it only bounds how long a broken test hangs, so a loaded
    machine makes a test slower, never failing it."""
    with trio.move_on_after(timeout):
        while not predicate():
            await trio.sleep(0.02)
        return
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def offer(digest: bytes, name: str = "test-model") -> ModelOffer:
    return ModelOffer(digest=digest, name=name, numeric_class="fp32-cpu", context_length=2048,
                      max_new_tokens=256, decode_tokens_per_s=12.5)
