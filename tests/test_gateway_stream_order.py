"""Choices (n > 1) stream from their own tasks into one HTTP response, served by the real hypercorn server.

The response start went out from one choice's task while another's first chunk was already being sent:
hypercorn takes the start as sent only once its socket write completes, so the chunk arrived "in state
REQUEST" and was refused (``UnexpectedMessageError``), cutting the response short. Seen once under heavy load
in ``tests/test_gateway_parity.py`` (``n=2`` streamed); here two choices start at the very same moment."""

from __future__ import annotations

import json
from typing import Any

import httpx
import trio

from p2pinfer.gateway.app import _lifespan, _Output
from p2pinfer.gateway.http import serve_tcp

CHOICES = 4


async def streamed_by_concurrent_choices(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        await _lifespan(receive, send)
        return
    out = _Output(None, None, "cmpl-test", send)  # type: ignore[arg-type]  # (gateway, spec): unused here

    async def choice(index: int) -> None:
        await out.start_stream("executor")
        for part in range(3):
            await out.event({"index": index, "part": part})

    async with trio.open_nursery() as nursery:
        for index in range(CHOICES):
            nursery.start_soon(choice, index)
    await out.send({"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": False})


async def test_concurrent_choices_stream_one_whole_response() -> None:
    async with trio.open_nursery() as nursery:
        url = await nursery.start(serve_tcp, streamed_by_concurrent_choices, "127.0.0.1", 0)
        for _ in range(3):
            response = await trio.to_thread.run_sync(lambda: httpx.get(url, timeout=120))
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            events = [line.removeprefix("data: ") for line in response.text.split("\n\n") if line]
            assert events[-1] == "[DONE]"
            got = sorted((e["index"], e["part"]) for e in map(json.loads, events[:-1]))
            assert got == [(i, p) for i in range(CHOICES) for p in range(3)]
        nursery.cancel_scope.cancel()
