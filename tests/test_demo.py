"""``p2pinfer demo`` as a newcomer runs it: a subprocess on the real default model, in a fresh data dir."""

from __future__ import annotations

import os
import subprocess
import sys


def test_demo_runs_catches_the_cheater_and_exits_cleanly(tmp_path):
    # Bids are awaited until every peer has answered (grace = timeout, both far above any honest delay):
    # on a loaded machine a late bid must not shrink the quorum the assertions below count on.
    env = {**os.environ, "XDG_DATA_HOME": str(tmp_path / "xdg")}
    proc = subprocess.run([sys.executable, "-m", "p2pinfer", "--data-dir", str(tmp_path / "data"), "demo",
                           "--max-tokens", "16", "--bid-timeout", "120", "--bid-grace", "120"],
                          capture_output=True, text=True, timeout=900, env=env)  # generous: first run imports
    out = proc.stdout
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "verified (ECVRF edwards25519)" in out and "the same executor" in out
    assert "ACCEPTED by 3 of 3 verifiers" in out
    assert "credit.tokens +" in out and "credit.verification +4 credits" in out
    assert "the client's own ledger" in out and "one credit = one output token" in out
    assert " 1 verifiers" not in out and " 1 tokens" not in out
    assert "CAUGHT as" in out
    assert "penalty." in out
    assert "cheater EXCLUDED from the election" in out
    # nothing of the tampered copy is left, and no child process was started
    assert not list(tmp_path.glob("**/tampered"))
