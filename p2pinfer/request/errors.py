"""Errors a client of the network can get. Each message says what happened and what to try."""

from __future__ import annotations

from ..errors import P2PInferError


class RequestError(P2PInferError):
    """Base class of errors raised by Client / AsyncClient."""


class BadParameters(RequestError, ValueError):
    """A request parameter is missing, of the wrong type or out of range. ``param`` names it, when known."""

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class PromptTooLarge(BadParameters):
    """The prompt (or all chat messages together) is larger than one request may carry; nothing was sent."""


class NoPeerServesModel(RequestError):
    """No known peer announces the requested model."""


class NoBidsInTime(RequestError):
    """Peers serving the model exist, but none bid (all busy, or no answer before the deadline)."""


class AllCandidatesFailed(RequestError):
    """Every elected candidate failed or refused while running the request."""


class NotConnected(RequestError):
    """The client could not reach any bootstrap node or peer."""


class VerificationFailed(RequestError):
    """``verify="wait"``: the output was not verified, so it is withheld. ``.verification`` says why."""

    def __init__(self, message: str, verification: object = None) -> None:
        super().__init__(message)
        self.verification = verification


class ResultRejected(VerificationFailed):
    """A majority of the verifiers rejected the executor's result (its executor is now penalized and
    excluded by this client; retrying goes to another peer)."""


class QuorumNotReached(VerificationFailed):
    """Too few verifiers answered (or they disagreed) for a majority decision; the output is unverified.
    Retry, or use ``verify="async"`` to take unverified output."""
