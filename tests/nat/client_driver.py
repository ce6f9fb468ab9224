"""A p2pinfer SDK client run as a subprocess inside a namespace of the NAT topology (tests and benchmark).

``python client_driver.py BOOTSTRAP MODEL_DIGEST_HEX --requests N --max-tokens T [--wait-direct PEER_ID]``

Joins through BOOTSTRAP, sends N requests one after another, and prints one JSON object per line:
``{"ok": true, "executor": ..., "seconds": ..., "tokens": ..., "direct": bool}`` (``direct``: whether the
connection to the executor was a direct one when the completion arrived), or ``{"ok": false, "error": ...}``.
With ``--wait-direct PEER_ID`` it first waits (up to 60 s) until it holds a direct connection to that peer.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import trio

from p2pinfer.net import NetError, PeerInfo
from p2pinfer.request.client import AsyncClient
from p2pinfer.wire import now_ms


async def main(args: argparse.Namespace) -> None:
    async with AsyncClient(bootstrap=[args.bootstrap], listen=[args.listen], verifiers=0) as client:
        node = client.node
        print(json.dumps({"joined": True, "peer_id": node.peer_id}), flush=True)
        if args.wait_direct:
            with trio.move_on_after(60):
                while not node.nat.has_direct_connection(args.wait_direct):
                    announcement = node.table.get(args.wait_direct, now_ms())
                    if announcement is not None and not node.nat.is_connected(args.wait_direct):
                        try:  # through the relay; DCUtR then upgrades the connection on its own
                            await node.connect(PeerInfo(args.wait_direct, announcement.addrs), timeout=10)
                        except NetError:
                            pass
                    await trio.sleep(0.1)
            print(json.dumps({"direct_to": args.wait_direct,
                              "direct": node.nat.has_direct_connection(args.wait_direct)}), flush=True)
        for _ in range(args.requests):
            started = time.perf_counter()
            try:
                completion = await client.generate(model=args.model, prompt=args.prompt,
                                                   max_tokens=args.max_tokens, temperature=0.0)
            except Exception as exc:
                print(json.dumps({"ok": False, "error": f"{type(exc).__name__}: {exc}"[:500]}), flush=True)
                continue
            seconds = time.perf_counter() - started
            print(json.dumps({"ok": True, "executor": completion.executor, "seconds": seconds,
                              "tokens": len(completion.token_ids),
                              "direct": node.nat.has_direct_connection(completion.executor)}), flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("bootstrap")
    parser.add_argument("model")
    parser.add_argument("--listen", default="/ip4/0.0.0.0/tcp/4001")
    parser.add_argument("--requests", type=int, default=1)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--prompt", default="def fibonacci(n):")
    parser.add_argument("--wait-direct", default=None)
    from p2pinfer.log import configure
    configure(level="info")  # log lines to stderr; stdout carries only our JSON lines
    trio.run(main, parser.parse_args())
    sys.exit(0)
