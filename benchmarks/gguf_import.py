"""Benchmark: import the default GGUF (SmolLM2-135M-Instruct, Q4_1) and run the imported ONNX model.

Prints import time, file sizes, session load time, prefill and decode tokens/s (greedy KV-cache loop,
onnxruntime CPU) and the largest |log-prob - reference| over the four cases of
``shared/models/smollm2-reference.json`` (when that file is found).

    python benchmarks/gguf_import.py [--threads 2] [--gguf FILE] [--reference FILE] [--decode 64]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from p2pinfer.gguf import find_default_gguf, import_gguf


def default_reference() -> Path | None:
    root = Path(__file__).resolve().parents[1]
    for candidate in (root.parent / "shared" / "models", Path(os.environ.get("P2PINFER_SHARED_MODELS", "/nonexistent"))):
        if (candidate / "smollm2-reference.json").is_file():
            return candidate / "smollm2-reference.json"
    return None


class Runner:
    def __init__(self, model_dir: Path, threads: int) -> None:
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        started = time.perf_counter()
        self.session = ort.InferenceSession(str(model_dir / "model.onnx"), options,
                                            providers=["CPUExecutionProvider"])
        self.load_seconds = time.perf_counter() - started
        self.outputs = [o.name for o in self.session.get_outputs()]
        self.past_names = [i.name for i in self.session.get_inputs() if i.name.startswith("past_key_values.")]
        shape = self.session.get_inputs()[3].shape
        self.kv_heads, self.head_dim = shape[1], shape[3]

    def empty_past(self) -> dict[str, np.ndarray]:
        return {n: np.zeros((1, self.kv_heads, 0, self.head_dim), np.float32) for n in self.past_names}

    def step(self, ids: list[int], past: dict[str, np.ndarray]):
        p, s = next(iter(past.values())).shape[2], len(ids)
        feed = {"input_ids": np.array([ids], np.int64), "attention_mask": np.ones((1, p + s), np.int64),
                "position_ids": np.arange(p, p + s, dtype=np.int64)[None], **past}
        out = dict(zip(self.outputs, self.session.run(None, feed)))
        return out["logits"][0], {n: out[n.replace("past_key_values.", "present.")] for n in self.past_names}


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--gguf", type=Path, default=None)
    parser.add_argument("--reference", type=Path, default=None)
    parser.add_argument("--decode", type=int, default=64, help="decode steps to time")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    gguf_path = args.gguf or find_default_gguf()
    reference = args.reference or default_reference()

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "model"
        result = import_gguf(gguf_path, out)
        sizes = {p.name: p.stat().st_size for p in sorted(out.iterdir())}
        print(f"gguf            {gguf_path.name}  {gguf_path.stat().st_size / 1e6:.1f} MB")
        print(f"import          {result.seconds:.2f} s")
        for name, size in sizes.items():
            print(f"  {name:22s} {size:>12,d} bytes")
        runner = Runner(out, args.threads)
        print(f"load            {runner.load_seconds:.2f} s  (onnxruntime CPU, {args.threads} threads)")

        prompt = list(range(1000, 1128))  # a 128-token prefill
        runner.step(prompt[:8], runner.empty_past())  # warm-up
        prefill, decode = [], []
        for _ in range(args.repeats):
            started = time.perf_counter()
            logits, past = runner.step(prompt, runner.empty_past())
            prefill.append(len(prompt) / (time.perf_counter() - started))
            token = int(logits[-1].argmax())
            started = time.perf_counter()
            for _ in range(args.decode):
                logits, past = runner.step([token], past)
                token = int(logits[-1].argmax())
            decode.append(args.decode / (time.perf_counter() - started))
        print(f"prefill         {max(prefill):.0f} tok/s (128-token prompt, best of {args.repeats})")
        print(f"decode          {max(decode):.1f} tok/s ({args.decode} steps after a 128-token prompt, "
              f"best of {args.repeats})")

        if reference is None:
            print("reference       not found (set P2PINFER_SHARED_MODELS)")
            return
        worst, tokens_equal = 0.0, 0
        cases = json.loads(reference.read_text())["cases"]
        for case in cases:
            logits, past = runner.step(case["prompt_ids"], runner.empty_past())
            rows, new = list(logits), [int(logits[-1].argmax())]
            while len(new) <= len(case["continuation_ids"]):
                logits, past = runner.step([new[-1]], past)
                rows.append(logits[-1])
                new.append(int(logits[-1].argmax()))
            tokens_equal += new[:-1] == case["continuation_ids"]
            lp = log_softmax(np.array(rows))
            for i, (ids, values) in enumerate(zip(case["topk_ids"], case["topk_logprobs"])):
                worst = max(worst, float(np.max(np.abs(lp[i, ids] - np.array(values)))))
        print(f"reference       continuations equal {tokens_equal}/{len(cases)}, "
              f"max |log-prob - reference| {worst:.2e}")


if __name__ == "__main__":
    main()
