"""``p2pinfer generate``: ask the network for a completion and stream it to the terminal."""

from __future__ import annotations

import os
import sys
from typing import TextIO

import click
import trio

from .. import log
from .common import AppContext, plural
from .net import PEERS_FILE, check_bootstrap, read_peers_file


@click.command("generate")
@click.argument("prompt")
@click.option("--bootstrap", "bootstrap", multiple=True, metavar="MULTIADDR",
              help="Bootstrap node or peer to join through (repeatable); also read from the config.")
@click.option("--model", required=True, help="Model name or digest (see the peers' announcements).")
@click.option("--chat", is_flag=True, help="Send PROMPT as a user chat message (the model's chat template).")
@click.option("--max-tokens", type=click.IntRange(1, 4096), default=128, show_default=True)
@click.option("--temperature", type=float, default=0.0, show_default=True, help="0 is greedy decoding.")
@click.option("--top-p", type=float, default=1.0, show_default=True)
@click.option("--top-k", type=int, default=0, show_default=True, help="0 disables top-k.")
@click.option("--stop", multiple=True, help="Stop string (repeatable).")
@click.option("--seed", type=int, default=None, help="Sampling seed, for reproducible sampled output.")
@click.pass_obj
def generate_cmd(app: AppContext, prompt: str, bootstrap: tuple[str, ...], model: str, chat: bool,
                 max_tokens: int, temperature: float, top_p: float, top_k: int, stop: tuple[str, ...],
                 seed: int | None) -> None:
    """Generate text for PROMPT on the network; the answer streams to stdout, alone; the executor, timings and
    verification go to stderr. Only warnings are logged unless the global --log-level asks for more."""
    from ..errors import P2PInferError
    from ..request.client import AsyncClient, Completion, StreamChunk

    peers = check_bootstrap([*bootstrap, *app.config.bootstrap, *read_peers_file(PEERS_FILE)])
    if not peers:
        raise P2PInferError("no bootstrap address: pass --bootstrap MULTIADDR (printed by `p2pinfer bootstrap`)")
    content = {"messages": [{"role": "user", "content": prompt}]} if chat else {"prompt": prompt}
    answer = _Answer(sys.stdout)
    parent = click.get_current_context().find_root().params
    # The answer is what the user asked for: the network's chatter stays out of it unless --log-level asks.
    log.configure(json=app.config.log_json if parent.get("log_json") is None else parent["log_json"],
                  level=parent.get("log_level") or "warning", stream=_LogStream(answer))

    async def run() -> Completion:
        async with AsyncClient(bootstrap=peers) as client:
            completion = None
            async for item in client.stream_with_result(model=model, max_tokens=max_tokens,
                                                        temperature=temperature, top_p=top_p, top_k=top_k,
                                                        stop=list(stop), seed=seed, **content):
                if isinstance(item, StreamChunk):
                    answer.write(item.text)
                else:
                    completion = item
            assert completion is not None
            return completion

    completion = trio.run(run)
    answer.write("\n")
    answer.flush()
    t = completion.timings
    click.echo(f"executor {completion.executor} (ranked first of {plural(len(completion.election.ranking), 'bidder')}); "
               f"{plural(len(completion.token_ids), 'token')}, finish={completion.finish_reason}; election "
               f"{t['election_s'] * 1000:.0f} ms, first token {t['first_token_s'] * 1000:.0f} ms, "
               f"total {t['total_s']:.2f} s", err=True)
    verification = completion.verification
    if verification is not None:
        count = len(verification.verifiers)
        click.echo(f"verification: {verification.outcome}" + (
            f" ({count} verifier{'' if count == 1 else 's'})" if count else
            " (no other peer serves the model to re-check it)"), err=True)
    if len(completion.attempts) > 1:
        click.echo("failover: " + ", ".join(f"{a.peer_id[-8:]}={a.outcome}" for a in completion.attempts), err=True)


class _Answer:
    """The answer on stdout; remembers whether its last line is still open (no newline yet)."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.mid_line = False

    def write(self, text: str) -> None:
        if text:
            self.out.write(text)
            self.out.flush()
            self.mid_line = not text.endswith("\n")

    def flush(self) -> None:
        self.out.flush()


class _LogStream:
    """stderr for log lines. When stdout and stderr end up in the same place (a terminal, or ``2>&1``), a log
    line arriving in the middle of an answer line first ends that line on stderr, so the two never share
    one line; the answer on stdout itself is never changed."""

    def __init__(self, answer: _Answer) -> None:
        self.answer = answer

    def write(self, text: str) -> None:
        if self.answer.mid_line and _same_destination(self.answer.out, sys.stderr):
            sys.stderr.write("\n")
            self.answer.mid_line = False
        sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


def _same_destination(a: TextIO, b: TextIO) -> bool:
    try:
        sa, sb = os.fstat(a.fileno()), os.fstat(b.fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)
