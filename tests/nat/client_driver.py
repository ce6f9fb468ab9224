"""A p2pinfer node + SDK client run as a subprocess inside a namespace of the NAT topology (tests, benchmark).

``python client_driver.py BOOTSTRAP MODEL_NAME [--requests N] [--max-tokens T] [--wait-direct PEER_ID]
[--wait-model] [--role client|peer] [--join-only] [--no-hole-punch]``

Prints one JSON object per line on stdout (log lines go to stderr):

* ``{"joined": true, "peer_id": ..., "join_s": ...}`` once the node has joined (``join_s``: time in
  ``Node.__aenter__``: bootstrap dial, DHT bootstrap, capacity sync, and for ``--role peer`` the
  reachability check); with ``--join-only`` it stops there;
* with ``--wait-model``: ``{"model_seen_s": ...}`` once an announcement for MODEL_NAME arrived;
* with ``--wait-direct PEER_ID``: ``{"direct_to": PEER_ID, "direct": bool, "seconds": ...}`` after dialling
  PEER_ID (through its relay) and waiting up to 60 s for a direct connection (hole punching);
* per request: ``{"ok": true, "executor": ..., "seconds": ..., "tokens": ..., "direct": bool}`` (``direct``:
  whether the connection to the executor was a direct one when the completion arrived), or
  ``{"ok": false, "error": ...}``.
"""

from __future__ import annotations

import argparse
import os
import json
import time

import trio

from p2pinfer.identity import Identity
from p2pinfer.net import NetError, Node, NodeConfig, PeerInfo
from p2pinfer.request.client import AsyncClient
from p2pinfer.wire import now_ms


def emit(**fields: object) -> None:
    print(json.dumps(fields), flush=True)


async def main(args: argparse.Namespace) -> None:
    config = NodeConfig(listen=[args.listen], bootstrap=[args.bootstrap], role=args.role,
                        hole_punch=not args.no_hole_punch)
    started = time.perf_counter()
    async with Node(Identity.generate(), config) as node:
        emit(joined=True, peer_id=node.peer_id, join_s=time.perf_counter() - started,
             reachability=node.reachability)
        if args.join_only:
            return
        client = AsyncClient.on_node(node, verifiers=0)
        if args.wait_model:
            with trio.move_on_after(120):
                while args.model not in await client.models():
                    await trio.sleep(0.05)
            emit(model_seen_s=time.perf_counter() - started)
        if args.wait_direct:
            t0 = time.perf_counter()
            with trio.move_on_after(60):
                while not node.nat.has_direct_connection(args.wait_direct):
                    announcement = node.table.get(args.wait_direct, now_ms())
                    if announcement is not None and not node.nat.is_connected(args.wait_direct):
                        try:  # through the relay; DCUtR then upgrades the connection
                            await node.connect(PeerInfo(args.wait_direct, announcement.addrs), timeout=10)
                        except NetError:
                            pass
                    await trio.sleep(0.05)
            emit(direct_to=args.wait_direct, direct=node.nat.has_direct_connection(args.wait_direct),
                 seconds=time.perf_counter() - t0)
        for _ in range(args.requests):
            t0 = time.perf_counter()
            try:
                completion = await client.generate(model=args.model, prompt=args.prompt,
                                                   max_tokens=args.max_tokens, temperature=0.0)
            except Exception as exc:
                emit(ok=False, error=f"{type(exc).__name__}: {exc}"[:500])
                continue
            emit(ok=True, executor=completion.executor, seconds=time.perf_counter() - t0,
                 tokens=len(completion.token_ids), since_start_s=time.perf_counter() - started,
                 direct=node.nat.has_direct_connection(completion.executor))


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("bootstrap")
    parser.add_argument("model")
    parser.add_argument("--listen", default="/ip4/0.0.0.0/tcp/4001")
    parser.add_argument("--role", choices=["client", "peer"], default="client")
    parser.add_argument("--requests", type=int, default=1)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--prompt", default="def fibonacci(n):")
    parser.add_argument("--wait-direct", default=None)
    parser.add_argument("--wait-model", action="store_true")
    parser.add_argument("--join-only", action="store_true")
    parser.add_argument("--no-hole-punch", action="store_true")
    from p2pinfer.log import configure
    configure(level=os.environ.get("DRIVER_LOG_LEVEL", "info"))  # logs to stderr; stdout: only our JSON
    trio.run(main, parser.parse_args())
