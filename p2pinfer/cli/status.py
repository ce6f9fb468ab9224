"""``p2pinfer status``: what the peer running with this data dir knows and has done, as tables."""

from __future__ import annotations

import json
import time
from typing import Any, Sequence

import click

from ..control import read_status
from .common import AppContext


@click.command("status")
@click.option("--json", "as_json", is_flag=True, help="Print the raw status JSON instead of tables.")
@click.option("--timeout", type=click.FloatRange(0.1, 60), default=5.0, show_default=True,
              help="Seconds to wait for the peer's answer.")
@click.pass_obj
def status_cmd(app: AppContext, as_json: bool, timeout: float) -> None:
    """Show the running peer's known peers, its own counts and recent requests.

    Reads the control socket (DATA_DIR/control.sock) of the peer started with the same --data-dir.
    """
    status = read_status(app.config.data_dir, timeout=timeout)
    if as_json:
        click.echo(json.dumps(status, indent=2))
    else:
        click.echo(render_status(status))


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain-text table with aligned columns (no box drawing: it stays readable when piped)."""
    cells = [[str(h) for h in headers]] + [["-" if v is None else str(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _short(peer_id: str) -> str:
    return peer_id if len(peer_id) <= 20 else f"{peer_id[:8]}…{peer_id[-8:]}"


def _ago(ms: int | None, now_ms: int) -> str:
    if not ms:
        return "-"
    seconds = max(0, (now_ms - ms) / 1000)
    if seconds < 120:
        return f"{seconds:.0f}s ago"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m ago"
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(ms / 1000))


def render_status(status: dict[str, Any]) -> str:
    peer = status.get("peer", {})
    now = status.get("generated_at_ms") or int(time.time() * 1000)
    counters = peer.get("counters", {})
    role = "bootstrap node" if peer.get("role") == "bootstrap" else "peer"
    out = [f"{role} {peer.get('peer_id')} (you)  (p2pinfer {peer.get('version')}, up {peer.get('uptime_s')} s, "
           f"{peer.get('connected_peers')} connected)"]
    for name, url in sorted(peer.get("urls", {}).items()):
        out.append(f"  {name}: {url}")
    if peer.get("models") is not None:
        slots = peer.get("slots", {})
        models = ", ".join(m["name"] for m in peer["models"]) or "none"
        out.append(f"  serves: {models}  (slots {slots.get('free')}/{slots.get('total')} free)")
    out.append("")
    out.append("Own counts")
    gossip = peer.get("gossip", {})
    rejected = {k: v for k, v in gossip.items() if k != "accepted"}
    rows = [
        ("credits", "n/a (no ledger)" if peer.get("credits") is None else _credits(peer["credits"])),
        ("penalties", "n/a (no ledger)" if peer.get("penalties") is None else _credits(peer["penalties"])),
        ("offers received", counters.get("offers", 0)),
        ("bids sent", counters.get("bids", 0)),
        ("elections won", counters.get("elections.won", 0)),
        ("tasks completed", counters.get("tasks.completed", 0)),
        ("tasks failed", counters.get("tasks.failed", 0)),
        ("tokens generated", counters.get("tokens.generated", 0)),
        ("refusals", ", ".join(f"{k.removeprefix('refused.')}={v}" for k, v in sorted(counters.items())
                               if k.startswith("refused.")) or 0),
        ("gossip accepted", gossip.get("accepted", 0)),
        ("gossip rejected", ", ".join(f"{k}={v}" for k, v in sorted(rejected.items())) or 0),
    ]
    out.append(table(("what", "count"), rows))
    if peer.get("credits") is not None:
        out.append("(one credit = one output token a verification quorum accepted; verifiers earn 4 per agreeing "
                   "verdict; this is this peer's own ledger)")
    out.append("")
    known = status.get("known_peers", [])
    out.append(f"Known peers ({len(known)}, besides you)")
    mine = peer.get("slots") or {}
    you = [(_short(peer.get("peer_id") or "") + " (you)",
            ", ".join(m["name"] for m in peer.get("models") or []) or ("(bootstrap node)" if role != "peer" else "-"),
            f"{mine['free']}/{mine['total']}" if mine else "-", None, "-", "-")]
    out.append(table(("peer", "models", "slots free", "tok/s", "reputation", "expires in"), you + [
        (_short(p["peer_id"]), ", ".join(m["name"] for m in p["models"]) or "- (client)",
         f"{p['free_slots']}/{p['total_slots']}",
         max((m["decode_tokens_per_s"] for m in p["models"]), default=None) or None,
         _reputation(p.get("reputation")), f"{p['expires_in_s']:.0f} s")
        for p in known]))
    if not known:
        out.append("  no other peer has a live announcement yet (is a bootstrap node reachable?)")
    out.append("")
    requests = status.get("recent_requests", [])
    out.append(f"Recent gateway requests ({len(requests)})")
    out.append(table(("when", "endpoint", "model", "outcome", "executor", "tokens", "verification", "seconds"), [
        (_ago(r["started_at_ms"], now), r["endpoint"] + (" (stream)" if r["stream"] else ""), r["model"],
         r["outcome"], _short(r["executor"]) if r["executor"] else "-", r["tokens"], r["verification"] or "-",
         f"{r['duration_s']:.2f}") for r in requests]) if requests else "  none")
    out.append("")
    tasks = status.get("recent_tasks", [])
    out.append(f"Recent tasks executed ({len(tasks)})")
    out.append(table(("when", "request", "client", "model", "tokens", "outcome", "seconds"), [
        (_ago(t["started_at_ms"], now), t["request_id"][:16], _short(t["client"]), t["model"], t["tokens"],
         t["outcome"], f"{t['duration_s']:.2f}") for t in tasks]) if tasks else "  none")
    return "\n".join(out)


def _credits(amount: int) -> str:
    return f"{amount} credit{'' if amount == 1 else 's'}"


def _reputation(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, dict):
        flags = " (proven fraud)" if value.get("proven_fraud") else " (excluded)" if value.get("excluded") else ""
        return f"{value['score']:.2f}{flags}"
    return str(value)
