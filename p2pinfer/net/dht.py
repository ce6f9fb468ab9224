"""Kademlia DHT on a private protocol ID: peer discovery and "who serves model X" provider records.

Workarounds for py-libp2p 0.8.1 that live here:

* **Protocol ID.** ``KadDHT(protocol_prefix=...)`` is stored but never used: the handler is registered
  and every outbound query opened on the module constant ``/ipfs/kad/1.0.0`` (``libp2p.kad_dht.common``),
  and the routing table only admits peers whose identify lists that exact string. We hand KadDHT a thin
  host wrapper (:class:`_PrivateProtocolHost`) that renames ``/ipfs/kad/1.0.0`` to
  :data:`PROTOCOL_ID` (``/p2pinfer/kad/1.0.0``) in ``set_stream_handler``, ``remove_stream_handler`` and
  ``new_stream``, and shows the routing table a peerstore in which peers speaking our protocol appear to
  speak ``/ipfs/kad/1.0.0`` (and IPFS peers appear not to). Result: our DHT speaks only
  ``/p2pinfer/kad/1.0.0`` and never joins (or pollutes) the public IPFS DHT; nothing is monkeypatched
  globally, so other py-libp2p users in the same process are unaffected.
* **No bootstrap, no seeding.** KadDHT never adds connected peers to its routing table by itself and has
  no bootstrap helper; its own refresh runs every 600 s. :meth:`Discovery.bootstrap` connects to the given
  peers, adds them and runs a self-lookup; :meth:`Discovery.run` seeds the routing table from every
  connected peer that identify shows to be a DHT server, and refreshes every ``refresh_interval_s``.
* **find_providers short-circuit.** ``ProviderStore.find_providers`` returns only the local provider store
  if it holds anything for the key (e.g. just ourselves when we also serve the model) and caches remote
  answers there forever (48 h). :meth:`Discovery.find_providers` does its own lookup: the k closest peers
  to the key (where ADD_PROVIDER stored the records) are all asked, results are merged and de-duplicated,
  and nothing is cached. The closest peers already in our routing table are asked at once, beside the
  network lookup, so a lookup cut short by its timeout still returns what they hold; likewise a provider
  record goes to those peers at once, beside ``provide()``'s own lookup.
* Validation is strict: only the standard ``/pk/`` namespace is accepted; every other key is refused
  instead of stored unvalidated (py-libp2p's default). (Earlier versions also stored each peer's capacity
  announcement under ``/p2pcap/``; nothing read it, since gossip and capacity sync carry announcements,
  so it was dropped.)

Provider records are *hints*: py-libp2p keeps them 48 h and has no withdrawal, so a peer that stopped
serving may still be listed. The capacity table (gossip) says who is live and has free slots.
"""

from __future__ import annotations

from typing import Any, Callable

import trio
from libp2p.abc import IHost
from libp2p.custom_types import TProtocol
from libp2p.kad_dht.common import PROTOCOL_ID as _UPSTREAM_KAD_PROTOCOL
from libp2p.kad_dht.kad_dht import DHTMode, KadDHT
from libp2p.peer.id import ID
from libp2p.records.pubkey import PublicKeyValidator
from libp2p.records.validator import NamespacedValidator
from libp2p.tools.anyio_service import background_trio_service

from ..log import get_logger
from ..wire.hashing import tagged_hash
from .addrs import PeerInfo
from .errors import DialError

log = get_logger("p2pinfer.net.dht")

PROTOCOL_ID = "/p2pinfer/kad/1.0.0"
DEFAULT_REFRESH_INTERVAL_S = 300.0
SEED_INTERVAL_S = 1.0
QUERY_TIMEOUT_S = 10.0
FIND_PROVIDERS_PEERS = 20  # Kademlia's k: ADD_PROVIDER stores a record on the k peers closest to the key


def provider_key(model_digest: bytes) -> bytes:
    """The DHT key under which peers serving ``model_digest`` register as providers."""
    if len(model_digest) != 32:
        raise ValueError("a model digest is 32 bytes")
    return tagged_hash("p2pinfer/v1/dht/model-providers", model_digest)


# ---- protocol renaming ------------------------------------------------------------------------------


class _PeerstoreView:
    """The host's peerstore, except that ``get_protocols`` reports our private Kademlia protocol under the
    upstream name (and hides real ``/ipfs/kad/1.0.0``), which is what the routing table's check looks for."""

    def __init__(self, peerstore: Any) -> None:
        self._peerstore = peerstore

    def __getattr__(self, name: str) -> Any:
        return getattr(self._peerstore, name)

    def get_protocols(self, peer_id: ID) -> list[str]:
        protocols = self._peerstore.get_protocols(peer_id)
        if protocols is None:
            return protocols
        return [str(_UPSTREAM_KAD_PROTOCOL) if p == PROTOCOL_ID else p
                for p in protocols if p != str(_UPSTREAM_KAD_PROTOCOL)]


class _PrivateProtocolHost:
    """Delegates everything to the real host, renaming the upstream Kademlia protocol ID to ours."""

    def __init__(self, host: IHost) -> None:
        self._host = host
        self._peerstore_view = _PeerstoreView(host.get_peerstore())

    def __getattr__(self, name: str) -> Any:
        return getattr(self._host, name)

    @staticmethod
    def _rename(protocol: Any) -> TProtocol:
        return TProtocol(PROTOCOL_ID) if str(protocol) == str(_UPSTREAM_KAD_PROTOCOL) else protocol

    def get_peerstore(self) -> Any:
        return self._peerstore_view

    def set_stream_handler(self, protocol_id: Any, handler: Any) -> None:
        self._host.set_stream_handler(self._rename(protocol_id), handler)

    def remove_stream_handler(self, protocol_id: Any) -> None:
        self._host.remove_stream_handler(self._rename(protocol_id))

    async def new_stream(self, peer_id: ID, protocol_ids: Any) -> Any:
        return await self._host.new_stream(peer_id, [self._rename(p) for p in protocol_ids])


# ---- discovery --------------------------------------------------------------------------------------


class Discovery:
    """The DHT of one node: server mode for peers and bootstrap nodes, client mode for SDK clients."""

    def __init__(self, host: IHost, *, server: bool = True,
                 refresh_interval_s: float = DEFAULT_REFRESH_INTERVAL_S) -> None:
        self.host = host
        self.server = server
        self.refresh_interval_s = refresh_interval_s
        validator = NamespacedValidator({"pk": PublicKeyValidator()}, strict_validation=True)
        self.dht = KadDHT(
            _PrivateProtocolHost(host),  # type: ignore[arg-type]
            DHTMode.SERVER if server else DHTMode.CLIENT,
            validator=validator,
            validator_changed=True,
            strict_validation=True,
            # Loopback/private addresses are exempt from the subnet cap anyway; the default applies elsewhere.
        )
        self._provided: set[bytes] = set()

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Run the DHT service, routing-table seeding and periodic refresh until cancelled."""
        async with background_trio_service(self.dht):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._seed_loop)
                nursery.start_soon(self._refresh_loop)
                task_status.started()

    async def _seed_loop(self) -> None:
        while True:
            await self.seed_from_connections()
            await trio.sleep(SEED_INTERVAL_S)

    async def seed_from_connections(self) -> int:
        """Add every connected DHT server (per identify) that the routing table lacks; returns how many.

        Also evicts peers that identify shows are *not* DHT servers: KadDHT adds the sender of every inbound
        query with ``skip_server_mode_check=True``, so DHT clients end up in servers' routing tables and
        are then handed out as "closer peers" that refuse our protocol.
        """
        added = 0
        peerstore = self.host.get_peerstore()
        for peer in list(self.dht.routing_table.get_peer_ids()):
            try:
                protocols = peerstore.get_protocols(peer) or []
            except Exception:
                continue
            if protocols and PROTOCOL_ID not in protocols:
                self.dht.routing_table.remove_peer(peer)
        for peer in list(self.host.get_connected_peers()):
            if self.dht.routing_table.peer_in_table(peer):
                continue
            try:
                protocols = peerstore.get_protocols(peer) or []
            except Exception:
                continue
            if PROTOCOL_ID in protocols and await self.dht.add_peer(peer):
                added += 1
        if added:
            log.debug("dht.seeded", added=added, table=self.dht.get_routing_table_size())
        return added

    async def _refresh_loop(self) -> None:
        while True:
            await trio.sleep(self.refresh_interval_s)
            await self.refresh()

    async def refresh(self) -> None:
        """A self-lookup (fills the routing table) and re-announcement of the models we provide."""
        with trio.move_on_after(QUERY_TIMEOUT_S * 3):
            try:
                await self.dht.peer_routing.refresh_routing_table()
            except Exception as exc:  # a failed refresh must not take the node down; retried next period
                log.warning("dht.refresh_failed", error=repr(exc)[:200])
        for digest in list(self._provided):
            await self._provide_once(digest)
        log.debug("dht.refreshed", table=self.dht.get_routing_table_size())

    async def bootstrap(self, peers: list[PeerInfo], *, connect: Callable[[PeerInfo], Any],
                        refresh_nursery: trio.Nursery | None = None) -> int:
        """Connect to ``peers`` (via ``connect``), add them to the routing table, then look ourselves up.

        Returns how many bootstrap peers were reached. Unreachable ones are logged, not raised. With
        ``refresh_nursery`` the self-lookup runs there in the background: it may wait on dials to peers
        that cannot be reached (behind NAT), and a join must not wait for those.
        """
        reached = 0
        for info in peers:
            if info.peer_id == self.host.get_id().to_base58():
                continue
            try:
                await connect(info)
            except DialError as exc:
                log.warning("dht.bootstrap_unreachable", peer=info.peer_id, error=str(exc)[:200])
                continue
            reached += 1
            # Skip the server-mode check: identify may not have finished yet, and a bootstrap node is a
            # DHT server by definition.
            await self.dht.add_peer(ID.from_base58(info.peer_id), skip_server_mode_check=True)
        log.info("dht.bootstrapped", reached=reached, of=len(peers), table=self.dht.get_routing_table_size())
        if reached:
            if refresh_nursery is not None:
                refresh_nursery.start_soon(self._look_up_self)
            else:
                await self._look_up_self()
        return reached

    async def _look_up_self(self) -> None:
        with trio.move_on_after(QUERY_TIMEOUT_S):
            try:
                await self.dht.peer_routing.refresh_routing_table()
            except Exception as exc:
                log.warning("dht.refresh_failed", error=repr(exc)[:200])
        log.info("dht.self_lookup_done", table=self.dht.get_routing_table_size())

    def routing_table_size(self) -> int:
        return self.dht.get_routing_table_size()

    def routing_table_peers(self) -> list[str]:
        return [p.to_base58() for p in self.dht.routing_table.get_peer_ids()]

    async def _provide_once(self, digest: bytes) -> bool:
        key = provider_key(digest)
        store = self.dht.provider_store
        local = self.host.get_id()
        sent_to_known = [False]

        async def tell(peer: ID) -> None:
            try:  # a private method: the public provide() sends only after its network lookup
                if await store._send_add_provider(peer, key):
                    sent_to_known[0] = True
            except Exception as exc:
                log.debug("dht.add_provider_failed", peer=peer.to_base58(), error=repr(exc)[:200])

        with trio.move_on_after(QUERY_TIMEOUT_S * 2):
            try:
                async with trio.open_nursery() as nursery:
                    # As in find_providers: the closest peers we already know get the record at once, so a
                    # network lookup that runs out of time still leaves it where lookups look first.
                    for peer in self.dht.routing_table.find_local_closest_peers(key, FIND_PROVIDERS_PEERS):
                        if peer != local:
                            nursery.start_soon(tell, peer)
                    stored = await store.provide(key)
                return stored or sent_to_known[0]
            except Exception as exc:
                log.warning("dht.provide_failed", model=digest.hex()[:16], error=repr(exc)[:200])
        return sent_to_known[0]

    async def provide(self, model_digest: bytes) -> bool:
        """Announce in the DHT that we serve ``model_digest`` (re-announced on every refresh)."""
        self._provided.add(model_digest)
        ok = await self._provide_once(model_digest)
        log.debug("dht.provided", model=model_digest.hex()[:16], stored_remotely=ok)
        return ok

    def stop_providing(self, model_digest: bytes) -> None:
        """Stop re-announcing ``model_digest`` (existing records elsewhere age out; see module docstring)."""
        self._provided.discard(model_digest)
        self.dht.provider_store.providing_keys.discard(provider_key(model_digest))
        self.dht.provider_store.providers.get(provider_key(model_digest), {}).pop(self.host.get_id().to_base58(), None)

    async def find_providers(self, model_digest: bytes, *, timeout: float = QUERY_TIMEOUT_S,
                             limit: int = 20) -> list[PeerInfo]:
        """Peers that registered as providers of ``model_digest`` (we are included if we provide it)."""
        key = provider_key(model_digest)
        store = self.dht.provider_store
        found: dict[str, PeerInfo] = {}

        def add(infos: Any) -> None:
            for info in infos:
                ours = PeerInfo.from_libp2p(info)
                prev = found.get(ours.peer_id)
                if prev is None or (not prev.addrs and ours.addrs):
                    found[ours.peer_id] = ours

        add(store.get_providers(key))  # records stored here (we are a DHT server) and our own
        local = self.host.get_id()
        asked: set[ID] = set()

        async def ask(peer: ID) -> None:
            if peer == local or peer in asked:
                return
            asked.add(peer)
            # A private method, but the public find_providers has the short-circuit described above.
            providers, _closer = await store._get_providers_from_peer_with_closers(peer, key)
            add(providers)

        with trio.move_on_after(timeout):
            async with trio.open_nursery() as nursery:
                # The peers we already know nearest the key are asked at once, beside the network lookup: a
                # lookup that runs out of time (a loaded machine, peers behind NAT) still returns what they
                # hold. For a client that just joined, those are its bootstrap nodes.
                for peer in self.dht.routing_table.find_local_closest_peers(key, FIND_PROVIDERS_PEERS):
                    nursery.start_soon(ask, peer)
                for peer in await self.dht.peer_routing.find_closest_peers_network(key, FIND_PROVIDERS_PEERS):
                    nursery.start_soon(ask, peer)
        return sorted(found.values(), key=lambda p: p.peer_id)[:limit]
