"""`p2pinfer peer --gateway` and `p2pinfer status` as real processes, against a live local network."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import openai
import trio

from p2pinfer.cli.status import render_status, table
from p2pinfer.localnet import local_network
from p2pinfer.runtime import load_model

MODEL_NAME = "tiny-llama-trained"


async def p2pinfer(data_dir: Path, *args: str) -> subprocess.CompletedProcess[bytes]:
    env = {**os.environ, "XDG_CONFIG_HOME": str(data_dir.parent / "config")}
    return await trio.run_process([sys.executable, "-m", "p2pinfer", "--data-dir", str(data_dir), *args],
                                  capture_stdout=True, capture_stderr=True, env=env, check=False)


async def test_status_of_a_running_peer_with_its_gateway(shared_models, tmp_path):
    model = load_model(shared_models / MODEL_NAME, name=MODEL_NAME, providers=["CPUExecutionProvider"])
    data_dir = tmp_path / "peer"
    async with local_network([model], peers=1) as net:
        env = {**os.environ, "XDG_CONFIG_HOME": str(tmp_path / "config")}
        proc = subprocess.Popen(
            [sys.executable, "-m", "p2pinfer", "--data-dir", str(data_dir), "peer", "--listen",
             "/ip4/127.0.0.1/tcp/0", "--bootstrap", net.bootstrap_addrs[0], "--model",
             str(shared_models / MODEL_NAME), "--gateway", "127.0.0.1:0", "--gateway-key", "k3y"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
        try:
            status = None
            with trio.fail_after(60):  # start-up: imports, model import and speed measurement
                while True:
                    assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
                    result = await p2pinfer(data_dir, "status", "--json")
                    if result.returncode == 0:
                        status = json.loads(result.stdout)
                        if any(p["models"] for p in status["known_peers"]):
                            break
                    await trio.sleep(0.2)
            url = status["peer"]["urls"]["gateway"]
            assert url.startswith("http://127.0.0.1:") and url.endswith("/v1")

            def one_request() -> str:
                api = openai.OpenAI(base_url=url, api_key="k3y", max_retries=0, timeout=60)
                return api.completions.create(model=MODEL_NAME, prompt="import os", max_tokens=4,
                                              temperature=0).choices[0].text

            text = await trio.to_thread.run_sync(one_request)
            result = await p2pinfer(data_dir, "status")
            assert result.returncode == 0, result.stderr.decode()
            out = result.stdout.decode()
        finally:
            proc.send_signal(signal.SIGTERM)
            stderr = (await trio.to_thread.run_sync(proc.communicate, None, 30))[1].decode()
    assert proc.returncode == 0 and "Traceback" not in stderr, stderr
    assert "event=gateway.started" in stderr and "url=http://127.0.0.1:" in stderr
    assert "page: http://127.0.0.1:" in out  # where to point a browser
    other = net.peers[0].peer_id
    assert f"{other[:8]}…{other[-8:]}" in out  # the known peer, with its model
    assert "Known peers" in out and MODEL_NAME in out
    assert "elections won" in out
    # The peer keeps its ledger in its data dir: the request it served or verified is credited there.
    credits = [line for line in out.splitlines() if line.strip().startswith("credits")]
    assert credits and int(credits[0].split()[-2]) > 0 and credits[0].endswith("credits"), out
    assert "(you)" in out.splitlines()[0]
    assert (data_dir / "ledger.sqlite").exists()
    request_lines = out.split("Recent gateway requests (1)")[1].splitlines()
    # Two peers serve the model (the gateway's own peer bids too): one executes, the other re-checks it.
    assert "completions" in request_lines[3] and " ok " in request_lines[3] and "accepted" in request_lines[3]
    assert text
    # Once the peer has stopped, its control socket is gone and status says so clearly.
    assert not (data_dir / "control.sock").exists()
    result = await p2pinfer(data_dir, "status")
    assert result.returncode == 1 and b"no p2pinfer peer is running" in result.stderr
    assert b"Traceback" not in result.stderr


def test_status_tables_render_empty_and_missing_fields():
    assert table(("a", "bb"), [(1, None)]).splitlines() == ["a  bb", "-  --", "1  -"]
    text = render_status({"peer": {"peer_id": "12D3KooWabc", "credits": None}, "known_peers": [],
                          "recent_requests": [], "recent_tasks": []})
    assert "no other peer has a live announcement yet" in text and "n/a (no ledger)" in text
    assert "12D3KooWabc (you)" in text


async def test_status_and_network_page_of_a_bootstrap_node(tmp_path):
    import httpx

    data_dir = tmp_path / "boot"
    env = {**os.environ, "XDG_CONFIG_HOME": str(tmp_path / "config")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "p2pinfer", "--data-dir", str(data_dir), "bootstrap", "--listen",
         "/ip4/127.0.0.1/tcp/0", "--page", "127.0.0.1:0"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    try:
        with trio.fail_after(60):
            while True:
                assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
                result = await p2pinfer(data_dir, "status", "--json")
                if result.returncode == 0:
                    break
                await trio.sleep(0.2)
        status = json.loads(result.stdout)
        text = (await p2pinfer(data_dir, "status")).stdout.decode()
        page_url = status["peer"]["urls"]["page"]

        def fetch() -> tuple[httpx.Response, httpx.Response, httpx.Response]:
            return (httpx.get(page_url), httpx.get(page_url + "v1/p2pinfer/network"),
                    httpx.post(page_url + "v1/chat/completions", json={}))

        page, network, chat = await trio.to_thread.run_sync(fetch)
    finally:
        proc.send_signal(signal.SIGTERM)
        stderr = (await trio.to_thread.run_sync(proc.communicate, None, 30))[1].decode()
    assert proc.returncode == 0 and "Traceback" not in stderr, stderr
    assert status["peer"]["role"] == "bootstrap"
    assert text.startswith(f"bootstrap node {status['peer']['peer_id']} (you)")
    assert page.status_code == 200 and "p2pinfer network" in page.text
    assert network.status_code == 200 and network.json()["peers"][0]["role"] == "bootstrap"
    assert chat.status_code == 404  # the page's endpoint spends no capacity for whoever reaches it


async def test_gateway_address_errors_are_clear(shared_models, tmp_path):
    with trio.socket.socket() as taken:
        await taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        for gateway, message in ((f"127.0.0.1:{port}", b"Address already in use; choose another --gateway"),
                                 ("localhost:http", b"expected HOST:PORT, e.g. 127.0.0.1:8080")):
            result = await p2pinfer(tmp_path / "peer", "peer", "--listen", "/ip4/127.0.0.1/tcp/0", "--model",
                                    str(shared_models / MODEL_NAME), "--gateway", gateway)
            assert result.returncode == 1 and message in result.stderr, result.stderr[-2000:]
            assert b"Traceback" not in result.stderr
