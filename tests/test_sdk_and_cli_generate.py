"""The synchronous SDK facade and `p2pinfer generate`, against a real local network."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys

import pytest
import trio

from p2pinfer import AsyncClient, Client, NoPeerServesModel
from p2pinfer.localnet import local_network

MODEL_NAME = "tiny-llama-trained"


async def test_sync_client_generate_and_stream_from_plain_and_asyncio_code(model):
    async with local_network([model], peers=2) as net:

        def use_sync_client():
            with Client(bootstrap=net.bootstrap_addrs) as client:
                result = client.generate(model=MODEL_NAME, prompt="import os\nimport sys", max_tokens=8,
                                         temperature=0)
                streamed = list(client.stream(model=MODEL_NAME, prompt="import os\nimport sys", max_tokens=8,
                                              temperature=0))

                async def inside_asyncio():  # an asyncio application calling the sync client
                    return client.generate(model=MODEL_NAME, prompt="import os\nimport sys", max_tokens=8)

                from_asyncio = asyncio.run(inside_asyncio())
                with pytest.raises(NoPeerServesModel):
                    client.generate(model="ab" * 32, prompt="x")
                return result, streamed, from_asyncio

        result, streamed, from_asyncio = await trio.to_thread.run_sync(use_sync_client)
    assert result.text == "".join(c.text for c in streamed) == from_asyncio.text
    assert len(result.token_ids) == 8
    assert result.executor in {p.peer_id for p in net.peers}


async def test_cli_generate_streams_the_answer(model, tmp_path):
    async with local_network([model], peers=2) as net:
        async with AsyncClient(bootstrap=net.bootstrap_addrs) as client:
            expected = (await client.generate(model=MODEL_NAME, prompt="import os\nimport sys", max_tokens=16,
                                              temperature=0)).text
        env = {**os.environ, "XDG_CONFIG_HOME": str(tmp_path), "XDG_DATA_HOME": str(tmp_path)}
        command = [sys.executable, "-m", "p2pinfer", "generate", "--bootstrap", net.bootstrap_addrs[0], "--model",
                   MODEL_NAME, "--max-tokens", "16", "import os\nimport sys"]
        result = await trio.run_process(command, capture_stdout=True, capture_stderr=True, env=env, check=False)
        # Logs turned all the way up and both streams into one pipe, as on a terminal: still one thing a line.
        merged = await trio.run_process([*command[:3], "--log-level", "debug", *command[3:]], capture_stdout=True,
                                        stderr=subprocess.STDOUT, env=env, check=False)
    stdout, stderr = result.stdout.decode(), result.stderr.decode()
    assert result.returncode == 0, stderr
    assert stdout == expected + "\n"  # exactly the answer: no log line, no summary
    assert stdout.startswith("\nimport os\nimport os")
    assert "executor 12D3KooW" in stderr and "16 tokens" in stderr
    assert "verification: accepted (1 verifier)" in stderr  # two peers: the other one re-checks
    assert "timestamp=" not in stderr  # the CLI's client logs warnings only, unless asked
    lines = merged.stdout.decode().splitlines()
    assert merged.returncode == 0 and any(line.startswith("timestamp=") for line in lines)
    assert all(line.startswith("timestamp=") for line in lines if "timestamp=" in line)
    assert "".join(line + "\n" for line in lines if not line.startswith(("timestamp=", "executor ",
                                                                           "verification: "))) == expected + "\n"


async def test_sdk_is_quiet_by_default(model, tmp_path):
    """The README's snippet in an application that configures nothing: a real request through the sync SDK in
    its own process; stdout holds only what the program printed, and no info line reaches stderr."""
    program = (
        "import sys\n"
        "from p2pinfer import Client, log\n"
        "with Client(bootstrap=[sys.argv[1]]) as client:\n"
        "    result = client.generate(model=sys.argv[2], prompt='import os', max_tokens=4, temperature=0)\n"
        "    print(result.text)\n"
        "log.get_logger('app').info('hidden.by.default')\n"
        "log.get_logger('app').warning('shown.on.stderr')\n"
        "log.configure(level='info')\n"
        "log.get_logger('app').info('shown.after.configure')\n"
    )
    env = {**os.environ, "XDG_CONFIG_HOME": str(tmp_path), "XDG_DATA_HOME": str(tmp_path)}
    async with local_network([model], peers=2) as net:
        async with AsyncClient(bootstrap=net.bootstrap_addrs) as client:
            expected = (await client.generate(model=MODEL_NAME, prompt="import os", max_tokens=4, temperature=0)).text
        result = await trio.run_process([sys.executable, "-c", program, net.bootstrap_addrs[0], MODEL_NAME],
                                        capture_stdout=True, capture_stderr=True, env=env, check=False)
    stdout, stderr = result.stdout.decode(), result.stderr.decode()
    assert result.returncode == 0, stderr
    assert stdout == expected + "\n"
    events = [line for line in stderr.splitlines() if "event=" in line]
    assert [line.split("event=")[1].split()[0] for line in events] == ["shown.on.stderr", "shown.after.configure"]


async def test_cli_generate_without_bootstrap_is_a_clear_error(tmp_path):
    env = {**os.environ, "XDG_CONFIG_HOME": str(tmp_path), "XDG_DATA_HOME": str(tmp_path)}
    result = await trio.run_process([sys.executable, "-m", "p2pinfer", "generate", "--model", "x", "hi"],
                                    capture_stdout=True, capture_stderr=True, env=env, check=False)
    assert result.returncode == 1
    assert b"no bootstrap address" in result.stderr and b"Traceback" not in result.stderr


async def test_cli_lists_the_models_on_offer_and_suggests_names(model, tmp_path):
    env = {**os.environ, "XDG_CONFIG_HOME": str(tmp_path), "XDG_DATA_HOME": str(tmp_path)}
    async with local_network([model], peers=2) as net:
        boot = net.bootstrap_addrs[0]
        listed = await trio.run_process([sys.executable, "-m", "p2pinfer", "models", "network", "--bootstrap", boot],
                                        capture_stdout=True, capture_stderr=True, env=env, check=False)
        as_json = await trio.run_process([sys.executable, "-m", "p2pinfer", "models", "network", "--bootstrap", boot,
                                          "--json"], capture_stdout=True, capture_stderr=True, env=env, check=False)
        typo = await trio.run_process([sys.executable, "-m", "p2pinfer", "generate", "--bootstrap", boot, "--model",
                                       "tiny-llama-traned", "hi"], capture_stdout=True, capture_stderr=True, env=env,
                                      check=False)
    assert listed.returncode == 0, listed.stderr.decode()
    row = [line for line in listed.stdout.decode().splitlines() if line.startswith(MODEL_NAME)]
    assert row and model.digest.hex()[:16] in row[0] and " 2 " in row[0] and "4 of 4" in row[0]
    assert json.loads(as_json.stdout) == [{"name": MODEL_NAME, "digest": model.digest.hex(), "peers": 2,
                                           "free_slots": 4, "total_slots": 4}]
    assert typo.returncode == 1 and typo.stdout == b""
    error = typo.stderr.decode()
    assert error.startswith("error: no peer serves model 'tiny-llama-traned' (did you mean 'tiny-llama-trained'?)")
    assert len(error.strip().splitlines()) == 1
