"""The kernel's attention (``GQAttention``, p2pinfer/kernels/qattn.c) against onnxruntime's ``GroupQueryAttention``
(the node the GGUF importer writes), in one process, interleaved, so that load from other processes hits both alike.

    python benchmarks/attention.py [--threads 1,2] [--reps 30] [--heads 9,3,64] [--against-tree OLD_TREE]
    python benchmarks/attention.py --model [--folder DIR] [--tokens 128,512] [--reps 5] [--threads 2]

One layer (default):
Cases (past positions, rows): a verification's one pass at 128 output tokens (0, 174), the passes of a 512-token
verification (0, 174; 174, 128; 302, 128; 430, 130), one 560-row pass, and decode steps at 200 and 560 positions.
Per case and thread count it prints the best time of ``--reps`` runs of each and the ratio onnxruntime / kernel
(both in one process, interleaved per case: the ratio is the figure that holds on a loaded machine). Both see a
fresh session per case; the kernel's outputs are checked against onnxruntime's (float32 rounding) before timing.
``--against-tree OLD_TREE``: the kernel library built from OLD_TREE's sources (e.g. ``git archive main | tar -x -C
/tmp/old``) in place of onnxruntime's node: the same GQAttention before and after a change, whose outputs and present
KV must be the same bits (checked before timing); the ratio is old / new.

``--model``: the default model (SmolLM2-135M-Instruct Q4_1, imported into a temporary folder unless ``--folder``)
in two kernel sessions, one with the kernel's attention and one with onnxruntime's (``P2PINFER_KERNEL_ATTENTION=0``
when it is made). Per output length: a greedy generation, then its verification on each session in turn, ``--reps``
times (best of each, both must accept), and ``--reps`` x 16 decode steps after the prompt on each in turn (best and
median step). Prints seconds and the ratio onnxruntime / kernel. ``--profile``: onnxruntime's per-operator kernel
time of the verification's forward passes on each (each node's minimum over ``--reps`` runs of its pass).
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


def tree_library(tree: Path) -> Path:
    """The kernel library built from ``tree``'s p2pinfer/kernels sources (the same compiler, flags and cache)."""
    folder = tree / "p2pinfer" / "kernels"
    sources = tuple(folder / s.name for s in kernels._SOURCES if (folder / s.name).is_file())
    cc = kernels._compiler()
    if cc is None or not sources or sources[0].name != kernels.SOURCE.name:
        raise SystemExit(f"no C compiler, or no {kernels.SOURCE.name} in {folder}")
    lib = kernels._build(cc, kernels._march(), sources=sources, stem="qmatmul-tree")
    if lib is None:
        raise SystemExit(f"the kernel library of {tree} did not build")
    return lib


def session(model: onnx.ModelProto, threads: int, ours: bool, lib: Path | None = None) -> ort.InferenceSession:
    """onnxruntime's GroupQueryAttention, or (``ours``) the kernel's GQAttention from ``lib`` (default: this tree's)."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")  # as kernel_session sets it
    if ours:
        if kernels.kernel_attention(model, threads) != 1:
            raise SystemExit("the rewrite did not take the node (P2PINFER_KERNEL_ATTENTION=0?)")
        options.register_custom_ops_library(str(lib or kernels.library_path()))
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def profile_forward(model, folder: Path, ids: list[int], threads: int, attention: bool, reps: int) -> str:
    """onnxruntime's per-operator kernel time of the forward passes over ``ids`` (128 rows a pass) in a profiling
    session of the kernel graph (with or without the kernel's attention): each node's minimum over ``reps`` runs of
    the same pass (load from other processes inflates it least), summed per operator type over nodes and passes."""
    import collections
    import json
    import os
    import tempfile

    g = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    os.environ["P2PINFER_KERNEL_ATTENTION"] = "1" if attention else "0"
    try:
        kernels.kernel_model(g, folder, threads)
    finally:
        del os.environ["P2PINFER_KERNEL_ATTENTION"]
    with tempfile.TemporaryDirectory(prefix="p2pinfer-attention-profile-") as tmp:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads, opts.inter_op_num_threads, opts.log_severity_level = threads, 1, 3
        opts.enable_profiling, opts.profile_file_prefix = True, tmp + "/p"
        opts.enable_cpu_mem_arena = False
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        opts.add_session_config_entry("session.model_external_initializers_file_folder_path", str(folder))
        opts.register_custom_ops_library(str(kernels.library_path()))
        session = ort.InferenceSession(g.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        saved, model.session = model.session, session
        try:
            chunks = [ids[s:s + 128] for s in range(0, len(ids), 128)]
            for _ in range(reps):
                passes = model.passes(model.empty_cache(), capacity=len(ids), rows=128)
                for chunk in chunks:
                    passes.run(chunk, keep=len(chunk))
        finally:
            model.session = saved
        events = json.loads(Path(session.end_profiling()).read_text())
    runs = [e for e in events if e.get("name") == "model_run"][-reps * len(chunks):]
    per: dict[tuple[int, str, str], list[float]] = collections.defaultdict(list)  # (pass, node, op) -> times
    for k, run in enumerate(runs):
        for e in events:
            if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") \
                    and run["ts"] <= e["ts"] <= run["ts"] + run["dur"]:
                per[(k % len(chunks), e["name"], e["args"]["op_name"])].append(e["dur"])
    totals: collections.Counter = collections.Counter()
    for (_, _, op), durs in per.items():
        totals[op] += min(durs)
    whole = sum(totals.values())
    return f"{whole / 1e3:.1f} ms kernel time: " + ", ".join(f"{op} {t / 1e3:.1f}" for op, t in totals.most_common(6))


def model_main(args) -> None:
    import os
    import statistics
    import tempfile

    from p2pinfer import log
    from p2pinfer.gguf import find_default_gguf, import_gguf
    from p2pinfer.runtime import GREEDY, generate, load_model, verify_result

    log.configure(level="warning")
    threads = int(args.threads.split(",")[-1])
    with tempfile.TemporaryDirectory(prefix="p2pinfer-attention-") as tmp:
        folder = Path(args.folder) if args.folder else import_gguf(find_default_gguf(), Path(tmp) / "q4",
                                                                   weights="native").out_dir
        ours = load_model(folder, threads=threads, providers=["CPUExecutionProvider"])
        os.environ["P2PINFER_KERNEL_ATTENTION"] = "0"
        theirs = ours.with_session(threads=threads, providers=["CPUExecutionProvider"])
        del os.environ["P2PINFER_KERNEL_ATTENTION"]
        for m in (ours, theirs):
            m.tolerance = 1.79e-3
        print(f"load average {os.getloadavg()[0]:.1f} at start; {threads} threads; best of {args.reps}")
        prompt = ours.prompt_ids(messages=[{"role": "user", "content": "Write a long story about a lighthouse keeper "
                                                                       "who finds a message in a bottle."}])
        for n in (int(t) for t in args.tokens.split(",")):
            r = generate(ours, prompt, max_tokens=n, params=GREEDY, seed_material=bytes(32), stop_at_eos=False)
            best = {"ort": float("inf"), "ours": float("inf")}
            for _ in range(args.reps):
                for name, m in (("ort", theirs), ("ours", ours)):
                    t = time.perf_counter()
                    v = verify_result(m, prompt_ids=prompt, output_ids=r.output_ids, fingerprint=r.fingerprint_bytes,
                                      params=GREEDY, seed_material=bytes(32), max_tokens=n,
                                      finish_reason=r.finish_reason, stop_at_eos=False)
                    best[name] = min(best[name], time.perf_counter() - t)
                    assert v.accept, (name, v.reason)
            gen = r.prefill_seconds + r.decode_seconds
            print(f"verify {n:4d} tokens ({len(prompt)} prompt): GroupQueryAttention {best['ort']:.3f} s   "
                  f"GQAttention {best['ours']:.3f} s   ratio {best['ort'] / best['ours']:.2f}   "
                  f"(this run's generation {gen:.3f} s: verify / generate {best['ours'] / gen:.3f} vs "
                  f"{best['ort'] / gen:.3f})")
            # the verification's forward alone (its passes: the prompt and the first rows, then 128 rows at a time,
            # every row's logits kept; no sampler, no near-tie reference, which can dominate a check's time)
            ids = list(prompt) + list(r.output_ids)
            fwd = {"ort": float("inf"), "ours": float("inf")}
            for _ in range(args.reps):
                for name, m in (("ort", theirs), ("ours", ours)):
                    t = time.perf_counter()
                    passes = m.passes(m.empty_cache(), capacity=len(ids), rows=128)
                    for start in range(0, len(ids), 128):
                        chunk = ids[start:start + 128]
                        passes.run(chunk, keep=len(chunk))
                    fwd[name] = min(fwd[name], time.perf_counter() - t)
            print(f"forward {len(ids):4d} positions, passes of 128: GroupQueryAttention {fwd['ort']:.3f} s   "
                  f"GQAttention {fwd['ours']:.3f} s   ratio {fwd['ort'] / fwd['ours']:.2f}")
            if args.profile:
                for name, m in (("ort", theirs), ("ours", ours)):
                    print(f"  profile, {name}: " + profile_forward(m, folder, ids, threads, name == "ours", args.reps))
            tokens = list(r.output_ids)
            steps: dict[str, list[float]] = {"ort": [], "ours": []}
            decoders = {}
            for name, m in (("ort", theirs), ("ours", ours)):
                _, cache = m.forward(prompt, m.empty_cache(), last=1)
                decoders[name] = m.decoder(cache, capacity=len(prompt) + len(tokens))
            for token in tokens[:min(len(tokens), args.reps * 16)]:
                for name in ("ort", "ours"):
                    t = time.perf_counter()
                    decoders[name].step(token)
                    steps[name].append(time.perf_counter() - t)
            print(f"decode steps after {len(prompt)} to {len(prompt) + len(steps['ours'])} positions: "
                  f"GroupQueryAttention best {min(steps['ort']) * 1e3:.2f} ms median "
                  f"{statistics.median(steps['ort']) * 1e3:.2f} ms   GQAttention best {min(steps['ours']) * 1e3:.2f} ms "
                  f"median {statistics.median(steps['ours']) * 1e3:.2f} ms   ratio (median) "
                  f"{statistics.median(steps['ort']) / statistics.median(steps['ours']):.2f}")
        print(f"load average {os.getloadavg()[0]:.1f} at the end")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--heads", default="9,3,64", help="num_heads,kv_num_heads,head_size (SmolLM2-135M's)")
    ap.add_argument("--model", action="store_true", help="verification and decode of the default model")
    ap.add_argument("--folder", help="with --model: an imported 4-bit model folder (default: import the GGUF)")
    ap.add_argument("--tokens", default="128,512", help="with --model: output lengths")
    ap.add_argument("--profile", action="store_true", help="with --model: onnxruntime's per-operator profile too")
    ap.add_argument("--against-tree", metavar="OLD_TREE",
                    help="compare with the GQAttention of OLD_TREE's kernel library instead of onnxruntime's node")
    args = ap.parse_args(argv)
    if args.model:
        if args.reps == 30:
            args.reps = 5
        return model_main(args)
    if kernels.library_path() is None:
        raise SystemExit("the kernel library is unavailable (no C compiler?)")
    nh, nkv, head = (int(v) for v in args.heads.split(","))
    model = graph(nh, nkv, head, 1024)
    old = tree_library(Path(args.against_tree)) if args.against_tree else None
    theirs_name = "old GQAttention" if old else "GroupQueryAttention"
    rng = np.random.default_rng(0)
    print(f"heads {nh}/{nkv}, head size {head}, isa {kernels.library_isa(kernels.library_path())}; best of {args.reps}")
    for threads in (int(t) for t in args.threads.split(",")):
        print(f"-- {threads} thread(s)")
        passes = {"ort": 0.0, "ours": 0.0}  # the passes of a 512-token verification: CASES[:4]
        for case, (past, rows) in enumerate(CASES):
            qkv = rng.standard_normal((1, rows, (nh + 2 * nkv) * head)).astype(np.float32)
            past_kv = rng.standard_normal((1, nkv, past, head)).astype(np.float32)
            feed = {"qkv": qkv, "past_key": past_kv, "past_value": past_kv,
                    "seqlens_k": np.array([past + rows - 1], np.int32), "total": np.array([past + rows], np.int32)}
            theirs = session(model, threads, old is not None, old)
            ours = session(model, threads, True)
            expected, got = theirs.run(None, feed), ours.run(None, feed)
            if old is not None:
                if not all(np.array_equal(a.view(np.uint32), b.view(np.uint32)) for a, b in zip(got, expected)):
                    raise SystemExit(f"the kernel's bits differ from {args.against_tree}'s at past {past}, rows {rows}")
            elif not np.abs(got[0] - expected[0]).max() <= 1e-4 * np.abs(qkv).max():
                raise SystemExit(f"the kernel disagrees with onnxruntime at past {past}, rows {rows}")
            reps = args.reps * (10 if rows == 1 else 1)
            best = {"ort": float("inf"), "ours": float("inf")}
            for _ in range(reps):
                for name, s in (("ort", theirs), ("ours", ours)):
                    if old is not None:
                        # two kernel libraries, two thread pools: a pool's workers spin for 2 ms after a job
                        # (WORKER_SPIN_NS) and would take the other side's cores; let them sleep, then run this
                        # side once untimed so that its own workers are awake, as in a model's run of 30 layers
                        time.sleep(0.004)
                        s.run(None, feed)
                    t = time.perf_counter()
                    s.run(None, feed)
                    best[name] = min(best[name], time.perf_counter() - t)
            print(f"past {past:4d} rows {rows:4d}: {theirs_name} {best['ort'] * 1e3:7.3f} ms   "
                  f"GQAttention {best['ours'] * 1e3:7.3f} ms   ratio {best['ort'] / best['ours']:5.2f}")
            if case < 4:
                passes = {name: passes[name] + best[name] for name in passes}
        print(f"a 512-token verification's passes (the first four): {theirs_name} {passes['ort'] * 1e3:.3f} ms   "
              f"GQAttention {passes['ours'] * 1e3:.3f} ms   ratio {passes['ort'] / passes['ours']:5.2f}")


if __name__ == "__main__":
    main()
