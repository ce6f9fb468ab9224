"""The public surface of ``p2pinfer`` (what an SDK user imports) is exactly this list, re-exported trio-style.

Adding or removing a public name is an API change: update PUBLIC here on purpose, and the docs with it.
"""

from __future__ import annotations

import ast
import inspect
import types
from pathlib import Path

import p2pinfer

PUBLIC = {
    "__version__",
    # clients and what they return
    "AsyncClient", "Client", "Completion", "StreamChunk", "ElectionEvidence", "Attempt", "Verification",
    "Outcome", "GenerationParams",
    # errors an SDK user meets
    "P2PInferError", "RequestError", "BadParameters", "NoPeerServesModel", "NoBidsInTime",
    "AllCandidatesFailed", "NotConnected", "VerificationFailed", "ResultRejected", "QuorumNotReached",
    # identity
    "Identity", "peer_id_from_public_key",
}


def public_names(module: types.ModuleType) -> set[str]:
    return {name for name in dir(module)
            if (not name.startswith("_") or name == "__version__")
            and not isinstance(getattr(module, name), types.ModuleType)}


def test_the_public_surface_is_exactly_the_documented_list():
    assert public_names(p2pinfer) == PUBLIC


def test_every_public_name_is_re_exported_as_itself():
    """``from .x import Name as Name``: the form type checkers (and trio) treat as an explicit re-export."""
    tree = ast.parse(Path(inspect.getfile(p2pinfer)).read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            for alias in node.names:
                assert alias.asname == alias.name, f"{alias.name} is imported without 'as {alias.name}'"


def test_errors_form_one_hierarchy_and_verification_errors_carry_the_verification():
    for name in PUBLIC:
        obj = getattr(p2pinfer, name)
        if isinstance(obj, type) and issubclass(obj, Exception):
            assert issubclass(obj, p2pinfer.P2PInferError), name
    assert issubclass(p2pinfer.ResultRejected, p2pinfer.VerificationFailed)
    assert issubclass(p2pinfer.QuorumNotReached, p2pinfer.VerificationFailed)
    assert issubclass(p2pinfer.BadParameters, ValueError)
    error = p2pinfer.ResultRejected("rejected", p2pinfer.Verification(p2pinfer.Outcome.REJECTED))
    assert error.verification.outcome == "rejected" and not error.verification.verified


def test_outcomes_compare_equal_to_their_wire_strings():
    assert {o.value for o in p2pinfer.Outcome} == {"accepted", "rejected", "unverified", "skipped", "failed"}
    assert p2pinfer.Outcome.ACCEPTED == "accepted"
