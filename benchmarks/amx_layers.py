"""The 4-bit kernel's many-row path per layer: AMX tiles against float32 FMA, interleaved, in one process.

    python benchmarks/amx_layers.py [--rows 64] [--rounds 20] [--threads 1] [--against-tree OLD_TREE]

One ``p2pinfer`` custom node per SmolLM2-135M layer shape (Q4_1 with block minimums: q/k/v 576 -> 960,
o 576 -> 576, gate/up 576 -> 3,072, down 1,536 -> 576; the Q8_0 head as two 4-bit terms 576 -> 49,152), random
codes with float16 scales and minimums (as GGUF stores them), run over ``--rows`` activation rows (64: one
verification pass) by two sessions of the same node: ``amx=1`` (AMX bfloat16 tiles where the CPU has them) and
``amx=0`` (the float32 FMA GEMM, what a peer without AMX runs). Each round runs every shape on both, in
alternating order; it prints the best time of each, the ratio (above 1: the tiles are faster), and each path's
largest error against a float64 product of the same weights, relative to ``sum |w x|`` of the row. On a loaded
machine only the ratios mean anything.

``--against-tree OLD_TREE`` (an export of another commit, e.g. ``git archive main | tar -x -C /tmp/old``) compares
this tree's many-row path with that tree's instead (``amx=1``: the tiles where the CPU has them, else float32 FMA),
each node through both libraries in alternating order, and says whether their outputs are bit-identical: for every
shape (and two edge shapes: columns not a multiple of 32, two terms at a small K) over rows 4..300 (tile remainders
included, and rows of NaN, infinities, zeros, -0 and subnormals), 1 to 3 threads, and both ``amx=0`` (float32 FMA,
what a CPU without AMX runs) and ``amx=1``. Each library has its own worker pool, whose workers spin for 2 ms after
a node: before each timed run the other library's workers are let fall asleep and this one's woken by an untimed
run (else at ``--threads 2`` a spinning worker of the other library takes the second core).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from p2pinfer import kernels  # noqa: E402

SHAPES = [("q/k/v 576->960", 576, 960, 1), ("o 576->576", 576, 576, 1), ("gate/up 576->3072", 576, 3072, 1),
          ("down 1536->576", 1536, 576, 1), ("head 576->49152 (Q8_0)", 576, 49152, 2)]


def layer(k: int, n: int, terms: int, rng: np.random.Generator):
    nb = k // 32
    inits, inputs = [], ["x"]
    weights = np.zeros((n, k))
    for t in range(terms):
        codes = rng.integers(0, 16, (n, nb, 32), dtype=np.uint8)
        scales = np.float16(rng.uniform(0.001, 0.05, (n, nb)) * (16 if t else 1)).astype(np.float32)
        packed = (codes[..., 0::2] | (codes[..., 1::2] << 4)).astype(np.uint8)
        inits += [numpy_helper.from_array(packed, f"q{t}"), numpy_helper.from_array(scales.reshape(-1), f"s{t}")]
        inputs += [f"q{t}", f"s{t}"]
        weights += ((codes.astype(np.float64) - 8) * scales[..., None]).reshape(n, k)
    attrs = {"zp0": 8, "zp1": 8} if terms == 2 else {"zp0": 8}
    if terms == 1:
        mins = np.float16(rng.uniform(-0.3, 0.0, (nb, n))).astype(np.float32)
        inits.append(numpy_helper.from_array(mins, "mins"))
        inputs.append("mins")
        weights += np.repeat(mins.T.astype(np.float64), 32, axis=1)
    op = "QMatMul2" if terms == 2 else "QMatMul1M"

    def model(amx: int, threads: int) -> bytes:
        node = helper.make_node(op, inputs, ["y"], domain=kernels.DOMAIN, K=k, N=n, threads=threads, amx=amx, **attrs)
        graph = helper.make_graph([node], "layer", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["m", k])],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["m", n])], initializer=inits)
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18),
                                                       helper.make_opsetid(kernels.DOMAIN, 1)]).SerializeToString()
    return model, weights


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=64, help="activation rows per call (64: one verification pass)")
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--against-tree", type=Path, help="compare with the AMX path of this tree's kernel library")
    args = ap.parse_args(argv)
    lib = kernels.library_path()
    if lib is None:
        sys.exit("amx_layers: the kernel is unavailable here (see the kernel.unavailable log line)")
    if args.against_tree:
        compare_trees(args, lib)
        return
    print(f"AMX tiles available: {kernels.amx_available()}; {args.rows} rows, {args.threads} kernel thread(s), "
          f"best of {args.rounds} interleaved rounds; load average {os.getloadavg()[0]:.1f} at start")
    rng = np.random.default_rng(0)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.log_severity_level = 3
    opts.register_custom_ops_library(str(lib))
    cases = []
    for name, k, n, terms in SHAPES:
        model, weights = layer(k, n, terms, rng)
        x = rng.standard_normal((args.rows, k)).astype(np.float32)
        exact = x.astype(np.float64) @ weights.T
        scale = np.abs(x.astype(np.float64)) @ np.abs(weights).T
        sessions = {amx: ort.InferenceSession(model(amx, args.threads), opts, providers=["CPUExecutionProvider"])
                    for amx in (1, 0)}
        errors = {amx: float(np.max(np.abs(s.run(None, {"x": x})[0] - exact) / scale)) for amx, s in sessions.items()}
        cases.append((name, sessions, x, errors))
    best = {(name, amx): float("inf") for name, *_ in cases for amx in (1, 0)}
    for r in range(args.rounds):
        for name, sessions, x, _ in cases:
            for amx in ((1, 0) if r % 2 == 0 else (0, 1)):
                t = time.perf_counter()
                sessions[amx].run(None, {"x": x})
                best[(name, amx)] = min(best[(name, amx)], time.perf_counter() - t)
    print("\n| layer | AMX ms | float32 FMA ms | AMX / FMA (speed) | error AMX | error FMA |\n"
          "|---|---|---|---|---|---|")
    for name, _, _, errors in cases:
        a, f = best[(name, 1)], best[(name, 0)]
        print(f"| {name} | {a * 1e3:.3f} | {f * 1e3:.3f} | {f / a:.2f} | {errors[1]:.1e} | {errors[0]:.1e} |")
    print(f"\nload average {os.getloadavg()[0]:.1f} at the end (the machine is shared: figures are rough)")


def library_of(tree: Path) -> str:
    """The kernel library built from ``tree``'s source (in a subprocess: that tree's own build recipe)."""
    code = f"import sys; sys.path.insert(0, {str(tree)!r}); from p2pinfer import kernels; print(kernels.library_path())"
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout.split()
    if not out or out[-1] == "None":
        sys.exit(f"amx_layers: no kernel library could be built from {tree}")
    return out[-1]


EDGE_SHAPES = [("edge 64->70 (+mins)", 64, 70, 1), ("edge 96->33 (two terms)", 96, 33, 2)]
IDENTITY_ROWS = (4, 5, 7, 8, 9, 13, 16, 17, 63, 64, 127, 128, 130, 300)


def _odd_values(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """x with rows of the values a kernel must pass through as the old one did (for rows >= 9)."""
    x = x.copy()
    if len(x) >= 9:
        x[1, 3], x[3, 5], x[4, 7] = np.nan, np.inf, -np.inf
        x[2], x[5] = 0.0, -0.0
        x[6] = rng.standard_normal(x.shape[1]).astype(np.float32) * np.float32(1e-39)  # subnormal
        x[7] *= np.float32(1e30)
    return x


def compare_trees(args: argparse.Namespace, lib: Path) -> None:
    old_lib = library_of(args.against_tree)
    print(f"this tree's many-row path against {args.against_tree}'s; {args.rows} rows, {args.threads} kernel "
          f"thread(s), best of {args.rounds} interleaved rounds; AMX tiles available: {kernels.amx_available()}; "
          f"load average {os.getloadavg()[0]:.1f} at start")
    rng = np.random.default_rng(0)

    def session(model: bytes, path: str) -> ort.InferenceSession:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        opts.log_severity_level = 3
        opts.register_custom_ops_library(path)
        return ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])

    cases, identity = [], {}
    for name, k, n, terms in SHAPES + EDGE_SHAPES:
        model, _ = layer(k, n, terms, rng)
        calls = same = 0
        for amx in (0, 1):
            for threads in sorted({1, 2, 3, args.threads}):
                pair = {side: session(model(amx, threads), path) for side, path in (("new", str(lib)), ("old", old_lib))}
                for rows in sorted(set(IDENTITY_ROWS) | {args.rows}):
                    if n * k * rows > 2e9 and rows not in (4, 7, args.rows, 300):
                        continue  # the head: a few row counts (each call is a 7 GFLOP product at 128 rows)
                    x = _odd_values(rng.standard_normal((rows, k)).astype(np.float32), rng)
                    calls += 1
                    same += np.array_equal(pair["new"].run(None, {"x": x})[0].view(np.uint32),
                                           pair["old"].run(None, {"x": x})[0].view(np.uint32))
                if amx == 0 and threads == args.threads and (name, k, n, terms) in SHAPES:
                    cases.append((name, pair, rng.standard_normal((args.rows, k)).astype(np.float32)))
        identity[name] = (same, calls)
    best = {(name, side): float("inf") for name, *_ in cases for side in ("new", "old")}
    for r in range(args.rounds):
        for name, sessions, x in cases:
            for side in (("new", "old") if r % 2 == 0 else ("old", "new")):
                time.sleep(0.003)  # the other library's workers asleep (they spin 2 ms after a node)
                sessions[side].run(None, {"x": x})  # and this one's awake, as between the nodes of a graph
                t = time.perf_counter()
                sessions[side].run(None, {"x": x})
                best[(name, side)] = min(best[(name, side)], time.perf_counter() - t)
    print("\n| layer (amx=0: float32 FMA) | this tree ms | other tree ms | other / this (speed) |\n|---|---|---|---|")
    for name, _, _ in cases:
        a, b = best[(name, "new")], best[(name, "old")]
        print(f"| {name} | {a * 1e3:.3f} | {b * 1e3:.3f} | {b / a:.2f} |")
    print(f"\nbit-identical (rows {min(IDENTITY_ROWS)}..{max(IDENTITY_ROWS)} with NaN/inf/zero/subnormal rows, threads "
          f"{sorted({1, 2, 3, args.threads})}, amx=0 and amx=1):")
    for name, (same, calls) in identity.items():
        print(f"  {name}: {'yes' if same == calls else 'NO'} ({same} of {calls} outputs)")
    print(f"\nload average {os.getloadavg()[0]:.1f} at the end (the machine is shared: figures are rough)")


if __name__ == "__main__":
    main()
