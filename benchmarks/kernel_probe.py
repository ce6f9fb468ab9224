"""Would a hand-written 4-bit x float32 kernel beat onnxruntime's MatMulNBits on the default model's decode?

    python benchmarks/kernel_probe.py [--threads 2] [--rounds 30] [--rows 1]

It reads the default GGUF (SmolLM2-135M-Instruct Q4_1, output head Q8_0) and times, INTERLEAVED round by
round, the weight matmuls of one decode step (30 layers x qkv 576->960, o 576->576, gate_up 576->3072,
down 1536->576, then the head 576->49152), every matrix its own memory as in a real step (~100 MB streamed):

* onnxruntime: the nodes the importer emits (``MatMulNBits`` terms, and for Q4_1 the block sums of the input
  times the block minimums), all in one session;
* C: ``kernel_probe.c``, compiled here with the system C compiler (``-O3 -march=native``, OpenMP): it reads
  the GGUF blocks as stored (Q4_1: 20 B per 32 weights, fp16 d and m; Q8_0: 34 B), float32 activations and
  float32 accumulation (NOT int8 activations), each output row on its own.

Both outputs are compared with a float64 product of the dequantized weights (the C kernel must be as close as
onnxruntime is). It prints per-matrix and per-step times (median and best of ``--rounds``) and the ratio. On
a loaded machine only the in-run ratios mean anything. Needs gcc (or ``$CC``) and an x86-64 CPU with AVX-512.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from gguf import GGMLQuantizationType as QT, GGUFReader
from onnx import TensorProto, helper, numpy_helper

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from p2pinfer.gguf import find_default_gguf  # noqa: E402
from p2pinfer.gguf.blockquant import from_gguf  # noqa: E402

TYPE_CODE = {QT.Q4_1: 0, QT.Q8_0: 1}


def compile_kernel(out: Path) -> ctypes.CDLL:
    cc = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        sys.exit("kernel_probe: no C compiler found (install gcc, or set CC)")
    lib = out / "libkernel_probe.so"
    subprocess.run([cc, "-O3", "-march=native", "-fopenmp", "-shared", "-fPIC",
                    str(Path(__file__).with_suffix(".c")), "-o", str(lib)], check=True)
    dll = ctypes.CDLL(str(lib))
    p = ctypes.c_void_p
    dll.step.argtypes = [ctypes.c_int, p, p, p, p, p, p, ctypes.c_int, ctypes.c_int]
    return dll


def step_matrices(gguf: Path) -> list[tuple[str, QT, np.ndarray, int]]:
    """(name, type, raw blocks uint8[N, row_bytes], K) of one decode step's matmuls, fused as the importer
    fuses them (q|k|v and gate|up stacked on the output rows)."""
    tensors = {t.name: t for t in GGUFReader(str(gguf)).tensors}

    def raw(name: str) -> tuple[QT, np.ndarray, int]:
        t = tensors[name]
        k = int(t.shape[0])
        return t.tensor_type, np.ascontiguousarray(np.asarray(t.data).reshape(int(t.shape[1]), -1)), k

    out = []
    layers = 1 + max(int(n.split(".")[1]) for n in tensors if n.startswith("blk."))
    for i in range(layers):
        b = f"blk.{i}."
        for name, parts in (("qkv", ["attn_q", "attn_k", "attn_v"]), ("o", ["attn_output"]),
                            ("gate_up", ["ffn_gate", "ffn_up"]), ("down", ["ffn_down"])):
            pieces = [raw(b + p + ".weight") for p in parts]
            out.append((name, pieces[0][0], np.concatenate([p[1] for p in pieces]), pieces[0][2]))
    head = "output.weight" if "output.weight" in tensors else "token_embd.weight"
    out.append(("head", *raw(head)))
    return out


def ort_session(mats, threads: int) -> ort.InferenceSession:
    """All matmuls in one graph, as the importer writes them; input x<K>, output y<i>."""
    inits, nodes, outputs, inputs = [], [], [], {}
    for i, (_, qtype, raw, k) in enumerate(mats):
        bq = from_gguf(raw, qtype, k)
        n = bq.rows
        x = f"x{k}"
        inputs[x] = helper.make_tensor_value_info(x, TensorProto.FLOAT, [1, "s", k])
        terms = []
        for j, t in enumerate(bq.terms):
            ins = [x, f"m{i}.q{j}", f"m{i}.s{j}"]
            inits += [numpy_helper.from_array(t.packed, ins[1]), numpy_helper.from_array(t.scales.reshape(-1), ins[2])]
            if t.packed_zero_points is not None:
                inits.append(numpy_helper.from_array(t.packed_zero_points, f"m{i}.z{j}"))
                ins.append(f"m{i}.z{j}")
            nodes.append(helper.make_node("MatMulNBits", ins, [f"m{i}.t{j}"], domain="com.microsoft", K=k, N=n,
                                          bits=4, block_size=32, accuracy_level=0))
            terms.append(f"m{i}.t{j}")
        if bq.mins is not None:
            inits += [numpy_helper.from_array(np.ascontiguousarray(bq.mins.T), f"m{i}.mins")]
            nodes += [helper.make_node("Reshape", [x, f"shape{k}"], [f"m{i}.xb"]),
                      helper.make_node("ReduceSum", [f"m{i}.xb", "last"], [f"m{i}.xs"], keepdims=0),
                      helper.make_node("MatMul", [f"m{i}.xs", f"m{i}.mins"], [f"m{i}.tm"])]
            terms.append(f"m{i}.tm")
        nodes.append(helper.make_node("Sum", terms, [f"y{i}"]))
        outputs.append(helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, [1, "s", n]))
    for k in {m[3] for m in mats}:
        inits.append(numpy_helper.from_array(np.array([0, 0, k // 32, 32], np.int64), f"shape{k}"))
    inits.append(numpy_helper.from_array(np.array([-1], np.int64), "last"))
    graph = helper.make_graph(nodes, "probe", list(inputs.values()), outputs, initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)],
                              ir_version=8)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--rows", type=int, default=1, help="activation rows per call (1: decode)")
    args = ap.parse_args(argv)
    print(f"{args.threads} threads, {args.rows} row(s); load average {os.getloadavg()[0]:.1f} on "
          f"{os.cpu_count()} CPUs at start")
    mats = step_matrices(find_default_gguf())
    rng = np.random.default_rng(0)
    xs = {k: rng.standard_normal((1, args.rows, k)).astype(np.float32) for k in {m[3] for m in mats}}
    session = ort_session(mats, args.threads)
    ys = [np.zeros((1, args.rows, m[2].shape[0]), np.float32) for m in mats]
    with tempfile.TemporaryDirectory(prefix="p2pinfer-kernel-probe-") as tmp:
        dll = compile_kernel(Path(tmp))
        count = len(mats)
        as_ptrs = lambda arrays: (ctypes.c_void_p * count)(*[a.ctypes.data for a in arrays])  # noqa: E731
        call = (count, (ctypes.c_int * count)(*[TYPE_CODE[m[1]] for m in mats]), as_ptrs([m[2] for m in mats]),
                as_ptrs([xs[m[3]] for m in mats]), as_ptrs(ys), (ctypes.c_int * count)(*[m[2].shape[0] for m in mats]),
                (ctypes.c_int * count)(*[m[3] for m in mats]), args.rows, args.threads)
        feeds = {f"x{k}": v for k, v in xs.items()}
        theirs = session.run(None, feeds)
        dll.step(*call)
        worst = {"onnxruntime": 0.0, "C": 0.0}
        for (name, qtype, raw, k), a, b in zip(mats[-1:] + mats[:4], theirs[-1:] + theirs[:4], ys[-1:] + ys[:4]):
            exact = xs[k][0].astype(np.float64) @ from_gguf(raw, qtype, k).dequantize().astype(np.float64).T
            worst["onnxruntime"] = max(worst["onnxruntime"], float(np.abs(a[0] - exact).max() / np.abs(exact).max()))
            worst["C"] = max(worst["C"], float(np.abs(b[0] - exact).max() / np.abs(exact).max()))
        t_ort, t_c, cpu_ort, cpu_c = [], [], [], []
        for _ in range(args.rounds):
            t, c = time.perf_counter(), time.thread_time()
            session.run(None, feeds)
            t_ort.append(time.perf_counter() - t)
            cpu_ort.append(time.thread_time() - c)
            t, c = time.perf_counter(), time.thread_time()
            dll.step(*call)
            t_c.append(time.perf_counter() - t)
            cpu_c.append(time.thread_time() - c)
    print(f"largest error vs a float64 product (relative to the largest output): onnxruntime {worst['onnxruntime']:.1e}, "
          f"C {worst['C']:.1e}")
    print(f"\n{count} matmuls of one step ({sum(m[2].nbytes for m in mats) / 1e6:.0f} MB of GGUF blocks)")
    print("| | median ms | best ms |\n|---|---|---|")
    print(f"| onnxruntime MatMulNBits | {1e3 * np.median(t_ort):.2f} | {1e3 * min(t_ort):.2f} |")
    print(f"| C kernel | {1e3 * np.median(t_c):.2f} | {1e3 * min(t_c):.2f} |")
    print(f"| ratio onnxruntime / C | {np.median(t_ort) / np.median(t_c):.2f}x | {min(t_ort) / min(t_c):.2f}x |")
    if args.threads == 1:  # both run on this thread: its CPU time leaves out the time other processes took
        print(f"CPU time of this thread, median: onnxruntime {1e3 * np.median(cpu_ort):.2f} ms, C "
              f"{1e3 * np.median(cpu_c):.2f} ms, ratio {np.median(cpu_ort) / np.median(cpu_c):.2f}x")
    print(f"load average {os.getloadavg()[0]:.1f} at the end (the machine is shared: figures are rough)")


if __name__ == "__main__":
    main()
