"""Which tie tolerance a session's near-tie detector uses: its own path's measured drift from exact arithmetic.

A model has two tolerances (docs/models.md, "Numeric classes and tolerance"):

* the **pair tolerance** (``LoadedModel.tolerance``): how far an honest executor's log-prob may sit from an
  honest verifier's, the fingerprint's allowance per claimed value;
* the **tie tolerance**: how far this party's own float32 row may sit from the exact-arithmetic row. The near-tie
  rule (:mod:`.tiebreak`) needs only that: a party whose detector admits one token has that token as the pick on
  the exact row, whoever the other party is. Calibration measures it per **path** — the way a session computes
  rows, which the party knows about itself: the standard graph, or the 4-bit kernel with its many-row path on AMX
  tiles or float32 FMA and its decode rows on the integer or the float32 path — as
  ``max(MIN_TOLERANCE, SAFETY_FACTOR * worst distance of that path's rows to the float64 reference)``.

The record of one calibration (:attr:`.calibrate.CalibrationResult.tie_tolerances`, stored in the model record) is
kept on the model itself (:attr:`.model.LoadedModel.tie_tolerances`, :func:`record`) beside the pair tolerance
measured with it, and carried to its other sessions: a session uses its path's entry while the model's pair
tolerance is still the one measured beside it. Anything else — a model loaded with a tolerance given by hand, a path the calibration did
not measure (the kernel built after calibrating, ``P2PINFER_DECODE_KERNEL=float`` on a machine without AMX, ...)
— uses the pair tolerance: the single-width rule of calibration format 5, wider than every path's own distance
to the reference wherever both were measured (2.3-3.9x on SmolLM2, docs/models.md), at the cost of as many times
more near ties.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..kernels import DecodePath

STANDARD = "standard"


def path_label(kernel: bool, amx: bool, decode: DecodePath | None) -> str:
    """The path of a session: ``standard``, or ``kernel,<amx|fma>,decode=<integer|float>``."""
    if not kernel:
        return STANDARD
    return f"kernel,{'amx' if amx else 'fma'},decode={(decode or DecodePath.INTEGER).value}"


def session_path(model: Any) -> str:
    """The path a :class:`~.model.LoadedModel`'s session computes its rows on."""
    return path_label(model.runs_kernel, model.runs_amx, model.decode_path)


def many_row_path(label: str) -> str:
    """The part of a path that computes many rows at once (prefill, verification passes): decode path aside."""
    return label.split(",decode=", 1)[0]


@dataclass(frozen=True)
class TieTolerances:
    """One calibration's near-tie detector widths per path, and the pair tolerance it measured beside them."""

    pair: float
    by_path: Mapping[str, float] = field(default_factory=dict)

    @classmethod
    def measured(cls, tolerance: float | None, tie_tolerances: Any) -> "TieTolerances | None":
        """From a calibration's (or a stored record's) path -> value mapping. Malformed entries (a hand-edited
        record) are left out: their path then uses the pair tolerance."""
        if tolerance is None or not isinstance(tie_tolerances, Mapping):
            return None
        clean: dict[str, float] = {}
        for path, value in tie_tolerances.items():
            if isinstance(path, str) and isinstance(value, (int, float)) and not isinstance(value, bool) \
                    and 0.0 < float(value) < float("inf"):
                clean[path] = float(value)
        return cls(float(tolerance), clean)


def record(model: Any, tolerance: float | None, tie_tolerances: Mapping[str, Any] | None) -> None:
    """Keep a calibration's tie tolerances (path -> value) on ``model``, with the pair ``tolerance`` measured
    with them."""
    model.tie_tolerances = TieTolerances.measured(tolerance, tie_tolerances)


def tie_tolerance(model: Any) -> float | None:
    """The width of ``model``'s near-tie detector: its session path's measured tie tolerance, else its pair
    tolerance (see the module docstring); None when the model has no tolerance at all (uncalibrated)."""
    if model.tolerance is None:
        return None
    widths: TieTolerances | None = model.tie_tolerances
    if widths is None or widths.pair != float(model.tolerance):  # a tolerance given by hand since: its own rule
        return float(model.tolerance)
    return widths.by_path.get(session_path(model), float(model.tolerance))
