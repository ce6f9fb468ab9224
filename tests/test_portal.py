"""The trio portal behind the synchronous Client: calls, streams, errors, early exit, asyncio callers."""

from __future__ import annotations

import asyncio
import threading

import pytest
import trio

from p2pinfer.request.portal import TrioPortal


class Service:
    def __init__(self):
        self.entered = self.exited = False
        self.cancelled_streams = 0
        self.nursery = None
        self.thread = None

    async def __aenter__(self):
        self.entered = True
        self.thread = threading.current_thread()
        self._cm = trio.open_nursery()
        self.nursery = await self._cm.__aenter__()
        return self

    async def __aexit__(self, *exc):
        self.nursery.cancel_scope.cancel()
        await self._cm.__aexit__(None, None, None)
        self.exited = True

    async def add(self, a, b):
        await trio.sleep(0.01)
        return a + b

    async def fail(self):
        raise ValueError("bad thing")

    async def count(self, n):
        completed = False
        try:
            for i in range(n):
                await trio.sleep(0)
                yield i
            completed = True
        finally:
            if not completed:
                self.cancelled_streams += 1


def test_call_stream_and_close():
    service = Service()
    portal = TrioPortal(lambda: service)
    assert portal.start() is service
    assert service.thread is not threading.current_thread()
    assert portal.call(service.add, 2, 3) == 5
    assert list(portal.iterate(lambda: service.count(5))) == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="bad thing"):
        portal.call(service.fail)
    portal.close()
    assert service.exited
    portal.close()  # idempotent


def test_stopping_a_stream_early_cancels_the_producer():
    service = Service()
    portal = TrioPortal(lambda: service)
    portal.start()
    try:
        for item in portal.iterate(lambda: service.count(1000)):
            if item == 3:
                break
        assert portal.call(service.add, 1, 1) == 2  # still usable
        assert service.cancelled_streams == 1
    finally:
        portal.close()


def test_startup_error_is_raised_in_the_caller():
    class Broken:
        async def __aenter__(self):
            raise RuntimeError("cannot start")

        async def __aexit__(self, *exc):
            return False

    with pytest.raises(RuntimeError, match="cannot start"):
        TrioPortal(Broken).start()


def test_usable_from_inside_asyncio():
    service = Service()
    portal = TrioPortal(lambda: service)
    portal.start()

    async def main():
        # Blocking calls from a coroutine are the caller's business; they must not need its loop.
        return portal.call(service.add, 20, 22)

    try:
        assert asyncio.run(main()) == 42
    finally:
        portal.close()
