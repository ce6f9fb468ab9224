"""Decode speed of the kernel built for each instruction set this CPU can run, interleaved in one process.

    python benchmarks/decode_isa.py [--threads 2] [--rounds 5] [--tokens 128] [--steps 32] [--model DIR] [--llama-cpp]

What an older CPU runs, measured on this one: the kernel library built with ``-march=x86-64-v3`` (AVX2 + FMA +
F16C, no AVX-512: Intel Haswell to 11th-gen laptops, AMD Zen 1-4) and ``-march=alderlake`` (AVX2 with AVX-VNNI's
256-bit ``vpdpbusd``, no AVX-512: Intel 12th-gen and later desktops/laptops), each on its integer and on its
float32 decode path, beside this CPU's own build (``-march=native``). The figures of the x86-64-v3 build are this
CPU running AVX2 code, not an AVX2 laptop: the ratios between the paths are what carries over.

Every round runs ``generate`` (``--tokens`` greedy tokens after a chat prompt: the whole decode loop, sampling,
log-softmax and fingerprint included) on every session, in an order that rotates each round, so load hits all
alike; it prints the best of ``--rounds`` per session and the ratios to the x86-64-v3 float32 path (what an AVX2
CPU ran before the AVX2 integer path) and to this CPU's integer path. With ``--llama-cpp`` (the benchmark-only
``llama-cpp-python``), llama.cpp decodes the same GGUF in the same rounds (its own build, for this CPU). The
sessions' greedy tokens must agree (the integer paths' rows are bit-identical; it says where they do not).
On a loaded machine only the ratios mean anything, and even they move with the load: each round also times
``--steps`` bare KV decode steps per session in CPU time of this process (``time.process_time``: all its threads,
spinning included), which the other engineers' processes disturb less than wall-clock tokens/s; with
``--threads 1`` that is the kernel's own cost per token.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from p2pinfer import kernels, log  # noqa: E402
from p2pinfer.kernels import DecodePath  # noqa: E402
from p2pinfer.runtime import generate, load_model  # noqa: E402

from model_folder import model_folder  # noqa: E402  (a sibling: benchmarks/model_folder.py)

CHAT = [{"role": "user", "content": "Write a long story about a lighthouse keeper who finds a message in a bottle."}]


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    return set(line.split(":", 1)[-1].split())


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--model", type=Path, help="an imported 4-bit model folder (default: import the default GGUF)")
    ap.add_argument("--llama-cpp", action="store_true", help="llama.cpp's decode in the same rounds")
    ap.add_argument("--steps", type=int, default=32, help="bare decode steps timed in CPU time per round")
    args = ap.parse_args(argv)
    log.configure(level="warning")
    flags = _cpu_flags()
    marches = ["native"] + (["x86-64-v3"] if {"avx2", "fma", "f16c"} <= flags else []) \
        + (["alderlake"] if {"avx2", "fma", "f16c", "avx_vnni"} <= flags else [])
    print(f"{args.threads} threads, best of {args.rounds} interleaved rounds of {args.tokens} tokens; load average "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs at start")
    with tempfile.TemporaryDirectory(prefix="p2pinfer-bench-") as tmp:
        folder = model_folder(args.model, tmp)
        sessions = {}
        for march in marches:
            os.environ["P2PINFER_KERNEL_MARCH"] = march
            lib = kernels.library_path()
            if lib is None:
                sys.exit("decode_isa: the kernel is unavailable here (see the kernel.unavailable log line)")
            isa = kernels.library_isa(lib)
            for decode in (DecodePath.INTEGER, DecodePath.FLOAT):
                model = load_model(folder, threads=args.threads, providers=["CPUExecutionProvider"], decode=decode)
                if model.decode_path is decode:  # a build without the integer path has one session only
                    sessions[f"{march} ({isa}) {decode.value}"] = model
        os.environ.pop("P2PINFER_KERNEL_MARCH", None)
        any_model = next(iter(sessions.values()))
        prompt = any_model.prompt_ids(messages=CHAT)
        llama = None
        if args.llama_cpp:
            from default_model import LlamaCpp  # noqa: E402  (a sibling benchmark)
            from p2pinfer.gguf import find_default_gguf

            llama = LlamaCpp(find_default_gguf(), args.threads)
            llama.decode(prompt, 4)
        for model in sessions.values():  # warm-up
            generate(model, prompt, max_tokens=4, stop_at_eos=False)
        best: dict[str, float] = {}
        cpu: dict[str, float] = {}  # best decode steps per CPU-second
        tokens: dict[str, list[int]] = {}
        _, cache = any_model.forward(prompt, any_model.empty_cache(), last=1)  # one cache for the bare steps
        names = list(sessions) + (["llama.cpp"] if llama else [])
        for round_ in range(args.rounds):
            shift = round_ % len(names)
            for name in names[shift:] + names[:shift]:  # each session goes first in turn
                if name == "llama.cpp":
                    speed = llama.decode(prompt, args.tokens)[0]
                else:
                    r = generate(sessions[name], prompt, max_tokens=args.tokens, stop_at_eos=False)
                    speed = (len(r.output_ids) - 1) / r.decode_seconds
                    tokens[name] = r.output_ids
                    model = sessions[name]
                    decoder = model.decoder(type(cache)([a.copy() for a in cache.arrays], cache.length),
                                            capacity=cache.length + args.steps)
                    token, t = prompt[-1], time.process_time()
                    for _ in range(args.steps):
                        token = int(np.argmax(decoder.step(token)))
                    cpu[name] = max(cpu.get(name, 0.0), args.steps / (time.process_time() - t))
                best[name] = max(best.get(name, 0.0), speed)
    base = next((n for n in best if n.startswith("x86-64-v3") and n.endswith("float")), None)
    top = next(n for n in best if n.startswith("native"))
    print(f"\n| decode path (-march, one-row ISA, path) | tok/s (best of {args.rounds}) | / {base or '-'} | / {top} "
          f"| steps per CPU-s | / {base or '-'} | / {top} |\n|---|---|---|---|---|---|---|")
    for name, speed in best.items():
        row = f"| {name} | {speed:.1f} | {speed / best[base]:.2f} | " if base else f"| {name} | {speed:.1f} | - | "
        row += f"{speed / best[top]:.2f} |"
        if name in cpu:
            c = cpu[name]
            row += f" {c:.1f} | {c / cpu[base]:.2f} | {c / cpu[top]:.2f} |" if base else f" {c:.1f} | - | {c / cpu[top]:.2f} |"
        print(row)
    integer = {n: t for n, t in tokens.items() if n.endswith("integer")}
    agree = len({tuple(t) for t in integer.values()}) <= 1
    print(f"\ngreedy tokens of the integer paths {'identical' if agree else 'DIFFER'} across builds "
          f"({len(integer)} sessions; their prefill runs each build's many-row path)")
    print(f"load average {os.getloadavg()[0]:.1f} at the end (the machine is shared: figures are rough)")


if __name__ == "__main__":
    main()
