"""The default model (SmolLM2-135M-Instruct, Q4_1 GGUF) against llama.cpp, in one run.

    python benchmarks/runtime.py                      # this benchmark (the default model)
    python benchmarks/default_model.py [--threads 2] [--rounds 5] [--tokens 128] [--verify-tokens 128,512]

What it prints, each figure the best of ``--rounds`` rounds taken INTERLEAVED (ours, llama.cpp, ours, ...),
so that other load on the machine hits both sides alike:

* files: GGUF size, our imported folder for the 4-bit (``q4_1-cpu``) and fp32 (``fp32-cpu``) classes;
* decode tokens/s (greedy, ``--tokens`` new tokens after a chat prompt) and prefill tokens/s (a prompt of
  ``--prefill`` tokens) for ours 4-bit, ours fp32 and llama.cpp on the same GGUF with the same thread count,
  and the ratios ours / llama.cpp;
* verification / generation time for ``--verify-tokens`` output tokens, 4-bit and fp32, greedy and sampled
  (``--verify-sampling``), with the decode speed behind each ratio; with ``--compare-rows N`` each request is
  also verified with N rows per forward pass (e.g. 4096: one pass, as before row-bounded passes), interleaved
  with the default (:func:`~p2pinfer.runtime.verify.verify_rows`), and both ratios are printed;
* resident memory: a serving process (the peer's modules, the model loaded, a greedy and a sampled request
  of ``--memory-tokens`` tokens, 128 and 512 by default, generated and verified) against the model files + 300 MB
  (each over it marked OVER), measured in a fresh
  subprocess per class, stage by stage, with the peak of each verification (``VmHWM`` reset before it, where
  ``/proc/self/clear_refs`` allows); with ``--compare-rows`` once more per class with that many rows per pass;
  and the peak of a first-run ``p2pinfer demo`` (empty home) against 1.5 GB (``--no-demo`` skips it);
* with ``--compare-amx``, where the 4-bit kernel runs its many-row path on AMX tiles, every request is also
  verified by a session with ``amx=False`` (float32 FMA, as on a peer without AMX): both ratios and their
  time ratio on the same requests (before/after in one run; ``P2PINFER_AMX=0`` turns AMX off everywhere).

``--parts speed,verify,memory`` chooses what runs (all by default).

llama.cpp comes from ``llama-cpp-python`` when it is installed (never a dependency of p2pinfer: install the
wheel from ``../shared/wheels/`` by hand); without it the benchmark prints our figures only.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from p2pinfer import log  # noqa: E402
from p2pinfer.gguf import find_default_gguf, import_gguf  # noqa: E402
from p2pinfer.runtime import GREEDY, SamplingParams, ensure_tolerance, generate, load_model, verify_result  # noqa: E402
from p2pinfer.runtime.verify import VERIFY_ROWS, VERIFY_ROWS_STANDARD, VERIFY_SHORT  # noqa: E402

CHAT = [{"role": "user", "content": "Write a long story about a lighthouse keeper who finds a message in a bottle."}]
PREFILL_TEXT = ("The history of the lighthouse begins with fires lit on hills to guide ships home. " * 40)


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file())


class Ours:
    def __init__(self, folder: Path, threads: int) -> None:
        self.model = load_model(folder, threads=threads, providers=["CPUExecutionProvider"])
        ensure_tolerance(self.model)  # it verifies below: only with a measured tolerance
        self.name = f"p2pinfer {self.model.runtime_numeric_class}"

    def decode(self, prompt: list[int], n: int) -> tuple[float, list[int]]:
        r = generate(self.model, prompt, max_tokens=n, stop_at_eos=False)
        return (len(r.output_ids) - 1) / r.decode_seconds, r.output_ids

    def prefill(self, ids: list[int]) -> float:
        t = time.perf_counter()
        self.model.forward(ids, self.model.empty_cache(), last=1)
        return len(ids) / (time.perf_counter() - t)


class LlamaCpp:
    def __init__(self, gguf: Path, threads: int) -> None:
        import llama_cpp  # optional: only this benchmark uses it

        self.llm = llama_cpp.Llama(model_path=str(gguf), n_threads=threads, n_threads_batch=threads, n_ctx=2048,
                                   n_batch=512, logits_all=False, verbose=False)
        self.name = "llama.cpp Q4_1"

    def _next(self) -> int:
        """Greedy pick from the last evaluated row (llama-cpp-python keeps no scores without logits_all)."""
        import numpy as np

        logits = np.ctypeslib.as_array(self.llm._ctx.get_logits(), shape=(self.llm.n_vocab(),))
        return int(np.argmax(logits))

    def decode(self, prompt: list[int], n: int) -> tuple[float, list[int]]:
        llm = self.llm
        llm.reset()
        llm.eval(prompt)
        out = [self._next()]
        t = time.perf_counter()
        while len(out) < n:
            llm.eval([out[-1]])
            out.append(self._next())
        return (n - 1) / (time.perf_counter() - t), out

    def prefill(self, ids: list[int]) -> float:
        self.llm.reset()
        t = time.perf_counter()
        self.llm.eval(ids)
        return len(ids) / (time.perf_counter() - t)


def verify_sampling(spec: str) -> list[tuple[str, SamplingParams]]:
    """``greedy,1.0,0.8/0.95`` -> labelled sampling parameters."""
    out = []
    for item in spec.split(","):
        if item == "greedy":
            out.append(("greedy", GREEDY))
        else:
            t, _, p = item.partition("/")
            params = SamplingParams(temperature=float(t), top_p=float(p) if p else 1.0)
            out.append((f"T={params.temperature:g}" + (f" top-p {params.top_p:g}" if p else ""), params))
    return out


def memory_probe(folder: Path, threads: int, tokens: int, tolerance: float, rows: int | None = None,
                 repo: Path = REPO) -> dict:
    """Resident memory of a fresh process that serves like a peer: the peer's modules imported, the model
    loaded, then a greedy and a sampled (T = 0.8, top-p 0.95) request of ``tokens`` tokens each generated and
    verified as the verifier service does (``recheck_and_release``: the check, then freed memory handed back).
    The ``tolerance`` is the one measured here (calibrating in the probe would count calibration's memory).

    Each stage's ``VmRSS`` (split into anonymous and file-backed pages by ``smaps_rollup``) and the peak
    (``VmHWM``, not ``ru_maxrss``: a child's ``ru_maxrss`` starts at its parent's high-water mark). The
    high-water mark is reset before each verification (``/proc/self/clear_refs``), so that its own peak is
    read; the process's peak is the largest of the stages' peaks. ``rows``: rows per verification pass (None:
    verify_result's default, also for a tree without the parameter); ``repo``: the tree whose code it runs."""
    rows_arg = "" if rows is None else f", rows_per_pass={rows}"
    code = f"""
import json, sys, time
sys.path.insert(0, {str(repo)!r})
from pathlib import Path

def memory():
    rollup = {{l.split()[0].rstrip(":"): int(l.split()[1]) * 1024 for l in open("/proc/self/smaps_rollup")
              if l.strip().endswith("kB")}}
    status = {{l.split(":")[0]: int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("Vm")}}
    return {{"rss": status["VmRSS"], "anon": rollup["Anonymous"], "peak": status["VmHWM"]}}

def reset_peak():
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # VmHWM := VmRSS
        return True
    except OSError:
        return False

stages = {{"start": memory()}}
import p2pinfer.peer  # everything a serving peer imports (libp2p, onnxruntime, ...)
from p2pinfer import log
from p2pinfer.runtime.memory import release_freed_memory
from p2pinfer.runtime import GREEDY, SamplingParams, generate, load_model, verify_result
log.configure(level="warning")
stages["imports"] = memory()
m = load_model(Path({str(folder)!r}), threads={threads}, providers=["CPUExecutionProvider"], tolerance={tolerance!r})
stages["loaded"] = memory()
p = m.prompt_ids(messages={CHAT!r})
generate(m, p, max_tokens=4, stop_at_eos=False)
stages["warm"] = memory()
accepted, trim = [], 0.0
for label, params in (("greedy", GREEDY), ("sampled", SamplingParams(temperature=0.8, top_p=0.95))):
    r = generate(m, p, max_tokens={tokens}, params=params, seed_material=bytes(32), stop_at_eos=False)
    stages["generated " + label] = memory()
    reset = reset_peak()
    v = verify_result(m, prompt_ids=p, output_ids=r.output_ids, fingerprint=r.fingerprint_bytes, params=params,
                      seed_material=bytes(32), max_tokens={tokens}, finish_reason=r.finish_reason, stop_at_eos=False
                      {rows_arg})
    stages["verified " + label] = memory()
    stages["verified " + label]["reset"] = reset
    t = time.perf_counter()
    release_freed_memory()
    trim = max(trim, time.perf_counter() - t)
    stages["released " + label] = memory()
    accepted.append(v.accept)
print(json.dumps({{"stages": stages, "accept": accepted, "trim_s": trim,
                  "peak": max(v["peak"] for v in stages.values())}}))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def demo_peak() -> tuple[int, float]:
    """Peak resident memory (bytes) and seconds of ``p2pinfer demo`` run as a user's first run: an empty home,
    so that it imports and calibrates the default model. It runs before any other child process: the peak is
    read from ``ru_maxrss`` of the waited-for children, which is the largest child so far."""
    import resource

    with tempfile.TemporaryDirectory(prefix="p2pinfer-demo-home-") as home:
        env = {**os.environ, "HOME": home, "XDG_DATA_HOME": f"{home}/.local/share", "XDG_CACHE_HOME": f"{home}/.cache",
               "XDG_CONFIG_HOME": f"{home}/.config"}
        t = time.perf_counter()
        subprocess.run([sys.executable, "-m", "p2pinfer", "demo", "--bid-timeout", "30", "--bid-grace", "10"],
                       env=env, capture_output=True, text=True, check=True, cwd=home)
        seconds = time.perf_counter() - t
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024, seconds


OTHER_CHAT = [{"role": "user", "content": "Explain how tides work."}]


def after_another_request(verifier) -> None:
    """Leave ``verifier`` as a verifier serving many users is before a request: holding the kept prompt prefix
    (runtime/prefix_kv) of ANOTHER user's request, which shares only the chat template with this benchmark's
    (24 positions on SmolLM2), not this very prompt from the request before (that would skip all of it)."""
    if not hasattr(verifier, "prefix_kv"):  # a tree before prefix_kv
        return
    from p2pinfer.runtime.verify import recompute_logprobs

    verifier.prefix_kv.clear()
    recompute_logprobs(verifier, verifier.prompt_ids(messages=OTHER_CHAT), [0])


def verify_table(sides: list, prompt: list[int], args: argparse.Namespace) -> None:
    """Verification / generation time per class, sampling and output length, best of ``rounds // 2``
    requests; with ``--compare-rows`` each request is verified both ways, interleaved (the order alternates);
    with ``--compare-amx`` a class whose kernel runs on AMX tiles is also verified by a session of the same model
    with ``amx=False`` (float32 FMA, the path of a peer without AMX), interleaved, on the same requests."""
    ways = [None] + ([args.compare_rows] if args.compare_rows else [])  # None: verify_result's default
    if args.compare_amx:
        ways = [None, "no-amx"]
    named = lambda w: "float32 FMA" if w == "no-amx" else "default rows" if w is None else f"{w} rows"  # noqa: E731
    cols = " | ".join(f"verify s ({named(w)}) | verify / generate ({named(w)})" for w in ways)
    same = f" verify time {named(ways[0])} / {named(ways[-1])}, same requests |" if len(ways) > 1 else ""
    print(f"\n| class | sampling | output tokens | decode tok/s | generate s | {cols} |{same}\n"
          "|---|---|---|---|---|" + "---|---|" * len(ways) + ("---|" if same else ""))
    for side in sides:
        m = side.model
        plain = m.with_session(threads=args.threads, amx=False) if args.compare_amx and m.runs_amx else m
        if args.compare_amx:
            print(f"  ({m.runtime_numeric_class}: the serving session {'runs' if m.runs_amx else 'does not run'} "
                  f"AMX tiles; float32 FMA column: {'a session with amx=False' if m.runs_amx else 'the same session'})")
        for label, params in verify_sampling(args.verify_sampling):
            for n in (int(x) for x in args.verify_tokens.split(",")):
                best: dict[int | None, tuple[float, float, float, float]] = {}  # rows -> (ratio, gen s, verify s, tok/s)
                pairs = []  # verify time with the first way / with the last, per request
                for round_ in range(max(1, args.rounds // 2)):
                    took = {}
                    r = generate(m, prompt, max_tokens=n, params=params, seed_material=bytes(32), stop_at_eos=False)
                    g = r.prefill_seconds + r.decode_seconds
                    for rows in (ways if round_ % 2 == 0 else ways[::-1]):
                        verifier = plain if rows == "no-amx" else m
                        after_another_request(verifier)
                        t = time.perf_counter()
                        v = verify_result(verifier, prompt_ids=prompt, output_ids=r.output_ids,
                                          fingerprint=r.fingerprint_bytes, params=params, seed_material=bytes(32),
                                          max_tokens=n, finish_reason=r.finish_reason, stop_at_eos=False,
                                          rows_per_pass=None if rows == "no-amx" else rows)
                        ver = took[rows] = time.perf_counter() - t
                        assert v.accept, v.reason
                        if rows not in best or ver / g < best[rows][0]:
                            best[rows] = (ver / g, g, ver, (n - 1) / r.decode_seconds)
                    pairs.append(took[ways[0]] / took[ways[-1]])
                first = best[ways[0]]
                print(f"| {m.runtime_numeric_class} | {label} | {n} | {first[3]:.1f} | {first[1]:.2f} | "
                      + " | ".join(f"{best[w][2]:.3f} | {best[w][0]:.3f}" for w in ways) + " |"
                      + (f" {min(pairs):.2f}–{max(pairs):.2f} |" if same else ""))


def memory_table(folders: dict[str, Path], sides: list, args: argparse.Namespace) -> None:
    """The serving probe per class (and per rows-per-pass setting with ``--compare-rows``)."""
    print(f"\nServing memory: a fresh process per class and request length, the peer's modules imported, a "
          f"greedy and a sampled request of {args.memory_tokens} tokens generated and verified, freed memory "
          f"released after each verification (as the verifier service does). MB; file = file-backed pages "
          f"(weights, libraries); verify peak: the high-water mark during each verification (greedy / sampled); "
          f"every figure - files against the limit of 300 (OVER where it is above).\n")
    print("| class | tokens | rows per pass | files | imports | loaded | after greedy | after sampled | anon / file at end | "
          "verify peak - files (limit 300) | peak | serving RSS - files (limit 300) | peak - files (limit 300) |\n"
          "|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    mb = lambda n: f"{n / 1e6:.0f}"  # noqa: E731
    limit = lambda n: f"{n / 1e6:.0f}" + (" OVER" if n > 300e6 else "")  # noqa: E731
    for weights, folder in folders.items():
        for tokens, rows in [(t, r) for t in (int(x) for x in str(args.memory_tokens).split(","))
                             for r in [None] + ([args.compare_rows] if args.compare_rows else [])]:
            mem = memory_probe(folder, args.threads, tokens,
                               sides[0 if weights == "native" else 1].model.tolerance, rows)
            assert all(mem["accept"]), mem
            st, files = mem["stages"], folder_bytes(folder)
            end = st["released sampled"]
            verify_peaks = " / ".join(limit(st[f"verified {k}"]["peak"] - files) if st[f"verified {k}"]["reset"]
                                      else "n/a" for k in ("greedy", "sampled"))
            print(f"| {'q4_1-cpu' if weights == 'native' else 'fp32-cpu'} | {tokens} | {rows or 'default'} | {mb(files)} | "
                  f"{mb(st['imports']['rss'])} | {mb(st['loaded']['rss'])} | {mb(st['released greedy']['rss'])} | "
                  f"{mb(end['rss'])} | {mb(end['anon'])} / {mb(end['rss'] - end['anon'])} | {verify_peaks} | "
                  f"{mb(mem['peak'])} | **{limit(end['rss'] - files)}** | {limit(mem['peak'] - files)} |")
            print(f"  stages ({weights}, {tokens} tokens, {rows or 'default'} rows): " + ", ".join(f"{k} {mb(v['rss'])}" for k, v in st.items())
                  + f"; malloc_trim took at most {mem['trim_s'] * 1000:.0f} ms")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=128, help="decode tokens per round")
    ap.add_argument("--prefill", type=int, default=256, help="prefill prompt tokens")
    ap.add_argument("--verify-tokens", default="128,512")
    ap.add_argument("--verify-sampling", default="greedy,1.0,0.8/0.95",
                    help="sampling of the verified requests: greedy or TEMPERATURE[/TOP_P], comma-separated "
                         "(1.0 is the gateway's default, as OpenAI's)")
    ap.add_argument("--no-llama-cpp", action="store_true", help="ours only, even when llama-cpp-python is installed")
    ap.add_argument("--memory-tokens", default="128,512",
                    help="output tokens of each request in the serving-memory probe (greedy and sampled), "
                         "comma-separated: a fresh probe per length")
    ap.add_argument("--no-demo", action="store_true", help="skip the first-run demo's peak memory (a minute or more)")
    ap.add_argument("--compare-rows", type=int, default=None,
                    help=f"also verify with this many rows per forward pass (default passes: {VERIFY_ROWS} rows on "
                         f"the 4-bit kernel and up to {VERIFY_SHORT} positions, else {VERIFY_ROWS_STANDARD}), "
                         "interleaved, and probe memory with it")
    ap.add_argument("--compare-amx", action="store_true",
                    help="also verify each request with the kernel's many-row path on float32 FMA (amx=False, "
                         "the path of a peer without AMX), interleaved; replaces --compare-rows in the verify table")
    ap.add_argument("--parts", default="speed,verify,memory",
                    help="what to measure, comma-separated: speed (decode/prefill), verify (ratios), memory")
    args = ap.parse_args(argv)
    parts = set(args.parts.split(","))
    log.configure(level="warning")
    gguf = find_default_gguf()
    load = os.getloadavg()
    print(f"default model {gguf.name}; {args.threads} threads; best of {args.rounds} interleaved rounds; "
          f"load average {load[0]:.1f} on {os.cpu_count()} CPUs at start")
    demo = None if args.no_demo or "memory" not in parts else demo_peak()  # first: read as the largest child so far
    with tempfile.TemporaryDirectory(prefix="p2pinfer-bench-") as tmp:
        folders = {}
        for weights in ("native", "fp32"):
            t = time.perf_counter()
            result = import_gguf(gguf, Path(tmp) / weights, weights=weights)
            folders[weights] = result.out_dir
            print(f"import {weights:6s}: {result.numeric_class:9s} {folder_bytes(result.out_dir) / 1e6:7.1f} MB "
                  f"({folder_bytes(result.out_dir) / gguf.stat().st_size:.2f}x the GGUF's "
                  f"{gguf.stat().st_size / 1e6:.1f} MB), {time.perf_counter() - t:.1f} s")
        sides = [Ours(folders["native"], args.threads), Ours(folders["fp32"], args.threads)]
        if not args.no_llama_cpp and "speed" in parts:
            try:
                sides.append(LlamaCpp(gguf, args.threads))
            except ImportError:
                print("llama-cpp-python is not installed: our figures only")
        ref = sides[0].model
        prompt = ref.prompt_ids(messages=CHAT)
        long_ids = ref.encode(PREFILL_TEXT)[: args.prefill]
        decode = {s.name: 0.0 for s in sides}
        prefill = {s.name: 0.0 for s in sides}
        greedy = {}
        for s in sides:  # warm-up (first-run allocations, prepacking)
            s.decode(prompt, 4)
            s.prefill(long_ids[:32])
        for _ in range(args.rounds if "speed" in parts else 0):
            for s in sides:
                rate, ids = s.decode(prompt, args.tokens)
                decode[s.name] = max(decode[s.name], rate)
                greedy[s.name] = ids
                prefill[s.name] = max(prefill[s.name], s.prefill(long_ids))
        if "speed" in parts:
            base = sides[-1].name if isinstance(sides[-1], LlamaCpp) else None
            print(f"\n| runtime | decode tokens/s | prefill tokens/s ({len(long_ids)} tokens) |"
                  + (" decode / llama.cpp | prefill / llama.cpp |" if base else ""))
            print("|---|---|---|" + ("---|---|" if base else ""))
            for s in sides:
                row = f"| {s.name} | {decode[s.name]:.1f} | {prefill[s.name]:.0f} |"
                if base:
                    row += f" {decode[s.name] / decode[base]:.2f} | {prefill[s.name] / prefill[base]:.2f} |"
                print(row)
            if base:
                same = sum(a == b for a, b in zip(greedy[sides[0].name], greedy[base]))
                print(f"greedy tokens identical to llama.cpp's: first {next((i for i, (a, b) in enumerate(zip(greedy[sides[0].name], greedy[base])) if a != b), args.tokens)} "
                      f"of {args.tokens} ({same} positions equal)")

        if "verify" in parts:
            verify_table(sides[:2], prompt, args)

        if "memory" in parts:
            memory_table(folders, sides, args)
        if demo is not None:
            print(f"\nfirst-run demo (empty home: import, calibration, five peers): peak {demo[0] / 1e9:.2f} GB "
                  f"(limit 1.5 GB), {demo[1]:.0f} s")
    load = os.getloadavg()
    print(f"\nload average {load[0]:.1f} at the end (the machine is shared: figures are rough)")


if __name__ == "__main__":
    main()
