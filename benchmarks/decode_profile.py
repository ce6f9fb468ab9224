"""Where a decode step of the default model spends its time: onnxruntime's per-operator profile and the Python
work around it.

    python benchmarks/decode_profile.py [--threads 2] [--steps 48] [--context 100] [--folder DIR ...]

Without ``--folder`` it imports the default GGUF (4-bit, ``q4_1-cpu``) into a temporary folder; with several
``--folder`` it profiles each (e.g. two imports to compare graphs) in the same run.

What it prints, per folder:

* per operator type: the number of nodes one decode step runs and their kernel time, each node's time being
  its MINIMUM over ``--steps`` decode steps (onnxruntime ``enable_profiling``), so that load from other
  processes inflates the figures as little as it can; the sum is the kernel time of one step on a quiet core;
* the step as the runtime serves it (:class:`~p2pinfer.runtime.model.KVDecoder`, KV cache in place, with
  the kernel of :mod:`p2pinfer.kernels`: its integer decode path where built, and its float32 one
  (``P2PINFER_DECODE_KERNEL=float``)), the same with the standard graph (``P2PINFER_DECODE_KERNEL=0``),
  and as the standard graph's ``forward()`` runs it (the KV cache copied in and out), wall time, best of
  ``--steps``, interleaved in blocks of 8 steps. The per-operator profile is printed for each session
  (the kernel is one custom node per 4-bit layer: ``QMatMul1M``, ``QMatMul2``);
* the Python work per generated token outside onnxruntime: log-softmax (float64, the whole vocabulary), the
  fingerprint row, greedy sampling, best of 200.

On a loaded machine compare folders within one run, never figures from different runs.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from p2pinfer import kernels, log  # noqa: E402
from p2pinfer.kernels import DecodePath  # noqa: E402
from p2pinfer.runtime import GREEDY, load_model  # noqa: E402
from p2pinfer.runtime.model import session_binding  # noqa: E402
from p2pinfer.runtime.fingerprint import FingerprintBuilder  # noqa: E402
from p2pinfer.runtime.sampling import log_softmax, sample  # noqa: E402

from model_folder import model_folder  # noqa: E402  (a sibling: benchmarks/model_folder.py)

BLOCK = 8  # decode steps per session before switching (see step_times)
TEXT = "The history of the lighthouse begins with fires lit on hills to guide ships home. " * 40


def kernel_profile(folder: Path, threads: int, steps: int, context: int,
                   kernel: DecodePath | None) -> tuple[dict, dict]:
    """Per op type: (summed minimum kernel microseconds, node count) of one decode step, through the kernel
    session (the 4-bit layers as p2pinfer custom nodes, decode rows on the path ``kernel``) or (None) the
    standard graph."""
    model = load_model(folder, threads=threads, providers=["CPUExecutionProvider"])
    with tempfile.TemporaryDirectory(prefix="p2pinfer-profile-") as tmp:
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(tmp) / "decode")
        options.log_severity_level = 3
        source: str | bytes = str(folder / "model.onnx")
        if kernel:  # as kernels.kernel_session builds it, with profiling on
            graph = onnx.load(str(folder / "model.onnx"), load_external_data=False)
            kernels.kernel_model(graph, folder, threads, kernel)
            source = graph.SerializeToString()
            options.register_custom_ops_library(str(kernels.library_path()))
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
            options.add_session_config_entry("session.model_external_initializers_file_folder_path", str(folder))
        model.session = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
        model.io = dataclasses.replace(model.io, **session_binding(model.session))  # as this session's graph has them
        ids = model.encode(TEXT)[:context]
        _, cache = model.forward(ids, model.empty_cache(), last=1)
        decoder = model.decoder(cache, context + steps)
        for _ in range(steps):
            decoder.step(42)
        events = json.loads(Path(model.session.end_profiling()).read_text())
    runs = [e for e in events if e.get("name") == "model_run"]
    first_step = runs[1]["ts"]  # runs[0] is the prefill
    node_min: dict[str, float] = {}
    node_op: dict[str, str] = {}
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= first_step:
            node_min[e["name"]] = min(node_min.get(e["name"], float("inf")), e["dur"])
            node_op[e["name"]] = e["args"]["op_name"]
    micros: dict[str, float] = collections.Counter()
    count: dict[str, int] = collections.Counter()
    for name, dur in node_min.items():
        micros[node_op[name]] += dur
        count[node_op[name]] += 1
    return dict(micros), dict(count)


def step_times(folder: Path, threads: int, steps: int, context: int) -> tuple[float, float, float, float]:
    """Best wall seconds of one decode step: in place (KVDecoder) with the kernel (p2pinfer.kernels, the
    default; inf when it is unavailable), the same on the kernel's float32 decode path, in place with the
    standard graph, and through forward().

    The three alternate in blocks of ``BLOCK`` steps, not step by step: after its run, the standard session's
    onnxruntime workers spin for a while, and a kernel step started right then shares the cores with them
    (measured at load 13: 24 ms alone, 39-61 ms when each kernel step follows a standard one). A peer runs one
    session; the best step of each block is the one without the other session's spinning."""
    model = load_model(folder, threads=threads, providers=["CPUExecutionProvider"])
    floats = model.with_session(threads=threads, providers=["CPUExecutionProvider"], decode=DecodePath.FLOAT)
    plain = model.with_session(threads=threads, providers=["CPUExecutionProvider"], kernel=False)
    ids = model.encode(TEXT)[:context]
    _, cache = plain.forward(ids, plain.empty_cache(), last=1)
    with_kernel = model.decoder(cache, context + steps)
    float_kernel = floats.decoder(cache, context + steps)
    standard = plain.decoder(cache, context + steps)
    kernel, float_path, in_place, copied = float("inf"), float("inf"), float("inf"), float("inf")
    for _ in range(max(1, steps // BLOCK)):  # interleaved by blocks, so that load hits all alike
        for _ in range(BLOCK if model.runs_kernel else 0):
            t = time.perf_counter()
            with_kernel.step(42)
            kernel = min(kernel, time.perf_counter() - t)
        for _ in range(BLOCK if floats.runs_kernel else 0):
            t = time.perf_counter()
            float_kernel.step(42)
            float_path = min(float_path, time.perf_counter() - t)
        for _ in range(BLOCK):
            t = time.perf_counter()
            standard.step(42)
            in_place = min(in_place, time.perf_counter() - t)
        for _ in range(BLOCK):
            t = time.perf_counter()
            plain.forward([42], cache)
            copied = min(copied, time.perf_counter() - t)
    return kernel, float_path, in_place, copied


def python_per_token(folder: Path) -> dict[str, float]:
    model = load_model(folder, threads=1, providers=["CPUExecutionProvider"])
    logits, _ = model.forward(model.encode(TEXT)[:16], model.empty_cache(), last=1)
    row = logits[-1]
    lp = log_softmax(row)
    out = {}
    for name, fn in (("log_softmax", lambda: log_softmax(row)), ("fingerprint row", lambda: FingerprintBuilder().add(lp)),
                     ("greedy sample", lambda: sample(lp, GREEDY, bytes(32), 3))):
        best = float("inf")
        for _ in range(200):
            t = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t)
        out[name] = best
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=48, help="decode steps profiled")
    ap.add_argument("--context", type=int, default=100, help="positions in the KV cache before the first step")
    ap.add_argument("--folder", action="append", type=Path, help="an imported model folder (repeatable)")
    args = ap.parse_args(argv)
    log.configure(level="warning")
    print(f"{args.threads} threads, {args.steps} decode steps after {args.context} positions; load average "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs at start")
    with tempfile.TemporaryDirectory(prefix="p2pinfer-bench-") as tmp:
        folders = args.folder or [model_folder(None, tmp, name="native")]
        paths = (DecodePath.INTEGER, DecodePath.FLOAT, None) if kernels.library_path() else (None,)
        runs = [(f, kernel) for f in folders for kernel in paths]
        profiles = [kernel_profile(f, args.threads, args.steps, args.context, kernel) for f, kernel in runs]
        ops = sorted(set().union(*(p[0] for p in profiles)), key=lambda o: -max(p[0].get(o, 0) for p in profiles))
        print("\n| operator | " + " | ".join(f"{f.name} {'kernel ' + k.value if k else 'standard'}: nodes, µs"
                                            for f, k in runs) + " |")
        print("|---|" + "---|" * len(runs))
        for op in ops:
            print(f"| {op} | " + " | ".join(f"{p[1].get(op, 0)}, {p[0].get(op, 0):.0f}" for p in profiles) + " |")
        print("| **all kernels** | " + " | ".join(f"{sum(p[1].values())}, {sum(p[0].values()):.0f}"
                                               for p in profiles) + " |")
        for f in folders:
            kernel, float_path, in_place, copied = step_times(f, args.threads, args.steps, args.context)
            print(f"\n{f.name}: one decode step {1e3 * kernel:.2f} ms in place with the kernel (default), "
                  f"{1e3 * float_path:.2f} ms with the kernel's float32 decode path, "
                  f"{1e3 * in_place:.2f} ms in place with the standard graph (KVDecoder), "
                  f"{1e3 * copied:.2f} ms through forward() (KV copied); best of {args.steps}")
        per_token = python_per_token(folders[0])
        print("Python per generated token: " + ", ".join(f"{k} {1e3 * v:.3f} ms" for k, v in per_token.items()))
    print(f"load average {os.getloadavg()[0]:.1f} at the end (the machine is shared: figures are rough)")


if __name__ == "__main__":
    main()
