"""Seeded, checkable sampling (pure functions, numpy only).

All randomness of a request comes from its *seed material* (:func:`sampling_seed`) and the output index. The
token at output index ``i`` is chosen by the **Gumbel-max rule** (an exponential race) over the candidates::

    key      = tagged_hash("p2pinfer/v2/sampling-noise", seed, uint64_be(i))[:16]   (128-bit Philox key)
    u_v      = (Philox4x64-10(key).raw[v] >> 11 + 0.5) / 2**53         for every token ID v, in (0, 1)
    g_v      = -log(-log(u_v))                                           (standard Gumbel noise)
    scaled   = logprobs / temperature                                    (float64)
    cand     = top_k(scaled) then top_p(...)                             (ranks by (-value, id))
    token    = argmax over v in cand of scaled_v + g_v                   (ties: the lower ID)

which draws exactly from ``softmax(scaled)`` restricted to the candidates. ``temperature`` below
:data:`GREEDY_BELOW` is greedy: the argmax of the log-probs, ties broken by the lower ID.

Why Gumbel-max and not an inverse CDF: a verifier's log-probs differ from the executor's by honest drift, so
the check must accept every token that *some* admissible drift would have made the winner. Under Gumbel-max
that is a token whose key is within ``2 * tolerance / T`` of the best other candidate's key; the chance that
the runner-up's key lies that close is at most about ``2 * tolerance / T`` per position, whatever the
vocabulary size (two tokens of probability p and q: ``4 * pq/(p+q)**2 * tolerance / T``). An inverse CDF has a
boundary per candidate, each with its own slack, so its ambiguous share of [0, 1) grows with the number of
plausible tokens — which let an executor choose among up to 1,744 tokens at flat SmolLM2 positions (issue 13,
attack 6). A token of negligible probability can never win: the largest Gumbel value a 53-bit ``u`` can give is
``-log(-log(1 - 2**-54)) < 37.5``, so a token more than ``37.5 + 2*tolerance/T`` scaled nats below a surely
eligible rival is rejected outright.

The choice depends only on (seed material, ``i``, the log-probs at that position, params), so a continuation
after fail-over that is given the already emitted prefix draws exactly the same tokens as an uninterrupted
run.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ..wire.hashing import tagged_hash
from . import philox, row_stats
from .row_halves import over_rows

NOISE_DOMAIN = "p2pinfer/v2/sampling-noise"
SEED_DOMAIN = "p2pinfer/v1/sampling-seed"
GREEDY_BELOW = 1e-3
"""Temperatures below this sample greedily, in the sampler and in the check alike. At T = 1e-3 a gap of
0.05 nats between the two best tokens already makes the runner-up e^-50 times less likely, so nothing
observable changes, and the check's slack ``2 * tolerance / T`` stays finite (a temperature of 1e-300 would
otherwise overflow it)."""


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens. ``temperature`` below :data:`GREEDY_BELOW` (0 included) means greedy;
    ``top_k == 0`` and ``top_p == 1`` disable them."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.temperature) and self.temperature >= 0.0):
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not (0.0 < self.top_p <= 1.0) and not (self.top_p == 0.0 and self.greedy):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW


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


def noise_key(seed_material: bytes, index: int) -> int:
    """The 128-bit Philox key of output index ``index``."""
    if index < 0:
        raise ValueError("index must be >= 0")
    return int.from_bytes(tagged_hash(NOISE_DOMAIN, seed_material, int(index).to_bytes(8, "big"))[:16], "big")


G_MAX = -math.log(-math.log1p(-2.0**-54))  # the largest Gumbel value a u of this module can give (< 37.5)
_PROBE = 64  # tokens whose keys bound the winner's before any other noise is computed (rows with NaN/+inf)
_PROBE_NATS = 4.0  # otherwise the tokens this close to the row's best value probe it (one comparison, no sort)
_PROBE_MAX = 1024  # at most this many of them (a flat row has them all; any subset is a valid probe)
_FEW_RIVALS = 4096  # is_acceptable computes every rival's key directly up to this many rivals
_G_PAD = 1e-6  # added to the largest noise of a position before it bounds keys (far above float64 rounding)


def uniforms(seed_material: bytes, index: int, vocab: int) -> np.ndarray:
    """``u_v`` for token IDs ``0 .. vocab-1`` at output index ``index``, each in (0, 1), never 0 or 1.

    Philox4x64-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3") is counter-based: its raw
    64-bit stream is a pure function of the key, so every peer and every numpy version computes the same
    values (``tests/test_runtime_sampling.py`` pins a vector).
    """
    u = _raw_noise(seed_material, index, vocab).astype(np.float64)
    u += 0.5  # in place: the same operations as ((raw >> 11) + 0.5) * 2**-53, hence the same bits
    u *= 2.0**-53
    return u


class _LazyUniforms:
    """:func:`uniforms` read on demand: ``u[ids]`` and ``u.max()`` convert only the draws asked for (the
    same operations on the same raw draws, hence the same bits), so a check that needs a few hundred noise
    values, and the largest one, does not convert all 49,152."""

    def __init__(self, seed_material: bytes, index: int, vocab: int) -> None:
        self._raw = _raw_noise(seed_material, index, vocab)

    def __getitem__(self, ids) -> np.ndarray:
        return (self._raw[ids].astype(np.float64) + 0.5) * 2.0**-53

    def max(self) -> float:  # the conversion is non-decreasing: the largest u is that of the largest draw
        return float(self[int(np.argmax(self._raw))])


def _raw_noise(seed_material: bytes, index: int, vocab: int) -> np.ndarray:
    """The top 53 bits of the first ``vocab`` Philox draws of output index ``index`` (uint64)."""
    raw = _philox_draws(seed_material, index, vocab)
    raw >>= np.uint64(11)
    return raw


def _philox_draws(seed_material: bytes, index: int, vocab: int) -> np.ndarray:
    """The first ``vocab`` raw 64-bit Philox draws of output index ``index`` (numpy's Philox stream, computed by
    ``kernels/philox.c`` where the kernel library runs: the same integers)."""
    return philox.stream(noise_key(seed_material, index), vocab, largest=False)[0]


def gumbel_keys(scaled: np.ndarray, seed_material: bytes, index: int, margin: float = 0.0,
                u: "np.ndarray | _LazyUniforms | None" = None) -> np.ndarray:
    """``scaled_v + g_v`` wherever ``scaled_v`` is finite, except that tokens whose key cannot come within
    ``margin`` of the best are left at ``-inf`` (exact, not an approximation: no ``g_v`` exceeds ``g_cap``,
    the noise of the largest ``u`` at this position (never above ``G_MAX``), so a token with ``scaled_v + g_cap
    < best - margin`` can neither win nor come within ``margin``). This skips the two logarithms for most of
    the vocabulary: at 49,152 tokens ``g_cap`` is about 11, where ``G_MAX`` is 37.5."""
    if u is None:
        u = uniforms(seed_material, index, scaled.shape[0])
    keys = np.full(scaled.shape[0], -np.inf)
    top = float(np.max(scaled)) if scaled.shape[0] else -math.inf
    if math.isfinite(top):
        # no NaN and no +inf (either would be the max): "finite" is "above -inf", which one comparison tests.
        # Any finite tokens probe the best key from below; those near the top probe it tightly.
        probe = np.flatnonzero(scaled >= top - _PROBE_NATS)[:_PROBE_MAX]
        finite = None
    else:
        finite = np.flatnonzero(np.isfinite(scaled))
        if finite.size == 0:
            return keys
        probe = finite[np.argpartition(-scaled[finite], min(_PROBE, finite.size) - 1)[:_PROBE]]
    best = float(np.max(scaled[probe] - np.log(-np.log(u[probe]))))
    u_top = u.max()  # over every token: still a bound for the finite ones, without gathering them
    g_cap = min(float(-np.log(-np.log(u_top))) + _G_PAD, G_MAX)  # the pad covers log's rounding
    threshold = best - margin - g_cap
    keep = np.flatnonzero(scaled >= threshold) if finite is None else finite[scaled[finite] >= threshold]
    keys[keep] = scaled[keep] - np.log(-np.log(u[keep]))
    return keys


def gumbel_noise(seed_material: bytes, index: int, vocab: int) -> np.ndarray:
    """The Gumbel noise ``g_v = -log(-log(u_v))`` that output index ``index`` adds to the scaled log-probs."""
    return -np.log(-np.log(uniforms(seed_material, index, vocab)))


_LOG_SOFTMAX_ROWS = 16  # rows per block: the float64 temporaries stay in cache (a verifier passes 100s of rows)
_NORMALIZER_ROWS = 4  # LogProbRows.from_logits: one float64 block of 4 x 49,152 values (1.5 MB) stays in L2


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Log-softmax over the last axis, in float64 (from float32 logits), as fingerprints define it.

    ``(x - max) - log(sum(exp(x - max)))``, computed in place, a block of rows at a time (the same
    operations, hence the same bits, as the plain expression, without five full-size temporaries). For float32
    logits the row maximum and the normaliser come from :func:`row_stats.log_norm` where it runs (the numbers
    :meth:`LogProbRows.from_logits` takes, so that both give the same bits), else from numpy.
    """
    out = np.array(logits, dtype=np.float64)  # a copy: the caller's logits are left alone
    rows = out.reshape(-1, out.shape[-1]) if out.ndim else out.reshape(1, 1)
    source = np.asarray(logits)
    stats = row_stats.log_norm(source.reshape(rows.shape)) if source.dtype == np.float32 and rows.size else None
    if stats is None:
        _log_softmax_numpy(rows, None)
    elif not stats.flagged.any():
        rows -= stats.shift[:, None]
        rows -= stats.log_norm[:, None]
    else:  # a row with a NaN, +inf or nothing finite: numpy's rules there
        for r in range(rows.shape[0]):
            if not stats.flagged[r]:
                rows[r] -= stats.shift[r]
                rows[r] -= stats.log_norm[r]
        _log_softmax_numpy(rows, np.flatnonzero(stats.flagged))
    return out


def _log_softmax_numpy(rows: np.ndarray, which: np.ndarray | None) -> None:
    """log_softmax in place over ``rows`` (all, or the row indices ``which``) with numpy's operations."""
    if which is not None:
        for r in which:
            rows[r] -= np.max(rows[r])
            rows[r] -= np.log(np.sum(np.exp(rows[r])))
        return
    scratch = np.empty((min(_LOG_SOFTMAX_ROWS, rows.shape[0]), rows.shape[1]), dtype=np.float64)
    for lo in range(0, rows.shape[0], _LOG_SOFTMAX_ROWS):
        block = rows[lo:lo + _LOG_SOFTMAX_ROWS]
        block -= np.max(block, axis=-1, keepdims=True)
        tmp = np.exp(block, out=scratch[:block.shape[0]])
        block -= np.log(np.sum(tmp, axis=-1, keepdims=True))


@dataclass(frozen=True)
class LogProbRows:
    """Rows of log-probs, kept as the model's logits ``values`` ``[n, vocab]`` and two float64 numbers per row:
    the log-prob of token ``v`` in row ``r`` is ``(float64(values[r, v]) - shift[r]) - log_norm[r]``.

    :meth:`from_logits` takes ``shift`` (the row maximum) and ``log_norm`` (``log(sum(exp(x - max)))``) with
    the very operations of :func:`log_softmax`, so every value read through :meth:`at`, :meth:`row` or
    :meth:`best` has the same bits as the full matrix would — but a verifier reads 10 values per row at greedy
    positions, not 49,152 (the full float64 matrix of 512 rows is 200 MB, and writing it cost more than the
    check). Dense log-probs fit too (:meth:`from_logprobs`: shift and log_norm 0, which leave values alone).
    """

    values: np.ndarray  # [n, vocab], float32 logits or float64 log-probs
    shift: np.ndarray  # float64 [n]
    log_norm: np.ndarray  # float64 [n]

    @classmethod
    def from_logits(cls, logits: np.ndarray) -> "LogProbRows":
        values = np.asarray(logits)
        n, vocab = values.shape
        # log_softmax's operations with fewer passes over memory, the same bits: the maximum of the float32 values
        # is the maximum of their float64 copies (exact), and float64(x) - max is computed straight from the
        # float32 rows into the float64 block (numpy converts each value exactly before subtracting); exp in place;
        # the sum over the same contiguous row (the same pairwise order). Small blocks stay in the L2 cache.
        shift = np.empty(n)
        log_norm = np.empty(n)

        def normalise(lo: int, hi: int) -> None:
            stats = row_stats.log_norm(values[lo:hi])  # C, where it runs: the numbers log_softmax takes too
            if stats is not None:
                shift[lo:hi] = stats.shift
                log_norm[lo:hi] = stats.log_norm
                for r in lo + np.flatnonzero(stats.flagged):  # NaN, +inf or nothing finite: numpy's rules
                    normalise_numpy(r, r + 1)
            else:
                normalise_numpy(lo, hi)

        def normalise_numpy(lo: int, hi: int) -> None:
            shift[lo:hi] = np.max(values[lo:hi], axis=-1)  # float32 -> float64: exact
            block = np.empty((min(_NORMALIZER_ROWS, hi - lo), vocab), dtype=np.float64)
            for a in range(lo, hi, _NORMALIZER_ROWS):
                b = block[:min(_NORMALIZER_ROWS, hi - a)]
                np.subtract(values[a:a + b.shape[0]], shift[a:a + b.shape[0], None], out=b)
                np.exp(b, out=b)
                log_norm[a:a + b.shape[0]] = np.log(np.sum(b, axis=-1))

        over_rows(n, normalise)  # two threads, the same bits (row_halves)
        return cls(values, shift, log_norm)

    @classmethod
    def from_logprobs(cls, logprobs: np.ndarray) -> "LogProbRows":
        lp = np.asarray(logprobs, dtype=np.float64)
        return cls(lp, np.zeros(lp.shape[0]), np.zeros(lp.shape[0]))

    @property
    def n(self) -> int:
        return int(self.values.shape[0])

    @property
    def vocab(self) -> int:
        return int(self.values.shape[1])

    def at(self, rows: np.ndarray, ids: np.ndarray) -> np.ndarray:
        """Log-probs of ``ids`` in ``rows`` (broadcast together, numpy fancy indexing)."""
        return (self.values[rows, ids].astype(np.float64) - self.shift[rows]) - self.log_norm[rows]

    def row(self, r: int) -> np.ndarray:
        """One full row of log-probs (float64)."""
        return (self.values[r].astype(np.float64) - self.shift[r]) - self.log_norm[r]

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, r: int) -> np.ndarray:
        return self.row(r)

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        """The full float64 matrix, for code that wants one (the same bits; the cost this class avoids)."""
        dense = (self.values.astype(np.float64) - self.shift[:, None]) - self.log_norm[:, None]
        return dense if dtype is None else dense.astype(dtype, copy=False)

    def best(self, exclude: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Per row, the lowest ID of the largest log-prob and that log-prob, leaving out the token IDs
        ``exclude[r]`` (``[n, k]``, each in the vocabulary). The log-prob is a non-decreasing function of the
        logit, so the largest logit's log-prob is the largest log-prob, bit for bit."""
        ids = np.empty(self.n, dtype=np.int64)
        nothing_left = np.zeros(self.n, dtype=bool)

        def pick(lo: int, hi: int) -> None:
            scan = row_stats.scan(self.values[lo:hi], None if exclude is None else exclude[lo:hi])
            if scan is not None and not scan.flagged.any():  # C, where it runs (a NaN row: numpy's rules)
                ids[lo:hi] = scan.ids
                nothing_left[lo:hi] = scan.best == -np.inf
                return
            for a in range(lo, hi, _LOG_SOFTMAX_ROWS):
                block = self.values[a:min(a + _LOG_SOFTMAX_ROWS, hi)]
                if exclude is not None:
                    block = block.copy()
                    block[np.arange(block.shape[0])[:, None], exclude[a:a + block.shape[0]]] = -np.inf
                ids[a:a + block.shape[0]] = top = np.argmax(block, axis=1)
                nothing_left[a:a + block.shape[0]] = block[np.arange(block.shape[0]), top] == -np.inf

        over_rows(self.n, pick, align=_LOG_SOFTMAX_ROWS)  # two threads, the same bits (row_halves)
        # a row whose every token is excluded has nothing left: -inf, as the max of a fully masked row
        return ids, np.where(nothing_left, -np.inf, self.at(np.arange(self.n), ids))

    def top_two(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per row: ``best()``'s ID and log-prob, and the runner-up's log-prob, ``best(exclude=ids)``'s (the
        largest of the others: the best value again where it occurs twice), from one pass over each row where
        :func:`row_stats.scan` runs; the same numbers either way."""
        first = np.empty(self.n, dtype=np.float32)
        second = np.empty(self.n, dtype=np.float32)
        ids = np.empty(self.n, dtype=np.int64)
        scanned = np.zeros(self.n, dtype=bool)

        def scan_rows(lo: int, hi: int) -> None:
            scan = row_stats.scan(self.values[lo:hi])
            if scan is not None and not scan.flagged.any():
                ids[lo:hi], first[lo:hi], second[lo:hi], scanned[lo:hi] = scan.ids, scan.best, scan.second, True

        over_rows(self.n, scan_rows)
        if not scanned.all():
            ids, best = self.best()
            return ids, best, self.best(exclude=ids[:, None])[1]
        # the log-probs with at()'s operations on the same float32 values, so the same bits as best()'s; nothing
        # left (every value -inf) is -inf, as there
        best = np.where(first == -np.inf, -np.inf, self.at(np.arange(self.n), ids))
        runner_up = np.where(second == -np.inf, -np.inf, (second.astype(np.float64) - self.shift) - self.log_norm)
        return ids, best, runner_up


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
    ids = candidates(lp, params)
    scaled = np.full(lp.shape[0], -np.inf)
    scaled[ids] = lp[ids] / params.temperature
    return int(np.argmax(gumbel_keys(scaled, seed_material, index)))  # ties go to the lower ID


def candidate_bounds(logprobs: np.ndarray, params: SamplingParams, tolerance: float,
                     sorted_scaled: "np.ndarray | Callable[[], np.ndarray] | None" = None
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Boolean masks over the vocabulary: tokens that are a candidate under *some* drift of at most
    ``tolerance`` per log-prob ("maybe"), and under *every* such drift ("surely"). Interval arithmetic,
    conservative towards "maybe".

    Top-p without top-k is first tried without sorting the vocabulary (:func:`_nucleus_unsorted`, exact or
    nothing). ``sorted_scaled``: ``np.sort(logprobs / temperature)``, or a function giving it, when the caller
    has it cheaper (see :func:`judge_rows`: sorting the float32 logits and mapping them is the same array)."""
    lp = np.asarray(logprobs, dtype=np.float64)
    vocab = lp.shape[0]
    d = tolerance / params.temperature  # how far one scaled value may sit from the executor's
    eps = 2.0 * d  # how far two scaled values may move relative to each other
    if (params.top_k == 0 or params.top_k >= vocab) and params.top_p >= 1.0:
        return np.ones(vocab, dtype=bool), np.ones(vocab, dtype=bool)  # every token, surely
    scaled = lp / params.temperature
    if (params.top_k == 0 or params.top_k >= vocab) and (fast := _nucleus_unsorted(scaled, d, eps, params.top_p)):
        return fast
    if callable(sorted_scaled):
        sorted_scaled = sorted_scaled()
    # contiguous, not a reversed view: exp and cumsum over it below run several times faster
    sorted_desc = (np.sort(scaled) if sorted_scaled is None else sorted_scaled)[::-1].copy()
    if params.top_k == 0 or params.top_k >= vocab:
        surely = np.ones(vocab, dtype=bool)
        maybe = np.ones(vocab, dtype=bool)
    else:
        k = params.top_k
        maybe = scaled >= sorted_desc[k - 1] - eps  # fewer than k tokens surely above it
        surely = scaled > sorted_desc[k] + eps  # at most k-1 others can reach it
    if params.top_p < 1.0:
        top = float(sorted_desc[0])
        all_maybe = bool(maybe.all())  # no top-k cut: no gathering
        m_ids = None if all_maybe else np.flatnonzero(maybe)
        m_vals = scaled if all_maybe else scaled[m_ids]
        desc = sorted_desc if all_maybe else np.sort(m_vals)[::-1]
        q_desc = np.exp(desc - top)
        cum0 = np.empty(q_desc.shape[0] + 1)
        cum0[0] = 0.0
        cum = np.cumsum(q_desc, out=cum0[1:])  # the running sums, written once (bits as a plain cumsum)
        neg = -desc  # ascending, for searchsorted
        q = np.exp(m_vals - top)
        every = all_maybe and bool(surely.all())  # then the masses of z_min are q (same bits)
        z_min = float(np.sum(q if every else np.exp(scaled[surely] - top))) * math.exp(-d)
        z_max = float(cum[-1]) * math.exp(d)
        head = _nucleus_head(m_vals, desc, q_desc, cum0, eps, d, z_min, z_max, params.top_p)
        h_vals = m_vals[head]
        n_surely_above = np.searchsorted(neg, -(h_vals + eps), side="left")  # count of desc > v + eps
        n_maybe_above = np.searchsorted(neg, -(h_vals - eps), side="right")  # count of desc >= v - eps
        above_min = cum0[n_surely_above] * math.exp(-d)
        above_max = np.maximum(cum0[n_maybe_above] - q[head], 0.0) * math.exp(d)
        ids_head = head if m_ids is None else m_ids[head]
        maybe = np.zeros(vocab, dtype=bool)
        maybe[ids_head] = above_min / z_max < params.top_p
        new_surely = np.zeros(vocab, dtype=bool)
        if z_min > 0:
            new_surely[ids_head] = above_max / z_min < params.top_p
        surely &= new_surely
    return maybe, surely


_HEAD_NATS = 8.0  # how far below the top (scaled nats) _nucleus_unsorted first looks for the nucleus
_HEAD_MAX = 4096  # it gives up (and candidate_bounds sorts) when the head needs more tokens than this


def _nucleus_unsorted(scaled: np.ndarray, d: float, eps: float, top_p: float) -> tuple[np.ndarray, np.ndarray] | None:
    """:func:`candidate_bounds`' top-p masks when no top-k cut applies, from the head of the distribution
    only; None when it cannot prove them equal (the caller then runs the sorted computation).

    What the sorted computation needs the whole vocabulary for: ``z_max``, the sum of all masses in
    descending order. Every other value it reads for a head token is a prefix sum over the tokens above
    ``thr`` (sorted here: a few hundred, not 49,152), and the same bits. ``z_max`` is bracketed instead:
    the pairwise sum that ``z_min`` already takes and the sequential one both lie within ``vocab * 2**-53``
    (relative) of the exact sum (Higham, "Accuracy and Stability of Numerical Algorithms", 4.2), so
    ``[z_lo, z_hi]`` below holds it; each "maybe" verdict is monotone in ``z_max``, so one that is the same at
    both ends is the exact verdict, and a row where any verdict differs (a ratio within ~1e-11 of top_p)
    returns None. Tokens below the head are ruled out as in :func:`_nucleus_head`: the mass above them
    already fails both tests, whatever their exact counts (:func:`_nucleus_from_head`).
    """
    vocab = scaled.shape[0]
    top = float(np.max(scaled))
    if not math.isfinite(top):  # NaN or +inf somewhere: leave it to the general computation
        return None
    total = float(np.sum(np.exp(scaled - top)))  # candidate_bounds' z_min sum: the same expression, the same bits
    z_min = total * math.exp(-d)

    def head(thr: float) -> tuple[np.ndarray, np.ndarray] | None:
        k_ids = np.flatnonzero(scaled >= thr)
        return None if k_ids.size > _HEAD_MAX else (k_ids, scaled[k_ids])

    found = _nucleus_from_head(head, vocab, top, total, total, z_min, z_min, d, eps, top_p)
    if found is None:
        return None
    h_ids, h_maybe, h_surely, _ = found
    maybe = np.zeros(vocab, dtype=bool)
    maybe[h_ids] = h_maybe
    surely = np.zeros(vocab, dtype=bool)
    surely[h_ids] = h_surely
    return maybe, surely


def _nucleus_from_head(head: Callable[[float], "tuple[np.ndarray, np.ndarray] | None"], vocab: int, top: float,
                       total_lo: float, total_hi: float, z_min_lo: float, z_min_hi: float, d: float, eps: float,
                       top_p: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None:
    """The top-p verdicts (no top-k) of the head tokens ``h_ids``: ``(h_ids, maybe, surely, scaled values)``;
    every other token is neither. None where they cannot be proven equal to the sorted computation's.

    ``head(thr)``: the IDs (ascending) and scaled values of every token whose scaled value is at least ``thr``
    (None: too many). ``total_lo <= total <= total_hi`` brackets ``sum(exp(scaled - top))`` as the sorted
    computation's ``z_min`` sum takes it (pairwise, over the vocabulary), and ``z_min_lo <= z_min <= z_min_hi``
    its ``z_min = total * exp(-d)``. Each verdict is monotone in ``z_min`` and ``z_max``, so one that is the
    same at both ends of their brackets is the exact verdict; a row where one differs returns None.
    """
    e_minus, e_plus = math.exp(-d), math.exp(d)
    if z_min_lo <= 0 < z_min_hi or not (math.isfinite(total_hi) and math.isfinite(z_min_hi)):
        return None
    rel = 4.0 * vocab * 2.0**-53 + 2.0**-50  # twice the two sums' error bounds, and this line's rounding
    z_lo = total_lo * (1.0 - rel) * e_plus
    z_hi = total_hi * (1.0 + rel) * e_plus
    if not math.isfinite(z_hi):
        return None
    reach = _HEAD_NATS
    while True:
        thr = top - reach
        got = head(thr)
        if got is None:
            return None
        k_ids, k_vals = got
        desc = -np.sort(-k_vals)  # the largest values of the vocabulary, descending: a prefix of its desc
        cum0 = np.empty(desc.shape[0] + 1)
        cum0[0] = 0.0
        np.cumsum(np.exp(desc - top), out=cum0[1:])  # the sorted computation's cum0, as far as it goes
        neg = -desc
        everything = k_ids.size == vocab
        in_head = np.ones(k_ids.size, dtype=bool) if everything else (k_vals - eps) >= thr
        n_head = int(np.count_nonzero(in_head))
        if everything:
            break
        # A token v below the head has v - eps < thr. "maybe" counts the values above v + eps <= thr + 2 eps:
        # at least those above thr + 2 eps, so its mass is at least theirs. "surely" counts the values at or
        # above v - eps: the head and v itself, and subtracts v's own mass, at most the next value's; what
        # is left is at least the head's mass less two roundings (2**-51 relative; 2**-48 is a wide pad).
        # Each test is a chain of monotone float operations, so these bounds decide it for every such v, and at
        # the bracket's far end (the largest z) for every z in it.
        above_min = cum0[int(np.searchsorted(neg, -(thr + 2.0 * eps), side="left"))] * e_minus
        tail_not_maybe = not above_min / z_hi < top_p
        tail_not_surely = z_min_hi <= 0 or (n_head > 0 and not float(cum0[n_head]) * (1.0 - 2.0**-48) * e_plus
                                            / z_min_hi < top_p)
        if tail_not_maybe and tail_not_surely:
            break
        reach = reach * 2.0 if reach < 1e6 else math.inf  # then thr is -inf: the whole vocabulary, or None
    h_ids = k_ids[in_head]
    h_vals = k_vals[in_head]
    n_surely_above = np.searchsorted(neg, -(h_vals + eps), side="left")  # count of desc > v + eps
    n_maybe_above = np.searchsorted(neg, -(h_vals - eps), side="right")  # count of desc >= v - eps
    above_min = cum0[n_surely_above] * e_minus
    maybe = above_min / z_lo < top_p
    if not np.array_equal(maybe, above_min / z_hi < top_p):
        return None  # a verdict within z_max's rounding of top_p: only the exact sum decides it
    if z_min_hi <= 0:
        return h_ids, maybe, np.zeros(h_ids.size, dtype=bool), h_vals
    # exp of the same values as over the whole row: numpy's exp is elementwise, the same bits at any position
    above_max = np.maximum(cum0[n_maybe_above] - np.exp(h_vals - top), 0.0) * e_plus
    surely = above_max / z_min_lo < top_p
    if z_min_hi != z_min_lo and not np.array_equal(surely, above_max / z_min_hi < top_p):
        return None  # the same for z_min
    return h_ids, maybe, surely, h_vals


def _nucleus_head(m_vals: np.ndarray, desc: np.ndarray, q_desc: np.ndarray, cum0: np.ndarray,
                  eps: float, d: float, z_min: float, z_max: float, top_p: float) -> np.ndarray:
    """Indices into ``m_vals`` that :func:`candidate_bounds` must test for nucleus membership one by one; every
    other value is provably neither "maybe" nor "surely" in the nucleus (exact: the bounds below use the
    very float operations of the test, and rounding is monotone).

    The test of a value ``v`` reads ``cum0`` at the count of values above ``v + eps`` ("maybe") or at least
    ``v - eps`` ("surely"); both counts reach ``J`` once ``v + eps < desc[J-1]``, and ``cum0`` only grows. So
    when the mass of the top ``J`` already fails both tests (for "surely" after taking away the largest own
    mass ``q`` of such a value), every such ``v`` fails them. Testing only the head skips two binary searches
    per vocabulary entry (10 ms of the 11 ms per row that a top-p check cost over 49,152 tokens).
    """
    everything = np.arange(m_vals.shape[0])
    if not (np.isfinite(desc[0]) and not np.isnan(desc).any()):
        return everything
    e_minus, e_plus = math.exp(-d), math.exp(d)

    def fails_maybe(c: int) -> bool:  # "maybe" fails for a value with c values above it (non-decreasing in c)
        return not cum0[c] * e_minus / z_max < top_p

    def fails_surely(c: int) -> bool:  # and "surely" for the largest value below the top c, own mass taken away
        own = q_desc[c] if c < q_desc.shape[0] else 0.0
        return z_min <= 0 or not max(cum0[c] - own, 0.0) * e_plus / z_min < top_p

    counts = range(1, cum0.shape[0])
    j = bisect.bisect_left(counts, True, key=fails_maybe)  # both grow with c: binary searches
    j = j + bisect.bisect_left(counts[j:], True, key=fails_surely)
    if j >= len(counts) or not (fails_maybe(counts[j]) and fails_surely(counts[j])):
        return everything
    threshold = desc[counts[j] - 1]
    # the tail, v + eps < threshold, is a suffix of desc (v + eps only falls along it): one more binary search
    first_tail = bisect.bisect_left(range(desc.shape[0]), True, key=lambda k: desc[k] + eps < threshold)
    if first_tail == desc.shape[0]:
        return everything
    # the bound used q_desc[j]; the exact one takes the tail's largest own mass (exp of the same values; the
    # pad covers any last-bit difference between exp over the sorted and the unsorted array)
    q_tail = float(np.max(q_desc[first_tail:])) * (1.0 + 1e-12)
    if z_min > 0 and max(float(cum0[counts[j]]) - q_tail, 0.0) * e_plus / z_min < top_p:
        return everything
    return np.flatnonzero((m_vals + eps) >= threshold)


def sampler_slack(params: SamplingParams, tolerance: float) -> float:
    """How far (in scaled nats) an honest token's key may sit below a rival's on the verifier: each of the two
    log-probs may be off by ``tolerance``, and keys divide them by the temperature."""
    return 2.0 * tolerance / params.temperature


def admissible_tokens(logprobs: np.ndarray, params: SamplingParams, seed_material: bytes, index: int,
                      tolerance: float) -> np.ndarray:
    """Every token ID the check accepts at this position (ascending). With honest drift it holds exactly the
    honest token at all but a ~``2*tolerance/T`` share of positions; benchmarks and the adaptive-executor
    test use it to measure the executor's freedom."""
    lp = np.asarray(logprobs, dtype=np.float64)
    if params.greedy:
        return np.flatnonzero(lp >= float(np.max(lp)) - 2.0 * tolerance)
    maybe, surely = candidate_bounds(lp, params, tolerance)
    slack = sampler_slack(params, tolerance)
    scaled = lp / params.temperature
    u = uniforms(seed_material, index, lp.shape[0])
    rival = gumbel_keys(np.where(surely, scaled, -np.inf), seed_material, index, slack, u)
    floor = float(np.max(rival)) - slack - G_MAX  # no token below this can be admitted (see gumbel_keys)
    keys = np.full(lp.shape[0], -np.inf)
    hopeful = np.flatnonzero(maybe & (scaled >= floor))
    keys[hopeful] = scaled[hopeful] - np.log(-np.log(u[hopeful]))
    best = int(np.argmax(rival))
    first = float(rival[best])
    rival[best] = -np.inf
    second = float(np.max(rival)) if rival.shape[0] > 1 else -np.inf
    best_other = np.full(lp.shape[0], first)
    best_other[best] = second
    return np.flatnonzero(maybe & (keys >= best_other - slack))


def is_acceptable(logprobs: np.ndarray, params: SamplingParams, seed_material: bytes, index: int,
                  token: int, tolerance: float) -> tuple[bool, str]:
    """Could an honest sampler whose log-probs differ from ``logprobs`` by at most ``tolerance`` per token
    have picked ``token`` at ``index``? Returns (ok, reason).

    Sampled: ``token`` must be a candidate under some admissible drift, and its key must be within
    :func:`sampler_slack` of the best key among the tokens that are candidates under every admissible drift.
    Greedy: within ``2 * tolerance`` of the best log-prob.
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
    maybe, surely = candidate_bounds(lp, params, tolerance)
    if not maybe[token]:
        return False, f"token {token} is outside the top-k/top-p candidates"
    slack = sampler_slack(params, tolerance)
    scaled = lp / params.temperature
    rivals = np.where(surely, scaled, -np.inf)
    rivals[token] = -np.inf
    rival_ids = np.flatnonzero(np.isfinite(rivals))
    if rival_ids.size <= _FEW_RIVALS:
        # top-k/top-p left few rivals: every key of theirs, and noise only up to the largest ID needed (the
        # Philox stream is the same prefix whatever its length); gumbel_keys' winner, bit for bit
        u = uniforms(seed_material, index, max(int(rival_ids.max(initial=0)), token) + 1)
        keys = rivals[rival_ids] - np.log(-np.log(u[rival_ids]))
        at = int(np.argmax(keys)) if keys.size else -1
        winner, best_key = (int(rival_ids[at]), float(keys[at])) if keys.size else (0, -np.inf)
    else:
        u = uniforms(seed_material, index, vocab)
        rival = gumbel_keys(rivals, seed_material, index, slack, u)
        winner = int(np.argmax(rival))
        best_key = float(rival[winner])
    gap = best_key - float((scaled[token] - np.log(-np.log(u[token:token + 1])))[0])
    if gap <= slack:
        return True, ""
    return False, (f"seeded sampler: token {token}'s key is {gap:.3g} below token {winner}'s "
                   f"(allowed drift {slack:.3g})")


def judge_row(logprobs: np.ndarray, params: SamplingParams, seed_material: bytes, index: int, token: int,
              tolerance: float, sorted_scaled: "np.ndarray | Callable[[], np.ndarray] | None" = None
              ) -> tuple[bool, bool]:
    """``(is_acceptable(...)[0], tiebreak.is_ambiguous(...))`` for a sampled row, from one pass: the candidate
    bounds, the noise and the rivals' keys are computed once and serve both (a verifier needs both for every
    accepted row; computing them apart built the bounds and drew the noise twice).

    Exactly the two verdicts, not an approximation (``tests/test_judge_rows.py`` compares them on random
    rows): both compare keys against the best and second-best rival key, which the pruned
    :func:`gumbel_keys` gives bit for bit wherever a comparison can turn on them.
    """
    lp = np.asarray(logprobs, dtype=np.float64)
    if not 0 <= token < lp.shape[0]:
        raise ValueError(f"token {token} outside the vocabulary")
    if params.greedy:
        raise ValueError("judge_row is for sampled rows; judge_rows vectorizes greedy ones")
    scaled = lp / params.temperature
    few = _row_candidates(lp, scaled, params, tolerance, token, sorted_scaled)
    if not isinstance(few, _FewCandidates):
        return _judge_all(scaled, params, seed_material, index, token, tolerance, *few)
    # noise only up to the largest ID needed: the Philox stream of a shorter draw is a prefix of the longer one
    return few.judge(_LazyUniforms(seed_material, index, int(few.ids[-1]) + 1)[few.ids], params, tolerance)


@dataclass(frozen=True)
class _FewCandidates:
    """A top-k/top-p row whose candidates are few: what the check needs of it, without the row itself."""

    token: int
    ids: np.ndarray  # ascending: every "maybe" and finite "surely" token, and the emitted one
    scaled: np.ndarray  # scaled log-probs at ids
    m_pos: np.ndarray  # positions in ids of the "maybe" tokens
    r_pos: np.ndarray  # ... of the finite "surely" tokens (the rivals; gumbel_keys keys finite values only)
    t_pos: int  # ... of the emitted token
    token_maybe: bool

    def judge(self, u: np.ndarray, params: SamplingParams, tolerance: float) -> tuple[bool, bool]:
        """The verdicts from the noise ``u`` at ``ids``: every rival's key directly (gumbel_keys' best and
        second best, bit for bit), then is_acceptable's and admissible_tokens' comparisons."""
        slack = sampler_slack(params, tolerance)
        r_keys = self.scaled[self.r_pos] - np.log(-np.log(u[self.r_pos]))
        at = int(np.argmax(r_keys)) if r_keys.size else 0
        first = float(r_keys[at]) if r_keys.size else -math.inf
        best = int(self.ids[self.r_pos[at]]) if r_keys.size and first != -math.inf else 0  # argmax of -infs: 0
        if r_keys.size:
            r_keys[at] = -np.inf
        second = float(np.max(r_keys)) if r_keys.size else -math.inf
        ok = False
        if self.token_maybe:
            rival_key = second if best == self.token else first
            t = slice(self.t_pos, self.t_pos + 1)
            ok = bool(rival_key - float((self.scaled[t] - np.log(-np.log(u[t])))[0]) <= slack)
        m_scaled = self.scaled[self.m_pos]
        hopeful = m_scaled >= first - slack - G_MAX
        m_keys = np.full(self.m_pos.shape[0], -np.inf)
        m_keys[hopeful] = m_scaled[hopeful] - np.log(-np.log(u[self.m_pos[hopeful]]))
        best_other = np.where(self.ids[self.m_pos] == best, second, first)
        return ok, int(np.count_nonzero(m_keys >= best_other - slack)) > 1


def _row_candidates(lp: np.ndarray, scaled: np.ndarray, params: SamplingParams, tolerance: float, token: int,
                    sorted_scaled) -> "_FewCandidates | tuple[np.ndarray | None, np.ndarray | None]":
    """The row's candidates when top-k/top-p leave at most :data:`_FEW_RIVALS` of them; otherwise the masks
    ``(maybe, surely)``, both None for plain sampling (every token a candidate, surely)."""
    if params.top_k == 0 and params.top_p >= 1.0:  # tiebreak's plain sampling
        return None, None
    maybe, surely = candidate_bounds(lp, params, tolerance, sorted_scaled)
    m_ids = np.flatnonzero(maybe)
    r_ids = np.flatnonzero(surely & np.isfinite(scaled))
    if max(m_ids.size, r_ids.size) > _FEW_RIVALS:
        return maybe, surely
    ids = np.union1d(np.union1d(m_ids, r_ids), [token])
    return _FewCandidates(token, ids, scaled[ids], np.searchsorted(ids, m_ids), np.searchsorted(ids, r_ids),
                          int(np.searchsorted(ids, token)), bool(maybe[token]))


def _judge_all(scaled: np.ndarray, params: SamplingParams, seed_material: bytes, index: int, token: int,
               tolerance: float, maybe: np.ndarray | None, surely: np.ndarray | None) -> tuple[bool, bool]:
    """judge_row when every token (``maybe`` None: plain sampling), or more than :data:`_FEW_RIVALS`, may be a
    rival: the pruned :func:`gumbel_keys` over the whole row, then the same comparisons."""
    slack = sampler_slack(params, tolerance)
    u = _LazyUniforms(seed_material, index, scaled.shape[0])
    keys = gumbel_keys(scaled if maybe is None else np.where(surely, scaled, -np.inf), seed_material, index, slack, u)
    best = int(np.argmax(keys))
    first = float(keys[best])
    keys[best] = -np.inf
    second = float(np.max(keys))
    ok = False
    if maybe is None or maybe[token]:
        # is_acceptable: the best rival key other than the token's own, and the token's key, the same ops
        rival_key = second if best == token else first
        ok = bool(rival_key - float((scaled[token] - np.log(-np.log(u[token:token + 1])))[0]) <= slack)
    if maybe is None:
        return ok, not second < first - slack  # tiebreak._plain_pick
    # admissible_tokens, over the "maybe" tokens only (the others are never admissible)
    m_ids = np.flatnonzero(maybe)
    m_scaled = scaled[m_ids]
    hopeful = m_scaled >= first - slack - G_MAX
    m_keys = np.full(m_ids.shape[0], -np.inf)
    m_keys[hopeful] = m_scaled[hopeful] - np.log(-np.log(u[m_ids[hopeful]]))
    best_other = np.where(m_ids == best, second, first)
    return ok, int(np.count_nonzero(m_keys >= best_other - slack)) > 1


_MASS_NATS = 22.0  # top-p masses are summed over the tokens this close to the top (scaled nats); the rest bounded
_MASS_REL = 1e-5  # the float32 mass sum's relative bracket (the proof in _mass_bracket)


class _Head:
    """One row of a :class:`LogProbRows` read at chosen tokens only: their scaled log-probs with the very
    operations of ``rows.row(r) / temperature`` (the same bits), and the tokens at or above a scaled value
    found with one comparison over the row's own values (no float64 row, no mask over the vocabulary)."""

    def __init__(self, rows: LogProbRows, r: int, temperature: float) -> None:
        self.x = rows.values[r]
        self.shift = float(rows.shift[r])
        self.log_norm = float(rows.log_norm[r])
        self.temperature = temperature
        self._near: "tuple[object, np.ndarray, np.ndarray] | None" = None  # (floor, ids, values) of a selection

    def select(self, c) -> tuple[np.ndarray, np.ndarray]:
        """IDs (ascending) and values of the tokens whose value is ``>= c``; kept, and later selections at or
        above ``c`` are taken from it instead of the whole row."""
        ids = self._ids_at_least(c)
        self._near = (c, ids, self.x[ids])
        return ids, self._near[2]

    def _ids_at_least(self, c) -> np.ndarray:
        if self._near is not None and c >= self._near[0]:
            return self._near[1][self._near[2] >= c]
        return np.flatnonzero(self.x >= c)

    def scaled(self, ids: np.ndarray) -> np.ndarray:
        return ((self.x[ids].astype(np.float64) - self.shift) - self.log_norm) / self.temperature

    def _scaled_of(self, value) -> float:  # the same operations on one value (Python floats are IEEE doubles)
        return ((float(value) - self.shift) - self.log_norm) / self.temperature

    def floor(self, thr: float):
        """A value ``c`` of the row's dtype such that every ``x < c`` has a scaled value below ``thr``: the map
        from ``x`` to its scaled value is a chain of rounded, non-decreasing operations, so it is enough that
        the largest representable value below ``c`` maps below ``thr`` (checked here, not assumed)."""
        kind = self.x.dtype.type
        if not thr > -math.inf:
            return kind(-np.inf)
        c = kind(self.shift + self.log_norm + thr * self.temperature)  # the inverse map, up to rounding
        step = 2.0**-20 * (1.0 + abs(float(c)))
        for _ in range(64):
            below = np.nextafter(c, kind(-np.inf))
            if not self._scaled_of(below) >= thr:
                return c
            c = kind(float(c) - step)
            step *= 2.0
        return kind(-np.inf)

    def at_least(self, thr: float, limit: int) -> "tuple[np.ndarray, np.ndarray] | None":
        """IDs (ascending) and scaled values of every token whose scaled value is ``>= thr``, exactly
        ``np.flatnonzero(scaled >= thr)``; None if more than ``limit``."""
        ids = self._ids_at_least(self.floor(thr))  # a superset: one comparison over the row
        if ids.size > 4 * limit:
            return None
        vals = self.scaled(ids)
        keep = vals >= thr
        ids, vals = ids[keep], vals[keep]
        return None if ids.size > limit else (ids, vals)


def _mass_bracket(head: _Head, top_id: int, top: float) -> tuple[float, float]:
    """``(lo, hi)`` holding ``sum(exp(scaled - top))`` as the sorted top-p computation takes it (float64, over
    the whole row), from the tokens within :data:`_MASS_NATS` of the top only, in float32.

    The proof. Let ``a = (x - x_top) / T`` exactly; the exact mass of a token is ``exp(a)``, and the float64
    computation's is that up to ``1e-10`` relative where ``a >= -80`` (its argument ``scaled - top`` is off by
    at most ``4u (|a| + 2 L / T)``, ``u = 2**-53``, ``0 <= L <= log vocab`` the normaliser, ``T >= 1e-3``; exp
    adds a few ulp), and its pairwise sum adds ``vocab * u`` relative. The kept tokens (``scaled >= top - 22``,
    a superset found as :meth:`_Head.at_least` finds one) are summed here as ``exp(float32((x - x_top) *
    float32(1/T)))``: the argument is ``a (1 + e)`` with ``|e| <= 3 * 2**-24 (1 + u)`` (the subtraction,
    ``float32(1/T)`` and the product), so each mass is off by a factor within ``exp(+-|a| * 1.8e-7)``: at the
    kept set's lowest ``|a|`` (measured below; about 22) ``1 +- 4e-6``; numpy's float32 exp is within a few ulp
    (``< 1e-6``), and the float64 sum of the float32 values adds ``vocab * u``. The top token's mass is exactly 1
    on both sides, so the total is at least 1 and these relative errors stay under ``(|a_min| + 1) * 2e-7 +
    2e-6``, which is below ``1e-5`` (``_MASS_REL``) for any kept set reaching less than 38 nats down. Every
    other token has ``scaled < top - 22``: its float64 mass is at most ``exp(-22) (1 + 1e-9)``, so the rest
    adds between 0 and ``n_rest * exp(-22) * (1 + 1e-6)`` (at most ``1.4e-5`` of the total at 49,152 tokens).
    ``tests/test_sampling_check_speed.py`` checks the bracket against the float64 sum on real-shaped rows.
    """
    ids, x = head.select(head.floor(top - _MASS_NATS))
    y = x - head.x[top_id]  # float32
    y *= np.float32(1.0 / head.temperature)
    rel = max(_MASS_REL, (abs(float(np.min(y))) + 1.0) * 2e-7 + 2e-6)  # the superset may reach a little lower
    np.exp(y, out=y)
    kept = float(np.add.reduce(y, dtype=np.float64))
    rest = (head.x.shape[0] - ids.size) * math.exp(-_MASS_NATS) * (1.0 + 1e-6)
    return kept * (1.0 - rel), kept * (1.0 + rel) + rest


def _few_from_head(head: _Head, h_ids: np.ndarray, h_maybe: np.ndarray, h_surely: np.ndarray,
                   h_vals: np.ndarray, token: int) -> "_FewCandidates | None":
    """:func:`_row_candidates`' result from the head tokens' verdicts (``h_ids`` ascending; every other token
    neither "maybe" nor "surely"); None when the candidates are too many for it (the caller then takes the
    whole row)."""
    rival = h_surely & np.isfinite(h_vals)
    chosen = h_maybe | rival
    ids = h_ids[chosen]  # union1d of the "maybe" and rival IDs: ascending, each once
    m_pos = np.flatnonzero(h_maybe[chosen])
    r_pos = np.flatnonzero(rival[chosen])
    if max(m_pos.size, r_pos.size) > _FEW_RIVALS:
        return None
    t_pos = int(np.searchsorted(ids, token))
    if t_pos < ids.size and int(ids[t_pos]) == token:
        token_maybe = bool(h_maybe[chosen][t_pos])
    else:  # the emitted token joins them (union1d with [token]): the positions at or after it move up by one
        ids = np.insert(ids, t_pos, token)
        m_pos[m_pos >= t_pos] += 1
        r_pos[r_pos >= t_pos] += 1
        token_maybe = False
    return _FewCandidates(token, ids, head.scaled(ids), m_pos, r_pos, t_pos, token_maybe)


def _head_candidates(head: _Head, params: SamplingParams, tolerance: float, token: int, top_id: int, top: float,
                     masses: bool) -> "_FewCandidates | None":
    """:func:`_row_candidates` for a top-k/top-p row from its head alone; None where that is not proven (the
    caller then builds the row). ``top_id``, ``top``: the row's largest value's ID and scaled value; ``masses``:
    whether :func:`_mass_bracket`'s proof holds for the row (top-p without top-k needs it)."""
    vocab = head.x.shape[0]
    d = tolerance / params.temperature
    eps = 2.0 * d
    if params.top_k == 0:
        if not masses:
            return None
        total = _mass_bracket(head, top_id, top)
        e_minus = math.exp(-d)
        found = _nucleus_from_head(lambda thr: head.at_least(thr, _HEAD_MAX), vocab, top, total[0], total[1],
                                   total[0] * e_minus, total[1] * e_minus, d, eps, params.top_p)
        if found is None:
            return None
        return _few_from_head(head, *found, token)
    # top-k (and top-p over its candidates): candidate_bounds reads only the tokens at or above the k-th value
    # less eps: "maybe" is that set, "surely" a part of it above the (k+1)-th plus eps, and top-p then reads
    # those two sets only. So candidate_bounds over the head alone, a prefix of the sorted row holding those
    # tokens and the k + 1 largest, gives the same verdicts (top_k stays below the head's size)
    k = params.top_k
    reach = 2.0 * _HEAD_NATS  # one comparison over the row: the k + 1 largest of a 49,152-token row are rarely lower
    while True:  # a prefix of the sorted row with more than k tokens
        ids, x = head.select(head.floor(top - reach))
        if ids.size > k:
            break
        if ids.size == vocab or reach == math.inf:
            return None
        reach = reach * 2.0 if reach < 1e6 else math.inf
    # the k-th and (k+1)-th largest values: the row's map to scaled values is non-decreasing, so they are the
    # sorted scaled row's [k - 1] and [k]
    part = np.partition(x, (ids.size - k - 1, ids.size - k))
    kth, after = head._scaled_of(part[ids.size - k]), head._scaled_of(part[ids.size - k - 1])
    got = head.at_least(min(kth - eps, after), _FEW_RIVALS)
    if got is None or got[0].size == vocab:
        return None
    ids, vals = got
    lp = (head.x[ids].astype(np.float64) - head.shift) - head.log_norm  # rows.row(r)[ids], the same bits
    maybe, surely = candidate_bounds(lp, params, tolerance)
    return _few_from_head(head, ids, maybe, surely, vals, token)


def _judge_plain(head: _Head, params: SamplingParams, seed_material: bytes, index: int, token: int,
                 tolerance: float, top_id: int, top: float) -> tuple[bool, bool]:
    """:func:`_judge_all` for plain sampling (no top-k/top-p) without a float64 row: the noise of every token
    (its largest value bounds every key), but keys only for the tokens that can come within the slack of the
    best, found with one comparison over the row's values.

    Exact: no key exceeds ``scaled + g_cap`` (``g_cap`` the noise of the position's largest draw, as in
    :func:`gumbel_keys`), and the best key is at least the top token's, so a token below ``key(top) - slack -
    g_cap`` is more than ``slack`` below the best. The tokens kept are then narrowed with the best key among
    the kept ones near the top, by the same argument. Every key within ``slack`` of the best is kept, with
    gumbel_keys' bits, so the best and second-best keys, the best's ID (the lowest among equal keys) and the
    token's key, hence both verdicts, are those of :func:`_judge_all`."""
    slack = sampler_slack(params, tolerance)
    # not shifted: only the draws read are; the largest draw comes from the same pass (C) or draws.max() (numpy)
    draws, largest = philox.stream(noise_key(seed_material, index), head.x.shape[0])

    def noise(ids: np.ndarray) -> np.ndarray:  # g at ids: uniforms' and gumbel_keys' operations, the same bits
        return np.log(-np.log(((draws[ids] >> np.uint64(11)).astype(np.float64) + 0.5) * 2.0**-53))

    u_top = (float(largest >> 11) + 0.5) * 2.0**-53  # the largest u (the shift is monotone)
    g_cap = min(float(-np.log(-np.log(u_top))) + _G_PAD, G_MAX)
    top_key = float((head.scaled(np.array([top_id])) - noise(np.array([top_id])))[0])
    ids, vals = head.at_least(top_key - slack - g_cap, head.x.shape[0])
    near_top = vals >= top - _PROBE_NATS  # the best key among these bounds the best from below, more tightly
    threshold = float(np.max(vals[near_top] - noise(ids[near_top]))) - slack - g_cap
    keep = vals >= threshold
    ids, vals = ids[keep], vals[keep]
    keys = vals - noise(ids)
    at = int(np.argmax(keys))  # the lowest ID among equal keys, as over the whole row (ids ascend)
    best, first = int(ids[at]), float(keys[at])
    keys[at] = -np.inf
    second = float(np.max(keys)) if keys.size > 1 else -math.inf
    token_key = float((head.scaled(np.array([token])) - noise(np.array([token])))[0])
    rival_key = second if best == token else first
    return bool(rival_key - token_key <= slack), not second < first - slack


def _sorted_scaled(rows: LogProbRows, r: int, temperature: float) -> np.ndarray:
    """``np.sort(rows.row(r) / temperature)``, bit for bit, at half the cost: the float32 logits sort in half
    the time of float64 values, and the log-prob and the division by T are non-decreasing maps."""
    out = (np.sort(rows.values[r]).astype(np.float64) - rows.shift[r]) - rows.log_norm[r]
    out /= temperature
    return out


def judge_rows(logprobs: "np.ndarray | LogProbRows", params: SamplingParams, seed_material: bytes,
               start_index: int, tokens: np.ndarray, tolerance: float,
               row_max: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Per row (output index ``start_index + r``): whether ``tokens[r]`` is acceptable (:func:`is_acceptable`)
    and whether the row is a near tie (``tiebreak.is_ambiguous``: more than one admissible token), in one
    pass. Greedy is vectorized over rows. Sampled rows get :func:`judge_row`'s verdicts without its float64
    row: each is read at the tokens near its top only (:class:`_Head`; top-p masses' total bracketed by
    :func:`_mass_bracket`, top-k from its head, plain sampling's keys in :func:`_judge_plain`), and where that
    cannot prove the verdicts, from the whole row as judge_row does. The rows whose top-k/top-p candidates are
    few get their noise together, at just those candidates' IDs (:mod:`.philox`). ``row_max``: each greedy
    row's largest log-prob when the caller has it already.
    """
    rows = logprobs if isinstance(logprobs, LogProbRows) else LogProbRows.from_logprobs(logprobs)
    n, vocab = rows.n, rows.vocab
    tokens = np.asarray(tokens, dtype=np.int64)
    in_vocab = (tokens >= 0) & (tokens < vocab)
    tok = np.where(in_vocab, tokens, 0)
    everything = np.arange(n)
    if params.greedy:
        top_ids, best, runner_up = rows.top_two()
        ok = in_vocab & (rows.at(everything, tok) >= (best if row_max is None else row_max) - 2.0 * tolerance)
        # a near tie: another token within 2 * tolerance of the best, i.e. the runner-up is (same bits as
        # is_ambiguous's count over the row, since the runner-up is the largest of the others)
        return ok, runner_up >= best - 2.0 * tolerance
    ok = np.zeros(n, dtype=bool)
    near = np.zeros(n, dtype=bool)
    sort_logits = params.top_k != 0 or params.top_p < 1.0  # only the candidate bounds sort
    plain = params.top_k == 0 and params.top_p >= 1.0
    # the head-only paths: each row's largest value (the lowest ID of it) on the row's own values, its scaled
    # value with the row's operations; for top-p without top-k, the bracket of the masses' total (float32 rows)
    top_ids, top_lp = rows.best()
    tops = top_lp / params.temperature
    # _mass_bracket's proof takes float32 rows as from_logits makes them: shift the row maximum, 0 <= L <= log V
    masses = ((rows.values.dtype == np.float32) & (rows.shift == rows.values[everything, top_ids])
              & (rows.log_norm >= 0.0) & (rows.log_norm <= math.log(vocab) + 1.0))
    halves: dict[int, dict[int, _FewCandidates]] = {}

    def judge(lo: int, hi: int) -> None:
        few = halves[lo] = {}
        for r in range(lo, hi):
            if not in_vocab[r]:
                continue
            token = int(tok[r])
            cands = None
            if math.isfinite(tops[r]):  # no NaN, no +inf, not every token -inf
                head = _Head(rows, r, params.temperature)
                if plain:
                    ok[r], near[r] = _judge_plain(head, params, seed_material, start_index + r, token, tolerance,
                                                  int(top_ids[r]), float(tops[r]))
                    continue
                if params.top_k < vocab:
                    cands = _head_candidates(head, params, tolerance, token, int(top_ids[r]), float(tops[r]),
                                             bool(masses[r]))
            if cands is None:  # the whole row, as judge_row takes it
                lp = rows.row(r)
                scaled = lp / params.temperature
                cands = _row_candidates(lp, scaled, params, tolerance, token,
                                        (lambda r=r: _sorted_scaled(rows, r, params.temperature)) if sort_logits
                                        else None)
            if isinstance(cands, _FewCandidates):
                few[r] = cands  # its noise comes below, with every other such row's
            else:
                ok[r], near[r] = _judge_all(scaled, params, seed_material, start_index + r, token, tolerance,
                                            *cands)

    if plain:  # rows are independent: two threads (row_halves) judge them, each row with the same operations, the
        # same bits; the Philox draws (most of a plain row's cost) run without the GIL. The other paths are mostly
        # small numpy calls, which hold it: one thread (measured: two were slower)
        over_rows(n, judge)
    else:
        judge(0, n)
    few = {r: c for lo in sorted(halves) for r, c in halves[lo].items()}
    if few:
        # the noise of every few-candidate row at just its candidates' IDs, in one vectorized Philox pass
        keys = [noise_key(seed_material, start_index + r) for r in few]
        pairs = np.repeat(np.array([[k & (2**64 - 1), k >> 64] for k in keys], dtype=np.uint64),
                          [c.ids.shape[0] for c in few.values()], axis=0)
        raw = philox.draws(pairs, np.concatenate([c.ids for c in few.values()])) >> np.uint64(11)
        u_all = (raw.astype(np.float64) + 0.5) * 2.0**-53  # uniforms' operations, hence its bits
        lo = 0
        for r, cands in few.items():
            hi = lo + cands.ids.shape[0]
            ok[r], near[r] = cands.judge(u_all[lo:hi], params, tolerance)
            lo = hi
    return ok, near


def acceptable_rows(logprobs: "np.ndarray | LogProbRows", params: SamplingParams, seed_material: bytes,
                    start_index: int, tokens: np.ndarray, tolerance: float,
                    row_max: np.ndarray | None = None) -> np.ndarray:
    """:func:`is_acceptable` for many rows at once (row ``r`` is output index ``start_index + r``).

    The verdicts of :func:`judge_rows` (one rule, one implementation), without its near-tie flags. ``row_max``:
    each row's largest log-prob when the caller has it already (greedy reads no other value).
    """
    return judge_rows(logprobs, params, seed_material, start_index, tokens, tolerance, row_max)[0]
