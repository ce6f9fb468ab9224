"""The MLP activation as one node (``SwiGLU``, p2pinfer/kernels/swiglu.c) against onnxruntime's three, interleaved.

    python benchmarks/swiglu.py [--threads 2] [--rounds 5] [--rows 1,174,560] [--inter 1536]
                                [--model DIR] [--no-model] [--passes 174,560] [--steps 48]

Two parts, each side measured in the same rounds (the order alternates), so that load hits both alike; only
the ratios (onnxruntime / SwiGLU: above 1 means SwiGLU is faster) hold on a loaded machine.

* The op alone, at the default model's width (``--inter`` 1536, input ``[1, rows, 2 * inter]``): one session
  of the ``SwiGLU`` node against one of the nodes gguf.graph emits (Split, Sigmoid, Mul, Mul, which onnxruntime
  runs as Split, QuickGelu, Mul), both with ``--threads`` threads and onnxruntime's workers not spinning (as
  kernels.kernel_session sets them). Per row count: the best microseconds of a run (Python's call included).
* The default model (SmolLM2-135M-Instruct Q4_1, imported into a temporary folder unless ``--model``): its
  kernel session with the rewrite against the same session without it (``kernel_model(swiglu=False)``), both
  profiled by onnxruntime: per pass of ``--passes`` rows (a verification pass of 46 prompt + 128 output
  tokens is 174 rows) and per decode step (after a 100-token prompt, ``--steps`` steps), the summed kernel
  time of the activation's nodes and of all nodes (the minimum of each node over the rounds) and the best wall
  time of the pass / step. The logits of both sessions must be the same bits (they are compared every round).
  Then the same two sessions on ONE thread: the CPU time of the calling thread per pass and decode step (best
  and median of the rounds): the work itself, which load disturbs far less than wall time.
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from p2pinfer import kernels, log  # noqa: E402
from p2pinfer.runtime import load_model  # noqa: E402

from model_folder import model_folder  # noqa: E402  (a sibling: benchmarks/model_folder.py)

TEXT = "The history of the lighthouse begins with fires lit on hills to guide ships home. " * 40


def _options(threads: int) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


def op_sessions(inter: int, threads: int) -> tuple[ort.InferenceSession, ort.InferenceSession]:
    """(the SwiGLU node, onnxruntime's nodes) over x [1, rows, 2 * inter]."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "rows", 2 * inter])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, "rows", inter])
    opsets = [helper.make_opsetid("", 18), helper.make_opsetid(kernels.DOMAIN, 1)]
    fused = helper.make_model(helper.make_graph(
        [helper.make_node("SwiGLU", ["x"], ["y"], domain=kernels.DOMAIN, inter=inter, rank=3, threads=threads,
                          quick_gelu=1)], "swiglu", [x], [y]), opset_imports=opsets, ir_version=8)
    nodes = [helper.make_node("Split", ["x", "sizes"], ["gate", "up"], axis=2),
             helper.make_node("Sigmoid", ["gate"], ["sigmoid"]), helper.make_node("Mul", ["gate", "sigmoid"], ["act"]),
             helper.make_node("Mul", ["act", "up"], ["y"])]
    plain = helper.make_model(helper.make_graph(nodes, "nodes", [x], [y], [
        numpy_helper.from_array(np.array([inter, inter], np.int64), "sizes")]), opset_imports=opsets, ir_version=8)
    options = _options(threads)
    options.register_custom_ops_library(str(kernels.library_path()))
    return (ort.InferenceSession(fused.SerializeToString(), options, providers=["CPUExecutionProvider"]),
            ort.InferenceSession(plain.SerializeToString(), _options(threads), providers=["CPUExecutionProvider"]))


def bench_op(args) -> None:
    ours, theirs = op_sessions(args.inter, args.threads)
    rng = np.random.default_rng(0)
    print(f"the op alone: inter {args.inter}, {args.threads} threads; best microseconds of a run")
    print(f"{'rows':>6} {'SwiGLU':>10} {'Split+QuickGelu+Mul':>20} {'ratio':>7}")
    for rows in args.rows:
        x = (rng.standard_normal((1, rows, 2 * args.inter)) * 2).astype(np.float32)
        assert np.array_equal(ours.run(None, {"x": x})[0], theirs.run(None, {"x": x})[0])
        repeat = max(5, 4000 // rows)
        best = {"ours": float("inf"), "theirs": float("inf")}
        for r in range(args.rounds):
            for side in (("ours", "theirs") if r % 2 == 0 else ("theirs", "ours")):
                session = ours if side == "ours" else theirs
                for _ in range(repeat):
                    t = time.perf_counter()
                    session.run(None, {"x": x})
                    best[side] = min(best[side], time.perf_counter() - t)
        print(f"{rows:>6} {best['ours'] * 1e6:>10.1f} {best['theirs'] * 1e6:>20.1f} {best['theirs'] / best['ours']:>7.2f}")


def profiled(folder: Path, threads: int, swiglu: bool, prefix: str | None):
    """The model with its kernel session (as kernels.kernel_session builds it), profiled by onnxruntime into
    ``prefix`` (None: not profiled)."""
    model = load_model(folder, threads=threads, providers=["CPUExecutionProvider"])
    graph = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    kernels.kernel_model(graph, folder, threads, swiglu=swiglu)
    options = _options(threads)
    if prefix is not None:
        options.enable_profiling = True
        options.profile_file_prefix = prefix
    options.enable_cpu_mem_arena = False
    options.register_custom_ops_library(str(kernels.library_path()))
    options.add_session_config_entry("session.model_external_initializers_file_folder_path", str(folder))
    model.session = ort.InferenceSession(graph.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return model


def node_minimums(events: list, labels: list[str], what: str) -> dict[tuple[str, str], float]:
    """(node name, op type) -> the node's minimum kernel microseconds over the runs labelled ``what`` (``labels``:
    one per session run, in order)."""
    model_runs = sorted((e for e in events if e.get("name") == "model_run"), key=lambda e: e["ts"])
    if len(model_runs) != len(labels):
        raise RuntimeError(f"{len(model_runs)} profiled runs, {len(labels)} expected")
    runs = [(e["ts"], e["ts"] + e["dur"]) for e, label in zip(model_runs, labels) if label == what]
    best: dict[tuple[str, str], float] = {}
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and any(a <= e["ts"] <= b for a, b in runs):
            key = (e["name"], e["args"]["op_name"])
            best[key] = min(best.get(key, float("inf")), e["dur"])
    return best


def bench_model(args) -> None:
    whats = [f"pass {rows}" for rows in args.passes] + ["decode step"]
    with tempfile.TemporaryDirectory(prefix="p2pinfer-swiglu-") as tmp:
        folder = model_folder(args.model, tmp)
        sides = {"SwiGLU": profiled(folder, args.threads, True, f"{tmp}/ours"),
                 "onnxruntime": profiled(folder, args.threads, False, f"{tmp}/theirs")}
        ids = sides["SwiGLU"].encode(TEXT)
        wall: dict[tuple[str, str], float] = collections.defaultdict(lambda: float("inf"))
        labels: dict[str, list[str]] = collections.defaultdict(list)  # side -> what each session run was
        for r in range(args.rounds):
            logits = {}
            for side in (("SwiGLU", "onnxruntime") if r % 2 == 0 else ("onnxruntime", "SwiGLU")):
                model = sides[side]
                for rows, what in zip(args.passes, whats):
                    t = time.perf_counter()
                    logits[(side, rows)], _ = model.forward(ids[:rows], model.empty_cache())
                    wall[(side, what)] = min(wall[(side, what)], time.perf_counter() - t)
                    labels[side].append(what)
                _, cache = model.forward(ids[:100], model.empty_cache(), last=1)
                labels[side].append("prompt")
                decoder = model.decoder(cache, 100 + args.steps)
                for _ in range(args.steps):
                    t = time.perf_counter()
                    decoder.step(42)
                    wall[(side, "decode step")] = min(wall[(side, "decode step")], time.perf_counter() - t)
                    labels[side].append("decode step")
            for rows in args.passes:
                assert np.array_equal(logits[("SwiGLU", rows)].view(np.uint32),
                                      logits[("onnxruntime", rows)].view(np.uint32)), "the sessions' logits differ"
        nodes = {}
        for side, model in sides.items():
            events = json.loads(Path(model.session.end_profiling()).read_text())
            for what in whats:
                nodes[(side, what)] = node_minimums(events, labels[side], what)
    print(f"\nthe default model, {args.threads} threads: the activation's nodes (those the other side has not; "
          f"summed minimum kernel time of each node) and the whole pass / step (best wall time)")
    print(f"{'':>12} {'side':>12} {'activation nodes':>26} {'kernel ms':>10} {'all nodes ms':>13} {'wall ms':>9}")
    for what in whats:
        total = {}
        for side, other in (("SwiGLU", "onnxruntime"), ("onnxruntime", "SwiGLU")):
            own = {k: v for k, v in nodes[(side, what)].items() if k not in nodes[(other, what)]}
            ops = collections.Counter(op for _, op in own)
            total[side] = sum(own.values())
            label = " + ".join(f"{n} {op}" for op, n in sorted(ops.items()))
            every = sum(nodes[(side, what)].values())
            print(f"{what:>12} {side:>12} {label:>26} {total[side] / 1e3:>10.3f} {every / 1e3:>13.3f} "
                  f"{wall[(side, what)] * 1e3:>9.2f}")
        every = {side: sum(nodes[(side, what)].values()) for side in total}
        print(f"{what:>12} {'ratio':>12} {'onnxruntime / SwiGLU':>26} "
              f"{total['onnxruntime'] / total['SwiGLU'] if total['SwiGLU'] else float('nan'):>10.2f} "
              f"{every['onnxruntime'] / every['SwiGLU']:>13.3f} {wall[('onnxruntime', what)] / wall[('SwiGLU', what)]:>9.3f}")


def bench_cpu(args) -> None:
    """One thread: a pass and a decode step run entirely on the calling thread, so its CPU time is the work
    done, which other processes' load disturbs far less than wall time."""
    with tempfile.TemporaryDirectory(prefix="p2pinfer-swiglu-") as tmp:
        folder = model_folder(args.model, tmp)
        sides = {"SwiGLU": profiled(folder, 1, True, None), "onnxruntime": profiled(folder, 1, False, None)}
        ids = sides["SwiGLU"].encode(TEXT)
        whats = [f"pass {rows}" for rows in args.passes] + ["decode step"]
        cpu: dict[tuple[str, str], list[float]] = collections.defaultdict(list)
        for r in range(args.rounds):
            for side in (("SwiGLU", "onnxruntime") if r % 2 == 0 else ("onnxruntime", "SwiGLU")):
                model = sides[side]
                for rows, what in zip(args.passes, whats):
                    t = time.thread_time()
                    model.forward(ids[:rows], model.empty_cache())
                    cpu[(side, what)].append(time.thread_time() - t)
                _, cache = model.forward(ids[:100], model.empty_cache(), last=1)
                decoder = model.decoder(cache, 100 + args.steps)
                t = time.thread_time()
                for _ in range(args.steps):
                    decoder.step(42)
                cpu[(side, "decode step")].append((time.thread_time() - t) / args.steps)
    print(f"\nthe default model, 1 thread: CPU time of the calling thread (ms), best and median of {args.rounds} rounds")
    print(f"{'':>12} {'SwiGLU':>16} {'onnxruntime':>16} {'ratio of medians':>17} {'ratio of bests':>15}")
    for what in whats:
        a, b = cpu[("SwiGLU", what)], cpu[("onnxruntime", what)]
        print(f"{what:>12} {min(a) * 1e3:>7.2f} {statistics.median(a) * 1e3:>8.2f} "
              f"{min(b) * 1e3:>7.2f} {statistics.median(b) * 1e3:>8.2f} "
              f"{statistics.median(b) / statistics.median(a):>17.3f} {min(b) / min(a):>15.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--rows", type=lambda s: [int(x) for x in s.split(",")], default=[1, 174, 560])
    parser.add_argument("--inter", type=int, default=1536)
    parser.add_argument("--model", default=None)
    parser.add_argument("--no-model", action="store_true", help="the op alone")
    parser.add_argument("--passes", type=lambda s: [int(x) for x in s.split(",")], default=[174, 560])
    parser.add_argument("--steps", type=int, default=48)
    args = parser.parse_args()
    log.configure(level="warning")
    if kernels.library_path() is None:
        sys.exit("the kernel library is unavailable (no C compiler?)")
    bench_op(args)
    if not args.no_model:
        bench_model(args)
        bench_cpu(args)


if __name__ == "__main__":
    main()
