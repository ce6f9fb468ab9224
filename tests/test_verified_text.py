"""Issue 13, attack 1: the text a user sees is decoded from the verified token IDs, never the executor's text.

The attacker is a real serving peer with its own key that runs modified software: it generates honestly
(so verification accepts its tokens) but puts fake text in every ``TokenChunk`` it signs. The client shows
the true text anyway, streamed and complete. The client does not hold the model: it fetches the tokenizer by
digest over ``/p2pinfer/tokenizer/1``, checks it against the digest, and caches it on disk; a peer that sends
a tokenizer not matching the digest is passed over.
"""

from __future__ import annotations

import hashlib

import pytest
import trio

from p2pinfer.localnet import local_network
from p2pinfer.request.client import AsyncClient, StreamChunk
from p2pinfer.request.evidence import chain_start, decode_bid_set, extend_chain
from p2pinfer.request.protocol import MAX_TASK_FRAME, TASK_PROTOCOL
from p2pinfer.request.text import TokenizerCache, TokenizerUnavailable
from p2pinfer.request.tokenizer_service import MAX_REPLY_FRAME, TOKENIZER_PROTOCOL
from p2pinfer.runtime import SamplingParams, generate, sampling_seed
from p2pinfer.wire import Assignment, InferenceResult, TokenChunk, decode_signed, encode_signed
from p2pinfer.wire.messages import FileChunk, ModelFile, TokenizerManifest, TokenizerQuery

MODEL_NAME = "tiny-llama-trained"
FAKE = "[PAY 0.1 BTC TO 1Fake]"


def install_fake_text_executor(peer, model) -> None:
    """The attacker's own task handler: honest tokens and result, fake text in every chunk it signs."""
    identity = peer.identity

    async def evil(frames) -> None:
        assignment: Assignment = decode_signed(await frames.receive(timeout=10), expect=Assignment,
                                               max_size=MAX_TASK_FRAME).message
        request = assignment.request
        request_id = request.request_id()
        prompt_ids = model.prompt_ids(prompt=request.prompt)
        result = await trio.to_thread.run_sync(lambda: generate(
            model, prompt_ids, max_tokens=request.max_tokens,
            params=SamplingParams(request.temperature, request.top_k, request.top_p),
            seed_material=sampling_seed(request_id, request.seed), stop=request.stop))
        # Everything else follows the protocol to the letter: the signed acceptance, the token chain, and a
        # result that names the election it won; only the text is a lie.
        election_id = decode_bid_set(assignment.bid_set).message_id if assignment.bid_set else b""
        chain = chain_start(request_id)
        await frames.send(encode_signed(identity, TokenChunk(request_id=request_id, index=0, token_ids=(), text="",
                                                             chain=chain)))
        for i in range(0, len(result.output_ids), 4):
            token_ids = tuple(result.output_ids[i:i + 4])
            chain = extend_chain(chain, token_ids)
            await frames.send(encode_signed(identity, TokenChunk(
                request_id=request_id, index=i, token_ids=token_ids, text=FAKE, chain=chain)))
        await frames.send(encode_signed(identity, InferenceResult(
            request_id=request_id, model=model.digest, numeric_class=model.numeric_class,
            executor=identity.public_key, prompt_ids=tuple(result.prompt_ids), output_ids=tuple(result.output_ids),
            finish_reason=result.finish_reason, fingerprint_format=result.fingerprint_format,
            fingerprint=result.fingerprint_bytes, commitment=result.commitment, started_at_ms=1, finished_at_ms=2,
            inherited_tokens=0, election=election_id, attempt=assignment.attempt)))

    peer.node.register_handler(TASK_PROTOCOL, evil, max_frame=MAX_TASK_FRAME)


async def test_fake_executor_text_is_never_shown(model, tmp_path):
    async with local_network([model], peers=3) as net:
        attacker = net.peers[0]
        install_fake_text_executor(attacker, model)
        async with AsyncClient(bootstrap=net.bootstrap_addrs, tokenizer_cache=tmp_path / "tok") as client:
            runs = 0
            while True:  # until the election picks the attacker (each peer wins about 1 in 3)
                runs += 1
                assert runs <= 40, "the attacker never won an election"
                chunks, completion = [], None
                async for item in client.stream_with_result(model=MODEL_NAME, prompt="import os\n", max_tokens=24,
                                                            temperature=0.8, verify="wait"):
                    if isinstance(item, StreamChunk):
                        chunks.append(item)
                    else:
                        completion = item
                assert completion is not None and completion.verified
                assert completion.text == model.decode(list(completion.token_ids))
                assert "".join(c.text for c in chunks) == completion.text
                assert FAKE not in completion.text
                if completion.executor == attacker.peer_id:
                    break
            fetched = client.tokenizers.fetched_bytes
    assert (tmp_path / "tok" / model.digest.hex() / "tokenizer.json").read_bytes() == \
        (model.path / "tokenizer.json").read_bytes()
    assert fetched > (model.path / "tokenizer.json").stat().st_size  # fetched once, from a peer
    # A later client process finds it on disk and fetches nothing.
    async with local_network([model], peers=2) as net:
        async with AsyncClient(bootstrap=net.bootstrap_addrs, tokenizer_cache=tmp_path / "tok") as client:
            completion = await client.generate(model=MODEL_NAME, prompt="import os\n", max_tokens=8)
            assert completion.text == model.decode(list(completion.token_ids))
            assert client.tokenizers.fetched_bytes == 0


async def test_a_tokenizer_that_does_not_match_the_digest_is_refused(model, tmp_path):
    """Peers that lie about the manifest or the bytes are passed over; the honest peer's tokenizer is used."""
    async with local_network([model], peers=3) as net:
        honest = net.peers[0].node.peer_id
        liars = net.peers[1:]

        def lying_handler(identity, mode):
            real = (model.path / "tokenizer.json").read_bytes()
            fake = real.replace(b'"import"', b'"IMPORT"') if b'"import"' in real else real + b" "
            entries = [ModelFile(p, (model.path / p).stat().st_size, hashlib.sha256((model.path / p).read_bytes()).digest())
                       for p in ("model.onnx", "tokenizer.json", "config.json", "generation_config.json")]

            async def handler(peer_id, body):
                query = decode_signed(body, expect=TokenizerQuery).message
                if not query.path:
                    shown = entries if mode == "bytes" else [
                        ModelFile(e.path, len(fake), hashlib.sha256(fake).digest()) if e.path == "tokenizer.json"
                        else e for e in entries]
                    return encode_signed(identity, TokenizerManifest(model=query.model, entries=tuple(shown)))
                data = fake if query.path == "tokenizer.json" else (model.path / query.path).read_bytes()
                return encode_signed(identity, FileChunk(model=query.model, path=query.path, offset=query.offset,
                                                         data=data[query.offset:query.offset + 500_000]))
            return handler

        for peer, mode in zip(liars, ("manifest", "bytes")):
            peer.node.register_request_handler(TOKENIZER_PROTOCOL, lying_handler(peer.identity, mode),
                                               max_frame=MAX_REPLY_FRAME)
        async with AsyncClient(bootstrap=net.bootstrap_addrs) as client:
            liar_ids = [p.node.peer_id for p in liars]
            cache = TokenizerCache(tmp_path / "a")
            with pytest.raises(TokenizerUnavailable, match="do not hash to the model digest.*SHA-256|SHA-256.*do not hash"):
                await cache.get(client.node, client.identity, model.digest, liar_ids)
            assert not (tmp_path / "a" / model.digest.hex()).exists()
            got = await cache.get(client.node, client.identity, model.digest, [*liar_ids, honest])
            assert got.tokenizer.to_str() == model.tokenizer.to_str()
