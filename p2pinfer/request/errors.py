"""Errors a client of the network can get. Each message says what happened and what to try."""

from __future__ import annotations

from ..errors import P2PInferError


class RequestError(P2PInferError):
    """Base class of errors raised by Client / AsyncClient."""


class BadParameters(RequestError, ValueError):
    """A request parameter is missing, of the wrong type or out of range."""


class NoPeerServesModel(RequestError):
    """No known peer announces the requested model."""


class NoBidsInTime(RequestError):
    """Peers serving the model exist, but none bid (all busy, or no answer before the deadline)."""


class AllCandidatesFailed(RequestError):
    """Every elected candidate failed or refused while running the request."""


class NotConnected(RequestError):
    """The client could not reach any bootstrap node or peer."""
