"""The sampler check p2pinfer used before issue 13 (ID-ordered inverse CDF with interval arithmetic), kept only so
that tests can enumerate what it admitted and show the current check admits none of it.

Old rule, no top-k/top-p: ``u = uniform(seed, i)`` (top 53 bits of a tagged SHA-256); token ``t`` was accepted
when ``u`` fell inside ``[A_min/(A_min+p_max+C_max), (A_max+p_max)/(A_max+p_max+C_min)]``, where ``A`` is the
probability mass of IDs below ``t``, ``C`` the mass above, every mass scaled by ``exp(+-tolerance/T)``.
"""

from __future__ import annotations

import math

import numpy as np

from p2pinfer.wire.hashing import tagged_hash

OLD_NOISE_DOMAIN = "p2pinfer/v1/sampling-noise"
OLD_TOLERANCE_FLOOR = 1e-3  # the old calibration's floor: max(1e-3, 20 x drift)


def old_uniform(seed_material: bytes, index: int) -> float:
    digest = tagged_hash(OLD_NOISE_DOMAIN, seed_material, int(index).to_bytes(8, "big"))
    return (int.from_bytes(digest[:8], "big") >> 11) * 2.0**-53


def old_admitted_tokens(logprobs: np.ndarray, temperature: float, seed_material: bytes, index: int,
                        tolerance: float = OLD_TOLERANCE_FLOOR) -> np.ndarray:
    """Every token ID the old check accepted at this position (temperature sampling, full vocabulary)."""
    d = tolerance / temperature
    scaled = np.asarray(logprobs, dtype=np.float64) / temperature
    base = np.exp(scaled - scaled.max())
    below = np.cumsum(base) - base
    above = base.sum() - below - base
    up, dn = math.exp(d), math.exp(-d)
    a_min, a_max, c_min, c_max, p_max = below * dn, below * up, above * dn, above * up, base * up
    lo = a_min / (a_min + p_max + c_max)
    hi = (a_max + p_max) / (a_max + p_max + c_min)
    u = old_uniform(seed_material, index)
    return np.flatnonzero((lo - 1e-12 <= u) & (u <= hi + 1e-12))


def old_sample(logprobs: np.ndarray, temperature: float, seed_material: bytes, index: int) -> int:
    """The token the old sampler picked: the first ID (ascending) whose cumulative probability exceeds u."""
    scaled = np.asarray(logprobs, dtype=np.float64) / temperature
    cum = np.cumsum(np.exp(scaled - scaled.max()))
    u = old_uniform(seed_material, index) * cum[-1]
    return int(min(np.searchsorted(cum, u, side="right"), len(cum) - 1))
