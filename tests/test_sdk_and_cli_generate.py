"""The synchronous SDK facade and `p2pinfer generate`, against a real local network."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys

import pytest
import trio

from p2pinfer import Client, NoPeerServesModel
from p2pinfer.localnet import local_network
from p2pinfer.runtime import load_model

MODEL_NAME = "tiny-llama-trained"


@pytest.fixture(scope="module")
def model(shared_models):
    return load_model(shared_models / MODEL_NAME, name=MODEL_NAME, providers=["CPUExecutionProvider"])


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
        env = {**os.environ, "XDG_CONFIG_HOME": str(tmp_path), "XDG_DATA_HOME": str(tmp_path)}
        result = await trio.run_process(
            [sys.executable, "-m", "p2pinfer", "generate", "--bootstrap", net.bootstrap_addrs[0], "--model",
             MODEL_NAME, "--max-tokens", "16", "import os\nimport sys"],
            capture_stdout=True, capture_stderr=True, env=env, check=False)
    stdout, stderr = result.stdout.decode(), result.stderr.decode()
    assert result.returncode == 0, stderr
    assert stdout.startswith("\nimport os\nimport os")
    assert "executor 12D3KooW" in stderr and "16 tokens" in stderr
    assert "verification: accepted (1 verifiers)" in stderr  # two peers: the other one re-checks


async def test_cli_generate_without_bootstrap_is_a_clear_error(tmp_path):
    env = {**os.environ, "XDG_CONFIG_HOME": str(tmp_path), "XDG_DATA_HOME": str(tmp_path)}
    result = await trio.run_process([sys.executable, "-m", "p2pinfer", "generate", "--model", "x", "hi"],
                                    capture_stdout=True, capture_stderr=True, env=env, check=False)
    assert result.returncode == 1
    assert b"no bootstrap address" in result.stderr and b"Traceback" not in result.stderr
