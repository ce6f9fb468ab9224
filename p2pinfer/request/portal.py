"""Run trio code from synchronous programs (and from asyncio apps) on a private trio thread.

The synchronous :class:`~p2pinfer.Client` owns one :class:`TrioPortal`: a thread running ``trio.run`` for the
client's whole life. Calls cross over with ``trio.from_thread``; streams cross over one item at a time, so
a caller that stops iterating early cancels the producer cleanly.
"""

from __future__ import annotations

import threading
from contextlib import AbstractAsyncContextManager, aclosing
from typing import Any, AsyncIterator, Awaitable, Callable, Iterator, TypeVar

import trio

T = TypeVar("T")

_DONE = object()


class TrioPortal:
    """Enter an async context manager on a dedicated trio thread and call into it from any thread."""

    def __init__(self, make_context: Callable[[], AbstractAsyncContextManager[Any]], *, name: str = "p2pinfer-trio"):
        self._make_context = make_context
        self._name = name
        self._thread: threading.Thread | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._ready = threading.Event()
        self._startup_error: BaseException | None = None
        self._stop: trio.Event | None = None
        self.value: Any = None

    def start(self) -> Any:
        """Start the thread and enter the context; returns the context's value (re-raises its errors)."""
        self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._startup_error is not None:
            self._thread.join()
            raise self._startup_error
        return self.value

    def _run(self) -> None:
        try:
            trio.run(self._main)
        except BaseException as exc:  # noqa: BLE001 - handed to the starting thread
            if not self._ready.is_set():
                self._startup_error = exc
                self._ready.set()

    async def _main(self) -> None:
        self._token = trio.lowlevel.current_trio_token()
        self._stop = trio.Event()
        async with self._make_context() as value:
            self.value = value
            self._ready.set()
            await self._stop.wait()

    def close(self) -> None:
        """Leave the context and stop the thread (idempotent)."""
        if self._thread is None or self._token is None or not self._thread.is_alive():
            return
        try:
            trio.from_thread.run_sync(self._stop.set, trio_token=self._token)  # type: ignore[union-attr]
        except trio.RunFinishedError:
            pass
        self._thread.join()

    def call(self, async_fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        """Run ``async_fn(*args)`` on the trio thread and return its result (or raise its exception)."""
        if self._token is None:
            raise RuntimeError("the client is not started; use it in a `with` block")
        return trio.from_thread.run(async_fn, *args, trio_token=self._token)

    def iterate(self, make_iterator: Callable[[], AsyncIterator[T]]) -> Iterator[T]:
        """Iterate, from this thread, over an async iterator living on the trio thread."""
        if self._token is None:
            raise RuntimeError("the client is not started; use it in a `with` block")
        send, receive = trio.open_memory_channel[Any](0)
        cancel_scope_box: list[trio.CancelScope] = []
        started = threading.Event()
        finished = trio.Event()

        async def produce() -> None:
            try:
                await _produce()
            finally:
                finished.set()

        async def _produce() -> None:
            with trio.CancelScope() as scope:
                cancel_scope_box.append(scope)
                started.set()
                async with send, aclosing(make_iterator()) as items:  # type: ignore[type-var]
                    try:
                        async for item in items:
                            await send.send((True, item))
                    except Exception as exc:  # delivered to the consumer, re-raised there
                        await send.send((False, exc))

        async def spawn() -> None:
            self._nursery_spawn(produce)

        trio.from_thread.run(spawn, trio_token=self._token)
        started.wait()
        try:
            while True:
                try:
                    ok, item = trio.from_thread.run(receive.receive, trio_token=self._token)
                except trio.EndOfChannel:
                    return
                if not ok:
                    raise item
                yield item
        finally:
            if cancel_scope_box:
                # Stop the producer and wait until it has cleaned up, so nothing outlives the iteration.
                trio.from_thread.run_sync(cancel_scope_box[0].cancel, trio_token=self._token)
                trio.from_thread.run(finished.wait, trio_token=self._token)

    def _nursery_spawn(self, fn: Callable[[], Awaitable[None]]) -> None:
        nursery = getattr(self.value, "nursery", None)
        if nursery is None:
            raise RuntimeError("the portal's context value must expose a `nursery` to run streams in")
        nursery.start_soon(fn)
