"""Misconfiguration is refused loudly: a taken port, a data dir in use, unreachable bootstrap nodes, bad
announce addresses; and only dialable addresses are ever announced. Real processes and sockets on 127.0.0.1."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import trio

from p2pinfer.config import load_config
from p2pinfer.datadir import DataDirInUse, DataDirLock
from p2pinfer.identity import Identity
from p2pinfer.net import BootstrapUnreachable, Node, NodeConfig
from p2pinfer.net.listen import ListenError, check_listen_ports
from p2pinfer.net.publicaddrs import announceable, expand_wildcards, is_announceable

REPO = Path(__file__).resolve().parents[2]


def spawn(tmp_path: Path, data: str, *args: str) -> subprocess.Popen[str]:
    env = {**os.environ, "XDG_CONFIG_HOME": str(tmp_path / "config")}
    return subprocess.Popen([sys.executable, "-m", "p2pinfer", "--data-dir", str(tmp_path / data), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_taken_port_is_refused_with_its_number() -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        with pytest.raises(ListenError, match=f"TCP port {port} .*already in use"):
            check_listen_ports([f"/ip4/127.0.0.1/tcp/{port}"])
        # The wildcard overlaps every specific address too.
        with pytest.raises(ListenError, match=f"TCP port {port}"):
            check_listen_ports([f"/ip4/0.0.0.0/tcp/{port}"])
    check_listen_ports([f"/ip4/127.0.0.1/tcp/{port}", "/ip4/127.0.0.1/tcp/0"])  # free again; 0 never checked


def test_second_node_on_the_same_port_does_not_start(tmp_path: Path) -> None:
    port = free_port()
    first = spawn(tmp_path, "a", "bootstrap", "--listen", f"/ip4/127.0.0.1/tcp/{port}")
    try:
        assert first.stdout is not None
        assert first.stdout.readline().startswith(f"/ip4/127.0.0.1/tcp/{port}/p2p/")
        second = spawn(tmp_path, "b", "bootstrap", "--listen", f"/ip4/127.0.0.1/tcp/{port}")
        out, err = second.communicate(timeout=60)
        assert second.returncode == 1 and "Traceback" not in err, err
        assert f"error: TCP port {port} (/ip4/127.0.0.1/tcp/{port}) is already in use" in err
        assert out == ""
    finally:
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=30)


def test_data_dir_lock_refuses_a_second_holder_and_takes_over_stale_locks(tmp_path: Path) -> None:
    with DataDirLock(tmp_path):
        with pytest.raises(DataDirInUse, match=f"pid {os.getpid()}"):
            DataDirLock(tmp_path).acquire()
    with DataDirLock(tmp_path):  # released on exit: free again
        pass
    # A holder killed without cleanup leaves its PID in the file, but the kernel dropped its lock.
    child = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from p2pinfer.datadir import DataDirLock; "
        f"DataDirLock({str(tmp_path)!r}).acquire(); print('held', flush=True); time.sleep(600)")],
        stdout=subprocess.PIPE, text=True, cwd=REPO)
    assert child.stdout is not None and child.stdout.readline().strip() == "held"
    with pytest.raises(DataDirInUse, match=f"pid {child.pid}"):
        DataDirLock(tmp_path).acquire()
    child.send_signal(signal.SIGKILL)
    child.wait(30)
    assert (tmp_path / "lock").read_text().strip() == str(child.pid)  # stale lock file left behind
    with DataDirLock(tmp_path):
        assert (tmp_path / "lock").read_text().strip() == str(os.getpid())


def test_second_peer_on_a_data_dir_in_use_is_refused(tmp_path: Path) -> None:
    first = spawn(tmp_path, "shared", "bootstrap", "--listen", "/ip4/127.0.0.1/tcp/0")
    try:
        assert first.stdout is not None and first.stdout.readline().startswith("/ip4/127.0.0.1/")
        second = spawn(tmp_path, "shared", "bootstrap", "--listen", "/ip4/127.0.0.1/tcp/0")
        _, err = second.communicate(timeout=60)
        assert second.returncode == 1 and "Traceback" not in err, err
        assert f"data dir {tmp_path / 'shared'} is in use by another running p2pinfer process (pid {first.pid})" in err
    finally:
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=30)


async def test_unreachable_bootstrap_fails_fast_naming_address_and_cause() -> None:
    port = free_port()  # nothing listens there: connection refused
    ghost = Identity.generate().peer_id
    addr = f"/ip4/127.0.0.1/tcp/{port}/p2p/{ghost}"
    started = trio.current_time()
    with pytest.raises(BootstrapUnreachable) as caught:
        async with Node(Identity.generate(), NodeConfig(listen=["/ip4/127.0.0.1/tcp/0"], bootstrap=[addr])):
            pass
    message = str(caught.value)
    assert addr in message and "no bootstrap node is reachable" in message
    assert "refused" in message.lower() or "connect" in message.lower(), message
    # Refused connections fail at once; the bootstrap timeout (5 s) is only an upper bound, so no clock test.
    assert trio.current_time() - started < NodeConfig().bootstrap_timeout_s + 30


def test_cli_reports_unreachable_bootstrap_in_one_line(tmp_path: Path) -> None:
    addr = f"/ip4/127.0.0.1/tcp/{free_port()}/p2p/{Identity.generate().peer_id}"
    proc = spawn(tmp_path, "boot", "bootstrap", "--listen", "/ip4/127.0.0.1/tcp/0", "--bootstrap", addr)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 1 and "Traceback" not in err, err
    lines = [l for l in err.splitlines() if l.startswith("error:")]
    assert len(lines) == 1 and addr in lines[0] and "no bootstrap node is reachable" in lines[0], err


def test_announce_from_config_and_wildcards_refused(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text('announce = ["/dns4/boot.example.org/tcp/4001"]\n[relay]\nmax_reservations = 7\n')
    loaded = load_config(config)
    assert loaded.announce == ("/dns4/boot.example.org/tcp/4001",)
    proc = spawn(tmp_path, "x", "bootstrap", "--announce", "/ip4/0.0.0.0/tcp/4001")
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 1 and "a wildcard address cannot be dialled" in err, err


def test_only_dialable_addresses_are_announced() -> None:
    assert not is_announceable("/ip4/0.0.0.0/tcp/4001", allow_loopback=True)
    assert not is_announceable("/ip6/::/tcp/4001", allow_loopback=True)
    assert not is_announceable("/ip4/169.254.3.4/tcp/4001", allow_loopback=False)
    assert not is_announceable("/ip6/fe80::1/tcp/4001", allow_loopback=False)
    assert not is_announceable("/ip4/127.0.0.1/tcp/4001", allow_loopback=False)
    assert is_announceable("/ip4/127.0.0.1/tcp/4001", allow_loopback=True)
    assert is_announceable("/ip4/192.168.1.20/tcp/4001", allow_loopback=False)
    assert is_announceable("/dns4/boot.example.org/tcp/4001", allow_loopback=False)
    expanded = expand_wildcards(["/ip4/0.0.0.0/tcp/4001"])
    assert expanded and all(a.endswith("/tcp/4001") and "/0.0.0.0/" not in a for a in expanded)
    assert "/ip4/127.0.0.1/tcp/4001" in expanded  # every machine has loopback ...
    public = announceable(["/ip4/0.0.0.0/tcp/4001"], listen=["/ip4/0.0.0.0/tcp/4001"])
    assert "/ip4/127.0.0.1/tcp/4001" not in public  # ... but it is only announced by loopback-only nodes
    assert announceable(["/ip4/127.0.0.1/tcp/5"], listen=["/ip4/127.0.0.1/tcp/0"]) == ["/ip4/127.0.0.1/tcp/5"]
