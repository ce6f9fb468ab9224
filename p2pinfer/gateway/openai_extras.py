"""OpenAI parameters beyond the basics: ``n``, ``logprobs`` / ``top_logprobs``, and usage of returned tokens.

Pure functions, no I/O.

* **Log-probs come from the executor's logit fingerprint** (``topk8-q16/1``: for every output position the 8
  most likely token IDs and their log-probs, of the model's distribution before temperature and top-k/top-p,
  to 2**-16 nats). Verifiers recompute exactly these numbers, so once a majority of them accepted the result
  the log-probs are verified; the gateway returns them only then (otherwise ``logprobs`` is null and
  ``p2pinfer.logprobs`` says why). At most 8 alternatives exist per position (``top_logprobs`` ≤ 8). A
  sampled token outside the top 8 gets ``-9999.0``, OpenAI's own marker for "very unlikely".
* **Returned tokens.** The output ends with the EOS token when one ended generation, and a stop string ends
  generation after the token that completes it, with the text cut before it. Usage and log-probs count only
  the tokens whose text is returned: no EOS, nothing from the token where the stop string starts.
* **n choices** are ``n`` independent requests (each elected, executed and verified on its own); with a
  ``seed``, choice ``i`` uses ``seed + i``, so each is reproducible and they differ.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

from .openai_api import bad_request

MAX_CHOICES = 4           # n: each choice is a whole network request
MAX_TOP_LOGPROBS = 8      # what the fingerprint holds per position
UNLIKELY_LOGPROB = -9999.0  # OpenAI's value for a token outside the listed top log-probs


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def parse_choices(body: Mapping[str, Any]) -> int:
    n = body.get("n")
    if n is None:
        return 1
    if not _is_int(n) or not 1 <= n <= MAX_CHOICES:
        raise bad_request(f"'n' must be an integer from 1 to {MAX_CHOICES} (each choice is its own network "
                          f"request), got {n!r}", "n")
    return n


def parse_logprobs(endpoint: str, body: Mapping[str, Any]) -> tuple[bool, int]:
    """(log-probs wanted, how many alternatives per token) for chat or completions."""
    if endpoint == "chat":
        wanted = body.get("logprobs")
        if wanted is not None and not isinstance(wanted, bool):
            raise bad_request("'logprobs' must be true or false", "logprobs")
        top = body.get("top_logprobs")
        if top is None:
            return bool(wanted), 0
        if not _is_int(top) or not 0 <= top <= MAX_TOP_LOGPROBS:
            raise bad_request(f"'top_logprobs' must be an integer from 0 to {MAX_TOP_LOGPROBS} (the verified "
                              f"fingerprint holds the top {MAX_TOP_LOGPROBS} tokens per position), got {top!r}",
                              "top_logprobs")
        if not wanted:
            raise bad_request("'top_logprobs' needs 'logprobs': true", "top_logprobs")
        return True, top
    top = body.get("logprobs")
    if top is None or top is False:
        return False, 0
    if not _is_int(top) or not 0 <= top <= MAX_TOP_LOGPROBS:
        raise bad_request(f"'logprobs' must be an integer from 0 to {MAX_TOP_LOGPROBS} (the verified fingerprint "
                          f"holds the top {MAX_TOP_LOGPROBS} tokens per position), got {top!r}", "logprobs")
    return True, top


def choice_seed(seed: int | None, index: int) -> int | None:
    return None if seed is None else (seed + index) % 2**64


def returned_token_count(token_ids: Sequence[int], text: str, finish_reason: str, eos_ids: Sequence[int],
                         decode: Callable[[Sequence[int]], str] | None) -> int:
    """How many leading output tokens the returned ``text`` is made of (see the module docstring).

    ``decode`` (the model's tokenizer) is needed only when a stop string ended generation; without it every
    token up to the stop is counted.
    """
    n = len(token_ids)
    if finish_reason == "eos" and n and token_ids[-1] in eos_ids:
        return n - 1
    if finish_reason != "stop" or decode is None:
        return n
    if not text:
        return 0
    # The smallest m whose decoded prefix covers the returned text: the tokens after it only formed the stop
    # string. Decoded length grows with m, so a binary search finds it with log2(n) decodes.
    lo, hi = 1, n
    while lo < hi:
        mid = (lo + hi) // 2
        if len(decode(token_ids[:mid])) >= len(text):
            hi = mid
        else:
            lo = mid + 1
    return lo


def _entry(token_text: str, logprob: float) -> dict[str, Any]:
    return {"token": token_text, "logprob": logprob, "bytes": list(token_text.encode("utf-8"))}


def token_logprobs(ids: Any, logprobs: Any, token_ids: Sequence[int], count: int, top: int,
                   token_text: Callable[[int], str]) -> list[dict[str, Any]]:
    """OpenAI's chat ``logprobs.content`` for the first ``count`` output tokens.

    ``ids`` and ``logprobs`` are the fingerprint's ``[n, 8]`` arrays (row ``i``: the distribution output token
    ``i`` was drawn from).
    """
    out = []
    for i in range(count):
        row_ids = [int(t) for t in ids[i]]
        row_lp = [float(x) for x in logprobs[i]]
        chosen = token_ids[i]
        logprob = row_lp[row_ids.index(chosen)] if chosen in row_ids else UNLIKELY_LOGPROB
        entry = _entry(token_text(chosen), logprob)
        entry["top_logprobs"] = [_entry(token_text(t), lp) for t, lp in zip(row_ids[:top], row_lp[:top])]
        out.append(entry)
    return out


def chat_logprobs(content: list[dict[str, Any]]) -> dict[str, Any]:
    return {"content": content, "refusal": None}


def completion_logprobs(content: list[dict[str, Any]], top: int) -> dict[str, Any]:
    """The legacy completions shape: parallel lists, ``top_logprobs`` as one {token: logprob} dict a token."""
    offsets, at = [], 0
    for entry in content:
        offsets.append(at)
        at += len(entry["token"])
    return {
        "tokens": [e["token"] for e in content],
        "token_logprobs": [e["logprob"] for e in content],
        "top_logprobs": [{t["token"]: t["logprob"] for t in e["top_logprobs"]} for e in content] if top else None,
        "text_offset": offsets,
    }
