"""``p2pinfer demo``: a whole network in one process on 127.0.0.1, an answer, its proofs, and a cheater caught.

1. imports the bundled SmolLM2-135M-Instruct on first use (into DATA_DIR/models), starts a bootstrap node and
   four serving peers (real libp2p hosts on loopback sockets, in this one process);
2. streams a chat answer through the SDK and prints the executor, its re-checked VRF proof, the verifiers'
   signed verdicts and the client's ledger changes;
3. builds a tampered copy of the model (one layer's weights perturbed by 1%, in a temporary folder that is
   deleted afterwards), starts a fifth peer serving it under the honest model's digest, and sends short
   requests until the cheater is caught (rejected as executor or outvoted as verifier), penalized, and
   excluded from the next election.

Everything stops when the command ends: no process is left behind.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

import click
import trio

from ..request.bid_window import GRACE_S
from .common import CREDIT_MEANING, AppContext, credits, plural

PROMPT = "In one sentence, what is a peer-to-peer network?"
TAMPER_LAYER = 1
TAMPER_SCALE = 0.01


def tamper_model(src: Path, dst: Path, *, layer: int = TAMPER_LAYER, scale: float = TAMPER_SCALE, seed: int = 1234) -> int:
    """Copy a model folder and multiply every weight of one decoder layer by ``1 + scale * N(0, 1)``.

    Works on models whose weights live in external data (``model.onnx.data``) or inside ``model.onnx``.
    Returns the number of weights changed.
    """
    import numpy as np
    import onnx
    from onnx import numpy_helper

    shutil.copytree(src, dst)
    graph_path = dst / "model.onnx"
    model = onnx.load(str(graph_path), load_external_data=False)
    rng = np.random.default_rng(seed)
    changed = 0
    marker = f".layers.{layer}."
    for tensor in model.graph.initializer:
        if marker not in tensor.name or tensor.data_type != onnx.TensorProto.FLOAT:
            continue
        external = {e.key: e.value for e in tensor.external_data}
        if external:
            data_path = dst / external["location"]
            offset, length = int(external.get("offset", 0)), int(external["length"])
            with open(data_path, "r+b") as f:
                f.seek(offset)
                values = np.frombuffer(f.read(length), dtype="<f4").copy()
                values *= 1 + scale * rng.standard_normal(values.shape).astype(np.float32)
                f.seek(offset)
                f.write(values.astype("<f4").tobytes())
        else:
            values = numpy_helper.to_array(tensor).copy()
            values *= 1 + scale * rng.standard_normal(values.shape).astype(np.float32)
            tensor.CopyFrom(numpy_helper.from_array(values.astype(np.float32), tensor.name))
        changed += values.size
    if not changed:
        raise click.ClickException(f"no float weights of layer {layer} found in {graph_path}")
    onnx.save(model, str(graph_path))
    return changed


def _short(peer_id: str) -> str:
    return f"…{peer_id[-8:]}"


@click.command("demo")
@click.option("--max-tokens", type=click.IntRange(1, 512), default=48, show_default=True,
              help="Length of the demo answer.")
@click.option("--prompt", default=PROMPT, show_default=True, help="The chat prompt to send.")
@click.option("--max-rounds", type=click.IntRange(1, 200), default=40, show_default=True,
              help="Short requests to send at most until the cheater is caught.")
@click.option("--bid-timeout", type=click.FloatRange(0.5, 600), default=3.0, show_default=True,
              help="Seconds the client waits for bids (raise it on a slow or busy machine).")
@click.option("--bid-grace", type=click.FloatRange(0, 600), default=GRACE_S, show_default=True,
              help="Seconds the client still waits for bids once executor and verifiers have bid "
                   "(at most --bid-timeout; raise both so that every peer's bid counts on a busy machine).")
@click.option("--verbose", is_flag=True, help="Also print the nodes' log lines (stderr).")
@click.pass_obj
def demo_cmd(app: AppContext, max_tokens: int, prompt: str, max_rounds: int, bid_timeout: float,
             bid_grace: float, verbose: bool) -> None:
    """Run a local network of four peers, get a verified answer, then catch a peer serving a tampered model."""
    if bid_grace > bid_timeout:
        raise click.BadParameter(f"{bid_grace} s is longer than --bid-timeout ({bid_timeout} s); "
                                 "give a grace no longer than the bid timeout", param_hint="--bid-grace")
    from .. import log

    if not verbose:
        log.configure(json=app.config.log_json, level="error")
    from ..runtime import ModelStore, load_model
    from .gguf import ensure_default_model_with_progress

    record = ensure_default_model_with_progress(ModelStore(app.config.models_dir), first="first run")
    honest = record.load(providers=["CPUExecutionProvider"])
    with tempfile.TemporaryDirectory(prefix="p2pinfer-demo-") as tmp:
        tampered_dir = Path(tmp) / "tampered"
        changed = tamper_model(record.path, tampered_dir)
        tampered = load_model(tampered_dir, digest=honest.digest, name=honest.name,
                              numeric_class=honest.numeric_class, tolerance=honest.tolerance,
                              providers=["CPUExecutionProvider"])
        ok = trio.run(_demo, honest, tampered, changed, prompt, max_tokens, max_rounds, bid_timeout, bid_grace)
    if not ok:
        raise click.ClickException(f"the cheater was not caught within {plural(max_rounds, 'request')} "
                                   "(try a larger --max-rounds)")


async def _demo(honest, tampered, changed: int, prompt: str, max_tokens: int, max_rounds: int,
                bid_timeout: float, bid_grace: float) -> bool:
    from ..identity import peer_id_from_public_key
    from ..localnet import local_network
    from ..request.client import AsyncClient, Completion, StreamChunk
    from ..wire import now_ms

    echo = click.echo
    echo(f"model: {honest.name} (digest {honest.digest.hex()[:16]}…, {honest.numeric_class})")
    started = time.perf_counter()
    async with local_network([honest], peers=4) as net:
        echo(f"network: 1 bootstrap node + {len(net.peers)} peers on 127.0.0.1 "
             f"(up in {time.perf_counter() - started:.1f} s)")
        for p in net.peers:
            echo(f"  peer {p.peer_id}")
        async with AsyncClient(bootstrap=net.bootstrap_addrs, bid_timeout=bid_timeout, bid_grace=bid_grace) as client:
            echo(f"\n[1] asking the network: {prompt!r}\n")
            completion: Completion | None = None
            async for item in client.stream_with_result(model=honest.name, max_tokens=max_tokens,
                                                        messages=[{"role": "user", "content": prompt}]):
                if isinstance(item, StreamChunk):
                    click.echo(item.text, nl=False)
                else:
                    completion = item
            assert completion is not None
            echo("\n")
            _print_proofs(completion, echo, peer_id_from_public_key)

            echo(f"\n[2] a fifth peer joins, serving a tampered copy of the model ({changed:,} weights of "
                 f"layer {TAMPER_LAYER} scaled by 1 ± {TAMPER_SCALE:.0%}) under the honest digest")
            cheater = await net.add_peer([tampered])
            key = cheater.identity.public_key
            echo(f"  cheater {cheater.peer_id}")
            caught = None
            for n in range(1, max_rounds + 1):
                c = await client.generate(model=honest.name, prompt="The capital of France is", max_tokens=6)
                v = c.verification
                role = ("executor" if c.executor == cheater.peer_id
                        else "verifier" if cheater.peer_id in v.verifiers else "not elected")
                echo(f"  request {n}: executor {_short(c.executor)}, verification {v.outcome} "
                     f"({v.tally.accepts} accept, {v.tally.rejects} reject); cheater: {role}")
                if role != "not elected":
                    caught = (c, role)
                    break
            if caught is None:
                return False
            c, role = caught
            v = c.verification
            if role == "executor":
                echo(f"\n  CAUGHT as executor: a majority rejected its result; the text was never marked "
                     f"verified. Rejections:")
            else:
                echo("\n  CAUGHT as verifier: its verdict went against the majority (outvoted). Verdicts:")
            for verdict in v.verdicts:
                m = verdict.message
                echo(f"    {_short(peer_id_from_public_key(verdict.signer))}: "
                     f"{'accept' if m.accept else 'reject'}"
                     + ("" if m.accept else f" at token {m.first_bad_position}: {m.reason}"))
            echo("  penalty in the client's own ledger (each party keeps its own): "
                 + ", ".join(f"{e.kind} {credits(e.amount, signed=True)}" for e in client.ledger.entries(key)))
            standing = client.ledger.standing(key, now_ms=now_ms())
            rule = ("excluded at once: a quorum this client asked rejected its result" if standing.proven_fraud
                    else "excluded below 0.50")
            echo(f"  cheater's reputation {standing.score:.2f} ({rule})"
                 + ("; fraud proof gossiped to the peers" if v.fraud_proof else ""))
            if role == "executor":
                with trio.move_on_after(10):
                    while not all(p.verification.counters["fraud.proven"] for p in net.peers
                                  if p is not cheater):
                        await trio.sleep(0.05)
                proven = sum(1 for p in net.peers if p is not cheater and p.verification.counters["fraud.proven"])
                honest_peers = len(net.peers) - 1
                echo(f"  {proven} of {plural(honest_peers, 'honest peer')} re-checked the fraud proof with the "
                     f"model: proven")
            after = await client.generate(model=honest.name, prompt="The capital of France is", max_tokens=6)
            excluded = cheater.peer_id in after.election.excluded
            echo(f"\n[3] next request: cheater {'EXCLUDED from the election' if excluded else 'still eligible'}; "
                 f"{plural(len(after.election.ranking), 'eligible bidder')}; executor {_short(after.executor)}, "
                 f"{after.verification.outcome}")
            await net.kill(cheater.peer_id)
            return excluded


def _print_proofs(c, echo, peer_id_from_public_key) -> None:
    from .. import vrf
    from ..election import election_input

    v = c.verification
    echo(f"executor:   {c.executor}  ({plural(len(c.token_ids), 'token')}, {c.timings['total_s']:.1f} s)")
    bid = next(b for b in c.election.bids if peer_id_from_public_key(b.public_key) == c.executor)
    output = vrf.verify(bid.public_key, bid.proof, election_input(c.request_id, c.election.epoch_seed))
    recheck = c.election.recheck()
    echo(f"VRF proof:  {bid.proof.hex()[:32]}… verified (ECVRF edwards25519); output {output.hex()[:16]}… is "
         f"the lowest of {plural(len(c.election.bids), 'bid')}; re-running the election gives "
         f"{'the same executor' if peer_id_from_public_key(recheck.executor) == c.executor else 'ANOTHER executor'}")
    echo(f"verifiers:  {v.outcome.upper()} by {v.tally.accepts} of {plural(len(v.verifiers), 'verifier')} "
         f"(verification took {v.seconds:.2f} s)")
    for verdict in v.verdicts:
        m = verdict.message
        echo(f"  {_short(peer_id_from_public_key(verdict.signer))}: {'accept' if m.accept else 'reject'}, "
             f"max log-prob deviation {m.max_deviation:.2g} nats, signed verdict {verdict.message_id.hex()[:12]}…"
             + ("" if m.accept or not m.reason else f": {m.reason}"))
    echo("ledger:     the client's own ledger (every peer keeps its own, from the receipts it holds): "
         + "; ".join(f"{_short(peer_id_from_public_key(e.peer))} {e.kind} {credits(e.amount, signed=True)}"
                     for e in v.entries))
    echo(f"            ({CREDIT_MEANING})")
    echo(f"receipt:    signed by the client, delivered to the executor and verifiers "
         f"({v.receipt.message_id.hex()[:12]}…)")
