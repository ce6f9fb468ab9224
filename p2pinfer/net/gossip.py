"""Capacity gossip over GossipSub (topic ``/p2pinfer/capacity/1``).

Workarounds for py-libp2p 0.8.1 that live here:

* **Heartbeat.** GossipSub's default heartbeat is 120 s, so mesh repair and gossip (IHAVE) run every two
  minutes; a late joiner would wait that long. We use 1 s (:data:`HEARTBEAT_S`).
* **Silent rate limit.** ``GossipSub._check_spam_protection`` silently stops forwarding (and, for our own
  publishes, silently drops) messages beyond ``max_messages_per_topic_per_second`` (default 10) *per
  forwarding peer* per topic. The whole network's announcements pass through a few forwarders (bootstrap
  nodes first), so 10/s would cap the network at ~600 peers announcing once a minute, and a burst of joins
  would stop propagating. We raise the limit to :data:`MAX_FORWARDED_PER_S` and rate-limit our own
  publishes (:data:`MIN_PUBLISH_INTERVAL_S`), coalescing bursts of changes into one announcement.
* **Lossy subscription queue.** ``Pubsub.subscribe`` returns a queue of 32 messages that drops silently
  when full. We do not depend on it: the *topic validator* verifies the announcement and records it in the
  :class:`~p2pinfer.net.announcements.AnnouncementTable` as the message is accepted, and a drain task only
  empties the queue. Validators run for every message before it is forwarded, so a message that fails is
  never forwarded (Pubsub.push_msg returns before ``router.publish``).
* **Throughput.** Latency collapses at >= 20 messages/s across 10 nodes, so only announcements go over
  gossip; request traffic uses direct streams (``p2pinfer.net.streams``).
* **Scoring.** GossipSub v1.1 peer scoring is present but all-permissive by default; :func:`score_params`
  turns on the invalid-message penalty (P4) with graylisting, and the validator applies the penalty only
  for provable faults (see :meth:`CapacityGossip.penalize` and :class:`FaultOnlyScorer`), since
  py-libp2p's validators cannot say "ignore" and its built-in counter would also punish honest forwarders
  of late (``stale``) messages.
* Pubsub's own message signing (``strict_signing``) stays on: it authenticates the message *source*, which
  the validator compares with the announcement's signer (``source-mismatch``).
* **Abandoned peer streams.** Pubsub opens one outbound stream to every connected peer and sends its
  subscriptions on it; ``Pubsub._handle_new_peer_with_retry`` retries that while the peer stays connected,
  but only on ``SwarmException``/``StreamClosed``. Under load the multistream negotiation fails with
  ``StreamFailure`` (the other side reset a negotiation it waited too long for) or the hello write with a
  ``StreamError``, and py-libp2p gives up on the peer for good while the connection stays up: the peer never
  learns we subscribe and we never send it anything, so a node can be connected to everyone and still be
  missing from every mesh. :class:`PatientPubsub` turns those two failures into the ``SwarmException`` the
  retry loop expects, so registration goes on (backoff 0.5 s doubling to 10 s) until the stream is up or the
  peer disconnects; only a peer that answers "protocols not supported" is left alone. (Most such failures
  under load were whole connections dropped after a cancelled write skipped a Noise nonce:
  :mod:`p2pinfer.net.whole_writes` fixes that; ``event=gossip.peer_stream_failed`` names the local peer, the
  whole cause chain and the peer's connections, to tell the two apart.)
* **Streams on a closing connection.** A peer can have two connections for a while (a simultaneous dial
  settled by :mod:`p2pinfer.net.connection_trim`, a relayed one that DCUtR closes once a direct one is up).
  When the one carrying our pubsub stream closes, py-libp2p noticed only at the next write, which was lost,
  and then forgot the peer's subscriptions although they came on the peer's own stream, which may well be
  alive: we would never send that peer anything again. :class:`PatientPubsub` moves its stream to the
  remaining connection as soon as the old one closes (a losing duplicate: as soon as both ends agree on the
  kept one, before the loser closes), and keeps a still-connected peer's subscriptions.
* **No flood publishing.** py-libp2p 0.8.1 sends our own messages to our mesh peers only. A peer that is
  subscribed but not (or no longer, for a heartbeat while a stream is re-opened) in the mesh misses the
  message for good: IHAVE gossip goes to non-mesh peers only, and the peer is back in the mesh by the next
  heartbeat. GossipSub v1.1 specifies flood publishing for this (go-libp2p's default):
  :class:`FloodPublishGossipSub` sends our own messages to every subscribed peer whose score is above the
  publish threshold. Forwarded messages still go to the mesh only; our own are at most 2/s.
"""

from __future__ import annotations

import hashlib

from collections import Counter
from typing import Any, Callable

import trio
from libp2p.abc import IHost, INetConn, INetwork
from libp2p.host.exceptions import StreamFailure
from libp2p.network.exceptions import SwarmException
from libp2p.network.stream.exceptions import StreamError
from libp2p.peer.id import ID
from libp2p.pubsub.gossipsub import PROTOCOL_ID_V11, PROTOCOL_ID_V12, GossipSub
from libp2p.pubsub.pubsub import Pubsub
from libp2p.pubsub.score import PeerScorer, ScoreParams, TopicScoreParams

from ..log import get_logger
from ..wire import now_ms
from .announcements import SENDER_FAULT_REASONS, AnnouncementRejected, AnnouncementTable
from .connection_trim import on_duplicate_settled
from .faults import FAULT_HALF_LIFE_S, FaultKind
from .notifee import Notifee

log = get_logger("p2pinfer.net.gossip")

CAPACITY_TOPIC = "/p2pinfer/capacity/1"
FRAUD_TOPIC = "/p2pinfer/fraud/1"  # fraud proofs (p2pinfer.fraud); rare by nature, rate-limited per source
GOSSIP_TOPICS = frozenset({CAPACITY_TOPIC, FRAUD_TOPIC})
HEARTBEAT_S = 1
MIN_PUBLISH_INTERVAL_S = 0.5
MAX_FORWARDED_PER_S = 200.0
# GossipSub mesh degree (D, D_lo, D_hi): libp2p's defaults.
MESH_DEGREE = (6, 4, 12)
# GossipSub v1.1 peer scoring, used for one thing: invalid messages (P4). Every other weight is 0, so an
# honest peer's score is exactly 0. Each invalid message a peer forwards costs 1 point, decaying with the
# fault book's half-life (the heartbeat is 1 s); at INVALID_GOSSIP_LIMIT points the peer is below the
# publish and graylist thresholds (its RPCs are ignored) and the fault book, which counts the same messages
# with weight BAN_SCORE / INVALID_GOSSIP_LIMIT, bans it and closes its connection.
INVALID_GOSSIP_LIMIT = 3


class FaultOnlyScorer(PeerScorer):
    """GossipSub's scorer, except that a failed validation alone does not count as an invalid message.

    py-libp2p's ``Pubsub.push_msg`` calls ``on_invalid_message`` for every message a validator refuses,
    but its validators can only say yes or no, not GossipSub v1.1's "ignore": an honest forwarder of a
    message that became ``stale`` on the way would be punished. Our validator reports provable faults
    through :meth:`record_invalid` instead.
    """

    def on_invalid_message(self, peer: ID, topic: str) -> None:
        pass

    def record_invalid(self, peer: ID, topic: str) -> None:
        super().on_invalid_message(peer, topic)


class PatientPubsub(Pubsub):
    """Pubsub that keeps trying to open its stream to a connected peer (see "Abandoned peer streams" above).

    ``stream_failures`` counts the attempts that failed and are tried again."""

    stream_failures = 0
    streams_moved = 0

    def __init__(self, host: IHost, *args: Any, **kwargs: Any) -> None:
        super().__init__(host, *args, **kwargs)
        host.get_network().register_notifee(_StreamMover(self))
        on_duplicate_settled(host, self.connection_closing)
        # Called with (peer, topic) when a peer becomes a partner on a topic: it subscribes to it and our
        # stream to it is up (whichever of the two comes last), i.e. from now on our publishes reach it.
        self.on_new_partner: Callable[[ID, str], None] | None = None

    def partners(self, topic: str) -> set[ID]:
        """Peers subscribed to ``topic`` that our stream reaches: those a publish right now is sent to."""
        return {peer for peer in self.peer_topics.get(topic, ()) if peer in self.peers}

    def _partner_appeared(self, peer_id: ID, topic: str) -> None:
        if self.on_new_partner is not None:
            try:
                self.on_new_partner(peer_id, topic)
            except Exception as exc:  # a hook must never break the pubsub service
                log.warning("gossip.partner_hook_failed", error=repr(exc)[:200])

    def handle_subscription(self, origin_id: ID, sub_message: Any) -> None:
        topic = sub_message.topicid
        known = origin_id in self.peer_topics.get(topic, ())
        super().handle_subscription(origin_id, sub_message)
        if sub_message.subscribe and not known and origin_id in self.partners(topic):
            self._partner_appeared(origin_id, topic)

    def _handle_dead_peer(self, peer_id: ID) -> None:
        # Subscriptions arrive on the peer's stream to us, not on ours to it; while the peer is connected
        # they stay valid (a peer whose own stream died opens a new one and sends them again).
        if not self._peer_is_connected(peer_id):
            return super()._handle_dead_peer(peer_id)
        topics = [topic for topic, peers in self.peer_topics.items() if peer_id in peers]
        count = self._peer_subscription_count.get(peer_id)
        super()._handle_dead_peer(peer_id)
        for topic in topics:
            self.peer_topics.setdefault(topic, set()).add(peer_id)
        if count is not None:
            self._peer_subscription_count[peer_id] = count

    def connection_closing(self, conn: INetConn) -> None:
        """A losing duplicate ``conn`` will close once its streams end: move our stream off it now."""
        peer_id = conn.muxed_conn.peer_id
        if any(c is not conn and not c.is_closed for c in self.host.get_network().get_connections(peer_id)):
            self.connection_closed(conn)

    def connection_closed(self, conn: INetConn) -> None:
        """Open our stream again at once when it was on ``conn`` and the peer is still connected otherwise."""
        peer_id = conn.muxed_conn.peer_id
        stream = self.peers.get(peer_id)
        if stream is None or stream.muxed_conn is not conn.muxed_conn or not self._peer_is_connected(peer_id):
            return
        self.streams_moved += 1
        log.debug("gossip.stream_moved", peer=peer_id.to_base58())
        self._handle_dead_peer(peer_id)  # drops the old stream, opens one on a live connection (retrying)

    async def _handle_new_peer(self, peer_id: ID) -> None:
        writable = peer_id in self.peers
        try:
            await super()._handle_new_peer(peer_id)
        except (StreamFailure, StreamError) as exc:
            if "protocols not supported" in str(exc.__cause__ or ""):
                raise  # the peer answered "na": it does not speak GossipSub, asking again would not help
            self.stream_failures += 1
            log.debug("gossip.peer_stream_failed", local=self.my_id.to_base58(), peer=peer_id.to_base58(),
                      error=_cause_chain(exc), connections=_connection_states(self.host, peer_id))
            raise SwarmException(f"pubsub stream to {peer_id} not established: {exc}") from exc
        if not writable and peer_id in self.peers:
            for topic in [t for t, subscribers in self.peer_topics.items() if peer_id in subscribers]:
                self._partner_appeared(peer_id, topic)


def _cause_chain(exc: BaseException) -> str:
    """``exc`` and the exceptions that caused it, outermost first: py-libp2p wraps the one that tells why
    (a reset stream, a closed connection) two or three levels deep."""
    parts: list[str] = []
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen and len(parts) < 6:
        seen.add(id(current))
        parts.append(f"{type(current).__name__}({str(current)[:120]!r})")
        current = current.__cause__ or current.__context__
    return " <- ".join(parts)


def _connection_states(host: IHost, peer_id: ID) -> str:
    """The peer's connections as the swarm sees them (closed flag, stream count): is the stream's connection
    on its way out?"""
    try:
        conns = host.get_network().get_connections(peer_id)
        return ",".join(f"{'closed' if c.is_closed else 'open'}/{len(c.get_streams())}" for c in conns) or "none"
    except Exception as exc:
        return f"unknown:{type(exc).__name__}"


class _StreamMover(Notifee):
    """Tells :class:`PatientPubsub` when a connection closes."""

    def __init__(self, pubsub: PatientPubsub) -> None:
        self.pubsub = pubsub

    async def disconnected(self, network: INetwork, conn: INetConn) -> None:
        try:
            self.pubsub.connection_closed(conn)
        except Exception as exc:  # a notifee must never break the swarm's connection cleanup
            log.debug("gossip.stream_move_failed", error=repr(exc)[:200])


class FloodPublishGossipSub(GossipSub):
    """GossipSub with v1.1 flood publishing of our own messages (see "No flood publishing" above)."""

    def _get_peers_to_send(self, topic_ids: Any, msg_forwarder: ID, origin: ID,
                           msg_id: bytes | None = None) -> Any:
        peers = set(super()._get_peers_to_send(topic_ids, msg_forwarder, origin, msg_id))
        if self.pubsub is None or msg_forwarder != self.pubsub.my_id:
            return peers
        for topic in topic_ids:
            for peer in self.pubsub.peer_topics.get(topic, ()):
                if peer == origin or peer not in self.peer_protocol:
                    continue
                if self.scorer is None or self.scorer.allow_publish(peer, [topic]):
                    peers.add(peer)
        return peers


def score_params() -> ScoreParams:
    decay_per_heartbeat = 0.5 ** (HEARTBEAT_S / FAULT_HALF_LIFE_S)
    threshold = -(INVALID_GOSSIP_LIMIT - 0.5)
    return ScoreParams(
        p4_invalid_messages=TopicScoreParams(weight=1.0, cap=1000.0, decay=decay_per_heartbeat),
        publish_threshold=threshold,
        graylist_threshold=threshold,
        gossip_threshold=threshold,
        accept_px_threshold=0.0,
    )


def build_pubsub(host: IHost, *, heartbeat_s: int = HEARTBEAT_S) -> tuple[Pubsub, GossipSub]:
    """GossipSub (v1.2/v1.1 protocol IDs, interoperable with go/js/rust) and the Pubsub service around it."""
    degree, degree_low, degree_high = MESH_DEGREE
    router = FloodPublishGossipSub(
        protocols=[PROTOCOL_ID_V12, PROTOCOL_ID_V11],
        degree=degree,
        degree_low=degree_low,
        degree_high=degree_high,
        heartbeat_interval=heartbeat_s,
        heartbeat_initial_delay=0.1,
        time_to_live=60,
        max_messages_per_topic_per_second=MAX_FORWARDED_PER_S,
        score_params=score_params(),
    )
    router.scorer = FaultOnlyScorer(router.scorer.params if router.scorer else score_params())
    pubsub = PatientPubsub(
        host,
        router,
        # Workaround: py-libp2p 0.8.1 identifies messages by (source, seqno) and seeds each node's seqno
        # counter with int(time.time()), in whole seconds. A peer restarted within a second or two reuses the
        # seqnos of its previous life, and its fresh announcement is dropped everywhere as "already seen".
        # Our payloads are unique signed announcements, so identify messages by (source, content) instead:
        # a restarted peer's new announcement is new, an exact re-publish by the same source is a duplicate,
        # and someone else re-publishing a peer's announcement still reaches the validator (source-mismatch).
        msg_id_constructor=_content_id,
        strict_signing=True,
        # The RPC frame limit: an RPC may batch several messages, each announcement is at most 16 KiB.
        max_inbound_rpc_size=256 * 1024,
        allowed_topics=GOSSIP_TOPICS,
    )
    return pubsub, router


def _content_id(msg: Any) -> bytes:
    return hashlib.sha256(bytes(msg.from_id) + b"/" + bytes(msg.data)).digest()


class CapacityGossip:
    """Validates, records and publishes capacity announcements on one Pubsub instance.

    ``counters`` maps ``accepted`` and every drop reason to a count (read by metrics).
    """

    def __init__(self, pubsub: Pubsub, table: AnnouncementTable, *, local_peer_id: str,
                 on_fault: Callable[[str, FaultKind, str], None] | None = None) -> None:
        self.pubsub = pubsub
        self.on_fault = on_fault
        self.table = table
        self.local_peer_id = local_peer_id
        self.counters: Counter[str] = Counter()
        self._subscription: Any = None
        self._last_publish = -float("inf")
        self._publish_lock = trio.Lock()
        self.accepted_event = trio.Event()  # set (and replaced) whenever an announcement is accepted
        # True while our last announcement was published to no partner: it went nowhere, and the first
        # partner to appear calls on_unheard_partner (once) so that we announce again.
        self.unheard = False
        self.on_unheard_partner: Callable[[], None] | None = None
        if isinstance(pubsub, PatientPubsub):
            pubsub.on_new_partner = self._new_partner

    def _validate(self, forwarder: ID, msg: Any) -> bool:
        source = ID(msg.from_id).to_base58() if msg.from_id else None
        try:
            signed = self.table.offer(bytes(msg.data), source_peer_id=source, now_ms=now_ms())
        except AnnouncementRejected as exc:
            self.counters[exc.reason] += 1
            log.debug("gossip.rejected", reason=exc.reason, detail=exc.detail[:200],
                      source=source, forwarder=forwarder.to_base58())
            if exc.reason in SENDER_FAULT_REASONS:
                self.penalize(forwarder, exc.reason)
            return False
        except Exception as exc:  # a validator must never crash the pubsub service
            self.counters["internal-error"] += 1
            log.warning("gossip.validator_error", error=repr(exc)[:200])
            return False
        self.counters["accepted"] += 1
        log.debug("gossip.accepted", peer=signed.message.peer_id, seq=signed.message.seq,
                  models=len(signed.message.models), free_slots=signed.message.free_slots)
        event, self.accepted_event = self.accepted_event, trio.Event()
        event.set()
        return True

    def penalize(self, forwarder: ID, reason: str, topic: str = CAPACITY_TOPIC) -> None:
        """An invalid message is the forwarder's own fault: every honest peer validates before forwarding.

        Timing failures (``stale``, ``expired``, ``future``) and rules a newer honest version may not share
        (``version``, ``unknown-type``) are not in SENDER_FAULT_REASONS: they are dropped, never penalized
        (GossipSub's "ignore", as opposed to "reject").
        """
        scorer = getattr(self.pubsub.router, "scorer", None)
        if isinstance(scorer, FaultOnlyScorer):
            scorer.record_invalid(forwarder, topic)
        if self.on_fault is not None:
            self.on_fault(forwarder.to_base58(), FaultKind.INVALID_GOSSIP, f"{topic}: {reason}")

    async def start(self) -> None:
        """Register the validator and subscribe. Call once Pubsub is running."""
        self.pubsub.set_topic_validator(CAPACITY_TOPIC, self._validate, is_async_validator=False)
        self._subscription = await self.pubsub.subscribe(CAPACITY_TOPIC)

    async def drain(self) -> None:
        """Empty the subscription queue forever (the table is filled by the validator)."""
        assert self._subscription is not None, "start() first"
        while True:
            await self._subscription.get()

    async def publish(self, envelope: bytes) -> int:
        """Publish signed announcement bytes, never faster than MIN_PUBLISH_INTERVAL_S; returns how many
        partners it was sent to (0: it went nowhere, see :attr:`unheard`)."""
        async with self._publish_lock:
            wait = self._last_publish + MIN_PUBLISH_INTERVAL_S - trio.current_time()
            if wait > 0:
                await trio.sleep(wait)
            self._last_publish = trio.current_time()
            # Counted before the send: a partner that appears from here on is told by _new_partner.
            reached = len(self.partners())
            self.unheard = reached == 0
            await self.pubsub.publish(CAPACITY_TOPIC, envelope)
            return reached

    def partners(self) -> set[ID]:
        """Peers our announcements are sent to: subscribed to the capacity topic, our stream to them up."""
        if isinstance(self.pubsub, PatientPubsub):
            return self.pubsub.partners(CAPACITY_TOPIC)
        return {p for p in self.pubsub.peer_topics.get(CAPACITY_TOPIC, ()) if p in self.pubsub.peers}

    def _new_partner(self, peer_id: ID, topic: str) -> None:
        if topic != CAPACITY_TOPIC or not self.unheard:
            return
        self.unheard = False
        log.debug("gossip.first_partner", peer=peer_id.to_base58())
        if self.on_unheard_partner is not None:
            self.on_unheard_partner()

    def mesh_size(self) -> int:
        mesh = getattr(self.pubsub.router, "mesh", {})
        return len(mesh.get(CAPACITY_TOPIC, ()))

    def topic_peers(self) -> list[str]:
        return [p.to_base58() for p in self.pubsub.peer_topics.get(CAPACITY_TOPIC, ())]
