"""Issue 13, attack 7: every temperature the schema accepts verifies on a real network.

Before, ``verify_result`` overflowed (``math.exp(tol/T)``) below T ~ 1.4e-6, so the verifiers answered an
internal error and were booked as silent. Temperatures below ``GREEDY_BELOW`` are now greedy in the sampler
and in the check, and a verifier whose own check fails answers a signed ``internal`` refusal, not silence.
"""

from __future__ import annotations


from p2pinfer.localnet import local_network
from p2pinfer.request.client import AsyncClient

MODEL_NAME = "tiny-llama-trained"


async def test_tiny_temperatures_are_served_and_verified_by_every_verifier(model):
    async with local_network([model], peers=4) as net:
        async with AsyncClient(bootstrap=net.bootstrap_addrs) as client:
            greedy = await client.generate(model=MODEL_NAME, prompt="import os\n", max_tokens=12, temperature=0,
                                           verify="wait")
            for temperature in (5e-324, 1e-300, 1e-7, 9e-4):
                completion = await client.generate(model=MODEL_NAME, prompt="import os\n", max_tokens=12,
                                                   temperature=temperature, verify="wait")
                v = completion.verification
                assert v is not None and v.outcome == "accepted", (temperature, v)
                assert not v.refusals, (temperature, v.refusals)  # every verifier judged: no internal errors
                assert completion.token_ids == greedy.token_ids
