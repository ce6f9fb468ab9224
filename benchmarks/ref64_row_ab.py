"""Whole near-tie reference rows with this tree's float64 kernels (``p2pinfer/kernels/ref64.c``) against another
tree's, in one process: bit for bit, then timed interleaved.

    python benchmarks/ref64_row_ab.py OLD_TREE [--prefixes 128,512] [--classes native,fp32] [--rounds 2]

The other tree's ``ref64.c`` is compiled with the kernel library's flags and swapped in for this tree's library
(``ref64._lib``) around each of its rows; everything else (the graph, the Python of the reference) is this tree's,
so the rows differ only by the C kernels. Per class and prefix: one reference row from scratch
(``ReferenceModel.logprobs``) with each library, alternating, best of ``--rounds``; the rows must be equal as bytes.
Take the exclusive lock: ``flock -x /tmp/bench.lock .venv/bin/python benchmarks/ref64_row_ab.py /tmp/old``.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from p2pinfer import log  # noqa: E402
from p2pinfer.gguf import find_default_gguf, import_gguf  # noqa: E402
from p2pinfer.kernels import ref64  # noqa: E402
from p2pinfer.runtime import load_model  # noqa: E402
from p2pinfer.runtime.reference import reference_for  # noqa: E402

from ref64_products import build  # noqa: E402
from reference_row import TEXT  # noqa: E402

_P = ctypes.c_void_p
_I = ctypes.c_int64


def with_signatures(lib: ctypes.CDLL) -> ctypes.CDLL:
    """The argument types ``ref64._library`` gives the library's functions (the products' are set by build)."""
    lib.p2pinfer_ref64_attention.argtypes = [_P, _P, _P, _P, _I, _I, _I, _I, _I, _I, _I, ctypes.c_double,
                                             ctypes.c_int]
    lib.p2pinfer_ref64_attention.restype = ctypes.c_int
    lib.p2pinfer_ref64_silu_mul.argtypes = [_P, _P, _I, _I, ctypes.c_int]
    lib.p2pinfer_ref64_silu_mul.restype = ctypes.c_int
    lib.p2pinfer_ref64_gqa.argtypes = [_P, _P, _P, _P, _P, _P, _P, _P, _I, _I, _I, _I, _I, _I, ctypes.c_double,
                                       ctypes.c_int]
    lib.p2pinfer_ref64_gqa.restype = ctypes.c_int
    lib.p2pinfer_ref64_skip_rmsnorm.argtypes = [_P, _P, _P, _P, _P, _P, _I, _I, ctypes.c_double, ctypes.c_int]
    lib.p2pinfer_ref64_skip_rmsnorm.restype = ctypes.c_int
    return lib


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("old_tree", type=Path)
    ap.add_argument("--prefixes", default="128,512")
    ap.add_argument("--classes", default="native,fp32")
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    log.configure(level="warning")
    prefixes = [int(x) for x in args.prefixes.split(",")]
    print(f"load average {os.getloadavg()[0]:.1f} at start; best of {args.rounds} rounds, old and new alternating")
    with tempfile.TemporaryDirectory(prefix="p2pinfer-ref-ab-") as tmp:
        old = with_signatures(build(args.old_tree, Path(tmp), "old"))
        assert ref64.available()
        new = ref64._lib[0]
        libs = {"old": old, "new": new}
        models = {}
        for weights in args.classes.split(","):
            folder = import_gguf(find_default_gguf(), Path(tmp) / weights, weights=weights).out_dir
            models[weights] = load_model(folder, threads=2, providers=["CPUExecutionProvider"])
        ids = next(iter(models.values())).encode(TEXT)[: max(prefixes)]
        best: dict[tuple[str, int, str], float] = {}
        rows: dict[tuple[str, int, str], bytes] = {}
        try:
            for name, m in models.items():
                ref = reference_for(m)
                for label, lib in libs.items():  # warm: the graph parsed, each library's first call
                    ref64._lib[:] = [lib]
                    ref.logprobs(ids[:8])
                for _ in range(args.rounds):
                    for n in prefixes:
                        for label, lib in libs.items():
                            ref64._lib[:] = [lib]
                            t = time.perf_counter()
                            row = ref.logprobs(ids[:n])
                            took = time.perf_counter() - t
                            best[(name, n, label)] = min(best.get((name, n, label), float("inf")), took)
                            key = (name, n, label)
                            assert rows.setdefault(key, row.tobytes()) == row.tobytes(), f"{key}: not repeatable"
                    for n in prefixes:
                        assert rows[(name, n, "old")] == rows[(name, n, "new")], f"{name} prefix {n}: rows differ"
        finally:
            ref64._lib[:] = [new]
        print("| class | prefix | old row s | new row s | old / new | rows |")
        print("|---|---|---|---|---|---|")
        for name in models:
            for n in prefixes:
                o, w = best[(name, n, "old")], best[(name, n, "new")]
                print(f"| {name} | {n} | {o:.3f} | {w:.3f} | {o / w:.3f} | equal bit for bit |")


if __name__ == "__main__":
    sys.exit(main())
