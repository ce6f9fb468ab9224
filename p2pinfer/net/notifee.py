"""A py-libp2p network notifee that ignores every event: subclasses override only the ones they need.

``libp2p.abc.INotifee`` declares six abstract callbacks; each of our notifees cares about one or two.
"""

from __future__ import annotations

from typing import Any

from libp2p.abc import INetConn, INetStream, INetwork, INotifee


class Notifee(INotifee):
    async def connected(self, network: INetwork, conn: INetConn) -> None:
        pass

    async def disconnected(self, network: INetwork, conn: INetConn) -> None:
        pass

    async def opened_stream(self, network: INetwork, stream: INetStream) -> None:
        pass

    async def closed_stream(self, network: INetwork, stream: INetStream) -> None:
        pass

    async def listen(self, network: INetwork, multiaddr: Any) -> None:
        pass

    async def listen_close(self, network: INetwork, multiaddr: Any) -> None:
        pass
