"""Honest service under attack: a 4-peer network with and without one hostile peer, in one run.

    python benchmarks/hostile.py                          # fixture model tiny-llama-trained
    python benchmarks/hostile.py --requests 40 --flooders 16

Phases (same network, same client, sequential honest requests of a few tokens each):

1. **baseline**: no attacker.
2. **attack**: a fresh client (it learns all 300 fake announcements by capacity sync when it joins), while
   one attacker at once
   * floods offers: signed TaskOffers from its own key to every peer on ``/p2pinfer/bid/1``, 8 streams;
   * sends junk frames: ``04 ff ff ff ff`` and friends on ``/meshsub/1.1.0``, ``/p2pinfer/bid/1`` and
     ``/p2pinfer/task/1`` (with a fresh key whenever its last one is banned);
   * relays 300 fake announcements, each signed by its own Sybil key, pointing at loopback ports nobody
     listens on.
3. **yamux flood** (separate target node): ``--flooders`` attackers, one after another, each with a fresh
   key, try to write 1 GiB of Yamux DATA past the receive window on a stream whose handler is busy;
   reports what they got onto the wire before the target closed them and the target's peak RSS growth.

Prints the honest success rate and median/p99 latency per phase and the attack/baseline ratios. Everything
runs in this process on 127.0.0.1 (real sockets, Noise, Yamux, real model).
"""

from __future__ import annotations

import argparse
import secrets
import statistics
import sys
import time
from contextlib import AsyncExitStack
from pathlib import Path

import trio

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from adversarial.attacker import Attacker, relay_until_held, rss_bytes, start_rogue_pubsub  # noqa: E402

from p2pinfer import AsyncClient, log  # noqa: E402
from p2pinfer.identity import Identity  # noqa: E402
from p2pinfer.localnet import local_network  # noqa: E402
from p2pinfer.net import FrameStream, Node, NodeConfig  # noqa: E402
from p2pinfer.request.possession import vetting_for  # noqa: E402
from p2pinfer.request.protocol import BID  # noqa: E402
from p2pinfer.runtime import load_model  # noqa: E402
from p2pinfer.wire import CapacityAnnouncement, ModelOffer, TaskOffer, encode_signed, now_ms  # noqa: E402

JUNK = (b"\x04\xff\xff\xff\xff", b"\xff" * 11, b"\xff\xff\xff\xff\x0f" + b"x" * 64, bytes(range(256)))
SYBILS = 300


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


async def honest_requests(client: AsyncClient, model: str, n: int) -> tuple[int, list[float]]:
    ok, latencies = 0, []
    for i in range(n):
        started = time.perf_counter()
        try:
            await client.generate(model=model, prompt=f"def f{i}(", max_tokens=4)
        except Exception as exc:  # counted as a failure; the benchmark reports the rate
            print(f"  request {i} failed: {type(exc).__name__}: {str(exc)[:120]}", file=sys.stderr)
            continue
        ok += 1
        latencies.append(time.perf_counter() - started)
    return ok, latencies


async def flood_offers(attacker: Node, peers: list[str], digest: bytes, counts: dict[str, int]) -> None:
    async def one_stream(peer_id: str) -> None:
        while True:
            offer = TaskOffer(request_id=secrets.token_bytes(32), model=digest, max_tokens=4, epoch_seed=b"",
                              expires_at_ms=now_ms() + 30_000)
            try:
                await attacker.request(peer_id, BID, encode_signed(attacker.identity, offer), timeout=5)
                counts["offers"] += 1
            except Exception:
                counts["offers_failed"] += 1
                await trio.sleep(0.05)

    async with trio.open_nursery() as nursery:
        for i in range(8):
            nursery.start_soon(one_stream, peers[i % len(peers)])


async def junk_frames(peers: list[tuple[str, str]], counts: dict[str, int]) -> None:
    async with AsyncExitStack() as stack:  # this task's own attacking hosts
        await _junk_loop(stack, peers, counts)


async def _junk_loop(stack: AsyncExitStack, peers: list[tuple[str, str]], counts: dict[str, int]) -> None:
    attacker: Attacker | None = None
    while True:
        for peer_id, addr in peers:
            for protocol in ("/meshsub/1.1.0", BID.id, "/p2pinfer/task/1"):
                for junk in JUNK:
                    try:
                        if attacker is None or not attacker.connected_to(peer_id):
                            attacker = await Attacker.start(stack)
                            await attacker.connect(addr)
                        await attacker.send_junk(peer_id, protocol, junk, linger=0.01)
                        counts["junk"] += 1
                    except Exception:
                        attacker = None
                        counts["junk_refused"] += 1
                    await trio.sleep(0.01)


def sybil_announcement(sybil: Identity, i: int, digest: bytes, name: str) -> bytes:
    now = now_ms()
    return encode_signed(sybil, CapacityAnnouncement(
        peer_id=sybil.peer_id, addrs=(f"/ip4/127.0.{1 + i // 250}.{1 + i % 250}/tcp/9",),
        models=(ModelOffer(digest=digest, name=name, numeric_class="fp32-cpu", context_length=2048,
                           max_new_tokens=256, decode_tokens_per_s=1000.0),),
        free_slots=8, total_slots=8, software="sybil", seq=now, issued_at_ms=now, expires_at_ms=now + 170_000))


async def network_phases(model, requests: int) -> dict[str, object]:
    out: dict[str, object] = {}
    async with local_network([model], peers=4) as net:
        async with AsyncClient(bootstrap=net.bootstrap_addrs) as client:
            await client.generate(model=model.name, prompt="warm", max_tokens=2)
            out["baseline"] = await honest_requests(client, model.name, requests)
        async with AsyncExitStack() as stack:
            counts: dict[str, int] = {"offers": 0, "offers_failed": 0, "junk": 0, "junk_refused": 0}
            attacker_node = await stack.enter_async_context(
                Node(Identity.generate(), NodeConfig(listen=("/ip4/127.0.0.1/tcp/0",), role="client",
                                                     bootstrap=tuple(net.bootstrap_addrs))))
            rogue = await start_rogue_pubsub(stack, Identity.generate(), net.bootstrap.addrs[0])
            for i in range(SYBILS):
                sybil = Identity.generate()
                await relay_until_held(rogue, sybil, sybil_announcement(sybil, i, model.digest, model.name),
                                       net.bootstrap)
            with trio.move_on_after(60):
                while len(net.bootstrap.serving(model.digest)) < SYBILS + len(net.peers):
                    await trio.sleep(0.1)
            # A client that joins now learns every announcement (capacity sync), fakes included.
            async with AsyncClient(bootstrap=net.bootstrap_addrs) as client:
                out["sybils_seen"] = len(client.node.serving(model.digest)) - len(net.peers)
                started = time.perf_counter()
                await client.generate(model=model.name, prompt="warm", max_tokens=2)
                out["first_request_s"] = time.perf_counter() - started  # includes challenging every candidate
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(flood_offers, attacker_node, [p.peer_id for p in net.peers], model.digest,
                                       counts)
                    nursery.start_soon(junk_frames, [(p.peer_id, p.node.addrs[0]) for p in net.peers], counts)
                    await trio.sleep(1.0)
                    out["attack"] = await honest_requests(client, model.name, requests)
                    nursery.cancel_scope.cancel()
                out["vetting"] = dict(vetting_for(client.node).counters)
            out["counts"] = counts
            out["banned"] = sum(p.node.counters.get("banned", 0) for p in net.peers)
            out["alive"] = all(net.alive(p.peer_id) for p in net.peers)
    return out


async def yamux_flood(flooders: int) -> dict[str, float]:
    async with AsyncExitStack() as stack:
        target = await stack.enter_async_context(Node(Identity.generate(), NodeConfig(listen=("/ip4/127.0.0.1/tcp/0",))))
        release = trio.Event()

        async def busy(frames: FrameStream) -> None:
            await release.wait()

        target.register_handler("/bench/busy/1", busy)
        before = peak = rss_bytes()
        sent = connections = most = 0
        started = time.perf_counter()

        async def sample() -> None:
            nonlocal peak
            while True:
                peak = max(peak, rss_bytes())
                await trio.sleep(0.01)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(sample)
            for _ in range(flooders):  # each one is banned, so the next comes with a fresh key
                async with AsyncExitStack() as attack:
                    attacker = await Attacker.start(attack)
                    await attacker.connect(target.addrs[0])
                    stream = await attacker.open(target.peer_id, "/bench/busy/1")
                    got = await attacker.flood_past_window(stream, 1 << 30)
                    sent += got
                    most = max(most, got)
                    connections += 1
            nursery.cancel_scope.cancel()
        release.set()
        return {"sent_mib": sent / 2**20, "connections": connections, "most_mib": most / 2**20, "peak_growth_mib": (peak - before) / 2**20,
                "seconds": time.perf_counter() - started, "banned": target.counters.get("banned", 0)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(ROOT.parent / "shared" / "models" / "tiny-llama-trained"))
    parser.add_argument("--requests", type=int, default=30)
    parser.add_argument("--flooders", type=int, default=16, help="Yamux flooders, one after another")
    args = parser.parse_args()
    log.configure(level="error")
    model_dir = Path(args.model)
    model = load_model(model_dir, name=model_dir.name, providers=["CPUExecutionProvider"])

    result = trio.run(network_phases, model, args.requests)
    print(f"model {model.name}, 4 peers + bootstrap, {args.requests} honest requests of 4 tokens per phase")
    rows = []
    for phase in ("baseline", "attack"):
        ok, lat = result[phase]  # type: ignore[misc]
        med, p99 = (statistics.median(lat), percentile(lat, 0.99)) if lat else (float("nan"), float("nan"))
        rows.append((med, p99))
        print(f"{phase:9s} success {ok}/{args.requests} = {ok / args.requests:6.1%}   "
              f"median {med * 1000:7.1f} ms   p99 {p99 * 1000:7.1f} ms")
    print(f"attack / baseline: median x{rows[1][0] / rows[0][0]:.2f}, p99 x{rows[1][1] / rows[0][1]:.2f}")
    print(f"attacker: {result['counts']}, sybil announcements seen by the client: {result['sybils_seen']}, "
          f"bans by the peers: {result['banned']}, every peer still running: {result['alive']}")
    print(f"first request with {result['sybils_seen']} unvetted fakes among the candidates: "
          f"{result['first_request_s'] * 1000:.0f} ms (challenges every candidate once); "
          f"possession outcomes: {result['vetting']}")
    flood = trio.run(yamux_flood, args.flooders)
    print(f"yamux flood: {flood['connections']} flooders each trying 1 GiB past the window got "
          f"{flood['sent_mib']:.1f} MiB onto the wire in all (at most {flood['most_mib']:.2f} MiB each) "
          f"in {flood['seconds']:.1f} s; target peak RSS growth {flood['peak_growth_mib']:.1f} MiB "
          f"(goal <= 64); bans {flood['banned']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
