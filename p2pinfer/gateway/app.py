"""The gateway's ASGI application: OpenAI's HTTP API on top of a peer's own node.

Routes: ``GET /v1/models``, ``POST /v1/chat/completions``, ``POST /v1/completions`` (both with ``stream``),
``GET /metrics`` (Prometheus), ``GET /v1/p2pinfer/status`` (JSON for ``p2pinfer status``), ``GET /health``.

Requests go to the network through an :class:`~p2pinfer.request.client.AsyncClient` running on the peer's
node (no second libp2p host), signed with the peer's key. Every response names the executor and the
verification outcome: headers ``x-p2pinfer-executor``, ``x-p2pinfer-request-id`` and
``x-p2pinfer-verification`` (non-streamed responses), and a ``p2pinfer`` object in the body (in a stream: on
the chunk with ``finish_reason``). OpenAI clients ignore both.

A streamed response starts (status 200) only when the first token arrives, so a request that fails before
that still gets a proper error status; a failure after it is sent as an ``{"error": ...}`` event, which the
OpenAI SDK raises as an ``APIError``. A client that disconnects cancels its request in the network.
"""

from __future__ import annotations

import hmac
import json
import time
import uuid
from typing import Any, Awaitable, Callable

import trio

from ..identity import Identity
from ..log import get_logger
from ..metrics import CONTENT_TYPE, PeerMetrics, RequestRecord, describe_verification
from ..net import Node
from ..request.client import AsyncClient, Completion, StreamChunk
from ..request.errors import (
    AllCandidatesFailed,
    BadParameters,
    NoBidsInTime,
    NoPeerServesModel,
    NotConnected,
    PromptTooLarge,
    RequestError,
)
from ..status import status_snapshot
from ..wire import now_ms
from . import openai_api as api
from .input import MAX_BODY, body_too_large, check_text_size, parse_json_body
from .openai_api import ApiError, GenerationSpec

log = get_logger("p2pinfer.gateway")

MODEL_LOOKUP_TIMEOUT_S = 3.0  # how long an unknown model name may take to appear in gossip before a 404

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


def _error_for(exc: RequestError) -> ApiError:
    if isinstance(exc, PromptTooLarge):
        return ApiError(413, str(exc), code="prompt_too_large")
    if isinstance(exc, BadParameters):
        return api.bad_request(str(exc))
    if isinstance(exc, NoPeerServesModel):
        return ApiError(503, f"{exc}; try again shortly", type="server_error", code="no_capacity")
    if isinstance(exc, NoBidsInTime):
        return ApiError(503, f"{exc}; try again shortly", type="server_error", code="no_capacity")
    if isinstance(exc, AllCandidatesFailed):
        return ApiError(503, f"{exc}; try again", type="server_error", code="all_candidates_failed")
    if isinstance(exc, NotConnected):
        return ApiError(503, str(exc), type="server_error", code="not_connected")
    return ApiError(500, str(exc), type="server_error", code="request_failed")


class Gateway:
    """The OpenAI-compatible API of one peer. :meth:`asgi` gives the ASGI app for one listener."""

    def __init__(self, node: Node, identity: Identity | None = None, *, metrics: PeerMetrics | None = None,
                 peer: Any = None, client_options: dict[str, Any] | None = None) -> None:
        self.node = node
        self.peer = peer  # the ServingPeer, for the status page (optional)
        self.metrics = metrics or PeerMetrics(node, getattr(peer, "server", None))
        options = {"discovery_timeout": MODEL_LOOKUP_TIMEOUT_S, **(client_options or {})}
        if getattr(peer, "ledger", None) is not None:
            # The peer's own ledger: what its gateway's requests teach it (penalties, exclusions) persists and
            # shows in `p2pinfer status`.
            options.setdefault("ledger", peer.ledger)
        self.client = AsyncClient.on_node(node, identity, **options)
        self.urls: dict[str, str] = {}  # listener name -> URL, filled in by whoever serves us

    def asgi(self, *, api_key: str | None = None) -> "GatewayApp":
        return GatewayApp(self, api_key=api_key)

    def status(self) -> dict[str, Any]:
        return status_snapshot(self.node, server=getattr(self.peer, "server", None), metrics=self.metrics,
                               urls=self.urls, ledger=getattr(self.peer, "ledger", None))

    # ---- generation ---------------------------------------------------------------------------------

    async def resolve(self, spec: GenerationSpec) -> bytes:
        try:
            return await self.client.resolve_model(spec.model)
        except NoPeerServesModel as exc:
            raise ApiError(404, f"The model '{spec.model}' does not exist in the network: {exc}. "
                                "GET /v1/models lists the models on offer.",
                           param="model", code="model_not_found") from None
        except BadParameters as exc:
            raise api.bad_request(str(exc), "model") from None


class GatewayApp:
    def __init__(self, gateway: Gateway, *, api_key: str | None) -> None:
        self.gateway = gateway
        self.api_key = api_key

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        try:
            await self._route(scope, receive, send)
        except ApiError as exc:
            await _send_json(send, exc.status, exc.body())
        except Exception as exc:  # never let one request take the server down; never show Python's text
            log.error("gateway.internal_error", path=scope.get("path"), error=repr(exc)[:300])
            await _send_json(send, 500, ApiError(500, "internal error in the gateway (logged on the peer as "
                                                      "gateway.internal_error); try again", type="server_error",
                                                 code="internal_error").body())

    async def _route(self, scope: Scope, receive: Receive, send: Send) -> None:
        method, path = scope["method"], scope["path"].rstrip("/") or "/"
        if path == "/health":
            await _send_json(send, 200, {"status": "ok", "peer_id": self.gateway.node.peer_id})
            return
        self._authorize(scope)
        routes: dict[str, tuple[str, Callable[..., Awaitable[None]]]] = {
            "/v1/models": ("GET", self._models),
            "/v1/chat/completions": ("POST", self._chat),
            "/v1/completions": ("POST", self._completions),
            "/metrics": ("GET", self._prometheus),
            "/v1/p2pinfer/status": ("GET", self._status),
        }
        if path not in routes:
            raise ApiError(404, f"Unknown request URL: {method} {path[:200]}. The gateway serves /v1/models, "
                                "/v1/chat/completions, /v1/completions, /metrics and /v1/p2pinfer/status.",
                           code="unknown_url")
        wanted, handler = routes[path]
        if method != wanted:
            raise ApiError(405, f"{path} takes {wanted}, not {method}", code="method_not_allowed")
        await handler(scope, receive, send)

    def _authorize(self, scope: Scope) -> None:
        if self.api_key is None:
            return
        headers = dict(scope["headers"])
        given = headers.get(b"authorization", b"").decode("latin-1")
        token = given[7:] if given[:7].lower() == "bearer " else ""
        if not hmac.compare_digest(token.encode(), self.api_key.encode()):
            raise ApiError(401, "Incorrect API key provided: pass the gateway key as the bearer token "
                                "(OpenAI(api_key=KEY)); the peer's operator set it with --gateway-key.",
                           code="invalid_api_key")

    # ---- simple routes -----------------------------------------------------------------------------

    async def _models(self, scope: Scope, receive: Receive, send: Send) -> None:
        models = await self.gateway.client.models()
        await _send_json(send, 200, api.model_list(models, int(self.gateway.metrics.started_at)))

    async def _prometheus(self, scope: Scope, receive: Receive, send: Send) -> None:
        await _send(send, 200, self.gateway.metrics.exposition(), CONTENT_TYPE)

    async def _status(self, scope: Scope, receive: Receive, send: Send) -> None:
        await _send_json(send, 200, self.gateway.status())

    # ---- generation -------------------------------------------------------------------------------

    async def _chat(self, scope: Scope, receive: Receive, send: Send) -> None:
        spec = api.parse_chat_request(parse_json_body(await _read_body(receive)))
        check_text_size(spec)
        await self._generate(spec, receive, send)

    async def _completions(self, scope: Scope, receive: Receive, send: Send) -> None:
        spec = api.parse_completion_request(parse_json_body(await _read_body(receive)))
        check_text_size(spec)
        await self._generate(spec, receive, send)

    async def _generate(self, spec: GenerationSpec, receive: Receive, send: Send) -> None:
        started, started_ms = time.perf_counter(), now_ms()
        id = f"{'chatcmpl' if spec.endpoint == 'chat' else 'cmpl'}-{uuid.uuid4().hex}"
        run = _Run(self.gateway, spec, id, send)
        outcome = "cancelled"
        error: ApiError | None = None
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_cancel_on_disconnect, receive, nursery.cancel_scope, run)
                try:
                    digest = await self.gateway.resolve(spec)
                    await run.execute(digest, started)
                except RequestError as exc:
                    error = _error_for(exc)
                except ApiError as exc:
                    error = exc
                finally:
                    nursery.cancel_scope.cancel()
            if error is not None:
                outcome = error.code or str(error.status)
                log.info("gateway.request_failed", id=id, status=error.status, code=error.code,
                         error=error.message[:300])
                if not run.started:
                    raise error
                await run.send_stream_error(error)
        finally:
            if run.finished:
                outcome = "ok"
            completion = run.completion
            self.gateway.metrics.record(RequestRecord(
                id=id, endpoint=spec.endpoint, model=spec.model, stream=spec.stream, outcome=outcome,
                executor=completion.executor if completion else (run.executor or ""), tokens=run.tokens,
                verification=describe_verification(completion.verification) if completion else "",
                started_at_ms=started_ms, duration_s=round(time.perf_counter() - started, 4)))


class _Run:
    """One generation request in flight: turns the client's stream into OpenAI responses."""

    def __init__(self, gateway: Gateway, spec: GenerationSpec, id: str, send: Send) -> None:
        self.gateway = gateway
        self.spec = spec
        self.id = id
        self.send = send
        self.created = int(time.time())
        self.started = False  # a streamed response's headers went out
        self.finished = False  # the response is complete (a disconnect now is the client's normal hang-up)
        self.executor: str | None = None
        self.tokens = 0
        self.completion: Completion | None = None

    async def execute(self, digest: bytes, started: float) -> None:
        metrics = self.gateway.metrics
        last: float | None = None
        async for item in self.gateway.client.stream_with_result(model=digest.hex(), **self.spec.params):
            if isinstance(item, Completion):
                self.completion = item
                continue
            now = time.perf_counter()
            count = len(item.token_ids)
            if last is None:
                metrics.time_to_first_token.observe(now - started)
            elif count:
                gap = (now - last) / count
                for _ in range(count):
                    metrics.token_latency.observe(gap)
            last = now
            self.tokens += count
            metrics.tokens.inc(count)
            self.executor = item.executor
            if self.spec.stream:
                await self._stream_chunk(item)
        assert self.completion is not None
        await self._finish(self.completion)

    def _extra(self, completion: Completion) -> dict[str, Any]:
        return {
            "executor": completion.executor,
            "request_id": completion.request_id.hex(),
            "model_digest": completion.model.hex(),
            "verification": describe_verification(completion.verification),
            "attempts": [{"peer_id": a.peer_id, "outcome": a.outcome, "tokens": a.tokens}
                         for a in completion.attempts],
            "election": {"bidders": len(completion.election.ranking), "ranking": list(completion.election.ranking)},
        }

    async def _start_stream(self, executor: str) -> None:
        self.started = True
        await self.send({"type": "http.response.start", "status": 200, "headers": [
            (b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache"),
            (b"x-p2pinfer-executor", executor.encode()), (b"x-accel-buffering", b"no")]})
        if self.spec.endpoint == "chat":
            await self._event(api.chunk_object(self.spec, self.id, self.created, text="", role=True))

    async def _stream_chunk(self, chunk: StreamChunk) -> None:
        if not self.started:
            await self._start_stream(chunk.executor)
        if chunk.text:
            await self._event(api.chunk_object(self.spec, self.id, self.created, text=chunk.text))

    async def _finish(self, completion: Completion) -> None:
        self.finished = True
        finish = api.finish_reason(completion.finish_reason)
        usage = api.usage(len(completion.result.message.prompt_ids), len(completion.token_ids))
        extra = self._extra(completion)
        if not self.spec.stream:
            body = api.completion_object(self.spec, self.id, self.created, completion.text, finish, usage, extra)
            await _send_json(self.send, 200, body, headers=[
                (b"x-p2pinfer-executor", completion.executor.encode()),
                (b"x-p2pinfer-request-id", completion.request_id.hex().encode()),
                (b"x-p2pinfer-verification", extra["verification"].encode())])
            return
        if not self.started:  # no token at all (e.g. an immediate end of sequence)
            await self._start_stream(completion.executor)
        await self._event(api.chunk_object(self.spec, self.id, self.created, finish=finish, extra=extra,
                                           text=None if self.spec.endpoint == "chat" else ""))
        if self.spec.include_usage:
            await self._event(api.chunk_object(self.spec, self.id, self.created, usage_=usage))
        await self.send({"type": "http.response.body", "body": api.SSE_DONE, "more_body": False})

    async def send_stream_error(self, exc: ApiError) -> None:
        await self._event(exc.body())
        await self.send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _event(self, obj: dict[str, Any]) -> None:
        await self.send({"type": "http.response.body", "body": api.sse(obj), "more_body": True})


async def _cancel_on_disconnect(receive: Receive, scope: trio.CancelScope, run: _Run) -> None:
    """A client that hangs up before its response is complete cancels the request in the network."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            if not run.finished:
                log.info("gateway.client_disconnected", id=run.id, tokens=run.tokens)
                scope.cancel()
            return


async def _read_body(receive: Receive) -> bytes:
    parts, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ApiError(400, "the client went away before sending the whole body", code="disconnected")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > MAX_BODY:
            raise body_too_large()
        parts.append(chunk)
        if not message.get("more_body"):
            return b"".join(parts)


async def _send(send: Send, status: int, body: bytes, content_type: str,
                headers: list[tuple[bytes, bytes]] | None = None) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", content_type.encode()), (b"content-length", str(len(body)).encode()),
                            *(headers or [])]})
    await send({"type": "http.response.body", "body": body, "more_body": False})


async def _send_json(send: Send, status: int, obj: Any, headers: list[tuple[bytes, bytes]] | None = None) -> None:
    await _send(send, status, json.dumps(obj, ensure_ascii=False).encode("utf-8", "replace"), "application/json",
                headers)


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return
