"""p2pinfer processes inside the namespaces of a :class:`~tests.nat.topology.Topology` (tests and benchmark)."""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

from .topology import Topology

REPO = Path(__file__).resolve().parents[2]
DRIVER = Path(__file__).resolve().parent / "client_driver.py"


class Proc:
    """A subprocess whose stdout lines are collected by a thread; stderr goes to a log file."""

    def __init__(self, cmd: list[str], log_path: Path) -> None:
        self.log_path = log_path
        self.started_at = time.monotonic()
        env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=str(REPO))
        self._log = open(log_path, "w")
        self.popen = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self._log, text=True, env=env, cwd=REPO)
        self.lines: list[str] = []
        self._queue: "queue.Queue[str | None]" = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            self._queue.put(line.rstrip("\n"))
        self._queue.put(None)

    def wait_line(self, predicate: Callable[[str], bool], timeout: float, what: str) -> str:
        """The first stdout line (seen or to come) for which ``predicate`` holds; fails with the log tail."""
        for line in self.lines:
            if predicate(line):
                return line
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            try:
                line = self._queue.get(timeout=max(remaining, 0.01))
            except queue.Empty:
                line = None
                if remaining > 0:
                    continue
                raise AssertionError(f"no {what} within {timeout} s; {self.describe()}") from None
            if line is None:
                raise AssertionError(f"process ended before {what} (rc={self.popen.wait()}); {self.describe()}")
            self.lines.append(line)
            if predicate(line):
                return line

    def json_line(self, predicate: Callable[[dict[str, Any]], bool], timeout: float, what: str) -> dict[str, Any]:
        def matches(line: str) -> bool:
            if not line.startswith("{"):
                return False  # the SDK's own log lines, if any
            return predicate(json.loads(line))
        return json.loads(self.wait_line(matches, timeout, what))

    def describe(self) -> str:
        try:
            tail = self.log_path.read_text(errors="replace")[-3000:]
        except OSError:
            tail = ""
        return f"stdout={self.lines[-20:]!r}\nlog {self.log_path} tail:\n{tail}"

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(20)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(10)
        self._log.close()


def cli(topology: Topology, role: str, data_dir: Path, *args: str) -> Proc:
    cmd = topology.exec_prefix(role) + [sys.executable, "-m", "p2pinfer", "--data-dir", str(data_dir), *args]
    return Proc(cmd, data_dir.with_suffix(".log"))


def client(topology: Topology, role: str, log_path: Path, bootstrap: str, model: str, *args: str) -> Proc:
    cmd = topology.exec_prefix(role) + [sys.executable, str(DRIVER), bootstrap, model, *args]
    return Proc(cmd, log_path)


def addrs_of(proc: Proc, timeout: float) -> tuple[list[str], str]:
    """The multiaddrs a node printed and its reachability line."""
    line = proc.wait_line(lambda l: l.startswith("reachability:"), timeout, "the reachability line")
    return [l for l in proc.lines if l.startswith("/")], line
