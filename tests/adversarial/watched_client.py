"""An SDK client that keeps what each offer round returned, for the silent-candidate test and benchmark."""

from __future__ import annotations

from typing import Any

from p2pinfer.request.client import AsyncClient


class WatchedClient(AsyncClient):
    """Keeps each offer round's bids (how the election closed, who stayed silent) in ``rounds``, in order.

    It hooks :meth:`AsyncClient._offer`, the client's seam for the network half of stage 1."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.rounds: list[Any] = []

    async def _offer(self, request, request_id):  # type: ignore[no-untyped-def]
        bids = await super()._offer(request, request_id)
        self.rounds.append(bids)
        return bids
