"""Small statistics helpers for fairness checks (no SciPy dependency).

The chi-square survival function uses the closed forms for integer degrees of freedom (Abramowitz and
Stegun 26.4.4 and 26.4.5), which are exact up to floating-point rounding.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

__all__ = ["chi_square_sf", "chi_square_uniform"]


def chi_square_sf(statistic: float, dof: int) -> float:
    """P(X >= statistic) for X chi-square distributed with ``dof`` (a positive integer) degrees of freedom."""
    if dof < 1 or int(dof) != dof:
        raise ValueError("degrees of freedom must be a positive integer")
    if statistic <= 0:
        return 1.0
    half = statistic / 2.0
    if dof % 2 == 0:
        # Q = exp(-x/2) * sum_{i < dof/2} (x/2)^i / i!
        term, total = 1.0, 1.0
        for i in range(1, dof // 2):
            term *= half / i
            total += term
        return min(1.0, math.exp(-half) * total)
    # Odd dof: Q = erfc(sqrt(x/2)) + sqrt(2x/pi) exp(-x/2) sum_{r=1}^{(dof-1)/2} x^(r-1) / (1*3*...*(2r-1))
    chi = math.sqrt(statistic)
    total, term = 0.0, 1.0 / chi  # chi^(2r-1)/(1*3*...*(2r-1)) for r = 0 ... built up below
    for r in range(1, (dof - 1) // 2 + 1):
        term *= statistic / (2 * r - 1)
        total += term
    density = math.exp(-half) / math.sqrt(2.0 * math.pi)
    return min(1.0, math.erfc(chi / math.sqrt(2.0)) + 2.0 * density * total)


def chi_square_uniform(counts: Sequence[int]) -> tuple[float, float]:
    """Pearson's chi-square statistic of ``counts`` against the uniform distribution, and its p-value."""
    if len(counts) < 2:
        raise ValueError("need at least two categories")
    n = sum(counts)
    if n <= 0:
        raise ValueError("need at least one observation")
    expected = n / len(counts)
    statistic = sum((c - expected) ** 2 for c in counts) / expected
    return statistic, chi_square_sf(statistic, len(counts) - 1)
