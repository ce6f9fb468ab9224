"""The synchronous client: the same API as :class:`AsyncClient`, usable from any program.

It runs an :class:`AsyncClient` on a private trio thread, so it also works inside asyncio applications (it
never touches the caller's event loop) and from several threads at once.
"""

from __future__ import annotations

from typing import Any, Iterable, Iterator, Mapping, Sequence

from ..identity import Identity
from .client import AsyncClient, Completion, StreamChunk
from .portal import TrioPortal


class Client:
    """``with Client(bootstrap=[...]) as client: client.generate(model=..., prompt=...)``."""

    def __init__(self, bootstrap: Sequence[str] = (), *, identity: Identity | None = None, **options: Any) -> None:
        self._async = AsyncClient(bootstrap, identity=identity, **options)
        self._portal = TrioPortal(lambda: self._async, name="p2pinfer-client")
        self._started = False

    def __enter__(self) -> "Client":
        self._portal.start()
        self._started = True
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def close(self) -> None:
        if self._started:
            self._started = False
            self._portal.close()

    @property
    def peer_id(self) -> str:
        return self._async.identity.peer_id

    def generate(self, *, model: str, prompt: str | None = None,
                 messages: Iterable[Mapping[str, Any]] | None = None, **params: Any) -> Completion:
        async def run() -> Completion:
            return await self._async.generate(model=model, prompt=prompt, messages=messages, **params)

        return self._portal.call(run)

    def stream(self, *, model: str, prompt: str | None = None,
               messages: Iterable[Mapping[str, Any]] | None = None, **params: Any) -> Iterator[StreamChunk]:
        return self._portal.iterate(
            lambda: self._async.stream(model=model, prompt=prompt, messages=messages, **params))

    def stream_with_result(self, *, model: str, prompt: str | None = None,
                           messages: Iterable[Mapping[str, Any]] | None = None,
                           **params: Any) -> Iterator[StreamChunk | Completion]:
        return self._portal.iterate(
            lambda: self._async.stream_with_result(model=model, prompt=prompt, messages=messages, **params))

    def models(self) -> dict[str, bytes]:
        return self._portal.call(self._async.models)
