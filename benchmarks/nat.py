"""NAT traversal in a namespace topology (tests/nat/topology.py): time to reachable, relayed vs direct.

Run as root: ``nice -n 5 .venv/bin/python benchmarks/nat.py [--requests 5] [--model-dir DIR] [--model NAME]``.

Measures, each from a fresh process start (so Python start-up and, for serving peers, loading the model and
measuring its decode speed are included):

* home peer A (behind NAT): start -> ``reachability: relayed`` printed; start -> its first request served
  through the relay (a public client that started at the same time waits for A's announcement);
* home client B (behind another NAT): join -> direct connection to A by hole punching (DCUtR);
* join time (``Node.__aenter__``) of a public peer and of a client with unreachable home peers in the DHT;
* a 64-token completion from A, median over ``--requests``: relayed (B with hole punching off) vs direct
  (B after the hole punch), latency and tokens/s, with direct/relayed ratios.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.conftest import find_shared_models  # noqa: E402
from tests.nat.procs import addrs_of, cli, client  # noqa: E402
from tests.nat.topology import Topology  # noqa: E402

LISTEN = "/ip4/0.0.0.0/tcp/4001"


def completions(proc, n: int) -> list[dict]:  # type: ignore[no-untyped-def]
    out = [proc.json_line(lambda d: "ok" in d, 300, "a completion") for _ in range(n)]
    bad = [r for r in out if not r["ok"]]
    if bad:
        raise SystemExit(f"requests failed: {bad}")
    return out


def summary(results: list[dict]) -> tuple[float, float]:  # type: ignore[type-arg]
    latency = statistics.median(r["seconds"] for r in results)
    rate = statistics.median(r["tokens"] / r["seconds"] for r in results)
    return latency, rate


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=5)
    parser.add_argument("--model-dir", default=str(find_shared_models() / "tiny-llama-trained"))
    parser.add_argument("--model", default="tiny-llama-trained")
    parser.add_argument("--max-tokens", type=int, default=64)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="p2pinfer-nat-bench-"))
    procs = []
    with Topology() as topo:
        try:
            boot = cli(topo, "boot", tmp / "boot", "bootstrap", "--listen", LISTEN)
            procs.append(boot)
            boot_addr = next(a for a in addrs_of(boot, 120)[0] if a.startswith(f"/ip4/{topo.ip('boot')}/"))

            watcher = client(topo, "client", tmp / "watcher.log", boot_addr, args.model, "--wait-model",
                             "--requests", "1", "--max-tokens", str(args.max_tokens))
            procs.append(watcher)
            watcher.json_line(lambda d: "joined" in d, 120, "the public client's join")
            t_start = time.monotonic()
            home = cli(topo, "homea", tmp / "homea", "peer", "--listen", LISTEN, "--bootstrap", boot_addr,
                       "--model", args.model_dir)
            procs.append(home)
            home_addrs, line = addrs_of(home, 300)
            t_relayed = time.monotonic() - t_start
            home_id = home_addrs[0].rsplit("/", 1)[1]
            first = completions(watcher, 1)[0]
            t_first = time.monotonic() - t_start
            print(f"home peer: {line}")
            print(f"home peer start -> reachable (relayed):        {t_relayed:6.2f} s")
            print(f"home peer start -> first relayed request done: {t_first:6.2f} s  "
                  f"(public client's request took {first['seconds']:.2f} s; direct={first['direct']})")

            joiner = client(topo, "client", tmp / "join-peer.log", boot_addr, args.model, "--role", "peer",
                            "--listen", "/ip4/0.0.0.0/tcp/4002", "--join-only")
            joined = joiner.json_line(lambda d: "joined" in d, 120, "join")
            procs.append(joiner)
            joiner2 = client(topo, "client", tmp / "join-client.log", boot_addr, args.model,
                             "--listen", "/ip4/0.0.0.0/tcp/4003", "--join-only")
            joined2 = joiner2.json_line(lambda d: "joined" in d, 120, "join")
            procs.append(joiner2)
            print(f"join, public peer (AutoNAT included):           {joined['join_s']:6.2f} s  "
                  f"[{joined['reachability']}]")
            print(f"join, client, unreachable home peers in DHT:    {joined2['join_s']:6.2f} s")

            relayed = client(topo, "homeb", tmp / "relayed.log", boot_addr, args.model, "--no-hole-punch",
                             "--requests", str(args.requests), "--max-tokens", str(args.max_tokens))
            procs.append(relayed)
            relayed_results = completions(relayed, args.requests)
            relayed.stop()
            direct = client(topo, "homeb", tmp / "direct.log", boot_addr, args.model, "--wait-direct", home_id,
                            "--requests", str(args.requests), "--max-tokens", str(args.max_tokens))
            procs.append(direct)
            punched = direct.json_line(lambda d: "direct_to" in d, 120, "the hole punch")
            direct_results = completions(direct, args.requests)
            print(f"home B join -> direct connection to home A:     {punched['seconds']:6.2f} s "
                  f"(direct={punched['direct']})")
            if not all(not r["direct"] for r in relayed_results) or not all(r["direct"] for r in direct_results):
                print("WARNING: a relayed request ran direct or a direct one relayed:",
                      [r["direct"] for r in relayed_results], [r["direct"] for r in direct_results])
            rl, rr = summary(relayed_results)
            dl, dr = summary(direct_results)
            print(f"{args.max_tokens}-token completion, median of {args.requests} (model {args.model}):")
            print(f"  relayed: {rl * 1000:7.1f} ms  {rr:7.1f} tokens/s")
            print(f"  direct:  {dl * 1000:7.1f} ms  {dr:7.1f} tokens/s")
            print(f"  direct/relayed: latency x{dl / rl:.2f}, throughput x{dr / rr:.2f}")
        finally:
            for proc in reversed(procs):
                proc.stop()


if __name__ == "__main__":
    main()
