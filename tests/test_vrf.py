"""ECVRF-EDWARDS25519-SHA512-TAI: RFC 9381 vectors, properties, and the validation rules of sections 5.3-5.4."""

from __future__ import annotations

import hashlib
import os

import nacl.bindings as sodium
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from p2pinfer import vrf
from p2pinfer.vrf import GROUP_ORDER, IDENTITY, VRFError

P = 2**255 - 19
D = (-121665 * pow(121666, -1, P)) % P
SQRT_M1 = pow(2, (P - 1) // 4, P)

# RFC 9381 Appendix B.3, examples 16, 17 and 18: (SK, PK, alpha, pi, beta).
RFC9381_B3 = [
    (
        "9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60",
        "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a",
        "",
        "8657106690b5526245a92b003bb079ccd1a92130477671f6fc01ad16f26f723f"
        "26f8a57ccaed74ee1b190bed1f479d97"
        "27d2d0f9b005a6e456a35d4fb0daab1268a1b0db10836d9826a528ca76567805",
        "90cf1df3b703cce59e2a35b925d411164068269d7b2d29f3301c03dd757876ff"
        "66b71dda49d2de59d03450451af026798e8f81cd2e333de5cdf4f3e140fdd8ae",
    ),
    (
        "4ccd089b28ff96da9db6c346ec114e0f5b8a319f35aba624da8cf6ed4fb8a6fb",
        "3d4017c3e843895a92b70aa74d1b7ebc9c982ccf2ec4968cc0cd55f12af4660c",
        "72",
        "f3141cd382dc42909d19ec5110469e4feae18300e94f304590abdced48aed593"
        "3bf0864a62558b3ed7f2fea45c92a465"
        "301b3bbf5e3e54ddf2d935be3b67926da3ef39226bbc355bdc9850112c8f4b02",
        "eb4440665d3891d668e7e0fcaf587f1b4bd7fbfe99d0eb2211ccec90496310eb"
        "5e33821bc613efb94db5e5b54c70a848a0bef4553a41befc57663b56373a5031",
    ),
    (
        "c5aa8df43f9f837bedb7442f31dcb7b166d38535076f094b85ce3a2e0b4458f7",
        "fc51cd8e6218a1a38da47ed00230f0580816ed13ba3303ac5deb911548908025",
        "af82",
        "9bc0f79119cc5604bf02d23b4caede71393cedfbb191434dd016d30177ccbf80"
        "96bb474e53895c362d8628ee9f9ea3c0"
        "e52c7a5c691b6c18c9979866568add7a2d41b00b05081ed0f58ee5e31b3a970e",
        "645427e5d00c62a23fb703732fa5d892940935942101e456ecca7bb217c61c45"
        "2118fec1219202a0edcf038bb6373241578be7217ba85a2687f7a0310b2df19f",
    ),
]

seeds = st.binary(min_size=32, max_size=32)
alphas = st.binary(max_size=64)
FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _rfc8032_decodes(encoded: bytes) -> bool:
    """Reference: RFC 8032 section 5.1.3 point decoding, with plain integers."""
    y = int.from_bytes(encoded, "little") & ((1 << 255) - 1)
    sign = encoded[31] >> 7
    if y >= P:
        return False
    x2 = (y * y - 1) * pow(D * y * y + 1, -1, P) % P
    if x2 == 0:
        return sign == 0
    x = pow(x2, (P + 3) // 8, P)
    if (x * x - x2) % P:
        x = x * SQRT_M1 % P
    return (x * x - x2) % P == 0


def _encode_y(y: int, sign: int) -> bytes:
    return (y | (sign << 255)).to_bytes(32, "little")


def _torsion_points() -> list[bytes]:
    """The 8 points of order dividing 8, as k*T8 for a point T8 of order 8."""
    ctr = 0
    while True:  # a random curve point has a component of order 8 with probability 1/2
        candidate = hashlib.sha512(b"torsion" + bytes([ctr])).digest()[:32]
        ctr += 1
        if not _rfc8032_decodes(candidate):
            continue
        cleared = vrf._times_cofactor(candidate)
        prime_part = sodium.crypto_scalarmult_ed25519_noclamp(vrf._INV8, cleared)
        t = sodium.crypto_core_ed25519_sub(candidate, prime_part)
        if vrf._double(vrf._double(t)) != IDENTITY:
            break
    points = [IDENTITY]
    for _ in range(7):
        points.append(sodium.crypto_core_ed25519_add(points[-1], t))
    assert sodium.crypto_core_ed25519_add(points[-1], t) == IDENTITY
    return points


TORSION = _torsion_points()


# ---- RFC vectors --------------------------------------------------------------------------------------


@pytest.mark.parametrize("sk, pk, alpha, pi, beta", RFC9381_B3, ids=["example16", "example17", "example18"])
def test_rfc9381_appendix_b3(sk: str, pk: str, alpha: str, pi: str, beta: str) -> None:
    sk_b, pk_b, alpha_b, pi_b, beta_b = map(bytes.fromhex, (sk, pk, alpha, pi, beta))
    assert vrf.public_key(sk_b) == pk_b
    assert vrf.prove(sk_b, alpha_b) == pi_b
    assert vrf.proof_to_hash(pi_b) == beta_b
    assert vrf.verify(pk_b, pi_b, alpha_b) == beta_b


def test_public_key_is_the_ed25519_public_key() -> None:
    seed = os.urandom(32)
    pk, _ = sodium.crypto_sign_seed_keypair(seed)
    assert vrf.public_key(seed) == pk


# ---- properties ---------------------------------------------------------------------------------------


@FAST
@given(seed=seeds, alpha=alphas)
def test_verify_accepts_what_prove_makes(seed: bytes, alpha: bytes) -> None:
    pi = vrf.prove(seed, alpha)
    assert len(pi) == vrf.PROOF_SIZE
    beta = vrf.verify(vrf.public_key(seed), pi, alpha)
    assert beta == vrf.proof_to_hash(pi)
    assert len(beta) == vrf.OUTPUT_SIZE
    assert vrf.prove(seed, alpha) == pi  # deterministic


@FAST
@given(seed=seeds, alpha=alphas, data=st.data())
def test_any_flipped_proof_bit_fails(seed: bytes, alpha: bytes, data: st.DataObject) -> None:
    pi = bytearray(vrf.prove(seed, alpha))
    bit = data.draw(st.integers(0, 8 * len(pi) - 1))
    pi[bit // 8] ^= 1 << (bit % 8)
    with pytest.raises(VRFError):
        vrf.verify(vrf.public_key(seed), bytes(pi), alpha)


@FAST
@given(seed=seeds, alpha=alphas, data=st.data())
def test_any_flipped_key_bit_fails(seed: bytes, alpha: bytes, data: st.DataObject) -> None:
    pk = bytearray(vrf.public_key(seed))
    bit = data.draw(st.integers(0, 255))
    pk[bit // 8] ^= 1 << (bit % 8)
    with pytest.raises(VRFError):
        vrf.verify(bytes(pk), vrf.prove(seed, alpha), alpha)


@FAST
@given(seed=seeds, alpha=st.binary(min_size=1, max_size=64), data=st.data())
def test_any_flipped_input_bit_fails(seed: bytes, alpha: bytes, data: st.DataObject) -> None:
    pi = vrf.prove(seed, alpha)
    bit = data.draw(st.integers(0, 8 * len(alpha) - 1))
    other = bytearray(alpha)
    other[bit // 8] ^= 1 << (bit % 8)
    with pytest.raises(VRFError):
        vrf.verify(vrf.public_key(seed), pi, bytes(other))
    with pytest.raises(VRFError):  # length changes too
        vrf.verify(vrf.public_key(seed), pi, alpha + b"\x00")


@FAST
@given(seed1=seeds, seed2=seeds, alpha=alphas)
def test_proof_for_another_key_fails(seed1: bytes, seed2: bytes, alpha: bytes) -> None:
    if seed1 == seed2:
        return
    with pytest.raises(VRFError, match="proof-invalid"):
        vrf.verify(vrf.public_key(seed2), vrf.prove(seed1, alpha), alpha)


@settings(max_examples=300, deadline=None)
@given(encoded=st.binary(min_size=32, max_size=32))
def test_point_decoding_matches_rfc8032(encoded: bytes) -> None:
    assert vrf._string_to_point_ok(encoded) == _rfc8032_decodes(encoded)


def test_point_decoding_edge_cases_match_rfc8032() -> None:
    edge = [_encode_y(y, sign) for sign in (0, 1) for y in [0, 1, 2, P - 2, P - 1, *range(P, 2**255)]]
    for encoded in edge + TORSION:
        assert vrf._string_to_point_ok(encoded) == _rfc8032_decodes(encoded), encoded.hex()
    assert not vrf._string_to_point_ok(_encode_y(1, 1))  # "negative zero" x
    assert not vrf._string_to_point_ok(_encode_y(P + 1, 0))  # non-canonical identity


# ---- key and proof validation -------------------------------------------------------------------------


def test_small_order_public_keys_rejected() -> None:
    seed, alpha = os.urandom(32), b"input"
    pi = vrf.prove(seed, alpha)
    for point in TORSION:
        with pytest.raises(VRFError, match="public-key"):
            vrf.verify(point, pi, alpha)


def test_non_canonical_public_keys_rejected() -> None:
    pi = vrf.prove(os.urandom(32), b"")
    for y in range(P, 2**255):
        for sign in (0, 1):
            with pytest.raises(VRFError, match="public-key"):
                vrf.verify(_encode_y(y, sign), pi, b"")
    with pytest.raises(VRFError, match="public-key"):
        vrf.verify(_encode_y(1, 1), pi, b"")
    with pytest.raises(VRFError, match="public-key"):
        vrf.verify(b"\x00" * 31, pi, b"")


def test_public_key_with_small_order_component_rejected() -> None:
    seed, alpha = os.urandom(32), b"x"
    pk = vrf.public_key(seed)
    mixed = sodium.crypto_core_ed25519_add(pk, TORSION[1])
    assert _rfc8032_decodes(mixed)
    with pytest.raises(VRFError, match="public-key"):
        vrf.verify(mixed, vrf.prove(seed, alpha), alpha)


def test_scalar_not_below_group_order_rejected() -> None:
    seed, alpha = os.urandom(32), b"scalar"
    pk, pi = vrf.public_key(seed), vrf.prove(seed, alpha)
    s = int.from_bytes(pi[48:], "little")
    for bad_s in (s + GROUP_ORDER, GROUP_ORDER, 2**256 - 1):
        forged = pi[:48] + bad_s.to_bytes(32, "little")
        with pytest.raises(VRFError, match="proof-scalar"):
            vrf.verify(pk, forged, alpha)
        with pytest.raises(VRFError, match="proof-scalar"):
            vrf.proof_to_hash(forged)


def test_bad_gamma_and_lengths_rejected() -> None:
    seed, alpha = os.urandom(32), b"gamma"
    pk, pi = vrf.public_key(seed), vrf.prove(seed, alpha)
    with pytest.raises(VRFError, match="proof-length"):
        vrf.verify(pk, pi[:-1], alpha)
    with pytest.raises(VRFError, match="proof-length"):
        vrf.verify(pk, pi + b"\x00", alpha)
    not_on_curve = next(
        e for e in (hashlib.sha256(bytes([i])).digest() for i in range(64)) if not _rfc8032_decodes(e)
    )
    for gamma in (not_on_curve, _encode_y(P, 0), _encode_y(1, 1)):
        with pytest.raises(VRFError, match="proof-gamma"):
            vrf.verify(pk, gamma + pi[32:], alpha)
        with pytest.raises(VRFError, match="proof-gamma"):
            vrf.proof_to_hash(gamma + pi[32:])


def test_small_order_gamma_fails_cleanly() -> None:
    seed, alpha = os.urandom(32), b"torsion"
    pk, pi = vrf.public_key(seed), vrf.prove(seed, alpha)
    for t in TORSION:
        with pytest.raises(VRFError, match="proof-invalid"):
            vrf.verify(pk, t + pi[32:], alpha)
    zero_s = pi[:48] + bytes(32)
    with pytest.raises(VRFError, match="proof-invalid"):
        vrf.verify(pk, zero_s, alpha)
    zero_c = pi[:32] + bytes(16) + pi[48:]
    with pytest.raises(VRFError, match="proof-invalid"):
        vrf.verify(pk, zero_c, alpha)


@pytest.mark.parametrize("residue", range(8))
def test_gamma_with_small_order_component_is_verified_as_the_rfc_says(residue: int) -> None:
    """RFC 9381 accepts any curve point as Gamma. A prover who adds a torsion point T to Gamma and grinds
    until c = r (mod 8) for a V it built with -r*T makes a proof the RFC verifier accepts; its output is
    unchanged, because proof_to_hash clears the cofactor. We must compute c*Gamma exactly to agree."""
    seed, alpha = os.urandom(32), b"malleable"
    x, nonce_key = vrf._secret_scalar(seed)
    pk = vrf.public_key(seed)
    h = vrf._encode_to_curve(pk, alpha)
    t = TORSION[1]  # order 8
    gamma = sodium.crypto_core_ed25519_add(vrf._prime_order_mult(x, h), t)
    minus_rt = sodium.crypto_core_ed25519_sub(IDENTITY, TORSION[residue])
    for attempt in range(400):
        k = int.from_bytes(hashlib.sha512(nonce_key + h + attempt.to_bytes(4, "little")).digest(), "little")
        k %= GROUP_ORDER
        v = sodium.crypto_core_ed25519_add(vrf._prime_order_mult(k, h), minus_rt)
        c_string = vrf._challenge(pk, h, gamma, vrf._base_mult(k), v)
        c = int.from_bytes(c_string, "little")
        if c % 8 == residue:
            break
    else:
        pytest.fail("no challenge with the wanted residue in 400 tries")
    s = (k + c * x) % GROUP_ORDER
    pi = gamma + c_string + s.to_bytes(32, "little")
    assert vrf.verify(pk, pi, alpha) == vrf.verify(pk, vrf.prove(seed, alpha), alpha)
    # ...and with any other residue the same Gamma fails.
    other = pi[:32] + ((c + 1) % 2**128).to_bytes(16, "little") + pi[48:]
    with pytest.raises(VRFError):
        vrf.verify(pk, other, alpha)


@FAST
@given(seed=seeds, alpha=alphas)
def test_secret_key_object_proves_the_same(seed: bytes, alpha: bytes) -> None:
    key = vrf.SecretKey(seed)
    assert key.public_key == vrf.public_key(seed)
    assert key.prove(alpha) == vrf.prove(seed, alpha)
    assert seed.hex() not in repr(key)


def test_wrong_seed_size_is_a_programming_error() -> None:
    with pytest.raises(ValueError):
        vrf.prove(b"short", b"")
