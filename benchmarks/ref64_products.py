"""The near-tie reference's float64 products (``p2pinfer/kernels/ref64.c``: ``p2pinfer_ref64_q4`` and
``p2pinfer_ref64_f32``) of this tree against another tree's, bit for bit, then timed interleaved.

    python benchmarks/ref64_products.py OLD_TREE [--check-only] [--rows 128,256] [--rounds 5] [--threads 2]

Both trees' ``ref64.c`` are compiled here with the kernel library's flags (``-O3 -march=native``) and loaded side
by side. The check: every output of both, compared as bytes, on SmolLM2-135M's shapes (K 576 and 1536; N 576,
960, 192, 3072, 1536, 49152; the served Q4_1 graph's two 4-bit terms with its block-minimum term, zero points
absent or per block), rows 1..300 (every count up to 26, then counts off the 8-row tile), 1 to 3 threads, float32
weights in both layouts, and inputs with NaN, infinities, -0 and subnormals. The timing: each layer's product as
the reference runs it (``--rows`` positions, the Q4_1 layer's three calls), old and new alternating, best of
``--rounds``; the ratio old / new per shape and for a layer's sum; then a layer's float32-weight products (the fp32 class). Take the exclusive lock first:
``flock -x /tmp/bench.lock .venv/bin/python benchmarks/ref64_products.py /tmp/old``.
"""

from __future__ import annotations

import argparse
import ctypes
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
_P = ctypes.c_void_p
_I = ctypes.c_int64


def build(tree: Path, out_dir: Path, name: str) -> ctypes.CDLL:
    source = tree / "p2pinfer" / "kernels" / "ref64.c"
    target = out_dir / f"{name}.so"
    subprocess.run(["gcc", "-O3", "-march=native", "-fPIC", "-shared", "-pthread", str(source), "-o", str(target)],
                   check=True)
    lib = ctypes.CDLL(str(target))
    lib.p2pinfer_ref64_q4.argtypes = [_P, _I, _I, _I, _P, _P, _P, _I, _I, _I, _P, _I, ctypes.c_int, _P, _I, _P,
                                      ctypes.c_int]
    lib.p2pinfer_ref64_q4.restype = ctypes.c_int
    lib.p2pinfer_ref64_f32.argtypes = [_P, _I, _I, _I, _P, ctypes.c_int, _I, _P, _I, ctypes.c_int]
    lib.p2pinfer_ref64_f32.restype = ctypes.c_int
    return lib


def _p(x: np.ndarray | None):
    return None if x is None else x.ctypes.data


class Q4Layer:
    """A Q4_1 layer as the served graph holds it: two 4-bit terms (block size 32) and the block minimums."""

    def __init__(self, rng: np.random.Generator, k: int, n: int, *, zero_points: bool, bs: int = 32) -> None:
        self.k, self.n, self.bs = k, n, bs
        self.blocks = (k + bs - 1) // bs
        self.terms = []
        for _ in range(2):
            packed = rng.integers(0, 256, (n, self.blocks, bs // 2), dtype=np.uint8)
            scales = (rng.standard_normal(n * self.blocks) * 0.01).astype(np.float32)
            zp = rng.integers(0, 16, (n, self.blocks), dtype=np.uint8) if zero_points else None
            self.terms.append((packed, scales, zp))
        self.minimums = (rng.standard_normal((self.blocks, n)) * 0.01).astype(np.float32)

    def run(self, lib: ctypes.CDLL, a: np.ndarray, threads: int, *, terms: int = 2, minimums: bool = True,
            out: np.ndarray | None = None) -> np.ndarray:
        m = a.shape[0]
        sums = np.ascontiguousarray(a[:, :self.blocks * self.bs].reshape(m, self.blocks, self.bs).sum(-1)) \
            if self.k == self.blocks * self.bs else np.ascontiguousarray(a[:, :self.blocks])
        accumulate = out is not None
        out = np.zeros((m, self.n)) if out is None else out.copy()
        for j, (packed, scales, zp) in enumerate(self.terms[:terms]):
            last = j == terms - 1 and minimums
            rc = lib.p2pinfer_ref64_q4(_p(a), m, self.k, self.k, _p(packed), _p(scales), _p(zp), self.n,
                                       self.blocks, self.bs, _p(out), self.n, int(accumulate or j > 0),
                                       _p(sums) if last else None, self.blocks if last else 0,
                                       _p(self.minimums) if last else None, threads)
            assert rc == 0
        return out


def same_bits(x: np.ndarray, y: np.ndarray) -> bool:
    return x.shape == y.shape and x.tobytes() == y.tobytes()


def special(rng: np.random.Generator, m: int, k: int) -> np.ndarray:
    a = rng.standard_normal((m, k))
    if m > 2:
        picks = rng.integers(0, m * k, 12)
        flat = a.reshape(-1)
        flat[picks[:3]] = np.nan
        flat[picks[3:5]] = np.inf
        flat[picks[5:7]] = -np.inf
        flat[picks[7:9]] = -0.0
        flat[picks[9:]] = 5e-324
        a[m // 2] = 0.0  # an all-zero row: -0 and +0 products
    return a


def check(old: ctypes.CDLL, new: ctypes.CDLL, rng: np.random.Generator) -> int:
    compared = 0
    shapes = [(576, 960), (576, 576), (576, 192), (576, 3072), (1536, 576), (576, 1536)]
    rows_list = list(range(1, 27)) + [31, 33, 47, 63, 65, 100, 127, 128, 129, 200, 255, 256, 257, 300]
    for k, n in shapes:
        for zero_points in (False, True):
            layer = Q4Layer(rng, k, n, zero_points=zero_points)
            for rows in rows_list:
                a = special(rng, rows, k) if rows % 3 == 0 else rng.standard_normal((rows, k))
                threads = 1 + rows % 3
                for terms, minimums in ((1, False), (2, True)):
                    x, y = layer.run(old, a, threads, terms=terms, minimums=minimums), \
                        layer.run(new, a, threads, terms=terms, minimums=minimums)
                    assert same_bits(x, y), f"q4 K={k} N={n} zp={zero_points} rows={rows} threads={threads}"
                    compared += x.size
                start = rng.standard_normal((rows, n))
                x, y = layer.run(old, a, threads, out=start), layer.run(new, a, threads, out=start)
                assert same_bits(x, y), f"q4 accumulate K={k} N={n} rows={rows}"
                compared += x.size
        print(f"  q4 K={k} N={n}: equal", flush=True)
    # odd shapes: columns off the 24-column micro-panel and the 96-column panel, K off the 128 block and off 32
    for k, n, bs in ((576, 100, 32), (577, 77, 32), (600, 50, 64), (130, 30, 16), (96, 9, 32), (1000, 49, 32),
                     (64, 8, 64), (31, 25, 32)):
        layer = Q4Layer(rng, k, n, zero_points=bool(n % 2), bs=bs)
        for rows in (1, 3, 5, 8, 9, 17, 40):
            a = special(rng, rows, k)
            for threads in (1, 2, 3):
                x, y = layer.run(old, a, threads), layer.run(new, a, threads)
                assert same_bits(x, y), f"q4 odd K={k} N={n} bs={bs} rows={rows} threads={threads}"
                compared += x.size
    print("  q4 odd shapes: equal", flush=True)
    # the LM head (49152 columns, one Q8_0 weight as two 4-bit terms) at 1, 5 and 9 rows
    head = Q4Layer(rng, 576, 49152, zero_points=False)
    for rows in (1, 5, 9):
        a = rng.standard_normal((rows, 576))
        x, y = head.run(old, a, 2, minimums=False), head.run(new, a, 2, minimums=False)
        assert same_bits(x, y), f"head rows={rows}"
        compared += x.size
    print("  q4 head: equal", flush=True)
    for k, n in ((576, 960), (576, 3072), (1536, 576), (576, 49152), (200, 70)):
        w = rng.standard_normal((k, n)).astype(np.float32)
        wt = np.ascontiguousarray(w.T)
        for rows in (1, 5, 8, 23, 128, 257):
            if n == 49152 and rows > 8:
                continue
            a = special(rng, rows, k)
            threads = 1 + rows % 3
            for transposed, weight in ((0, w), (1, wt)):
                outs = []
                for lib in (old, new):
                    out = np.empty((rows, n))
                    assert lib.p2pinfer_ref64_f32(_p(a), rows, k, k, _p(weight), transposed, n, _p(out), n,
                                                  threads) == 0
                    outs.append(out)
                assert same_bits(*outs), f"f32 K={k} N={n} rows={rows} transposed={transposed}"
                compared += outs[0].size
    print("  f32: equal", flush=True)
    return compared


def timing(old: ctypes.CDLL, new: ctypes.CDLL, rng: np.random.Generator, rows_list: list[int], rounds: int,
           threads: int) -> None:
    shapes = {"q/k/v": (576, 960), "o": (576, 576), "gate/up": (576, 3072), "down": (1536, 576)}
    for rows in rows_list:
        totals = {"old": 0.0, "new": 0.0}
        flops_total = 0
        for name, (k, n) in shapes.items():
            layer = Q4Layer(rng, k, n, zero_points=False)
            a = rng.standard_normal((rows, k))
            best = {"old": 1e9, "new": 1e9}
            for _ in range(rounds):
                for label, lib in (("old", old), ("new", new)):
                    t = time.perf_counter()
                    layer.run(lib, a, threads)
                    best[label] = min(best[label], time.perf_counter() - t)
            flops = 2 * rows * n * (2 * k + layer.blocks)
            flops_total += flops
            for label in best:
                totals[label] += best[label]
            print(f"  rows {rows:4d} {name:8s} old {best['old'] * 1e3:7.3f} ms ({flops / best['old'] / 1e9:5.1f} "
                  f"GFLOP/s)  new {best['new'] * 1e3:7.3f} ms ({flops / best['new'] / 1e9:5.1f} GFLOP/s)  "
                  f"old/new {best['old'] / best['new']:.3f}", flush=True)
        print(f"  rows {rows:4d} layer    old {totals['old'] * 1e3:7.3f} ms ({flops_total / totals['old'] / 1e9:5.1f}"
              f" GFLOP/s)  new {totals['new'] * 1e3:7.3f} ms ({flops_total / totals['new'] / 1e9:5.1f} GFLOP/s)  "
              f"old/new {totals['old'] / totals['new']:.3f}", flush=True)
        # the fp32 class: float32 weights as MatMul stores them ([k, n])
        totals = {"old": 0.0, "new": 0.0}
        flops_total = 0
        for name, (k, n) in shapes.items():
            w = rng.standard_normal((k, n)).astype(np.float32)
            a = rng.standard_normal((rows, k))
            out = np.empty((rows, n))
            best = {"old": 1e9, "new": 1e9}
            for _ in range(rounds):
                for label, lib in (("old", old), ("new", new)):
                    t = time.perf_counter()
                    assert lib.p2pinfer_ref64_f32(_p(a), rows, k, k, _p(w), 0, n, _p(out), n, threads) == 0
                    best[label] = min(best[label], time.perf_counter() - t)
            flops_total += 2 * rows * n * k
            for label in best:
                totals[label] += best[label]
        print(f"  rows {rows:4d} f32 layer old {totals['old'] * 1e3:7.3f} ms ({flops_total / totals['old'] / 1e9:5.1f}"
              f" GFLOP/s)  new {totals['new'] * 1e3:7.3f} ms ({flops_total / totals['new'] / 1e9:5.1f} GFLOP/s)  "
              f"old/new {totals['old'] / totals['new']:.3f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("old_tree", type=Path)
    parser.add_argument("--check-only", action="store_true")
    parser.add_argument("--rows", default="128,256")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        old = build(args.old_tree, Path(tmp), "old")
        new = build(REPO, Path(tmp), "new")
        rng = np.random.default_rng(2026)
        print("bit-identity, old tree vs this tree:", flush=True)
        compared = check(old, new, rng)
        print(f"  {compared} output elements, every one the same bits", flush=True)
        if not args.check_only:
            print(f"timing ({args.threads} threads, best of {args.rounds}, old and new alternating):", flush=True)
            timing(old, new, rng, [int(r) for r in args.rows.split(",")], args.rounds, args.threads)


if __name__ == "__main__":
    sys.exit(main())
