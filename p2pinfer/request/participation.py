"""What this peer itself took part in: requests it executed or verified, for whom, with which result.

A receipt is booked only when the receiving peer took part in its request for its client
(:func:`p2pinfer.settlement.book_receipt`); this bounded in-memory record is that knowledge. Receipts come
seconds after the work, so a record that forgets the oldest entries (or everything, on restart) only drops
receipts that would be late anyway.
"""

from __future__ import annotations

from collections import OrderedDict

from ..settlement import Participation

MAX_REMEMBERED = 4096


class Participations:
    def __init__(self, limit: int = MAX_REMEMBERED) -> None:
        self._limit = limit
        self._seen: OrderedDict[tuple[bytes, bytes], Participation] = OrderedDict()

    def remember(self, request_id: bytes, client: bytes, result_hash: bytes) -> None:
        self._seen[(request_id, result_hash)] = Participation(client, result_hash)
        self._seen.move_to_end((request_id, result_hash))
        while len(self._seen) > self._limit:
            self._seen.popitem(last=False)

    def lookup(self, request_id: bytes, result_hash: bytes) -> Participation | None:
        return self._seen.get((request_id, result_hash))
