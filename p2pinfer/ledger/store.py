"""The persistent ledger: one SQLite file per peer (or client), WAL journal, ``synchronous=FULL``.

Every write is one transaction; once a write method returns, its entries survive a crash or a SIGKILL
(WAL + FULL fsyncs the log on every commit). The schema and its migrations live in :data:`MIGRATIONS`;
``PRAGMA user_version`` records how many have run. Methods are blocking (SQLite) and thread-safe: async
callers run them in a worker thread (``trio.to_thread.run_sync``).
"""

from __future__ import annotations

import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Iterator, Sequence

from ..log import get_logger
from ..wire import Receipt, Signed, Verdict, decode_signed
from ..settlement import EXCLUDING_FRAUD, Entry, FraudStatus

if TYPE_CHECKING:
    from ..reputation import Standing

log = get_logger("p2pinfer.ledger")

LEDGER_FILE = "ledger.sqlite"

MIGRATIONS: tuple[str, ...] = (
    # 1: receipts, verdicts, credits/penalties, fraud records
    """
    CREATE TABLE receipts (
        message_id   BLOB PRIMARY KEY,
        request_id   BLOB NOT NULL,
        client       BLOB NOT NULL,
        executor     BLOB NOT NULL,
        result_hash  BLOB NOT NULL,
        outcome      TEXT NOT NULL,
        output_tokens INTEGER NOT NULL,
        issued_at_ms INTEGER NOT NULL,
        envelope     BLOB NOT NULL
    );
    CREATE INDEX receipts_request ON receipts(request_id);
    CREATE TABLE verdicts (
        message_id   BLOB PRIMARY KEY,
        request_id   BLOB NOT NULL,
        result_hash  BLOB NOT NULL,
        verifier     BLOB NOT NULL,
        accept       INTEGER NOT NULL,
        issued_at_ms INTEGER NOT NULL,
        envelope     BLOB NOT NULL
    );
    CREATE TABLE entries (
        id         INTEGER PRIMARY KEY AUTOINCREMENT,
        peer       BLOB NOT NULL,
        kind       TEXT NOT NULL,
        amount     INTEGER NOT NULL,
        request_id BLOB NOT NULL,
        at_ms      INTEGER NOT NULL,
        note       TEXT NOT NULL DEFAULT '',
        UNIQUE (peer, kind, request_id)
    );
    CREATE INDEX entries_peer ON entries(peer, at_ms);
    CREATE TABLE fraud (
        result_hash BLOB PRIMARY KEY,
        executor    BLOB NOT NULL,
        request_id  BLOB NOT NULL,
        status      TEXT NOT NULL,
        at_ms       INTEGER NOT NULL,
        proof       BLOB NOT NULL
    );
    CREATE INDEX fraud_executor ON fraud(executor);
    """,
)

PROVEN = FraudStatus.PROVEN
PROVEN_INHERITED = FraudStatus.PROVEN_INHERITED
QUORUM_REJECTED = FraudStatus.QUORUM_REJECTED
DISPROVEN = FraudStatus.DISPROVEN
UNCHECKED = FraudStatus.UNCHECKED


@dataclass(frozen=True)
class FraudRecord:
    result_hash: bytes
    executor: bytes
    request_id: bytes
    status: str
    at_ms: int
    proof: bytes


class LedgerError(Exception):
    pass


class Ledger:
    """``Ledger(path)`` opens (creating and migrating) the ledger at ``path``; ``Ledger(None)`` is in memory."""

    def __init__(self, path: Path | str | None = None) -> None:
        self.path = None if path is None else Path(path)
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(":memory:" if self.path is None else str(self.path), check_same_thread=False,
                                   isolation_level=None, timeout=10.0)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._migrate()

    def _migrate(self) -> None:
        with self._lock:
            version = self._db.execute("PRAGMA user_version").fetchone()[0]
            if version > len(MIGRATIONS):
                raise LedgerError(f"ledger {self.path} has schema version {version}, newer than this p2pinfer "
                                  f"({len(MIGRATIONS)}); upgrade p2pinfer or use another --data-dir")
            for n in range(version, len(MIGRATIONS)):
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    for statement in _statements(MIGRATIONS[n]):
                        self._db.execute(statement)
                    self._db.execute(f"PRAGMA user_version = {n + 1}")
                    self._db.execute("COMMIT")
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> "Ledger":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- writes (each one transaction) ------------------------------------------------------------

    def _tx(self, work) -> None:  # type: ignore[no-untyped-def]
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                work(self._db)
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def add_entries(self, entries: Iterable[Entry]) -> None:
        rows = [(e.peer, e.kind, e.amount, e.request_id, e.at_ms, e.note) for e in entries]
        self._tx(lambda db: db.executemany(
            "INSERT OR IGNORE INTO entries (peer, kind, amount, request_id, at_ms, note) VALUES (?,?,?,?,?,?)", rows))

    def record_receipt(self, signed: Signed[Receipt], entries: Sequence[Entry] = ()) -> bool:
        """Store a signed receipt and the entries it justifies; False if it was already stored."""
        r = signed.message
        inserted = [False]

        def work(db: sqlite3.Connection) -> None:
            cur = db.execute(
                "INSERT OR IGNORE INTO receipts (message_id, request_id, client, executor, result_hash, outcome, "
                "output_tokens, issued_at_ms, envelope) VALUES (?,?,?,?,?,?,?,?,?)",
                (signed.message_id, r.request_id, r.client, r.executor, r.result_hash, r.outcome, r.output_tokens,
                 r.issued_at_ms, signed.to_bytes()))
            inserted[0] = cur.rowcount == 1
            if inserted[0]:
                db.executemany(
                    "INSERT OR IGNORE INTO entries (peer, kind, amount, request_id, at_ms, note) VALUES (?,?,?,?,?,?)",
                    [(e.peer, e.kind, e.amount, e.request_id, e.at_ms, e.note) for e in entries])

        self._tx(work)
        return inserted[0]

    def record_verdict(self, signed: Signed[Verdict]) -> None:
        v = signed.message
        self._tx(lambda db: db.execute(
            "INSERT OR IGNORE INTO verdicts (message_id, request_id, result_hash, verifier, accept, issued_at_ms, "
            "envelope) VALUES (?,?,?,?,?,?,?)",
            (signed.message_id, v.request_id, v.result_hash, signed.signer, int(v.accept), v.issued_at_ms,
             signed.to_bytes())))

    def record_fraud(self, record: FraudRecord, entries: Sequence[Entry] = ()) -> bool:
        """Store (or upgrade from unchecked) a fraud record with its entries; False if nothing changed."""
        changed = [False]

        def work(db: sqlite3.Connection) -> None:
            row = db.execute("SELECT status FROM fraud WHERE result_hash = ?", (record.result_hash,)).fetchone()
            if row is not None and row[0] != UNCHECKED:
                return
            db.execute("INSERT OR REPLACE INTO fraud (result_hash, executor, request_id, status, at_ms, proof) "
                       "VALUES (?,?,?,?,?,?)", (record.result_hash, record.executor, record.request_id,
                                                record.status, record.at_ms, record.proof))
            db.executemany(
                "INSERT OR IGNORE INTO entries (peer, kind, amount, request_id, at_ms, note) VALUES (?,?,?,?,?,?)",
                [(e.peer, e.kind, e.amount, e.request_id, e.at_ms, e.note) for e in entries])
            changed[0] = True

        self._tx(work)
        return changed[0]

    # ---- reads ------------------------------------------------------------------------------------

    def _rows(self, sql: str, args: tuple = ()) -> list[tuple]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    def entries(self, peer: bytes | None = None, *, since_ms: int = 0) -> list[Entry]:
        if peer is None:
            rows = self._rows("SELECT peer, kind, amount, request_id, at_ms, note FROM entries WHERE at_ms >= ? "
                              "ORDER BY id", (since_ms,))
        else:
            rows = self._rows("SELECT peer, kind, amount, request_id, at_ms, note FROM entries WHERE peer = ? AND "
                              "at_ms >= ? ORDER BY id", (peer, since_ms))
        return [Entry(bytes(p), k, a, bytes(r), t, n) for p, k, a, r, t, n in rows]

    def entry_count(self) -> int:
        return self._rows("SELECT count(*) FROM entries")[0][0]

    def balances(self) -> dict[bytes, int]:
        return {bytes(p): total for p, total in self._rows("SELECT peer, sum(amount) FROM entries GROUP BY peer")}

    def balance(self, peer: bytes) -> int:
        return self._rows("SELECT coalesce(sum(amount), 0) FROM entries WHERE peer = ?", (peer,))[0][0]

    def fraud_records(self, executor: bytes | None = None) -> list[FraudRecord]:
        sql = "SELECT result_hash, executor, request_id, status, at_ms, proof FROM fraud"
        rows = self._rows(sql + (" WHERE executor = ?" if executor else "") + " ORDER BY at_ms",
                          (executor,) if executor else ())
        return [FraudRecord(bytes(h), bytes(e), bytes(r), s, t, bytes(p)) for h, e, r, s, t, p in rows]

    def fraud_status(self, result_hash: bytes) -> str | None:
        rows = self._rows("SELECT status FROM fraud WHERE result_hash = ?", (result_hash,))
        return rows[0][0] if rows else None

    def receipts(self) -> Iterator[bytes]:
        """Signed receipt envelopes, oldest first."""
        for (envelope,) in self._rows("SELECT envelope FROM receipts ORDER BY issued_at_ms, message_id"):
            yield bytes(envelope)

    def recent_receipts(self, limit: int) -> list[bytes]:
        """The ``limit`` most recently issued signed receipt envelopes, newest first."""
        return [bytes(e) for (e,) in self._rows(
            "SELECT envelope FROM receipts ORDER BY issued_at_ms DESC, message_id LIMIT ?", (limit,))]

    def recent_entries(self, peer: bytes, limit: int) -> list[Entry]:
        """``peer``'s ``limit`` most recent entries, oldest first (with :meth:`balance`: its balance over time)."""
        rows = self._rows("SELECT peer, kind, amount, request_id, at_ms, note FROM entries WHERE peer = ? "
                          "ORDER BY id DESC LIMIT ?", (peer, limit))
        return [Entry(bytes(p), k, a, bytes(r), t, n) for p, k, a, r, t, n in reversed(rows)]

    def totals(self, peer: bytes) -> tuple[int, int]:
        """``peer``'s credits (sum of positive entries) and penalties (sum of negative ones, as a positive)."""
        row = self._rows("SELECT coalesce(sum(CASE WHEN amount > 0 THEN amount END), 0), "
                         "coalesce(sum(CASE WHEN amount < 0 THEN -amount END), 0) FROM entries WHERE peer = ?",
                         (peer,))[0]
        return int(row[0]), int(row[1])

    def verdicts(self) -> list[Signed[Verdict]]:
        return [decode_signed(bytes(e), expect=Verdict)
                for (e,) in self._rows("SELECT envelope FROM verdicts ORDER BY issued_at_ms")]

    def standing(self, peer: bytes, *, now_ms: int) -> "Standing":
        from ..reputation import WINDOW_MS, standing  # import here: reputation imports the rules module
        # one rule (p2pinfer.settlement.EXCLUDING_FRAUD): proven fraud, or a result our own quorum rejected
        marks = ",".join("?" * len(EXCLUDING_FRAUD))
        proven = self._rows(f"SELECT max(at_ms) FROM fraud WHERE executor = ? AND status IN ({marks})",
                            (peer, *sorted(EXCLUDING_FRAUD)))[0][0]
        return standing(self.entries(peer, since_ms=now_ms - WINDOW_MS), now_ms=now_ms, fraud_at_ms=proven)

    def excluded(self, peers: Iterable[bytes], *, now_ms: int) -> set[bytes]:
        """The keys among ``peers`` that honest clients leave out of elections (proven fraud, low score)."""
        return {p for p in set(peers) if self.standing(p, now_ms=now_ms).excluded}

    def integrity_check(self) -> str:
        return self._rows("PRAGMA integrity_check")[0][0]


def _statements(script: str) -> list[str]:
    return [s.strip() for s in script.split(";") if s.strip()]
