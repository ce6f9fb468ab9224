"""Sybils must cost something: announcements alone never get work; a peer without the weights is caught.

Real peers with real models on 127.0.0.1. The attacker relays 300 valid announcements, each signed by its
own fresh key (one GossipSub connection carrying 300 identities), that point at loopback addresses
nobody listens on; and one real peer serves a perturbed model under the honest model's digest.
"""

from __future__ import annotations

from contextlib import AsyncExitStack
from dataclasses import replace
from functools import partial

import pytest
import trio

from p2pinfer.identity import Identity
from p2pinfer.localnet import local_network
from p2pinfer.request.client import AsyncClient
from p2pinfer.request.possession import vetting_for
from p2pinfer.request.possession_rules import Possession
from p2pinfer.wire import CapacityAnnouncement, ModelOffer, decode_signed, encode_signed, now_ms

from net.helpers import wait_until
from .attacker import relay_until_held, start_rogue_pubsub

MODEL = "tiny-llama-trained"
SYBILS = 300
REQUESTS = 20


def sybil_announcement(sybil: Identity, i: int, digest: bytes) -> bytes:
    now = now_ms()
    # 127.0.1.x / 127.0.2.x: one distinct loopback host per Sybil (so the per-host quota does not hide them),
    # port 9 (discard): nobody listens, a dial is refused at once and nothing leaves the machine.
    host = f"127.0.{1 + i // 250}.{1 + i % 250}"
    return encode_signed(sybil, CapacityAnnouncement(
        peer_id=sybil.peer_id, addrs=(f"/ip4/{host}/tcp/9",),
        models=(ModelOffer(digest=digest, name=MODEL, numeric_class="fp32-cpu", context_length=2048,
                           max_new_tokens=256, decode_tokens_per_s=1000.0),),
        free_slots=8, total_slots=8, software="sybil", seq=now, issued_at_ms=now, expires_at_ms=now + 170_000))


async def test_possession_challenge_tells_real_weights_from_a_different_model(honest, perturbed) -> None:
    async with local_network([honest], peers=3, peer_models=[[perturbed], [honest], [honest]]) as net:
        cheater, checker, other = net.peers
        vetting = vetting_for(checker.node)  # a serving peer: it holds the model and recomputes
        assert await vetting.challenge(cheater.peer_id, honest.digest) is Possession.WRONG
        assert await vetting.challenge(other.peer_id, honest.digest) is Possession.PROVEN
        async with AsyncClient(bootstrap=net.bootstrap_addrs) as client:  # no model: can only see an answer
            bare = vetting_for(client.node)
            assert await bare.challenge(other.peer_id, honest.digest) is Possession.ANSWERED
            nobody = Identity.generate().peer_id
            assert await bare.challenge(nobody, honest.digest, timeout=3) is Possession.UNREACHABLE
        # The gateway's client (on the checker's node) never offers work to the cheater.
        gateway_client = AsyncClient.on_node(checker.node)
        completion = await gateway_client.generate(model=MODEL, prompt="def main(", max_tokens=4)
        assert completion.executor != cheater.peer_id
        assert cheater.peer_id not in completion.election.ranking


async def test_300_fake_announcements_do_not_stop_honest_requests(honest) -> None:
    async with local_network([honest], peers=2) as net, AsyncExitStack() as stack:
        rogue = await start_rogue_pubsub(stack, Identity.generate(), net.bootstrap.addrs[0])
        sybils = [Identity.generate() for _ in range(SYBILS)]
        for i, sybil in enumerate(sybils):
            await relay_until_held(rogue, sybil, sybil_announcement(sybil, i, honest.digest), net.bootstrap)
        with trio.fail_after(120):
            while len(net.bootstrap.serving(honest.digest)) < SYBILS:
                await trio.sleep(0.1)
        async with AsyncClient(bootstrap=net.bootstrap_addrs) as client:  # joins after them: capacity sync
            with trio.fail_after(120):
                while len(client.node.serving(honest.digest)) < SYBILS:  # they really are on the network
                    await trio.sleep(0.1)
            ok = 0
            for i in range(REQUESTS):
                try:
                    completion = await client.generate(model=MODEL, prompt=f"def f{i}(", max_tokens=4)
                except Exception:
                    continue
                assert completion.executor in {p.peer_id for p in net.peers}
                ok += 1
            assert ok / REQUESTS >= 0.99, f"{ok}/{REQUESTS} honest requests succeeded"
            counters = vetting_for(client.node).counters
            assert counters.get("unreachable", 0) >= SYBILS * 0.9, counters
        # Nobody was penalized for relaying valid announcements.
        assert not net.bootstrap.guard.is_banned(net.peers[0].peer_id)


async def test_fakes_that_accept_connections_and_never_answer_cannot_hold_requests(honest, tmp_path) -> None:
    """Tarpit Sybils: their announced address accepts TCP and then says nothing. Challenges to them time out
    (each within its timeout, all within the vetting budget); honest requests go through, and the first
    request's vetting reaches *every* honest peer: a tarpit's dial holds a dial slot of the client's node
    until the challenge times out, and 40 of them once left an honest peer's dial queued behind them until
    its own challenge timed out (a first request failed when both honest peers were queued there). The client
    starts without the model's tokenizer: it fetches it from a vetted peer, not from the fakes (which announce
    the most free slots, so they come first in the table: 40 fetches timing out one after the other)."""
    held: list[trio.SocketStream] = []

    async def tarpit(stream: trio.SocketStream) -> None:
        held.append(stream)
        await trio.sleep_forever()

    async with local_network([honest], peers=2) as net, AsyncExitStack() as stack:
        nursery = await stack.enter_async_context(trio.open_nursery())
        listeners = await nursery.start(partial(trio.serve_tcp, tarpit, 0, host="127.0.0.1"))
        port = listeners[0].socket.getsockname()[1]
        rogue = await start_rogue_pubsub(stack, Identity.generate(), net.bootstrap.addrs[0])
        for i in range(40):
            sybil = Identity.generate()
            fake = decode_signed(sybil_announcement(sybil, i, honest.digest)).message
            data = encode_signed(sybil, replace(fake, addrs=(f"/ip4/127.0.0.1/tcp/{port}",)))
            await relay_until_held(rogue, sybil, data, net.bootstrap)
        async with AsyncClient(bootstrap=net.bootstrap_addrs, tokenizer_cache=tmp_path) as client:
            assert len(client.node.serving(honest.digest)) >= 40
            assert not client.tokenizers.has(honest.digest)
            vetting = vetting_for(client.node)
            completion = await client.generate(model=MODEL, prompt="def g(", max_tokens=4)
            assert completion.executor in {p.peer_id for p in net.peers}
            # Every honest peer was challenged in the first request's round, none queued behind the tarpits:
            # its outcome is known (waited for as an event: the first request may close before the slower
            # honest answer arrives, by the vetting's closing rule) and it answered.
            await wait_until(lambda: all(vetting.status(p.peer_id, honest.digest) is not None for p in net.peers),
                             what="both honest peers' challenges to end")
            outcomes = {p.peer_id: vetting.status(p.peer_id, honest.digest) for p in net.peers}
            assert set(outcomes.values()) == {Possession.ANSWERED}, (outcomes, vetting.counters)
            for i in range(3):
                completion = await client.generate(model=MODEL, prompt=f"def g{i}(", max_tokens=4)
                assert completion.executor in {p.peer_id for p in net.peers}
        assert held, "the tarpit was never dialled"
        nursery.cancel_scope.cancel()
