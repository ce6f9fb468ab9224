"""The bootstrap kit: bootstrap/README.md's commands run as written (paths and port swapped for temporary
ones), peers.txt ships as package data and a built copy of the package reads it, and the sample config with
its announce address and relay limits is valid."""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
from pathlib import Path

from p2pinfer.cli.common import AppContext
from p2pinfer.cli.net import relay_limits
from p2pinfer.config import load_config

REPO = Path(__file__).resolve().parents[1]
KIT = REPO / "bootstrap"


def readme_commands() -> list[str]:
    """The `p2pinfer ...` lines of the README's "Running it" section, in order."""
    text = (KIT / "README.md").read_text()
    section = text.split("## Running it", 1)[1].split("\n## ", 1)[0].split("\n### ", 1)[0]
    blocks = re.findall(r"```sh\n(.*?)```", section, re.S)
    return [line for block in blocks for line in block.splitlines() if line.startswith("p2pinfer ")]


def localize(command: str, tmp: Path) -> list[str]:
    command = command.replace("/var/lib/p2pinfer", str(tmp / "state")).replace(
        "/ip4/0.0.0.0/tcp/4001", "/ip4/127.0.0.1/tcp/0")
    argv = shlex.split(command)
    assert argv[0] == "p2pinfer"
    return [sys.executable, "-m", "p2pinfer", *argv[1:]]


def test_readme_commands_stand_up_a_bootstrap_node(tmp_path: Path) -> None:
    commands = readme_commands()
    assert [c.split()[1] for c in commands] == ["keys", "--data-dir"], commands
    env = {**os.environ, "XDG_CONFIG_HOME": str(tmp_path / "config"), "XDG_DATA_HOME": str(tmp_path / "data")}
    keys = subprocess.run(localize(commands[0], tmp_path), capture_output=True, text=True, env=env, timeout=60,
                          cwd=tmp_path)
    assert keys.returncode == 0, keys.stderr
    peer_id = re.search(r"12D3KooW\w+", keys.stdout + keys.stderr).group(0)  # type: ignore[union-attr]
    node = subprocess.Popen(localize(commands[1], tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env, cwd=tmp_path)
    try:
        assert node.stdout is not None
        lines = []
        while not lines or not lines[-1].startswith("reachability:"):
            line = node.stdout.readline()
            assert line, f"bootstrap exited: {node.wait(30)} {node.stderr.read() if node.stderr else ''}"
            lines.append(line.strip())
        assert f"/dns4/boot.example.org/tcp/4001/p2p/{peer_id}" in lines  # the announce address, as published
        assert any(l.startswith("/ip4/127.0.0.1/tcp/") and l.endswith(peer_id) for l in lines)
        assert lines[-1].startswith("reachability: unreachable (not checked yet")  # nobody to dial it back
    finally:
        node.send_signal(signal.SIGTERM)
        _, err = node.communicate(timeout=30)
    assert node.returncode == 0 and "Traceback" not in err, err


def test_peers_txt_is_package_data_read_by_a_built_copy(tmp_path: Path) -> None:
    build = tmp_path / "lib"
    done = subprocess.run([sys.executable, "-c", "import setuptools; setuptools.setup()", "-q", "build_py",
                           "--build-lib", str(build)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    shipped = build / "p2pinfer" / "peers.txt"
    assert shipped.read_text() == (REPO / "p2pinfer" / "peers.txt").read_text()
    # and every C source and header the kernel libraries build from (a missing one: no kernel, silently slower)
    from p2pinfer import kernels

    for source in {*kernels._SOURCES, kernels.REF64_SOURCE, kernels.EXP64_HEADER}:
        assert (build / "p2pinfer" / "kernels" / source.name).read_bytes() == source.read_bytes(), source.name
    # The built copy's CLI reads its own peers.txt: list a node there that does not run, and the copy says so.
    ghost = "/ip4/127.0.0.1/tcp/9/p2p/12D3KooWH6m3miAi8jpijSu4WZiKX28yG2fmFxJEk71Ga88CLSAo"
    shipped.write_text(f"{ghost}\n")
    env = {**os.environ, "PYTHONPATH": str(build), "XDG_CONFIG_HOME": str(tmp_path / "config")}
    run = subprocess.run([sys.executable, "-m", "p2pinfer", "--data-dir", str(tmp_path / "d"), "bootstrap",
                          "--listen", "/ip4/127.0.0.1/tcp/0"], capture_output=True, text=True, env=env,
                         timeout=120, cwd=tmp_path)
    assert run.returncode == 1 and ghost in run.stderr and "no bootstrap node is reachable" in run.stderr, run.stderr


def test_sample_config_sets_announce_and_relay_limits() -> None:
    config = load_config(KIT / "config.sample.toml")
    assert config.announce == ("/dns4/boot.example.org/tcp/4001",)
    limits = relay_limits(AppContext(config), None, None, None)
    assert limits.max_reservations == 128 and limits.circuit_duration_s == 600
    assert relay_limits(AppContext(config), 7, None, None).max_reservations == 7  # options win
    unit = (KIT / "p2pinfer-bootstrap.service").read_text()
    assert "--config /etc/p2pinfer/config.toml" in unit
    containerfile = (KIT / "Containerfile").read_text()
    assert '"bootstrap"' in containerfile and "--announce" in containerfile
    assert "pip install p2pinfer" not in (KIT / "README.md").read_text()
