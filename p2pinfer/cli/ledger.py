"""``p2pinfer ledger``: look at this node's ledger and export its signed receipts for settlement elsewhere."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from .common import CREDIT_MEANING, AppContext, credits, plural


def _open(app: AppContext, path: Path | None):
    from ..ledger import LEDGER_FILE, Ledger

    path = path or app.config.data_dir / LEDGER_FILE
    if not path.exists():
        raise click.ClickException(f"no ledger at {path}: a peer creates it when it first books a receipt "
                                   "(pass --ledger FILE or --data-dir DIR to read another one)")
    return Ledger(path)


@click.group("ledger")
def ledger() -> None:
    """This node's ledger: receipts, verdicts, credits, penalties and fraud records."""


@ledger.command("export")
@click.option("--ledger", "path", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="Ledger file [default: DATA_DIR/ledger.sqlite].")
@click.option("--out", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="Write to FILE instead of stdout.")
def export_cmd(path: Path | None, out: Path | None) -> None:
    """Write every signed receipt as one JSON object per line.

    Each line holds the receipt's fields and ``envelope``: the signed envelope in hex, which anyone can check
    with the client's public key (``p2pinfer.wire.decode_signed``).
    """
    from ..identity import peer_id_from_public_key
    from ..wire import Receipt, decode_signed

    app = click.get_current_context().find_object(AppContext)
    with _open(app, path) as book:
        stream = open(out, "w", encoding="utf-8") if out else sys.stdout
        try:
            n = 0
            for envelope in book.receipts():
                signed = decode_signed(envelope, expect=Receipt)
                r = signed.message
                stream.write(json.dumps({
                    "request_id": r.request_id.hex(), "model": r.model.hex(),
                    "client": peer_id_from_public_key(r.client), "executor": peer_id_from_public_key(r.executor),
                    "verifiers": [peer_id_from_public_key(k) for k in r.verifiers], "outcome": r.outcome,
                    "output_tokens": r.output_tokens, "inherited_tokens": r.inherited_tokens,
                    "issued_at_ms": r.issued_at_ms, "message_id": signed.message_id.hex(),
                    "envelope": envelope.hex(),
                }, sort_keys=True) + "\n")
                n += 1
        finally:
            if out:
                stream.close()
    click.echo(f"exported {plural(n, 'signed receipt')}", err=True)


@ledger.command("show")
@click.option("--ledger", "path", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="Ledger file [default: DATA_DIR/ledger.sqlite].")
def show_cmd(path: Path | None) -> None:
    """Balances and reputation per peer, and fraud records."""
    from ..identity import peer_id_from_public_key
    from ..wire import now_ms

    app = click.get_current_context().find_object(AppContext)
    with _open(app, path) as book:
        now = now_ms()
        balances = book.balances()
        click.echo(f"{plural(len(list(book.receipts())), 'receipt')}, "
                   f"{plural(book.entry_count(), 'entry', 'entries')}, "
                   f"{plural(len(book.fraud_records()), 'fraud record')} in this node's own ledger")
        if balances:
            click.echo(f"({CREDIT_MEANING})")
        for key, total in sorted(balances.items(), key=lambda kv: -kv[1]):
            s = book.standing(key, now_ms=now)
            click.echo(f"{peer_id_from_public_key(key)}  balance {credits(total, signed=True)}  "
                       f"reputation {s.score:.2f}" + ("  EXCLUDED" if s.excluded else ""))
        for f in book.fraud_records():
            click.echo(f"fraud {f.status}: executor {peer_id_from_public_key(f.executor)} "
                       f"request {f.request_id.hex()[:16]}…")
