"""Prometheus metrics of one peer process, in one place.

Two kinds of metrics, both cheap on the hot path:

* what the gateway itself observes (requests by outcome, tokens streamed, time to first token, the gap
  between tokens, verification outcomes): ``prometheus_client`` counters and histograms, updated once per
  request or per token chunk;
* what other parts already count (the node's gossip drop reasons, the task server's bids, elections won,
  tasks and tokens, failover silence witnessed and task-status answers; the announcement table's known peers): read only when ``/metrics`` is scraped, by
  :class:`_PeerCollector`, so the network and task code keep their plain integer counters.

Each :class:`PeerMetrics` has its own registry (never the process-wide default), so several peers in one
process (tests, :mod:`p2pinfer.localnet`) do not collide. ``prometheus_client`` is imported here only; this
module is imported only when a gateway or control endpoint runs, so ``p2pinfer --version`` stays light.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from .wire import now_ms

if TYPE_CHECKING:
    from .net import Node
    from .request.server import TaskServer

__all__ = ["CONTENT_TYPE", "PeerMetrics", "RequestRecord", "describe_verification"]

CONTENT_TYPE = CONTENT_TYPE_LATEST
RECENT_REQUESTS = 32
# How the task server answers a status query (its counters "status.<answer>"): always exposed, 0 included.
STATUS_ANSWERS = ("answered", "pending", "not-assigned", "not-entitled", "rate_limited", "invalid")

# Seconds. Time to first token includes the election (a few round trips) and the prompt's prefill.
_TTFT_BUCKETS = (0.025, 0.05, 0.1, 0.2, 0.35, 0.5, 0.75, 1.0, 1.5, 2.5, 5.0, 10.0, 30.0)
_TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.035, 0.05, 0.075, 0.1, 0.2, 0.5, 1.0, 2.5)


def describe_verification(verification: Any) -> str:
    """One word for a :attr:`Completion.verification <p2pinfer.request.client.Completion.verification>`.

    ``None`` (no quorum ran, e.g. ``verify="off"`` on an old path) is ``unverified``. Otherwise the outcome
    is the verification's ``outcome`` (``accepted``, ``rejected``, ``unverified`` or ``skipped``).
    """
    if verification is None:
        return "unverified"
    for key in ("outcome", "status"):
        value = verification.get(key) if isinstance(verification, dict) else getattr(verification, key, None)
        if value is not None:
            return str(value)
    accepted = verification.get("accepted") if isinstance(verification, dict) else getattr(verification, "accepted", None)
    if isinstance(accepted, bool):
        return "accepted" if accepted else "rejected"
    return str(verification)[:64]


@dataclass(frozen=True)
class RequestRecord:
    """One request served by this peer's gateway: for ``p2pinfer status``."""

    id: str
    endpoint: str  # "chat" or "completions"
    model: str
    stream: bool
    outcome: str  # "ok" or the OpenAI error code
    executor: str
    tokens: int
    verification: str
    started_at_ms: int
    duration_s: float

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class PeerMetrics:
    def __init__(self, node: "Node", server: "TaskServer | None" = None) -> None:
        self.node = node
        self.server = server
        self.started_at = time.time()
        self.registry = CollectorRegistry(auto_describe=False)
        self.requests = Counter("p2pinfer_gateway_requests", "Gateway requests by endpoint and outcome "
                                "(ok, or the OpenAI error code)", ["endpoint", "outcome"], registry=self.registry)
        self.responses = Counter("p2pinfer_gateway_responses", "Every HTTP answer of the gateway and control "
                                 "socket, by route and status code (errors included)", ["route", "status"],
                                 registry=self.registry)
        self.tokens = Counter("p2pinfer_gateway_tokens", "Tokens generated for gateway clients",
                              registry=self.registry)
        self.time_to_first_token = Histogram(
            "p2pinfer_gateway_time_to_first_token_seconds",
            "From the request's arrival to its first generated token (election and prefill included)",
            buckets=_TTFT_BUCKETS, registry=self.registry)
        self.token_latency = Histogram(
            "p2pinfer_gateway_token_latency_seconds",
            "Time between consecutive generated tokens of one request, as the gateway receives them",
            buckets=_TOKEN_BUCKETS, registry=self.registry)
        self.verification = Counter("p2pinfer_verification_outcomes", "Verification outcome of each completed "
                                    "gateway request (unverified while no quorum ran)", ["outcome"],
                                    registry=self.registry)
        self.recent: deque[RequestRecord] = deque(maxlen=RECENT_REQUESTS)
        self.registry.register(_PeerCollector(self))

    def record(self, record: RequestRecord) -> None:
        self.requests.labels(record.endpoint, record.outcome).inc()
        if record.outcome == "ok":
            self.verification.labels(record.verification).inc()
        self.recent.append(record)

    def exposition(self) -> bytes:
        """The Prometheus text format (``CONTENT_TYPE``)."""
        return generate_latest(self.registry)


class _PeerCollector:
    """Reads the node's and task server's own counters at scrape time."""

    def __init__(self, metrics: PeerMetrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Any]:
        node, server = self.metrics.node, self.metrics.server
        live = [a for a in node.table.live(now_ms()) if a.peer_id != node.peer_id]
        known = GaugeMetricFamily("p2pinfer_known_peers", "Peers with a live capacity announcement")
        known.add_metric([], len(live))
        yield known
        connected = GaugeMetricFamily("p2pinfer_connected_peers", "Peers with an open libp2p connection")
        connected.add_metric([], len(node.connected_peers()))
        yield connected

        gossip = node.gossip.counters
        accepted = CounterMetricFamily("p2pinfer_gossip_accepted", "Capacity announcements accepted from gossip")
        accepted.add_metric([], gossip.get("accepted", 0))
        yield accepted
        rejected = CounterMetricFamily("p2pinfer_gossip_rejected", "Gossip messages rejected, by reason",
                                       labels=["reason"])
        for reason, count in sorted(gossip.items()):
            if reason != "accepted":
                rejected.add_metric([reason], count)
        yield rejected
        handler = CounterMetricFamily("p2pinfer_stream_handler_errors", "Inbound streams that failed, by reason",
                                      labels=["reason"])
        for key, count in sorted(node.stats.items()):
            if key.startswith("handler."):
                handler.add_metric([key.removeprefix("handler.")], count)
        yield handler

        if server is None:
            return
        counters = server.counters
        for name, key, doc in (
            ("p2pinfer_offers", "offers", "Task offers received"),
            ("p2pinfer_bids", "bids", "VRF bids sent"),
            ("p2pinfer_elections_won", "elections.won", "Assignments accepted: elections this peer won"),
            ("p2pinfer_tokens_generated", "tokens.generated", "Tokens this peer generated as executor"),
        ):
            family = CounterMetricFamily(name, doc)
            family.add_metric([], counters.get(key, 0))
            yield family
        tasks = CounterMetricFamily("p2pinfer_tasks", "Tasks executed, by outcome", labels=["outcome"])
        tasks.add_metric(["completed"], counters.get("tasks.completed", 0))
        tasks.add_metric(["failed"], counters.get("tasks.failed", 0))
        yield tasks
        refusals = CounterMetricFamily("p2pinfer_refusals", "Offers and assignments refused, by code",
                                       labels=["code"])
        for key, count in sorted(counters.items()):
            if key.startswith("refused."):
                refusals.add_metric([key.removeprefix("refused.")], count)
        yield refusals
        silent = CounterMetricFamily("p2pinfer_failover_witnessed_silent", "Lower ranks this peer found silent "
                                     "(no answer to its task-status query) before taking a task over")
        silent.add_metric([], counters.get("failover.witnessed_silent", 0))
        yield silent
        status = CounterMetricFamily("p2pinfer_status_queries", "Task-status queries from failover candidates, "
                                     "by answer", labels=["answer"])
        answers = dict.fromkeys(STATUS_ANSWERS, 0)
        answers.update((k.removeprefix("status."), c) for k, c in counters.items() if k.startswith("status."))
        for answer, count in sorted(answers.items()):
            status.add_metric([answer], count)
        yield status
        slots = GaugeMetricFamily("p2pinfer_slots", "Request slots of this peer", labels=["state"])
        slots.add_metric(["free"], server.free_slots)
        slots.add_metric(["total"], server.slots)
        yield slots
