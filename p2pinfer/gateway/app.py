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
from collections import deque
from typing import Any, Awaitable, Callable

import trio

from .. import __version__
from ..identity import Identity
from ..log import get_logger
from ..metrics import CONTENT_TYPE, PeerMetrics, RequestRecord, describe_verification
from ..net import Node
from ..request.client import AsyncClient, Completion, StreamChunk
from ..runtime.fingerprint import unpack as unpack_fingerprint
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
from . import network_view as view
from . import openai_api as api
from . import openai_extras as extras
from .input import MAX_BODY, body_too_large, check_text_size, parse_json_body
from .openai_api import ApiError, GenerationSpec
from .page import PAGE_HTML

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
        self.requests: deque[view.GatewayRequest] = deque(maxlen=view.RECENT_REQUESTS)  # for the network page
        self._token_texts: dict[bytes, _TokenText] = {}
        self._checked = view.ElectionCache()  # re-checked elections: a VRF proof costs ~2 ms to verify

    def asgi(self, *, api_key: str | None = None, page_only: bool = False) -> "GatewayApp":
        """The ASGI app; ``page_only`` serves the network page, status and metrics but no generation (for a
        bootstrap node, which should not spend the network's capacity for whoever reaches its page)."""
        return GatewayApp(self, api_key=api_key, page_only=page_only)

    def status(self) -> dict[str, Any]:
        return status_snapshot(self.node, server=getattr(self.peer, "server", None), metrics=self.metrics,
                               urls=self.urls, ledger=getattr(self.peer, "ledger", None))

    def tokens_of(self, digest: bytes) -> "_TokenText | None":
        """The tokenizer of model ``digest`` if this peer serves it (log-probs and usage need it)."""
        for model in getattr(self.peer, "models", None) or ():
            if model.digest == digest:
                if digest not in self._token_texts:
                    self._token_texts[digest] = _TokenText(model)
                return self._token_texts[digest]
        return None

    def remember(self, completion: Completion, model: str) -> None:
        """Keep what the network page shows about one of our completions (election evidence, verdicts)."""
        v = completion.verification
        self.requests.append(view.GatewayRequest(
            request_id=completion.request_id, model=model, at_ms=now_ms(), executor=completion.executor,
            tokens=len(completion.token_ids), epoch_seed=completion.election.epoch_seed,
            bids=tuple(completion.election.bids), outcome=describe_verification(v),
            verifiers=tuple(v.verifiers) if v else (), verdicts=tuple(v.verdicts) if v else (),
            refusals=tuple(v.refusals) if v else ()))

    async def network(self) -> dict[str, Any]:
        """The network page's JSON (see :mod:`p2pinfer.gateway.network_view`)."""
        node, server = self.node, getattr(self.peer, "server", None)
        ledger = getattr(self.peer, "ledger", None)
        me = node.peer_id
        # The node's tables are read here, on the event loop; the rest (SQLite reads, re-checking VRF proofs)
        # runs in a worker thread on these copies.
        peers = view.peers_view(node, server)
        names = view.model_names(node, server)
        elections = dict(server.recent_elections) if server is not None else {}
        own = list(self.requests)
        failed = [r for r in list(self.metrics.recent) if r.outcome != "ok"]
        about = {"peer_id": me, "role": node.config.role, "version": __version__, "addrs": list(node.addrs),
                 "urls": dict(self.urls), "uptime_s": round(time.time() - self.metrics.started_at, 1),
                 "connected_peers": len(node.connected_peers())}
        others = [p["peer_id"] for p in peers if not p["you"]]

        def build() -> dict[str, Any]:
            ledger_json, receipts, standing = None, [], {}
            if ledger is not None:
                ledger_json = view.ledger_view(ledger, node.identity.public_key)
                receipts = view.receipts_view(ledger)
                standing = view.reputations(ledger, others)
            for p in peers:
                p["reputation"] = standing.get(p["peer_id"])
            requests = view.merge_requests(
                [view.request_from_gateway(r, me, self._checked) for r in own]
                + [view.request_from_failure(r, me) for r in failed],
                [view.request_from_receipt(r, me, names, elections, self._checked) for r in receipts],
                [view.request_from_election(e, me, names, self._checked) for e in elections.values()])
            return {"generated_at_ms": now_ms(), "peer": about, "peers": peers, "requests": requests,
                    "ledger": ledger_json}

        return await trio.to_thread.run_sync(build)

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
    def __init__(self, gateway: Gateway, *, api_key: str | None, page_only: bool = False) -> None:
        self.gateway = gateway
        self.api_key = api_key
        self.page_only = page_only

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        status: list[int] = []

        async def counted_send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status.append(message["status"])
            await send(message)

        try:
            await self._route(scope, receive, counted_send)
        except ApiError as exc:
            if not status:  # once a response has started, a second one is refused: the first is cut short
                await _send_json(counted_send, exc.status, exc.body())
        except Exception as exc:  # never let one request take the server down; never show Python's text
            log.error("gateway.internal_error", path=scope.get("path"), error=repr(exc)[:300])
            if not status:
                await _send_json(counted_send, 500, ApiError(
                    500, "internal error in the gateway (logged on the peer as gateway.internal_error); try again",
                    type="server_error", code="internal_error").body())
        finally:
            # Every answer is counted, errors included (a cancelled request that never answered is not one).
            if status:
                self.gateway.metrics.responses.labels(_route_label(scope.get("path", "")), str(status[0])).inc()

    async def _route(self, scope: Scope, receive: Receive, send: Send) -> None:
        method, path = scope["method"], scope["path"].rstrip("/") or "/"
        if path == "/health":
            await _send_json(send, 200, {"status": "ok", "peer_id": self.gateway.node.peer_id})
            return
        if path == "/" and method == "GET":  # the page holds no data; its script sends the key for the JSON
            await _send(send, 200, PAGE_HTML.encode(), "text/html; charset=utf-8",
                        headers=[(b"cache-control", b"no-cache"),
                                 (b"content-security-policy", b"default-src 'self'; script-src 'unsafe-inline'; "
                                                              b"style-src 'unsafe-inline'; img-src 'self' data:")])
            return
        self._authorize(scope)
        if path.startswith("/v1/models/") and not self.page_only:
            if method != "GET":
                raise ApiError(405, f"/v1/models/{{model}} takes GET, not {method}", code="method_not_allowed")
            await self._model(path.removeprefix("/v1/models/"), send)
            return
        routes: dict[str, tuple[str, Callable[..., Awaitable[None]]]] = {
            "/metrics": ("GET", self._prometheus),
            "/v1/p2pinfer/status": ("GET", self._status),
            view.NETWORK_PATH: ("GET", self._network),
        }
        if not self.page_only:
            routes.update({
                "/v1/models": ("GET", self._models),
                "/v1/chat/completions": ("POST", self._chat),
                "/v1/completions": ("POST", self._completions),
            })
        if path not in routes:
            raise ApiError(404, f"Unknown request URL: {method} {path[:200]}. This endpoint serves "
                                f"{', '.join(['/', *sorted(routes)])}.", code="unknown_url")
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

    async def _model(self, name: str, send: Send) -> None:
        """``GET /v1/models/{model}``: one model on offer, by name or digest (as ``model`` in a request)."""
        models = await self.gateway.client.models()
        for entry in api.model_list(models, int(self.gateway.metrics.started_at))["data"]:
            if name in (entry["id"], entry["digest"]):
                await _send_json(send, 200, entry)
                return
        known = ", ".join(sorted(models)) or "none yet"
        raise ApiError(404, f"The model '{name}' is not on offer in the network (models on offer: {known}); "
                            "GET /v1/models lists them.", param="model", code="model_not_found")

    async def _prometheus(self, scope: Scope, receive: Receive, send: Send) -> None:
        await _send(send, 200, self.gateway.metrics.exposition(), CONTENT_TYPE)

    async def _status(self, scope: Scope, receive: Receive, send: Send) -> None:
        await _send_json(send, 200, self.gateway.status())

    async def _network(self, scope: Scope, receive: Receive, send: Send) -> None:
        await _send_json(send, 200, await self.gateway.network())

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
        out = _Output(self.gateway, spec, id, send)
        runs = [_Run(self.gateway, spec, index, out) for index in range(spec.n)]
        outcome = "cancelled"
        error: ApiError | None = None
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_cancel_on_disconnect, receive, nursery.cancel_scope, out)
                try:
                    digest = await self.gateway.resolve(spec)
                    tokens = self.gateway.tokens_of(digest)
                    if spec.logprobs and tokens is None:
                        raise api.bad_request(
                            "log-probs need the model's tokenizer on this gateway's peer, which does not serve "
                            "this model: serve it here too (`p2pinfer peer --model ...`) or leave logprobs out",
                            "logprobs", code="unsupported_parameter")
                    async with trio.open_nursery() as choices:
                        for run in runs:
                            choices.start_soon(run.execute, digest, started, tokens, choices.cancel_scope)
                    failed = [run.error for run in runs if run.error is not None]
                    if failed:
                        raise failed[0]
                    await out.finish(runs)
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
                if not out.started:
                    raise error
                await out.send_stream_error(error)
        finally:
            if out.finished:
                outcome = "ok"
            completions = [run.completion for run in runs if run.completion is not None]
            for completion in completions:
                self.gateway.remember(completion, spec.model)
            first = completions[0] if completions else None
            self.gateway.metrics.record(RequestRecord(
                id=id, endpoint=spec.endpoint, model=spec.model, stream=spec.stream, outcome=outcome,
                executor=first.executor if first else (runs[0].executor or ""),
                tokens=sum(run.tokens for run in runs),
                verification=describe_verification(first.verification) if first else "",
                started_at_ms=started_ms, duration_s=round(time.perf_counter() - started, 4)))


class _Output:
    """The HTTP response of one generation request, shared by its choices (``n``)."""

    def __init__(self, gateway: Gateway, spec: GenerationSpec, id: str, send: Send) -> None:
        self.gateway = gateway
        self.spec = spec
        self.id = id
        self._send = send
        # The choices (n > 1) send from their own tasks. One message at a time, in order: the server takes
        # the response start as sent only once its write completes, and a body message that slipped in
        # while that write was waiting on the socket was refused (hypercorn's UnexpectedMessageError,
        # "body in state REQUEST"), failing the whole response on a loaded machine.
        self._sending = trio.Lock()
        self.created = int(time.time())
        self.started = False  # a streamed response's headers went out
        self.finished = False  # the response is complete (a disconnect now is the client's normal hang-up)

    async def send(self, message: dict[str, Any]) -> None:
        async with self._sending:
            await self._send(message)

    async def start_stream(self, executor: str) -> None:
        async with self._sending:
            if self.started:
                return
            self.started = True
            await self._send({"type": "http.response.start", "status": 200, "headers": [
                (b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache"),
                (b"x-p2pinfer-executor", executor.encode()), (b"x-accel-buffering", b"no")]})

    async def event(self, obj: dict[str, Any]) -> None:
        await self.send({"type": "http.response.body", "body": api.sse(obj), "more_body": True})

    async def finish(self, runs: list["_Run"]) -> None:
        self.finished = True
        completions = [run.completion for run in runs]
        assert all(c is not None for c in completions)
        usage = api.usage(len(completions[0].result.message.prompt_ids), sum(run.returned for run in runs))
        extra = runs[0].extra
        if len(runs) > 1:
            extra = {**extra, "choices": [run.extra for run in runs]}
        if not self.spec.stream:
            choices = [api.choice_object(self.spec, run.index, run.text, run.finish, run.logprobs) for run in runs]
            verification = ",".join(dict.fromkeys(run.extra["verification"] for run in runs))
            body = api.completion_object(self.spec, self.id, self.created, "", "", usage, extra, choices=choices)
            await _send_json(self.send, 200, body, headers=[
                (b"x-p2pinfer-executor", completions[0].executor.encode()),
                (b"x-p2pinfer-request-id", completions[0].request_id.hex().encode()),
                (b"x-p2pinfer-verification", verification.encode())])
            return
        if self.spec.include_usage:
            await self.event(api.chunk_object(self.spec, self.id, self.created, usage_=usage))
        await self.send({"type": "http.response.body", "body": api.SSE_DONE, "more_body": False})

    async def send_stream_error(self, exc: ApiError) -> None:
        await self.event(exc.body())
        await self.send({"type": "http.response.body", "body": b"", "more_body": False})


class _Run:
    """One choice in flight: one network request, its stream turned into OpenAI chunks."""

    def __init__(self, gateway: Gateway, spec: GenerationSpec, index: int, out: _Output) -> None:
        self.gateway = gateway
        self.spec = spec
        self.index = index
        self.out = out
        self.executor: str | None = None
        self.tokens = 0  # tokens received (all of them, for the token metrics)
        self.completion: Completion | None = None
        self.error: RequestError | ApiError | None = None
        self.opened = False  # this choice's first chunk (the chat role) went out
        # Filled in when the completion arrives:
        self.text = ""
        self.finish = "stop"
        self.returned = 0  # tokens whose text is returned (usage)
        self.logprobs: dict[str, Any] | None = None
        self.extra: dict[str, Any] = {}

    async def execute(self, digest: bytes, started: float, tokens: "_TokenText | None",
                      siblings: trio.CancelScope) -> None:
        try:
            await self._execute(digest, started, tokens)
        except (RequestError, ApiError) as exc:
            self.error = exc
            siblings.cancel()  # one failed choice fails the response: stop the others

    async def _execute(self, digest: bytes, started: float, tokens: "_TokenText | None") -> None:
        metrics = self.gateway.metrics
        last: float | None = None
        params = dict(self.spec.params)
        params["seed"] = extras.choice_seed(params.get("seed"), self.index)
        async for item in self.gateway.client.stream_with_result(model=digest.hex(), **params):
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
        self._describe(self.completion, tokens)
        if self.spec.stream:
            await self._open(self.completion.executor)
            await self.out.event(api.chunk_object(
                self.spec, self.out.id, self.out.created, finish=self.finish, extra=self.extra, index=self.index,
                logprobs=self.logprobs, text=None if self.spec.endpoint == "chat" else ""))

    def _describe(self, completion: Completion, tokens: "_TokenText | None") -> None:
        """Text, finish reason, returned tokens, verified log-probs and the p2pinfer extra of this choice."""
        self.text = completion.text
        self.finish = api.finish_reason(completion.finish_reason)
        eos = tokens.eos_ids if tokens is not None else ()
        self.returned = extras.returned_token_count(completion.token_ids, completion.text, completion.finish_reason,
                                                    eos, tokens.decode if tokens is not None else None)
        verification = describe_verification(completion.verification)
        self.extra = {
            "executor": completion.executor,
            "request_id": completion.request_id.hex(),
            "model_digest": completion.model.hex(),
            "verification": verification,
            "attempts": [{"peer_id": a.peer_id, "outcome": a.outcome, "tokens": a.tokens}
                         for a in completion.attempts],
            "election": {"bidders": len(completion.election.ranking), "ranking": list(completion.election.ranking)},
        }
        if not self.spec.logprobs:
            return
        if not completion.verified or tokens is None:
            # Nothing unverified is shown: log-probs only once a majority of the verifiers accepted them.
            self.extra["logprobs"] = f"withheld: verification {verification}"
            return
        fingerprint = unpack_fingerprint(completion.result.message.fingerprint)
        content = extras.token_logprobs(fingerprint.ids, fingerprint.logprobs, completion.token_ids,
                                        min(self.returned, len(fingerprint)), self.spec.top_logprobs, tokens.text)
        self.logprobs = (extras.chat_logprobs(content) if self.spec.endpoint == "chat"
                         else extras.completion_logprobs(content, self.spec.top_logprobs))
        self.extra["logprobs"] = "verified"

    async def _open(self, executor: str) -> None:
        await self.out.start_stream(executor)
        if not self.opened:
            self.opened = True
            if self.spec.endpoint == "chat":
                await self.out.event(api.chunk_object(self.spec, self.out.id, self.out.created, text="", role=True,
                                                      index=self.index))

    async def _stream_chunk(self, chunk: StreamChunk) -> None:
        await self._open(chunk.executor)
        if chunk.text:
            await self.out.event(api.chunk_object(self.spec, self.out.id, self.out.created, text=chunk.text,
                                                  index=self.index))


class _TokenText:
    """The model's tokenizer, where this peer has it: token texts for log-probs, prefixes for usage."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.eos_ids = tuple(model.eos_token_ids)
        self._texts: dict[int, str] = {}

    def text(self, token_id: int) -> str:
        if token_id not in self._texts:
            if len(self._texts) > 65536:
                self._texts.clear()
            self._texts[token_id] = self.model.decode([token_id], skip_special_tokens=False)
        return self._texts[token_id]

    def decode(self, ids: Any) -> str:
        return self.model.decode(list(ids))


async def _cancel_on_disconnect(receive: Receive, scope: trio.CancelScope, out: _Output) -> None:
    """A client that hangs up before its response is complete cancels the request in the network."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            if not out.finished:
                log.info("gateway.client_disconnected", id=out.id)
                scope.cancel()
            return


_ROUTE_LABELS = ("/", "/health", "/metrics", "/v1/models", "/v1/chat/completions", "/v1/completions",
                 "/v1/p2pinfer/status", view.NETWORK_PATH)


def _route_label(path: str) -> str:
    """A bounded label for the metrics: the route, or "other" (unknown paths are anyone's choice)."""
    path = path.rstrip("/") or "/"
    if path.startswith("/v1/models/"):
        return "/v1/models/{model}"
    return path if path in _ROUTE_LABELS else "other"


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
