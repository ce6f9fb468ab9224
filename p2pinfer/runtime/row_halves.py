"""Work over the rows of a verification pass's logits on two threads.

A verifier's check reads every logit of every checked row once or twice (the log-softmax normaliser: one float64
``exp`` per logit; the best unclaimed token: an ``argmax`` per row). numpy runs each call on one thread, and
after the forward pass the machine's other core is idle, so :func:`over_rows` gives the second half of the rows
to one helper thread. Rows are independent and each half runs the very same numpy operations on its rows, so
the results are bit for bit those of one call over all rows. The helper is joined before ``over_rows``
returns (its errors are raised there): nothing runs on after the caller.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

MIN_ROWS = 16  # below this the hand-over costs more than half the rows' work

_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _helper() -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="p2pinfer-rows")
        return _pool


def over_rows(n: int, work: Callable[[int, int], None], *, align: int = 1) -> None:
    """``work(lo, hi)`` over the rows ``[0, n)``: the second half on a helper thread where there are at least
    :data:`MIN_ROWS` rows and two CPUs, else one call. ``align``: the split falls on a multiple of it (callers
    that work in blocks of rows keep their blocks)."""
    if n < MIN_ROWS or (os.cpu_count() or 1) < 2:
        work(0, n)
        return
    mid = (n // 2 + align - 1) // align * align
    if mid >= n:
        work(0, n)
        return
    second = _helper().submit(work, mid, n)
    try:
        work(0, mid)
    finally:
        second.result()  # joined (and its error raised) whatever happened to the first half
