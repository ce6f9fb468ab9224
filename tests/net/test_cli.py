"""`p2pinfer bootstrap` and `p2pinfer peer` as real processes: start, join, clean shutdown on signals."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from p2pinfer.cli.net import PEERS_FILE, read_peers_file
from p2pinfer.errors import P2PInferError


def spawn(tmp_path: Path, name: str, *args: str) -> subprocess.Popen[str]:
    env = {**os.environ, "XDG_CONFIG_HOME": str(tmp_path / "config")}
    return subprocess.Popen(
        [sys.executable, "-m", "p2pinfer", "--data-dir", str(tmp_path / name), *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )


def first_line(proc: subprocess.Popen[str], timeout: float = 30.0) -> str:
    deadline = time.monotonic() + timeout
    assert proc.stdout is not None
    line = proc.stdout.readline()  # the node prints its multiaddr as soon as it listens
    assert line, f"process exited early: {proc.wait(timeout=max(deadline - time.monotonic(), 1))} " \
                 f"{proc.stderr.read() if proc.stderr else ''}"
    return line.strip()


def stop(proc: subprocess.Popen[str], sig: int) -> tuple[int, str]:
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=30)
    return proc.returncode, err


def test_bootstrap_and_peer_join_serve_and_stop_cleanly(tmp_path: Path, shared_models: Path) -> None:
    boot = spawn(tmp_path, "boot", "bootstrap", "--listen", "/ip4/127.0.0.1/tcp/0")
    peer = None
    try:
        boot_addr = first_line(boot)
        assert boot_addr.startswith("/ip4/127.0.0.1/tcp/") and "/p2p/12D3KooW" in boot_addr
        peer = spawn(tmp_path, "peer", "--log-level", "info", "peer", "--listen", "/ip4/127.0.0.1/tcp/0",
                     "--bootstrap", boot_addr, "--model", str(shared_models / "tiny-llama-trained"))
        peer_addr = first_line(peer)
        assert "/p2p/12D3KooW" in peer_addr and peer_addr != boot_addr
        # The key was created in the data directory, private, and is reused on the next start.
        key = tmp_path / "peer" / "peer.key"
        assert key.exists() and key.stat().st_mode & 0o077 == 0
        rc, err = stop(peer, signal.SIGTERM)
        assert rc == 0 and "Traceback" not in err, err
        assert "event=dht.bootstrapped" in err and "reached=1" in err
        assert "event=node.stopped" in err
        # The model folder was imported into the peer's store and served.
        assert "event=peer.model_ready" in err and "decode_tokens_per_s=" in err
        from p2pinfer.runtime import compute_digest  # the user's store, shared by every data dir
        digest = compute_digest(shared_models / "tiny-llama-trained").hex()
        assert (Path(os.environ["P2PINFER_MODELS_DIR"]) / digest / "p2pinfer-model.json").is_file()
    finally:
        if peer is not None and peer.poll() is None:
            peer.kill()
    rc, err = stop(boot, signal.SIGINT)
    assert rc == 0 and "Traceback" not in err, err
    assert "event=node.stopped" in err


def test_bad_bootstrap_address_is_a_clear_error(tmp_path: Path) -> None:
    proc = spawn(tmp_path, "peer", "peer", "--listen", "/ip4/127.0.0.1/tcp/0", "--bootstrap", "/ip4/1.2.3.4/tcp/1",
                 "--model", "no-model-needed-the-address-fails-first")
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 1 and "Traceback" not in err
    assert "no /p2p/<peer id> part" in err


def test_peers_file_format(tmp_path: Path) -> None:
    good = "/ip4/127.0.0.1/tcp/4001/p2p/12D3KooWH6m3miAi8jpijSu4WZiKX28yG2fmFxJEk71Ga88CLSAo"
    path = tmp_path / "peers.txt"
    path.write_text(f"# comment\n\n{good}  # trailing comment\n")
    assert read_peers_file(path) == [good]
    path.write_text("/ip4/127.0.0.1/tcp/4001\n")
    with pytest.raises(P2PInferError, match="peers.txt:1"):
        read_peers_file(path)
    # The shipped list holds only real nodes (none yet), and parses.
    assert read_peers_file(PEERS_FILE) == []
    assert PEERS_FILE.name == "peers.txt" and PEERS_FILE.parent.name == "p2pinfer"  # package data
