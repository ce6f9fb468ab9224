"""Logging: key=value lines for humans, JSON lines with --log-json; one event per line."""

from __future__ import annotations

import io
import json

from p2pinfer import log


def test_logfmt_lines():
    stream = io.StringIO()
    log.configure(level="debug", stream=stream)
    log.get_logger("p2pinfer.test").info("gossip.rejected", reason="expired", peer="12D3KooW")
    line = stream.getvalue().strip()
    assert "\n" not in line
    assert "level=info" in line and "event=gossip.rejected" in line and "reason=expired" in line
    assert line.startswith("timestamp=")


def test_json_lines_and_level_filter():
    stream = io.StringIO()
    log.configure(json=True, level="info", stream=stream)
    logger = log.get_logger("p2pinfer.test")
    logger.debug("hidden")
    logger.warning("peer.slow", tokens_per_s=3.5)
    lines = stream.getvalue().strip().splitlines()
    assert len(lines) == 1
    record = json.loads(lines[0])
    assert record["event"] == "peer.slow" and record["level"] == "warning" and record["tokens_per_s"] == 3.5


def test_cli_log_json_flag(tmp_path):
    import os
    import subprocess
    import sys

    env = dict(os.environ, XDG_DATA_HOME=str(tmp_path), XDG_CONFIG_HOME=str(tmp_path))
    result = subprocess.run([sys.executable, "-m", "p2pinfer", "--log-json", "keys", "new"], env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0
    record = json.loads(result.stderr.strip().splitlines()[-1])
    assert record["event"] == "keys.created" and record["peer_id"].startswith("12D3KooW")


def test_module_level_loggers_follow_later_configuration():
    logger = log.get_logger("p2pinfer.early")  # created before configure(), as at import time
    stream = io.StringIO()
    log.configure(json=True, level="warning", stream=stream)
    logger.info("too.quiet")
    logger.warning("loud.enough")
    lines = stream.getvalue().strip().splitlines()
    assert [json.loads(line)["event"] for line in lines] == ["loud.enough"]
