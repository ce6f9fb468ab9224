"""Every float32 gate value through the SwiGLU op against onnxruntime's own nodes, bit for bit.

    python benchmarks/swiglu_exhaustive.py [--march native|x86-64-v3|x86-64] [--step 1]

All 2^32 bit patterns as gates (chunks of 2^24, every ``--step``-th chunk), each with up = 1 (the activation
itself) and with a fixed random up: the ``SwiGLU`` node with ``quick_gelu=1`` against Split + Sigmoid + Mul +
Mul at ORT_ENABLE_ALL (onnxruntime runs Split, QuickGelu, Mul), and with ``quick_gelu=0`` against the same
nodes at ORT_DISABLE_ALL (Sigmoid, Mul, Mul). Prints the count of differing bit patterns (NaN payloads
included) and the first few. A check, not a timing: about 10 minutes a build on a 2-core machine.
tests/test_swiglu.py samples the same comparison.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

INTER = 4096
CHUNK = 1 << 24


def graph(fused: bool, quick_gelu: int = 1) -> bytes:
    from p2pinfer import kernels

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "s", 2 * INTER])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, "s", INTER])
    if fused:
        nodes = [helper.make_node("SwiGLU", ["x"], ["y"], domain=kernels.DOMAIN, inter=INTER, rank=0, threads=2,
                                  quick_gelu=quick_gelu)]
        inits = []
    else:
        nodes = [helper.make_node("Split", ["x", "sizes"], ["g", "u"], axis=2), helper.make_node("Sigmoid", ["g"], ["s"]),
                 helper.make_node("Mul", ["g", "s"], ["a"]), helper.make_node("Mul", ["a", "u"], ["y"])]
        inits = [numpy_helper.from_array(np.array([INTER, INTER], np.int64), "sizes")]
    model = helper.make_model(helper.make_graph(nodes, "g", [x], [y], inits), ir_version=8,
                              opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid(kernels.DOMAIN, 1)])
    return model.SerializeToString()


def session(source: bytes, level, lib: Path | None = None) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = level
    options.intra_op_num_threads = 2
    options.log_severity_level = 3
    if lib is not None:
        options.register_custom_ops_library(str(lib))
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--march", default="native")
    ap.add_argument("--step", type=int, default=1, help="every STEP-th chunk of 2^24 gates")
    args = ap.parse_args()
    os.environ["P2PINFER_KERNEL_MARCH"] = args.march
    from p2pinfer import kernels

    lib = kernels.library_path()
    if lib is None:
        sys.exit("the kernel library is unavailable (no C compiler?)")
    full, none = ort.GraphOptimizationLevel.ORT_ENABLE_ALL, ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    pairs = {"QuickGelu": (session(graph(True, 1), full, lib), session(graph(False), full)),
             "Sigmoid": (session(graph(True, 0), full, lib), session(graph(False), none))}
    rows = CHUNK // INTER
    random_up = np.random.default_rng(0).standard_normal((1, rows, INTER)).astype(np.float32)
    differing = dict.fromkeys(pairs, 0)
    start = time.time()
    for c in range(0, 256, args.step):
        gates = np.arange(c * CHUNK, (c + 1) * CHUNK, dtype=np.uint64).astype(np.uint32).view(np.float32)
        gates = gates.reshape(1, rows, INTER)
        for up in (np.ones_like(random_up), random_up):
            x = np.concatenate([gates, up], axis=2)
            for name, (ours, theirs) in pairs.items():
                a = ours.run(None, {"x": x})[0].view(np.uint32)
                b = theirs.run(None, {"x": x})[0].view(np.uint32)
                diff = a != b
                if diff.any():
                    differing[name] += int(diff.sum())
                    for i in map(tuple, np.argwhere(diff)[:3]):
                        print(f"{name}: gate {gates.view(np.uint32)[i]:#010x} up {up[i]!r}: "
                              f"{a.view(np.float32)[i]!r} against {b.view(np.float32)[i]!r}", flush=True)
    print(f"{args.march} build ({kernels.library_isa(lib)}), onnxruntime {ort.__version__}, every {args.step}. chunk: "
          f"differing bit patterns {differing} ({time.time() - start:.0f} s)")


if __name__ == "__main__":
    main()
