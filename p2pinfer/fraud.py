"""Checking signed results and fraud proofs.

A *fraud proof* is a :class:`~p2pinfer.wire.FraudProof`: the request, the executor's signed
``InferenceResult`` envelope and the signed ``Verdict`` envelopes that rejected it. Signatures prove who
said what, not who is right: colluding verifiers can sign false rejections of an honest result. So:

* :func:`check_proof_shape` (cheap, no model) checks everything signatures and hashes can: the result is
  signed by the executor it names and answers this request, every verdict is signed, names this result and
  rejects it, one per verifier, and the inherited token count is the one the executor signed in its result. Gossip forwards only proofs that pass it.
* :func:`recheck_result` (one prefill, blocking: run it in a worker thread) re-runs the verification with the
  model. Only that decides: if the result fails, the fraud is *proven* and the executor is blamed (unless
  the first bad position lies in tokens inherited from an earlier executor); if it passes, the proof is
  *disproven* and its rejecting verifiers are the ones penalized (framing).

A peer that does not hold the model records an unchecked proof and does not act on it.
"""

from __future__ import annotations

from dataclasses import dataclass

from .runtime import FingerprintVerdict, LoadedModel, SamplingParams, sampling_seed, verify_result
from .wire import FraudProof, InferenceResult, Request, Signed, Verdict, WireError, decode_signed
from .wire.messages import MAX_SIGNED_RESULT_BYTES, MAX_VERDICT_BYTES


class InvalidProof(ValueError):
    """A fraud proof (or verify task) whose signed parts do not fit together."""


@dataclass(frozen=True)
class ProofParts:
    request: Request
    result: Signed[InferenceResult]
    verdicts: tuple[Signed[Verdict], ...]
    inherited_tokens: int

    @property
    def result_hash(self) -> bytes:
        return self.result.message_id

    @property
    def executor(self) -> bytes:
        return self.result.signer

    @property
    def rejecting_verifiers(self) -> tuple[bytes, ...]:
        return tuple(v.signer for v in self.verdicts)


def decode_result(request: Request, result_bytes: bytes) -> Signed[InferenceResult]:
    """The signed result, checked against the request it claims to answer (no model needed)."""
    try:
        result = decode_signed(result_bytes, expect=InferenceResult, max_size=MAX_SIGNED_RESULT_BYTES)
    except WireError as exc:
        raise InvalidProof(f"the result is not a valid signed InferenceResult: {exc}") from None
    r = result.message
    if result.signer != r.executor:
        raise InvalidProof("the result is not signed by the executor it names")
    if r.request_id != request.request_id():
        raise InvalidProof("the result answers another request")
    if r.model != request.model:
        raise InvalidProof("the result names another model than the request")
    return result


def check_proof_shape(proof: FraudProof) -> ProofParts:
    """Everything about a fraud proof that signatures and hashes can show; raises :class:`InvalidProof`."""
    result = decode_result(proof.request, proof.result)
    verdicts: list[Signed[Verdict]] = []
    seen: set[bytes] = set()
    for data in proof.verdicts:
        try:
            verdict = decode_signed(data, expect=Verdict, max_size=MAX_VERDICT_BYTES)
        except WireError as exc:
            raise InvalidProof(f"a verdict is not a valid signed Verdict: {exc}") from None
        v = verdict.message
        if v.request_id != result.message.request_id or v.result_hash != result.message_id:
            raise InvalidProof("a verdict is about another request or result")
        if v.accept:
            raise InvalidProof("a fraud proof may carry only rejecting verdicts")
        if verdict.signer in seen:
            raise InvalidProof("two verdicts from the same verifier")
        if verdict.signer == result.signer:
            raise InvalidProof("the executor cannot verify its own result")
        seen.add(verdict.signer)
        verdicts.append(verdict)
    if proof.inherited_tokens != result.message.inherited_tokens:
        # blame rests on the executor's own signed count: a proof that states another one is a framing attempt
        raise InvalidProof("the proof's inherited_tokens differ from what the executor signed in its result")
    return ProofParts(proof.request, result, tuple(verdicts), proof.inherited_tokens)


def recheck_result(model: LoadedModel, request: Request, result: Signed[InferenceResult]) -> FingerprintVerdict:
    """Re-verify a signed result with ``model`` (one prefill; blocking). The verifiers' and re-checkers' rule.

    Besides the fingerprints this checks what the executor cannot choose: the model and numeric class, and
    that ``prompt_ids`` are exactly the request's prompt rendered by this model's tokenizer/chat template.
    """
    r = result.message
    if r.model != model.digest:
        return FingerprintVerdict(False, None, "the result names another model than the one checked against")
    if r.numeric_class != model.numeric_class:
        return FingerprintVerdict(False, None, f"numeric class {r.numeric_class!r} differs from ours "
                                               f"({model.numeric_class!r}); this verifier cannot judge it")
    try:
        expected_prompt = model.prompt_ids(
            prompt=request.prompt,
            messages=None if request.messages is None else [{"role": m.role, "content": m.content}
                                                             for m in request.messages])
    except ValueError as exc:
        return FingerprintVerdict(False, None, f"the request cannot be rendered: {exc}")
    if list(r.prompt_ids) != list(expected_prompt):
        return FingerprintVerdict(False, None, "prompt_ids are not the request's prompt")
    return verify_result(
        model, prompt_ids=r.prompt_ids, output_ids=r.output_ids, fingerprint=r.fingerprint,
        params=SamplingParams(temperature=request.temperature, top_k=request.top_k, top_p=request.top_p),
        seed_material=sampling_seed(r.request_id, request.seed), max_tokens=request.max_tokens,
        finish_reason=r.finish_reason, stop=request.stop, commitment=r.commitment,
        fingerprint_format=r.fingerprint_format)
