"""The command line, run as a user runs it: in a subprocess, with a private data directory."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from p2pinfer import __version__


def run(*args, env_extra=None, cwd=None):
    env = dict(os.environ)
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-m", "p2pinfer", *args], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=120)


@pytest.fixture
def xdg(tmp_path):
    return {"XDG_DATA_HOME": str(tmp_path / "data"), "XDG_CONFIG_HOME": str(tmp_path / "config")}


def test_version():
    result = run("--version")
    assert result.returncode == 0
    assert __version__ in result.stdout


def test_keys_new_and_show_in_default_data_dir(tmp_path, xdg):
    created = run("keys", "new", env_extra=xdg)
    assert created.returncode == 0, created.stderr
    key_file = tmp_path / "data" / "p2pinfer" / "peer.key"
    assert key_file.exists()
    assert oct(key_file.stat().st_mode & 0o777) == oct(0o600)
    shown = run("keys", "show", env_extra=xdg)
    assert shown.returncode == 0
    peer_id = [line.split()[-1] for line in created.stdout.splitlines() if line.startswith("peer id")][0]
    assert peer_id in shown.stdout
    assert peer_id.startswith("12D3KooW")


def test_keys_new_out_and_show_file(tmp_path, xdg):
    path = tmp_path / "elsewhere.key"
    assert run("keys", "new", "--out", str(path), env_extra=xdg).returncode == 0
    shown = run("keys", "show", str(path), env_extra=xdg)
    assert shown.returncode == 0 and "12D3KooW" in shown.stdout
    again = run("keys", "new", "--out", str(path), env_extra=xdg)
    assert again.returncode == 1
    assert "already exists" in again.stderr and "--force" in again.stderr
    assert run("keys", "new", "--out", str(path), "--force", env_extra=xdg).returncode == 0


def test_data_dir_option(tmp_path, xdg):
    data_dir = tmp_path / "custom"
    assert run("--data-dir", str(data_dir), "keys", "new", env_extra=xdg).returncode == 0
    assert (data_dir / "peer.key").exists()


def test_data_dir_from_config_file(tmp_path, xdg):
    config = tmp_path / "p2pinfer.toml"
    config.write_text(f'data_dir = "{tmp_path / "fromconfig"}"\nbootstrap = []\n')
    assert run("--config", str(config), "keys", "new", env_extra=xdg).returncode == 0
    assert (tmp_path / "fromconfig" / "peer.key").exists()


@pytest.mark.parametrize(
    "setup, expected",
    [
        ("missing", "does not exist"),
        ("group-readable", "chmod 600"),
        ("malformed", "malformed"),
        ("unreadable", "permission denied|not readable|does not exist|chmod"),
    ],
)
def test_key_file_errors_are_one_line_without_traceback(tmp_path, xdg, setup, expected):
    import re

    path = tmp_path / "peer.key"
    if setup != "missing":
        path.write_text("ed25519-seed: " + "11" * 32 + "\n" if setup != "malformed" else "oops\n")
        os.chmod(path, {"group-readable": 0o644, "malformed": 0o600, "unreadable": 0o000}[setup])
    if setup == "unreadable" and os.geteuid() == 0:
        # root reads any file; the permission check still refuses a world-readable key, so use that.
        os.chmod(path, 0o604)
    result = run("keys", "show", str(path), env_extra=xdg)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith("error: ")
    assert len(result.stderr.strip().splitlines()) == 1
    assert re.search(expected, result.stderr), result.stderr


def test_malformed_config_is_a_clear_error(tmp_path, xdg):
    config = tmp_path / "bad.toml"
    config.write_text("data_dir = [\n")
    result = run("--config", str(config), "keys", "show", env_extra=xdg)
    assert result.returncode == 1
    assert "not valid TOML" in result.stderr and "Traceback" not in result.stderr
    config.write_text("bootstrapp = []\n")
    result = run("--config", str(config), "keys", "show", env_extra=xdg)
    assert "unknown key(s) bootstrapp" in result.stderr


def test_unknown_command_is_a_usage_error():
    result = run("frobnicate")
    assert result.returncode == 2
    assert result.stderr.startswith("error: no such command 'frobnicate'") and "p2pinfer --help" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("args, expected", [
    (("peer", "--data-dir", "/tmp/somewhere"), "--data-dir is a global option: put it before the command, e.g. "
                                                "`p2pinfer --data-dir DIRECTORY peer ...`"),
    (("status", "--log-level", "debug"), "--log-level is a global option"),
    (("status", "--bogus"), "see `p2pinfer status --help`"),
    (("generate",), "missing argument 'PROMPT' (see `p2pinfer generate --help`)"),
])
def test_usage_errors_are_one_line_with_what_to_do(args, expected, xdg):
    result = run(*args, env_extra=xdg)
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert expected in result.stderr
