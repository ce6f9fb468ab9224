"""Which duplicate connection to a peer stays, decided alike at both ends (pure).

When two peers dial each other at the same moment, each ends up with two direct connections to the other:
the one it dialled and the one it accepted. Closing "the other one" at each end closes both (each end keeps
a different one). Both ends must close the *same* connection, so the rule may only use facts both ends see:
who dialled it. The connection dialled by the peer with the smaller peer ID (compared as bytes) stays; the
ones dialled by the larger peer ID are closed, by both ends. (libp2p's simultaneous-open extension to
multistream-select settles a related race, two ends both acting as dialler on *one* TCP connection, the same
way: both ends compare values they both know. Here the peer IDs are that shared order.)

Relayed connections are not duplicates of direct ones here: a relayed connection is closed by DCUtR once a
direct one exists (see :mod:`p2pinfer.net.nat`). Several direct connections dialled by the same peer are not
settled by this rule (only their dialler knows which it will keep); py-libp2p's own per-peer trim bounds
them.
"""

from __future__ import annotations

import enum
from typing import Sequence


class Dialer(enum.Enum):
    """Who opened a connection, seen from one end."""

    US = "us"
    THEM = "them"
    RELAYED = "relayed"  # a relayed connection: never a duplicate of a direct one
    UNKNOWN = "unknown"  # py-libp2p did not record the direction: left alone


def keeping_dialer(local_peer: bytes, remote_peer: bytes) -> Dialer:
    """The dialer whose connection stays, from the local end: the one with the smaller peer ID."""
    return Dialer.US if local_peer < remote_peer else Dialer.THEM


def duplicates_to_close(local_peer: bytes, remote_peer: bytes, dialers: Sequence[Dialer]) -> list[int]:
    """Indices (into ``dialers``, one entry per open connection to ``remote_peer``) of the connections to
    close: those dialled by the larger peer ID, when one dialled by the smaller peer ID exists."""
    keep = keeping_dialer(local_peer, remote_peer)
    lose = Dialer.THEM if keep is Dialer.US else Dialer.US
    if keep not in dialers:
        return []
    return [i for i, dialer in enumerate(dialers) if dialer is lose]
