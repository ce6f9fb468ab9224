"""The one place where every inbound stream of a host is guarded: nothing a peer sends escapes a handler.

Upstream bug (py-libp2p 0.8.1): a stream handler's exception is not caught anywhere between the handler
and the connection's nursery (``SwarmConn._handle_muxed_stream`` -> ``BasicHost._swarm_stream_handler``
-> handler). Pubsub's ``stream_handler`` catches only ``StreamError``/``ParseError``/
``IncompleteReadError``, so five bytes on ``/meshsub/1.1.0`` (``04 ff ff ff ff``: a 4-byte RPC that is
not valid protobuf) raise ``google.protobuf.message.DecodeError`` into the swarm's nursery, which ends the
host and with it the whole node (peer, bootstrap node or SDK client alike). Any other handler (kad,
identify, identify push, ping, relay...) that raises on bad input does the same.

:class:`PeerGuard` fixes it for every protocol at once, on this host instance only (no global patching):

* the swarm's ``common_stream_handler`` (multistream negotiation + handler) is wrapped: any ``Exception``
  is caught, logged once per peer and reason (``event=guard.stream_failed``), and the stream reset;
* the host's multistream handler table is replaced by a mapping that wraps each handler as it is
  registered (also those registered later: pubsub, kad, ours), enforcing the per-protocol stream limits of
  :class:`~p2pinfer.net.resources.ResourceLimits` and attributing parse failures to the sender as faults;
* every Yamux connection gets bounded receive buffers (:mod:`p2pinfer.net.yamux_bounds`);
* faults go to a :class:`~p2pinfer.net.faults.FaultBook`; a peer that reaches the ban score is
  disconnected, and while banned its new connections are closed as they arrive.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Awaitable, Callable

import trio
from libp2p.abc import IHost, INetConn, INetStream, INetwork

from ..log import get_logger
from .faults import FaultBook, FaultKind
from .notifee import Notifee
from .resources import DEFAULT_LIMITS, ResourceLimits, ResourceScopes
from .yamux_bounds import bound_yamux_buffers

log = get_logger("p2pinfer.net.guard")

Handler = Callable[[INetStream], Awaitable[None]]

# Exceptions that mean "the bytes did not parse": the sender's fault on a protocol it chose to speak.
_PARSE_ERROR_NAMES = frozenset({
    "DecodeError", "ParseError", "MessageTooLarge", "UnicodeDecodeError", "InvalidVarintError",
    "ValueError", "ExtraData", "UnpackException", "UnpackValueError", "FormatError", "StackError",
    "BufferFull", "OutOfData",
})


def _is_parse_error(exc: BaseException) -> bool:
    if isinstance(exc, BaseExceptionGroup):
        return any(_is_parse_error(e) for e in exc.exceptions)
    return any(cls.__name__ in _PARSE_ERROR_NAMES for cls in type(exc).__mro__)


def _peer_of(stream: Any) -> str:
    try:
        return stream.muxed_conn.peer_id.to_base58()
    except Exception:
        return "unknown"


class PeerGuard:
    """Guards one host's inbound streams; records faults; disconnects and refuses banned peers."""

    def __init__(self, host: IHost, *, limits: ResourceLimits = DEFAULT_LIMITS,
                 faults: FaultBook | None = None) -> None:
        self.host = host
        self.limits = limits
        self.scopes = ResourceScopes(limits)
        self.faults = faults or FaultBook()
        self.counters: Counter[str] = Counter()
        self._logged: set[tuple[str, str]] = set()
        self._disconnect_send, self._disconnect_receive = trio.open_memory_channel[str](256)
        self._installed = False

    # ---- installation -------------------------------------------------------------------------------

    def install(self) -> None:
        if self._installed:
            return
        self._installed = True
        network = self.host.get_network()
        inner = network.common_stream_handler  # type: ignore[attr-defined]
        network.common_stream_handler = self._wrap_common(inner)  # type: ignore[attr-defined]
        multiselect = self.host.multiselect  # type: ignore[attr-defined]
        multiselect.handlers = _GuardedHandlers(self, multiselect.handlers)
        network.register_notifee(_BanNotifee(self))
        bound_yamux_buffers(self.host, self.limits, self._on_window_overrun)

    def _on_window_overrun(self, peer_id: str, detail: str, provable: bool) -> None:
        if provable:
            self.fault(peer_id, FaultKind.WINDOW_OVERRUN, detail, protocol="/yamux/1.0.0")
            return
        # our own unread streams filled the connection's buffer: closed for our memory, no fault of the peer
        self.counters["closed.connection-buffer-full"] += 1
        self._log_once(peer_id, "connection-buffer-full", "guard.connection_closed", detail=detail)

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Close connections of peers as they get banned (owned by the node's nursery)."""
        task_status.started()
        async for peer_id in self._disconnect_receive:
            await self._disconnect(peer_id)

    # ---- faults -------------------------------------------------------------------------------------

    def now(self) -> float:
        try:
            return trio.current_time()
        except RuntimeError:  # outside trio (pure tests): any monotonic clock works
            import time
            return time.monotonic()

    def is_banned(self, peer_id: str) -> bool:
        return self.faults.is_banned(peer_id, self.now())

    def fault(self, peer_id: str, kind: FaultKind, detail: str = "", *, protocol: str = "") -> None:
        """Record a fault the peer provably committed; ban and disconnect it at the threshold."""
        self.counters[f"fault.{kind.value}"] += 1
        self._log_once(peer_id, kind.value, "guard.peer_fault", protocol=protocol, detail=detail[:200])
        if self.faults.record(peer_id, kind, self.now()):
            self.counters["banned"] += 1
            log.info("guard.peer_banned", peer=peer_id, reason=kind.value, ban_s=self.faults.ban_s)
            self.request_disconnect(peer_id)

    def request_disconnect(self, peer_id: str) -> None:
        try:
            self._disconnect_send.send_nowait(peer_id)
        except (trio.WouldBlock, trio.ClosedResourceError, RuntimeError):
            pass  # the notifee still closes its connections on their next stream or reconnection

    async def _disconnect(self, peer_id: str) -> None:
        from .keys import to_libp2p_id
        try:
            await self.host.disconnect(to_libp2p_id(peer_id))
        except Exception as exc:
            log.debug("guard.disconnect_failed", peer=peer_id, error=repr(exc)[:200])

    def _log_once(self, peer_id: str, reason: str, event: str, **fields: Any) -> None:
        """One info line per (peer, reason); repeats go to debug (a flood must not flood the log)."""
        key = (peer_id, reason)
        if key in self._logged:
            log.debug(event, peer=peer_id, reason=reason, **fields)
            return
        if len(self._logged) > 10_000:
            self._logged.clear()
        self._logged.add(key)
        log.info(event, peer=peer_id, reason=reason, **fields)

    # ---- wrappers -----------------------------------------------------------------------------------

    def _wrap_common(self, inner: Handler) -> Handler:
        async def guarded_common(stream: INetStream) -> None:
            peer_id = _peer_of(stream)
            if self.is_banned(peer_id):
                self.counters["refused.banned"] += 1
                await _reset(stream)
                self.request_disconnect(peer_id)
                return
            if not self.scopes.try_open_stream(peer_id):
                self.counters["refused.streams-per-peer"] += 1
                self._log_once(peer_id, "streams-per-peer", "guard.stream_refused",
                               limit=self.limits.inbound_streams_per_peer)
                await _reset(stream)
                return
            try:
                await inner(stream)
            except Exception as exc:
                # Negotiation failures py-libp2p does not catch itself (a reset mid-negotiation, junk the
                # multistream reader chokes on); handler failures were already handled per protocol.
                self.counters["stream.failed"] += 1
                self._log_once(peer_id, "negotiation", "guard.stream_failed", error=repr(exc)[:200])
                await _reset(stream)
            finally:
                self.scopes.close_stream(peer_id)

        return guarded_common

    def wrap_handler(self, protocol: str, handler: Handler) -> Handler:
        async def guarded(stream: INetStream) -> None:
            peer_id = _peer_of(stream)
            if not self.scopes.try_open_protocol(peer_id, protocol):
                self.counters["refused.streams-per-protocol"] += 1
                self._log_once(peer_id, f"streams-per-protocol:{protocol}", "guard.stream_refused",
                               protocol=protocol, limit=self.scopes.peer_protocol_limit(protocol))
                await _reset(stream)
                return
            try:
                await handler(stream)
            except Exception as exc:
                if _is_parse_error(exc):
                    self.fault(peer_id, FaultKind.MALFORMED_STREAM, repr(exc), protocol=protocol)
                elif isinstance(exc, RuntimeError) and "Nursery is closed" in str(exc):
                    log.debug("guard.stream_during_shutdown", peer=peer_id, protocol=protocol)
                else:
                    self.counters["stream.failed"] += 1
                    self._log_once(peer_id, f"handler:{type(exc).__name__}", "guard.stream_failed",
                                   protocol=protocol, error=repr(exc)[:200])
                await _reset(stream)
            finally:
                self.scopes.close_protocol(peer_id, protocol)

        guarded.__wrapped__ = handler  # type: ignore[attr-defined]
        return guarded


class _GuardedHandlers(dict):  # type: ignore[type-arg]
    """Multistream's protocol -> handler table, wrapping every handler as it is stored."""

    def __init__(self, guard: PeerGuard, initial: dict) -> None:  # type: ignore[type-arg]
        super().__init__()
        self._guard = guard
        for protocol, handler in initial.items():
            self[protocol] = handler

    def __setitem__(self, protocol: Any, handler: Any) -> None:
        if handler is not None and protocol is not None and not hasattr(handler, "__wrapped__"):
            handler = self._guard.wrap_handler(str(protocol), handler)
        super().__setitem__(protocol, handler)


class _BanNotifee(Notifee):
    """Closes connections from banned peers as soon as they are made."""

    def __init__(self, guard: PeerGuard) -> None:
        self.guard = guard

    async def connected(self, network: INetwork, conn: INetConn) -> None:
        peer_id = _peer_of(conn)
        if self.guard.is_banned(peer_id):
            self.guard.counters["refused.banned-connection"] += 1
            self.guard.request_disconnect(peer_id)


async def _reset(stream: INetStream) -> None:
    with trio.move_on_after(2):
        try:
            await stream.reset()
        except Exception:
            pass

