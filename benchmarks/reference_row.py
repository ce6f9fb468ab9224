"""What a float64 reference row costs on the default model, and where its time goes (docs/models.md, "Near ties").

    python benchmarks/reference_row.py [--prefixes 64,256,512] [--rounds 3] [--extend 1,16] [--classes native,fp32]

Per numeric class (``q4_1-cpu``: the served 4-bit graph; ``fp32-cpu``) and prefix length, best of ``--rounds``
rounds taken interleaved, in one process:

* ``row s``: one reference row from scratch (``ReferenceModel.logprobs``: chunked passes over its own float64
  KV cache, dropped after the call) and, as the baseline of the same run, onnxruntime's float32 prefill of the
  same tokens (``LoadedModel.forward``, the serving session); their ratio;
* ``numpy row s``: the same row with the C kernels off (``p2pinfer/kernels/ref64.c``: products, attention,
  normalization, SiLU), from a reference built without them (the graph as stored: what runs where the library
  is unavailable), interleaved with the rows above; the speed-up, and the largest difference between the two
  rows (float64 rounding). Run the script of an older tree for that tree's figures;
* ``extend s``: a row ``k`` positions (``--extend``) after one already computed in the same
  :class:`~p2pinfer.runtime.reference.ReferenceSession` (a later near tie of the same request);
* ``GEMM GFLOP/s``: the float64 matrix products' rate inside the row (2 x weights x positions / the time of
  the ``MatMul``/``MatMulNBits`` nodes) against numpy's float64 GEMM on one thread at the same shapes with
  weights already in float64 (what the reference's one BLAS thread can reach: its ceiling);
* a profile of the longest prefix's row by operator.

Times depend on load (the machine is shared): the load average is printed; read ratios, not seconds.
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_limits

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from p2pinfer import log  # noqa: E402
from p2pinfer.gguf import find_default_gguf, import_gguf  # noqa: E402
from p2pinfer.runtime import load_model  # noqa: E402
from p2pinfer.runtime import reference as reference_module  # noqa: E402
from p2pinfer.runtime.reference import ReferenceModel, reference_for  # noqa: E402

try:  # absent from trees before the C kernels: no numpy-path columns
    from p2pinfer.kernels import ref64  # noqa: E402
except ImportError:
    ref64 = None

# absent from trees before the per-request cache (run from such a tree for a before/after): no extend columns
ReferenceSession = getattr(reference_module, "ReferenceSession", None)

TEXT = "The history of the lighthouse begins with fires lit on hills to guide ships home. " * 80
GEMM_OPS = ("MatMul", "MatMulNBits", "Gemm", "Q4Linear")


class OpTimes:
    """Seconds per operator type of the reference's nodes (wraps ``reference._run_node`` for the run)."""

    def __init__(self) -> None:
        self.seconds: collections.Counter[str] = collections.Counter()
        self.flops = 0.0
        self._inner = reference_module._run_node

    def __enter__(self) -> "OpTimes":
        def timed(node, raw, results):
            t = time.perf_counter()
            out = self._inner(node, raw, results)
            self.seconds[node.op_type] += time.perf_counter() - t
            if node.op_type in GEMM_OPS and hasattr(raw[0], "shape") and hasattr(out[0], "shape"):
                rows = int(np.prod(raw[0].shape[:-1]))
                self.flops += 2.0 * rows * raw[0].shape[-1] * out[0].shape[-1]
            return out

        reference_module._run_node = timed
        return self

    def __exit__(self, *exc) -> None:
        reference_module._run_node = self._inner


class NumpyPath:
    """The reference's numpy path for the block (its C kernels off), as where the library is unavailable. A
    reference built inside it has the graph as stored (no fused nodes): what the reference ran before the kernels."""

    def __enter__(self) -> "NumpyPath":
        ref64._library()  # looked up once, so that the block can swap it out and back
        self._held = list(ref64._lib)
        ref64._lib[:] = [None]
        return self

    def __exit__(self, *exc) -> None:
        ref64._lib[:] = self._held


def numpy_reference(model) -> ReferenceModel:
    """A reference of ``model`` of its own (not the one :func:`reference_for` shares), built as it is built where
    the kernels are unavailable (call inside :class:`NumpyPath`)."""
    empty = model.empty_cache().arrays[0].shape
    return ReferenceModel(Path(model.path) / "model.onnx", kv_heads=empty[1], head_dim=empty[3])


def gemm_ceiling(rows: int) -> float:
    """numpy float64 GEMM GFLOP/s on one thread at SmolLM2's layer shapes (weights already float64)."""
    rng = np.random.default_rng(0)
    best = 0.0
    with threadpool_limits(limits=1, user_api="blas"):
        for k, n in ((576, 960), (576, 576), (576, 3072), (1536, 576)):
            a, w = rng.standard_normal((rows, k)), rng.standard_normal((n, k))
            t = min(_time(lambda: a @ w.T) for _ in range(3))
            best = max(best, 2 * rows * k * n / t / 1e9)
    return best


def _time(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prefixes", default="64,256,512")
    ap.add_argument("--extend", default="1,16", help="positions a later row adds to a session's cache")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--classes", default="native,fp32")
    args = ap.parse_args(argv)
    log.configure(level="warning")
    prefixes = [int(x) for x in args.prefixes.split(",")]
    extends = [int(x) for x in args.extend.split(",")]
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs at start; best of {args.rounds} "
          f"interleaved rounds")
    with tempfile.TemporaryDirectory(prefix="p2pinfer-ref-") as tmp:
        models = {}
        for weights in args.classes.split(","):
            folder = import_gguf(find_default_gguf(), Path(tmp) / weights, weights=weights).out_dir
            models[weights] = load_model(folder, threads=2, providers=["CPUExecutionProvider"])
        first = next(iter(models.values()))
        ids = first.encode(TEXT)[: max(prefixes) + max(extends)]
        best: dict[tuple[str, str, int], float] = {}
        flops: dict[tuple[str, int], float] = {}
        gemm_s: dict[tuple[str, int], float] = {}
        diff: dict[tuple[str, int], float] = {}
        numpy_refs = {}

        def keep(key, seconds) -> None:
            best[key] = min(best.get(key, float("inf")), seconds)

        for name, m in models.items():  # warm: the graph parsed, the session's first run
            reference_for(m).logprobs(ids[:8])
            if ref64 is not None and ref64.available():
                with NumpyPath():
                    numpy_refs[name] = numpy_reference(m)
                    numpy_refs[name].logprobs(ids[:8])
            m.forward(ids[:8], m.empty_cache(), last=1)
        for _ in range(args.rounds):
            for name, m in models.items():
                ref = reference_for(m)
                for n in prefixes:
                    keep((name, "ort", n), _time(lambda: m.forward(ids[:n], m.empty_cache(), last=1)))
                    fast = []
                    with OpTimes() as ops:
                        took = _time(lambda: fast.append(ref.logprobs(ids[:n])))
                    if took < best.get((name, "row", n), float("inf")):  # the GEMM rate of the best row
                        flops[(name, n)] = ops.flops
                        gemm_s[(name, n)] = sum(ops.seconds[o] for o in GEMM_OPS)
                    keep((name, "row", n), took)
                    if name in numpy_refs:
                        with NumpyPath():
                            t = time.perf_counter()
                            slow = numpy_refs[name].logprobs(ids[:n])
                            keep((name, "numpy", n), time.perf_counter() - t)
                        diff[(name, n)] = max(diff.get((name, n), 0.0), float(np.max(np.abs(fast[0] - slow))))
                    if ReferenceSession is None:
                        continue
                    session = ReferenceSession(ref)
                    session.row(ids[:n])
                    for k in extends:
                        keep((name, f"+{k}", n), _time(lambda: session.row(ids[:n + k])))
                        session.row(ids[:n])  # back to the prefix (its cache is kept)
                    session.close()
        ceiling = gemm_ceiling(max(prefixes))
        print(f"\nnumpy float64 GEMM, one thread, {max(prefixes)} rows, SmolLM2 layer shapes: {ceiling:.1f} GFLOP/s "
              f"(the reference's ceiling)\n")
        print("| class | prefix | onnxruntime prefill s (served session) | numpy row s (kernels off) | reference row s "
              "| speed-up | max row difference | row / prefill | "
              + " | ".join(f"row {k} position{'s' if k > 1 else ''} later s" for k in extends)
              + " | GEMM GFLOP/s in the row (4-bit: dequantization included) | of the ceiling |")
        print("|---|---|---|---|---|---|---|---|" + "---|" * len(extends) + "---|---|")
        for name, m in models.items():
            for n in prefixes:
                rate = flops[(name, n)] / gemm_s[(name, n)] / 1e9
                numpy_s = best.get((name, "numpy", n))
                print(f"| {m.runtime_numeric_class} | {n} | {best[(name, 'ort', n)]:.3f} | "
                      + (f"{numpy_s:.2f} | {best[(name, 'row', n)]:.2f} | {numpy_s / best[(name, 'row', n)]:.2f} | "
                         f"{diff[(name, n)]:.1e} | " if numpy_s else f"n/a | {best[(name, 'row', n)]:.2f} | n/a | n/a | ")
                      + f"{best[(name, 'row', n)] / best[(name, 'ort', n)]:.1f} | "
                      + " | ".join(f"{best[(name, f'+{k}', n)]:.2f}" if (name, f"+{k}", n) in best else "n/a"
                                   for k in extends)
                      + f" | {rate:.1f} | {rate / ceiling:.0%} |")
        for name, m in models.items():
            with OpTimes() as ops:
                total = _time(lambda: reference_for(m).logprobs(ids[:max(prefixes)]))
            print(f"\nprofile {m.runtime_numeric_class}, {max(prefixes)} positions, {total:.2f} s: "
                  + ", ".join(f"{op} {100 * s / total:.0f} %" for op, s in ops.seconds.most_common(6)))
    print(f"\nload average {os.getloadavg()[0]:.1f} at the end (the machine is shared: figures are rough)")


if __name__ == "__main__":
    main()
