"""p2pinfer: an open peer-to-peer network for AI inference.

Public API: what an application meets (the clients, their results, the errors they raise). Everything else
is internal and may change. Names are re-exported as ``X as X`` (as trio does), so type checkers see them as
public; ``tests/test_exports.py`` guards the list.
"""

from ._version import __version__ as __version__  # first: modules below read it

from .errors import P2PInferError as P2PInferError
from .identity import Identity as Identity, peer_id_from_public_key as peer_id_from_public_key
from .request.client import (
    AsyncClient as AsyncClient,
    Attempt as Attempt,
    Completion as Completion,
    ElectionEvidence as ElectionEvidence,
    StreamChunk as StreamChunk,
)
from .request.errors import (
    AllCandidatesFailed as AllCandidatesFailed,
    BadParameters as BadParameters,
    NoBidsInTime as NoBidsInTime,
    NoPeerServesModel as NoPeerServesModel,
    NotConnected as NotConnected,
    QuorumNotReached as QuorumNotReached,
    RequestError as RequestError,
    ResultRejected as ResultRejected,
    VerificationFailed as VerificationFailed,
)
from .request.params import GenerationParams as GenerationParams
from .request.settling import Verification as Verification
from .request.sync import Client as Client
from .settlement import Outcome as Outcome
