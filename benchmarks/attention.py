"""One attention layer of the default model's shapes: the kernel's ``GQAttention`` (p2pinfer/kernels/qattn.c) against
onnxruntime's ``GroupQueryAttention``, the node the GGUF importer writes, on the same inputs in the same run.

    python benchmarks/attention.py [--threads 1,2] [--reps 30] [--heads 9,3,64]

Cases (past positions, rows): a verification's one pass at 128 output tokens (0, 174), the passes of a 512-token
verification (0, 174; 174, 128; 302, 128; 430, 130), one 560-row pass, and decode steps at 200 and 560 positions.
Per case and thread count it prints the best time of ``--reps`` runs of each and the ratio onnxruntime / kernel
(both in one process, interleaved per case: the ratio is the figure that holds on a loaded machine). Both see a
fresh session per case; the kernel's outputs are checked against onnxruntime's (float32 rounding) before timing.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from p2pinfer import kernels  # noqa: E402

CASES = [(0, 174), (174, 128), (302, 128), (430, 130), (0, 560), (200, 1), (560, 1)]


def graph(nh: int, nkv: int, head: int, positions: int) -> onnx.ModelProto:
    inv = 1.0 / 10000.0 ** (np.arange(0, head, 2) / head)
    angles = np.arange(positions)[:, None] * inv[None, :]
    cos, sin = np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)
    node = helper.make_node("GroupQueryAttention", ["qkv", "", "", "past_key", "past_value", "seqlens_k", "total",
                                                    "cos", "sin"], ["out", "present_key", "present_value"],
                            domain="com.microsoft", num_heads=nh, kv_num_heads=nkv, scale=1.0, do_rotary=1,
                            rotary_interleaved=0)
    kv = [1, nkv, "p", head]
    g = helper.make_graph(
        [node], "attention",
        [helper.make_tensor_value_info("qkv", TensorProto.FLOAT, [1, "s", (nh + 2 * nkv) * head]),
         helper.make_tensor_value_info("past_key", TensorProto.FLOAT, kv),
         helper.make_tensor_value_info("past_value", TensorProto.FLOAT, kv),
         helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, [1]),
         helper.make_tensor_value_info("total", TensorProto.INT32, [1])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, "s", nh * head]),
         helper.make_tensor_value_info("present_key", TensorProto.FLOAT, [1, nkv, "t", head]),
         helper.make_tensor_value_info("present_value", TensorProto.FLOAT, [1, nkv, "t", head])],
        initializer=[numpy_helper.from_array(cos, "cos"), numpy_helper.from_array(sin, "sin")])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1),
                                               helper.make_opsetid(kernels.DOMAIN, 1)], ir_version=8)


def session(model: onnx.ModelProto, threads: int, ours: bool) -> ort.InferenceSession:
    model = onnx.ModelProto.FromString(model.SerializeToString())
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")  # as kernel_session sets it
    if ours:
        if kernels.kernel_attention(model, threads) != 1:
            raise SystemExit("the rewrite did not take the node (P2PINFER_KERNEL_ATTENTION=0?)")
        options.register_custom_ops_library(str(kernels.library_path()))
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--heads", default="9,3,64", help="num_heads,kv_num_heads,head_size (SmolLM2-135M's)")
    args = ap.parse_args(argv)
    if kernels.library_path() is None:
        raise SystemExit("the kernel library is unavailable (no C compiler?)")
    nh, nkv, head = (int(v) for v in args.heads.split(","))
    model = graph(nh, nkv, head, 1024)
    rng = np.random.default_rng(0)
    print(f"heads {nh}/{nkv}, head size {head}, isa {kernels.library_isa(kernels.library_path())}; best of {args.reps}")
    for threads in (int(t) for t in args.threads.split(",")):
        print(f"-- {threads} thread(s)")
        for past, rows in CASES:
            qkv = rng.standard_normal((1, rows, (nh + 2 * nkv) * head)).astype(np.float32)
            past_kv = rng.standard_normal((1, nkv, past, head)).astype(np.float32)
            feed = {"qkv": qkv, "past_key": past_kv, "past_value": past_kv,
                    "seqlens_k": np.array([past + rows - 1], np.int32), "total": np.array([past + rows], np.int32)}
            theirs, ours = session(model, threads, False), session(model, threads, True)
            expected, got = theirs.run(None, feed)[0], ours.run(None, feed)[0]
            if not np.abs(got - expected).max() <= 1e-4 * np.abs(qkv).max():
                raise SystemExit(f"the kernel disagrees with onnxruntime at past {past}, rows {rows}")
            reps = args.reps * (10 if rows == 1 else 1)
            best = {"ort": float("inf"), "ours": float("inf")}
            for _ in range(reps):
                for name, s in (("ort", theirs), ("ours", ours)):
                    t = time.perf_counter()
                    s.run(None, feed)
                    best[name] = min(best[name], time.perf_counter() - t)
            print(f"past {past:4d} rows {rows:4d}: GroupQueryAttention {best['ort'] * 1e3:7.3f} ms   "
                  f"GQAttention {best['ours'] * 1e3:7.3f} ms   ratio {best['ort'] / best['ours']:5.2f}")


if __name__ == "__main__":
    main()
