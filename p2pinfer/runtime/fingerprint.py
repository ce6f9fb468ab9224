"""Logit fingerprints: what the executor records while generating, and the check a verifier runs (pure).

Format ``topk8-q16/1`` (see docs/models.md)::

    header  = 0x01 (version) || k (1 byte, 8)
    row i   = k token IDs, uint24 big-endian, ordered by descending log-prob (ties: lower ID first)
           || k log-probs as uint24 big-endian q = min(round(-logprob * 2**16), 2**24 - 1)

Row ``i`` describes the distribution the token at output index ``i`` was drawn from. With k = 8 a row is
exactly 48 bytes, so a fingerprint is ``2 + 48 * n_tokens`` bytes. Log-probs are kept to 2**-16 nats (rounding
error at most 2**-17 = 7.6e-6, far below any tolerance we use); values below -256 nats saturate at the floor.
The commitment is ``tagged_hash("p2pinfer/v1/fingerprint", format, bytes)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..wire.hashing import tagged_hash
from .sampling import LogProbRows, SamplingParams, is_acceptable, judge_rows
from .tiebreak import ReferenceRow, settle_near_ties

FORMAT = "topk8-q16/1"
VERSION = 1
TOP_K = 8
SCALE = 1 << 16
Q_MAX = (1 << 24) - 1
ID_MAX = (1 << 24) - 1
HEADER_BYTES = 2
QUANTUM = 1.0 / SCALE
COMMITMENT_DOMAIN = "p2pinfer/v1/fingerprint"


def bytes_per_token(k: int = TOP_K) -> int:
    return 6 * k


class FingerprintFormatError(ValueError):
    """Fingerprint bytes that do not parse."""


@dataclass(frozen=True)
class Fingerprint:
    """Per output position: ``ids[i]`` (k token IDs) and their quantized log-probs ``q[i]`` (uint24 units)."""

    ids: np.ndarray  # int64 [n, k]
    q: np.ndarray  # int64 [n, k]; logprob = -q / 2**16

    @property
    def k(self) -> int:
        return int(self.ids.shape[1])

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    @property
    def logprobs(self) -> np.ndarray:
        return -self.q.astype(np.float64) / SCALE

    def pack(self) -> bytes:
        return pack(self)

    def truncated(self, n: int) -> "Fingerprint":
        return Fingerprint(self.ids[:n].copy(), self.q[:n].copy())


def quantize(logprobs: np.ndarray) -> np.ndarray:
    q = np.rint(-np.asarray(logprobs, dtype=np.float64) * SCALE)
    return np.clip(q, 0, Q_MAX).astype(np.int64)


def top_k_row(logprobs: np.ndarray, k: int = TOP_K) -> tuple[np.ndarray, np.ndarray]:
    """The top-k IDs (by descending log-prob, ties by lower ID) of one row and their quantized log-probs."""
    lp = np.asarray(logprobs, dtype=np.float64)
    k = min(k, lp.shape[0])
    part = np.argpartition(-lp, k - 1)[:k] if k < lp.shape[0] else np.arange(lp.shape[0])
    # include everything tied with the k-th value so the tie-break by ID is exact
    kth = lp[part].min()
    pool = np.flatnonzero(lp >= kth)
    order = np.lexsort((pool, -lp[pool]))[:k]
    ids = pool[order]
    return ids.astype(np.int64), quantize(lp[ids])


class FingerprintBuilder:
    """Accumulates rows while generating."""

    def __init__(self, k: int = TOP_K) -> None:
        self.k = k
        self._ids: list[np.ndarray] = []
        self._q: list[np.ndarray] = []

    def add(self, logprobs: np.ndarray) -> None:
        ids, q = top_k_row(logprobs, self.k)
        self._ids.append(ids)
        self._q.append(q)

    def __len__(self) -> int:
        return len(self._ids)

    def build(self) -> Fingerprint:
        if not self._ids:
            return Fingerprint(np.zeros((0, self.k), np.int64), np.zeros((0, self.k), np.int64))
        return Fingerprint(np.stack(self._ids), np.stack(self._q))


def _u24(a: np.ndarray) -> np.ndarray:
    a = a.astype(">u4")
    return a.view(np.uint8).reshape(*a.shape, 4)[..., 1:]


def pack(fp: Fingerprint) -> bytes:
    k = fp.k
    if not 1 <= k <= 255:
        raise ValueError("k must be in 1..255")
    if fp.ids.size and (fp.ids.min() < 0 or fp.ids.max() > ID_MAX):
        raise ValueError("token IDs must fit in 24 bits")
    n = len(fp)
    rows = np.concatenate([_u24(fp.ids).reshape(n, 3 * k), _u24(fp.q).reshape(n, 3 * k)], axis=1)
    return bytes([VERSION, k]) + rows.astype(np.uint8).tobytes()


def unpack(data: bytes) -> Fingerprint:
    if len(data) < HEADER_BYTES:
        raise FingerprintFormatError("fingerprint shorter than its 2-byte header")
    version, k = data[0], data[1]
    if version != VERSION:
        raise FingerprintFormatError(f"unknown fingerprint version {version}")
    if k == 0:
        raise FingerprintFormatError("fingerprint with k = 0")
    body = len(data) - HEADER_BYTES
    row = 6 * k
    if body % row:
        raise FingerprintFormatError(f"fingerprint body of {body} bytes is not a multiple of {row}")
    n = body // row
    raw = np.frombuffer(data, dtype=np.uint8, offset=HEADER_BYTES).reshape(n, 2, k, 3).astype(np.int64)
    vals = (raw[..., 0] << 16) | (raw[..., 1] << 8) | raw[..., 2]
    return Fingerprint(np.ascontiguousarray(vals[:, 0]), np.ascontiguousarray(vals[:, 1]))


def commitment(data: bytes, fmt: str = FORMAT) -> bytes:
    """The 32-byte commitment to packed fingerprint bytes."""
    return tagged_hash(COMMITMENT_DOMAIN, fmt.encode("utf-8"), data)


@dataclass
class FingerprintVerdict:
    accept: bool
    first_bad_position: int | None = None  # output index (0-based) of the first failing token
    reason: str = ""
    max_deviation: float = 0.0
    positions_checked: int = 0
    positions_failed: int = 0


_NEAR_TIE_REASON = ("seeded sampler: a near tie at this index (more than one token within the drift), and the "
                    "float64 reference picks another token")


@dataclass
class FingerprintChecker:
    """Checks a claimed fingerprint against recomputed log-probs, row chunk by row chunk.

    Per output index ``i`` (recomputed log-probs ``lp``, claimed top-k ``ids``/``c``, allowance
    ``a = tolerance + 2**-16``):

    1. structure: IDs distinct and inside the vocabulary, claimed values non-increasing;
    2. every claimed value within ``a`` of ``lp[id]`` (a saturated value only needs ``lp[id] <= c + a``);
    3. no unclaimed token above the claimed k-th value by more than ``a``;
    4. the emitted token is the seeded sampler's pick by :func:`.tiebreak.check_rows`: admissible under this
       verifier's own drift from exact arithmetic (:func:`sampling.is_acceptable` with ``tie_tolerance``) and,
       where more than one token is, the float64 reference's pick (``reference_row``: output index -> reference
       log-prob row; None leaves such rows open).

    ``tolerance`` is the pair tolerance (rules 2-3); ``tie_tolerance`` the verifier's near-tie detector width
    (:mod:`.tie_tolerance`), None: the pair tolerance (the earlier single-width rule, for tooling).

    ``defer_near_ties``: rule 4's reference rows are not computed during :meth:`check_rows`; the near ties
    that passed every other test are listed, and :meth:`settle_near_ties` decides them afterwards, in index
    order. The verdict is the same (first bad position and reason); a verifier uses it so that the float64
    reference runs after the forward passes' buffers are freed (its memory peak is then not added to theirs).
    With ``stop_at_first``, near ties after the first bad index are not decided (they cannot change it).
    """

    fingerprint: Fingerprint
    output_ids: list[int]
    params: SamplingParams
    seed_material: bytes
    tolerance: float
    max_deviation: float = 0.0
    first_bad: int | None = None
    reason: str = ""
    failed: int = 0
    checked: int = 0
    stop_at_first: bool = False
    reference_row: ReferenceRow | None = None
    defer_near_ties: bool = False
    tie_tolerance: float | None = None
    _claimed: np.ndarray = field(init=False)
    _deferred: list[tuple[int, int]] = field(init=False, default_factory=list)  # (index, token) to decide

    def __post_init__(self) -> None:
        self._claimed = self.fingerprint.logprobs

    @property
    def _tie(self) -> float:
        return self.tolerance if self.tie_tolerance is None else self.tie_tolerance

    @property
    def done(self) -> bool:
        return self.stop_at_first and self.first_bad is not None

    def check_rows(self, start: int, logprobs: "np.ndarray | LogProbRows") -> None:
        """Check output indices ``start .. start + n - 1`` (vectorized over the rows): ``logprobs`` is the
        float64 matrix ``[n, vocab]`` or, cheaper, :class:`~.sampling.LogProbRows` over the logits."""
        if self.done:
            return
        allowance = self.tolerance + QUANTUM
        rows = logprobs if isinstance(logprobs, LogProbRows) else LogProbRows.from_logprobs(logprobs)
        n, vocab = rows.n, rows.vocab
        stop = start + n
        ids = self.fingerprint.ids[start:stop]
        claimed = self._claimed[start:stop]
        saturated = self.fingerprint.q[start:stop] == Q_MAX
        r = np.arange(n)[:, None]
        srt = np.sort(ids, axis=1)
        malformed_ids = (ids.min(axis=1) < 0) | (ids.max(axis=1) >= vocab) | np.any(srt[:, 1:] == srt[:, :-1], axis=1)
        disordered = np.any(np.diff(claimed, axis=1) > 0, axis=1)
        safe_ids = np.clip(ids, 0, vocab - 1)
        actual = rows.at(r, safe_ids)
        dev = np.abs(actual - claimed)
        dev = np.where(saturated, np.maximum(actual - claimed, 0.0), dev)
        worst = dev.max(axis=1)
        other_id, other = rows.best(exclude=safe_ids)  # the best unclaimed token
        excess = np.maximum(other - claimed[:, -1], 0.0)
        tokens = np.asarray(self.output_ids[start:stop], dtype=np.int64)
        # the row maximum is the larger of the best unclaimed and the best claimed value (same bits, no pass)
        sampler_ok, near_tie = judge_rows(rows, self.params, self.seed_material, start, tokens, self._tie,
                                          row_max=np.maximum(other, actual.max(axis=1)))
        other_bad = malformed_ids | disordered | (worst > allowance) | (excess > allowance)
        if self.defer_near_ties:  # decided by settle_near_ties: the near ties nothing else rejects
            self._deferred += [(start + int(r), int(tokens[r])) for r in np.flatnonzero(sampler_ok & near_tie
                                                                                         & ~other_bad)]
        else:
            sampler_ok = settle_near_ties(rows, self.params, self.seed_material, start, tokens, self._tie,
                                          sampler_ok, self.reference_row, near_tie)
        good = ~malformed_ids
        if np.any(good):
            self.max_deviation = max(self.max_deviation, float(np.max(np.maximum(worst, excess)[good])))
        if np.any(malformed_ids):
            self.max_deviation = float("inf")
        bad = other_bad | ~sampler_ok
        self.checked += n
        self.failed += int(bad.sum())
        if self.first_bad is not None or not bad.any():
            return
        j = int(np.argmax(bad))
        i = start + j
        self.first_bad = i
        if malformed_ids[j]:
            self.reason = "malformed row: duplicate or out-of-vocabulary token IDs"
        elif disordered[j]:
            self.reason = "malformed row: claimed log-probs not in descending order"
        elif worst[j] > allowance:
            c = int(dev[j].argmax())
            self.reason = (f"log-prob of token {int(ids[j, c])} claimed {claimed[j, c]:.6f}, recomputed "
                           f"{actual[j, c]:.6f} (deviation {worst[j]:.3g} > tolerance {self.tolerance:.3g})")
        elif excess[j] > allowance:
            self.reason = (f"unclaimed token {int(other_id[j])} at {other[j]:.6f} exceeds the claimed "
                           f"k-th log-prob {claimed[j, -1]:.6f} by {excess[j]:.3g}")
        else:
            _, why = is_acceptable(rows.row(j), self.params, self.seed_material, i, int(tokens[j]), self._tie)
            self.reason = why or _NEAR_TIE_REASON

    @property
    def deferred_indices(self) -> list[int]:
        """The output indices of the near ties waiting for :meth:`settle_near_ties`, in order."""
        return [i for i, _ in self._deferred]

    def settle_near_ties(self, reference_row: ReferenceRow) -> None:
        """Decide the near ties :meth:`check_rows` deferred (``defer_near_ties``), in index order: a token that
        is not the reference's pick is a bad row (the first bad index moves to it when it is earlier)."""
        deferred, self._deferred = self._deferred, []
        for i, token in deferred:
            if self.stop_at_first and self.first_bad is not None and i > self.first_bad:
                break
            yes = np.ones(1, dtype=bool)  # accepted by the drift-only check, and a near tie (hence deferred)
            if settle_near_ties(None, self.params, self.seed_material, i, np.asarray([token]), self._tie, yes,
                                reference_row, yes)[0]:
                continue
            self.failed += 1
            if self.first_bad is None or i < self.first_bad:
                self.first_bad, self.reason = i, _NEAR_TIE_REASON

    def verdict(self) -> FingerprintVerdict:
        return FingerprintVerdict(
            accept=self.first_bad is None,
            first_bad_position=self.first_bad,
            reason=self.reason,
            max_deviation=self.max_deviation,
            positions_checked=self.checked,
            positions_failed=self.failed,
        )


def verify_fingerprint(fingerprint: Fingerprint, logprobs: np.ndarray, output_ids: list[int],
                       params: SamplingParams, seed_material: bytes, tolerance: float) -> FingerprintVerdict:
    """Check a whole fingerprint against recomputed log-probs ``[n_output, vocab]`` (see FingerprintChecker)."""
    n = len(output_ids)
    if len(fingerprint) != n:
        return FingerprintVerdict(False, min(len(fingerprint), n),
                                  f"fingerprint has {len(fingerprint)} rows for {n} output tokens")
    if np.asarray(logprobs).shape[0] != n:
        raise ValueError("logprobs must have one row per output token")
    checker = FingerprintChecker(fingerprint, list(output_ids), params, seed_material, tolerance)
    checker.check_rows(0, logprobs)
    return checker.verdict()
