"""Seeded, checkable sampling (pure functions, numpy only).

All randomness of a request comes from its *seed material* (:func:`sampling_seed`) and the output index:
``u_i = uniform(tagged_hash("p2pinfer/v1/sampling-noise", seed, uint64_be(i)))``. The token at output index
``i`` is chosen by inverse-CDF sampling over the candidate tokens **in ascending token-ID order**::

    scaled   = logprobs / temperature                    (float64)
    cand     = top_k(scaled) then top_p(...)             (ranks by (-value, id))
    p_v      = exp(scaled_v - logsumexp(scaled[cand]))   for v in cand, ascending id
    token    = first v with cumsum(p)_v > u_i

``temperature == 0`` is greedy: the argmax, ties broken by the lower ID. Because the choice depends only on
(seed, i, the log-probs at that position, params), a continuation after fail-over that is given the already
emitted prefix draws exactly the same tokens as an uninterrupted run.

Ascending-ID order (not probability order) keeps the CDF boundaries stable: a drift of ``eps`` nats in every
log-prob moves each boundary by at most ``exp(2*eps/T) - 1``, which :func:`acceptable_tokens` uses to accept
near-ties on a verifier whose log-probs differ from the executor's by at most the model's tolerance.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..wire.hashing import tagged_hash

NOISE_DOMAIN = "p2pinfer/v1/sampling-noise"
SEED_DOMAIN = "p2pinfer/v1/sampling-seed"


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens. ``temperature == 0`` means greedy; ``top_k == 0`` and ``top_p == 1`` disable them."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.temperature) and self.temperature >= 0.0):
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not (0.0 < self.top_p <= 1.0) and not (self.top_p == 0.0 and self.temperature == 0.0):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


GREEDY = SamplingParams()


def sampling_seed(request_id: bytes, seed: int | None) -> bytes:
    """The seed material of a request: its 32-byte request ID, or a hash of its explicit ``seed``."""
    if seed is None:
        if len(request_id) != 32:
            raise ValueError("request_id must be 32 bytes")
        return bytes(request_id)
    if not 0 <= seed < 1 << 64:
        raise ValueError("seed must be an unsigned 64-bit integer")
    return tagged_hash(SEED_DOMAIN, seed.to_bytes(8, "big"))


def uniform(seed_material: bytes, index: int) -> float:
    """The uniform number in [0, 1) for output index ``index``: top 53 bits of a tagged SHA-256."""
    if index < 0:
        raise ValueError("index must be >= 0")
    digest = tagged_hash(NOISE_DOMAIN, seed_material, index.to_bytes(8, "big"))
    return (int.from_bytes(digest[:8], "big") >> 11) * 2.0**-53


_LOG_SOFTMAX_ROWS = 16  # rows per block: the float64 temporaries stay in cache (a verifier passes 100s of rows)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Log-softmax over the last axis, in float64 (from float32 logits), as fingerprints define it.

    ``(x - max) - log(sum(exp(x - max)))``, computed in place, a block of rows at a time (the same
    operations, hence the same bits, as the plain expression, without five full-size temporaries).
    """
    out = np.array(logits, dtype=np.float64)  # a copy: the caller's logits are left alone
    rows = out.reshape(-1, out.shape[-1]) if out.ndim else out.reshape(1, 1)
    scratch = np.empty((min(_LOG_SOFTMAX_ROWS, rows.shape[0]), rows.shape[1]), dtype=np.float64)
    for lo in range(0, rows.shape[0], _LOG_SOFTMAX_ROWS):
        block = rows[lo:lo + _LOG_SOFTMAX_ROWS]
        block -= np.max(block, axis=-1, keepdims=True)
        tmp = np.exp(block, out=scratch[:block.shape[0]])
        block -= np.log(np.sum(tmp, axis=-1, keepdims=True))
    return out


def _rank_order(values: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Indices into ``ids`` sorted by (-value, id)."""
    return np.lexsort((ids, -values))


def _top_candidates(scaled: np.ndarray, top_k: int) -> np.ndarray:
    """Token IDs of the top-k by (-value, id); all IDs when top_k is 0 or covers the vocabulary."""
    vocab = scaled.shape[0]
    if top_k == 0 or top_k >= vocab:
        return np.arange(vocab)
    # argpartition finds the k-th value; include everything tied with it, then cut by (-value, id).
    kth = np.partition(scaled, vocab - top_k)[vocab - top_k]
    ids = np.flatnonzero(scaled >= kth)
    order = _rank_order(scaled[ids], ids)
    return ids[order[:top_k]]


def _nucleus(scaled: np.ndarray, ids: np.ndarray, top_p: float) -> np.ndarray:
    """The smallest prefix (by (-value, id)) of ``ids`` whose probability mass reaches ``top_p``."""
    if top_p >= 1.0:
        return ids
    vals = scaled[ids]
    order = _rank_order(vals, ids)
    p = np.exp(vals[order] - _logsumexp(vals))
    cum = np.cumsum(p)
    n = int(np.searchsorted(cum, top_p, side="left")) + 1
    return ids[order[: min(n, len(ids))]]


def _logsumexp(x: np.ndarray) -> float:
    m = float(np.max(x))
    return m + math.log(float(np.sum(np.exp(x - m))))


def candidates(logprobs: np.ndarray, params: SamplingParams) -> np.ndarray:
    """Sorted (ascending) token IDs the sampler may draw from at one position."""
    scaled = np.asarray(logprobs, dtype=np.float64) / params.temperature
    ids = _top_candidates(scaled, params.top_k)
    return np.sort(_nucleus(scaled, ids, params.top_p))


def sample(logprobs: np.ndarray, params: SamplingParams, seed_material: bytes, index: int) -> int:
    """The token the seeded sampler picks at output index ``index`` from one row of log-probs."""
    lp = np.asarray(logprobs, dtype=np.float64)
    if params.greedy:
        return int(np.argmax(lp))  # numpy's argmax returns the first (lowest-ID) maximum
    scaled = lp / params.temperature
    ids = candidates(lp, params)
    vals = scaled[ids]
    p = np.exp(vals - _logsumexp(vals))
    cum = np.cumsum(p)
    u = uniform(seed_material, index) * cum[-1]
    j = int(np.searchsorted(cum, u, side="right"))
    return int(ids[min(j, len(ids) - 1)])


def is_acceptable(logprobs: np.ndarray, params: SamplingParams, seed_material: bytes, index: int,
                  token: int, tolerance: float) -> tuple[bool, str]:
    """Could an honest sampler whose log-probs differ from ``logprobs`` by at most ``tolerance`` per token
    have picked ``token`` at ``index``? Returns (ok, reason). Interval arithmetic, conservative towards
    acceptance: near-ties within tolerance are accepted, anything clearly outside is not.
    """
    lp = np.asarray(logprobs, dtype=np.float64)
    vocab = lp.shape[0]
    if not 0 <= token < vocab:
        return False, f"token {token} outside the vocabulary"
    if params.greedy:
        best = float(np.max(lp))
        if lp[token] >= best - 2.0 * tolerance:
            return True, ""
        return False, f"greedy: token {token} is {best - lp[token]:.3g} nats below the best token"

    t = params.temperature
    d = tolerance / t  # how far one scaled value may sit from the executor's
    eps = 2.0 * d  # how far two scaled values may move relative to each other
    scaled = lp / t
    sorted_desc = np.sort(scaled)[::-1]

    # Candidate membership under every admissible drift: "surely" in, and "maybe" in.
    if params.top_k == 0 or params.top_k >= vocab:
        surely = np.ones(vocab, dtype=bool)
        maybe = np.ones(vocab, dtype=bool)
    else:
        k = params.top_k
        maybe = scaled >= sorted_desc[k - 1] - eps  # fewer than k tokens surely above it
        surely = scaled > sorted_desc[k] + eps  # at most k-1 others can reach it
    if params.top_p < 1.0:
        top = float(sorted_desc[0])
        m_ids = np.flatnonzero(maybe)
        m_vals = scaled[m_ids]
        desc = np.sort(m_vals)[::-1]
        cum = np.cumsum(np.exp(desc - top))
        neg = -desc  # ascending, for searchsorted
        n_surely_above = np.searchsorted(neg, -(m_vals + eps), side="left")  # count of desc > v + eps
        n_maybe_above = np.searchsorted(neg, -(m_vals - eps), side="right")  # count of desc >= v - eps
        cum0 = np.concatenate(([0.0], cum))
        q = np.exp(m_vals - top)
        above_min = cum0[n_surely_above] * math.exp(-d)
        above_max = np.maximum(cum0[n_maybe_above] - q, 0.0) * math.exp(d)
        z_min = float(np.sum(np.exp(scaled[surely] - top))) * math.exp(-d)
        z_max = float(cum[-1]) * math.exp(d)
        nucleus_maybe = above_min / z_max < params.top_p
        nucleus_surely = above_max / z_min < params.top_p if z_min > 0 else np.zeros_like(nucleus_maybe)
        maybe = np.zeros(vocab, dtype=bool)
        maybe[m_ids] = nucleus_maybe
        new_surely = np.zeros(vocab, dtype=bool)
        new_surely[m_ids] = nucleus_surely
        surely &= new_surely
    if not maybe[token]:
        return False, f"token {token} is outside the top-k/top-p candidates"

    u = uniform(seed_material, index)
    # Bounds of the token's CDF interval in ascending-ID order: [A/(A+p+C), (A+p)/(A+p+C)], with A the
    # candidate mass below the token's ID and C the mass above it.
    up, dn = math.exp(d), math.exp(-d)
    base = np.exp(scaled - float(sorted_desc[0]))
    ids = np.arange(vocab)
    below, above = ids < token, ids > token
    a_min = float(np.sum(base[surely & below])) * dn
    a_max = float(np.sum(base[maybe & below])) * up
    c_min = float(np.sum(base[surely & above])) * dn
    c_max = float(np.sum(base[maybe & above])) * up
    p_max = float(base[token]) * up
    lo = a_min / (a_min + p_max + c_max)
    hi = (a_max + p_max) / (a_max + p_max + c_min)
    if lo - 1e-12 <= u <= hi + 1e-12:
        return True, ""
    return False, f"seeded sampler: u={u:.6f} is outside token {token}'s interval [{lo:.6f}, {hi:.6f}]"


def acceptable_rows(logprobs: np.ndarray, params: SamplingParams, seed_material: bytes, start_index: int,
                    tokens: np.ndarray, tolerance: float) -> np.ndarray:
    """:func:`is_acceptable` for many rows at once (row ``r`` is output index ``start_index + r``).

    Greedy, temperature and top-k are vectorized over rows; top-p (which needs per-row ranking) runs row by row.
    """
    lp = np.asarray(logprobs, dtype=np.float64)
    n, vocab = lp.shape
    tokens = np.asarray(tokens, dtype=np.int64)
    in_vocab = (tokens >= 0) & (tokens < vocab)
    tok = np.where(in_vocab, tokens, 0)
    r = np.arange(n)
    if params.greedy:
        return in_vocab & (lp[r, tok] >= lp.max(axis=1) - 2.0 * tolerance)
    if params.top_p < 1.0:
        return np.array([is_acceptable(lp[i], params, seed_material, start_index + i, int(tokens[i]), tolerance)[0]
                         for i in range(n)], dtype=bool)
    d = tolerance / params.temperature
    eps = 2.0 * d
    scaled = lp / params.temperature
    base = np.exp(scaled - scaled.max(axis=1, keepdims=True))
    if params.top_k == 0 or params.top_k >= vocab:
        maybe_b = surely_b = base
        maybe_tok = np.ones(n, dtype=bool)
    else:
        k = params.top_k
        part = -np.partition(-scaled, [k - 1, k], axis=1)
        maybe = scaled >= (part[:, k - 1] - eps)[:, None]
        surely = scaled > (part[:, k] + eps)[:, None]
        maybe_b, surely_b = base * maybe, base * surely
        maybe_tok = maybe[r, tok]
    up, dn = math.exp(d), math.exp(-d)
    cm, cs = np.cumsum(maybe_b, axis=1), np.cumsum(surely_b, axis=1)
    a_max = (cm[r, tok] - maybe_b[r, tok]) * up
    a_min = (cs[r, tok] - surely_b[r, tok]) * dn
    c_max = (cm[:, -1] - cm[r, tok]) * up
    c_min = np.maximum(cs[:, -1] - cs[r, tok], 0.0) * dn
    p_max = base[r, tok] * up
    lo = a_min / (a_min + p_max + c_max)
    hi = (a_max + p_max) / (a_max + p_max + c_min)
    u = np.array([uniform(seed_material, start_index + i) for i in range(n)])
    return in_vocab & maybe_tok & (lo - 1e-12 <= u) & (u <= hi + 1e-12)
