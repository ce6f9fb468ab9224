"""Reading GGUF files in a process of its own, so a test measures what reading them costs and nothing else.

Run as ``python gguf_target.py LIMIT MODE:PATH ...``, where MODE is ``open`` (:class:`~p2pinfer.gguf.reader.GGUFModel`)
or ``spec`` (``read_llama_spec(GGUFModel(path))``). For each argument, in order, it resets the kernel's
peak-RSS counter, reads the file, and writes one JSON line to stdout: the path, the error it raised (class
name, whether it is our :class:`~p2pinfer.gguf.GGUFImportError`, message; null when the file was read) and
the growth of the resident set, now and at its peak (``VmHWM``, so no spike between two samples is missed).

A read that grows the resident set past LIMIT bytes (a reader without bounds loops allocating, ~30 MB/s) is
stopped there: its line reports the growth and the process exits with status 3, so a failing test fails
fast instead of filling the machine's memory.

The pytest process's RSS is no measure of one read: other tests' garbage, allocator state and threads are in
it. Here everything is imported before the first read, so only the read itself is measured.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time

from flood_target import memory_kib, reset_peak  # the same /proc counters as the flood test's target

from p2pinfer.gguf import GGUFImportError
from p2pinfer.gguf.reader import GGUFModel, read_llama_spec


EXCEEDED_STATUS = 3


def watch(limit: int, current: dict[str, object]) -> None:
    """Stop the process when the read in progress grows the resident set past ``limit`` bytes."""
    while True:
        time.sleep(0.05)
        start = current.get("rss_kib")
        if start is not None and (memory_kib()["rss_kib"] - int(start)) * 1024 > limit:
            growth = (memory_kib()["rss_kib"] - int(start)) * 1024
            print(json.dumps({"path": current["path"], "error": None, "rss_growth": growth, "peak_growth": growth,
                              "stopped": f"resident set grew past {limit} bytes"}), flush=True)
            os._exit(EXCEEDED_STATUS)


def read(mode: str, path: str, current: dict[str, object]) -> dict[str, object]:
    reset_peak()
    before = memory_kib()
    current.update(path=path, rss_kib=before["rss_kib"])
    error: dict[str, object] | None = None
    try:
        model = GGUFModel(path)
        if mode == "spec":
            read_llama_spec(model)
    except Exception as exc:  # noqa: BLE001 - reported, so that the test can say which error it was
        error = {"type": type(exc).__name__, "ours": isinstance(exc, GGUFImportError), "message": str(exc)}
    after = memory_kib()
    current["rss_kib"] = None
    return {"path": path, "error": error, "rss_growth": (after["rss_kib"] - before["rss_kib"]) * 1024,
            "peak_growth": (after["peak_kib"] - before["rss_kib"]) * 1024}


def main(args: list[str]) -> None:
    limit, reads = int(args[0]), args[1:]
    current: dict[str, object] = {}
    threading.Thread(target=watch, args=(limit, current), daemon=True).start()
    for arg in reads:
        mode, _, path = arg.partition(":")
        if mode not in ("open", "spec"):
            raise SystemExit(f"unknown mode {mode!r} in {arg!r}: use open:PATH or spec:PATH")
        print(json.dumps(read(mode, path, current)), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
