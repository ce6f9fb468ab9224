"""p2pinfer: an open peer-to-peer network for AI inference.

Public API (what applications need); everything else is internal and may change.
"""

from importlib.metadata import PackageNotFoundError, version as _version

try:
    __version__ = _version("p2pinfer")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"

from .errors import P2PInferError
from .identity import Identity, peer_id_from_public_key
from .request.client import AsyncClient, Completion, ElectionEvidence, StreamChunk
from .request.errors import (
    AllCandidatesFailed,
    BadParameters,
    NoBidsInTime,
    NoPeerServesModel,
    NotConnected,
    RequestError,
)
from .request.sync import Client

__all__ = [
    "__version__",
    "AllCandidatesFailed",
    "AsyncClient",
    "BadParameters",
    "Client",
    "Completion",
    "ElectionEvidence",
    "Identity",
    "NoBidsInTime",
    "NoPeerServesModel",
    "NotConnected",
    "P2PInferError",
    "RequestError",
    "StreamChunk",
    "peer_id_from_public_key",
]
