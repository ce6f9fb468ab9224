"""Helpers for network tests: real nodes on 127.0.0.1 with ephemeral ports, bounded polling."""

from __future__ import annotations

from contextlib import AsyncExitStack
from typing import Callable, Hashable

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


async def wait_while_progressing(state: Callable[[], Hashable], done: Callable[[], bool], *, stall_s: float = 240.0,
                                 limit_s: float = 900.0, what: str = "condition") -> None:
    """Wait until ``done()``; fail only when ``state()`` (a measure of progress, e.g. announcements learned)
    has not changed for ``stall_s``.

    Many nodes in one process on a loaded machine make progress slowly, but they make it: a fixed limit over
    the whole wait is a deadline the machine can miss, while a network that stopped making progress is stuck
    whatever the load. ``limit_s`` only bounds how long a test whose state keeps changing can hang."""
    last, since = state(), trio.current_time()
    started = since
    while not done():
        if trio.current_time() - started > limit_s:
            raise AssertionError(f"not done after {limit_s} s waiting for {what}")
        now_state = state()
        if now_state != last:
            last, since = now_state, trio.current_time()
        elif trio.current_time() - since > stall_s:
            raise AssertionError(f"no progress for {stall_s} s waiting for {what}")
        await trio.sleep(0.05)
