"""ECVRF-EDWARDS25519-SHA512-TAI, exactly as RFC 9381 specifies it (suite string 0x03).

A VRF is a keyed hash that anyone can check: ``prove`` gives an 80-byte proof ``pi`` that the holder of a
secret key computed ``beta = proof_to_hash(pi)`` (64 bytes) for input ``alpha``; ``verify`` checks the proof
against the public key and returns the same ``beta``. Executor election ranks peers by ``beta``.

Construction (RFC 9381 section 5, with the section 5.5 parameters for this suite):

* keys are Ed25519 keys (RFC 8032 section 5.1.5): secret ``x`` = clamped first half of SHA-512(seed),
  public ``Y = x*B``;
* ``H = encode_to_curve(Y, alpha)`` by try-and-increment (section 5.4.1.1), cofactor cleared;
* ``Gamma = x*H``; nonce ``k`` per RFC 8032 section 5.1.6 (section 5.4.2.2); challenge ``c`` = first 16 bytes
  of SHA-512 over the five points (section 5.4.3); ``s = k + c*x mod L``;
* ``pi = Gamma (32) || c (16) || s (32)``; ``beta = SHA-512(0x03 || 0x03 || 8*Gamma || 0x00)``.

Every group operation runs in libsodium through PyNaCl's low-level bindings. libsodium's scalar
multiplications only accept canonical points of the prime-order subgroup and refuse a zero result; the RFC,
however, lets ``Gamma`` be any point of the curve (section 5.4.4). This module therefore uses libsodium
directly for the points it knows are of prime order (``B``, a validated ``Y``, ``H``), and for any other
``Gamma`` splits it into its prime-order and small-order parts (``P = m*(8P) + T`` with ``m = 8^-1 mod L``)
so that ``c*Gamma`` is still computed exactly. Plain integers are used only to check encodings (``y < p``)
and to compare scalars with ``L``.

Public keys are validated more strictly than section 5.4.5 asks: besides rejecting non-canonical encodings
and small-order points (as the RFC requires), a key must lie in the prime-order subgroup (libsodium's
``crypto_core_ed25519_is_valid_point``). Every key that RFC 8032 key generation produces does; a key with a
small-order component could only have been made on purpose.
"""

from __future__ import annotations

import hashlib
import hmac

import nacl.bindings as _sodium
import nacl.exceptions

__all__ = [
    "SUITE_STRING",
    "PROOF_SIZE",
    "OUTPUT_SIZE",
    "PUBLIC_KEY_SIZE",
    "SEED_SIZE",
    "VRFError",
    "SecretKey",
    "prove",
    "proof_to_hash",
    "verify",
    "public_key",
]

SUITE_STRING = b"\x03"  # ECVRF-EDWARDS25519-SHA512-TAI
SEED_SIZE = 32
PUBLIC_KEY_SIZE = 32
POINT_SIZE = 32  # ptLen
CHALLENGE_SIZE = 16  # cLen
SCALAR_SIZE = 32  # qLen
PROOF_SIZE = POINT_SIZE + CHALLENGE_SIZE + SCALAR_SIZE  # 80
OUTPUT_SIZE = 64

FIELD_PRIME = 2**255 - 19
GROUP_ORDER = 2**252 + 27742317777372353535851937790883648493  # L, "q" in RFC 9381
_Y_MASK = (1 << 255) - 1
IDENTITY = b"\x01" + bytes(31)  # point_to_string of the neutral element (0, 1)
_INV8 = pow(8, -1, GROUP_ORDER).to_bytes(SCALAR_SIZE, "little")

# Domain separators of RFC 9381 section 5.4.
_ENCODE_FRONT, _CHALLENGE_FRONT, _HASH_FRONT, _BACK = b"\x01", b"\x02", b"\x03", b"\x00"


class VRFError(ValueError):
    """A proof, key or input was rejected. ``reason`` is a stable short code for logs and refusals."""

    def __init__(self, reason: str, message: str) -> None:
        self.reason = reason
        super().__init__(f"{reason}: {message}")


class _NotOnCurve(Exception):
    pass


# ---- encodings ----------------------------------------------------------------------------------------


def _is_canonical_encoding(encoded: bytes) -> bool:
    """The integer-only part of RFC 8032 section 5.1.3 decoding: ``y < p``, and no "negative zero" x.

    x is zero exactly when y = 1 or y = p - 1; RFC 8032 refuses such an encoding with the sign bit set.
    Whether y belongs to a curve point at all is left to libsodium (see :func:`_double`).
    """
    y = int.from_bytes(encoded, "little") & _Y_MASK
    if y >= FIELD_PRIME:
        return False
    return not (encoded[31] & 0x80 and (y == 1 or y == FIELD_PRIME - 1))


def _double(point: bytes) -> bytes:
    """2*P for any curve point P; raises _NotOnCurve when ``point`` is no point of the curve.

    libsodium's ``crypto_core_ed25519_add`` decodes both operands with a full square-root check and fails
    exactly when y belongs to no curve point; unlike its scalar multiplications it accepts points of any
    order, so it is the primitive for cofactor clearing.
    """
    try:
        return _sodium.crypto_core_ed25519_add(point, point)
    except nacl.exceptions.RuntimeError:
        raise _NotOnCurve from None


def _decode_and_double(encoded: bytes) -> bytes | None:
    """2*P if ``encoded`` decodes to a curve point P under RFC 8032 section 5.1.3 (any order), else None.

    The doubling is the validity check; callers that clear the cofactor reuse it.
    """
    if len(encoded) != POINT_SIZE or not _is_canonical_encoding(encoded):
        return None
    try:
        return _double(encoded)
    except _NotOnCurve:
        return None


def _string_to_point_ok(encoded: bytes) -> bool:
    """True when ``encoded`` decodes to a curve point under RFC 8032 section 5.1.3 (any order)."""
    return _decode_and_double(encoded) is not None


def _times_cofactor(point: bytes) -> bytes:
    """8*P by three doublings (P must be a curve point)."""
    return _double(_double(_double(point)))


# ---- scalar multiplication ----------------------------------------------------------------------------


def _scalar(n: int) -> bytes:
    return n.to_bytes(SCALAR_SIZE, "little")


def _base_mult(n: int) -> bytes:
    """n*B for 0 <= n < L (libsodium refuses n = 0, whose result is the identity)."""
    if n == 0:
        return IDENTITY
    return _sodium.crypto_scalarmult_ed25519_base_noclamp(_scalar(n))


def _prime_order_mult(n: int, point: bytes) -> bytes:
    """n*P for 0 <= n < L and P a non-identity point of the prime-order subgroup."""
    if n == 0:
        return IDENTITY
    return _sodium.crypto_scalarmult_ed25519_noclamp(_scalar(n), point)


def _any_order_mult(n: int, point: bytes) -> bytes:
    """n*P for 0 <= n < L and P any curve point (RFC 9381 lets Gamma have a small-order component).

    Fast path: libsodium directly, which succeeds exactly for canonical points of the prime-order subgroup.
    Otherwise P = P_L + T with P_L = m*(8P), m = 8^-1 mod L (8m = 1 mod L and 8m = 0 mod 8), T of order
    dividing 8, and n*P = n*P_L + (n mod 8)*T.
    """
    if n == 0:
        return IDENTITY
    try:
        return _sodium.crypto_scalarmult_ed25519_noclamp(_scalar(n), point)
    except nacl.exceptions.RuntimeError:
        pass  # small-order component, small order, or not a point: the caller has checked it is a point
    cleared = _times_cofactor(point)
    prime_part = IDENTITY if cleared == IDENTITY else _sodium.crypto_scalarmult_ed25519_noclamp(_INV8, cleared)
    torsion = _sodium.crypto_core_ed25519_sub(point, prime_part)
    result = IDENTITY if prime_part == IDENTITY else _prime_order_mult(n, prime_part)
    for _ in range(n % 8):
        result = _sodium.crypto_core_ed25519_add(result, torsion)
    return result


# ---- RFC 9381 section 5.4 helpers ---------------------------------------------------------------------


def _encode_to_curve(salt: bytes, alpha: bytes) -> bytes:
    """ECVRF_encode_to_curve_try_and_increment (section 5.4.1.1); ``salt`` is the public key string."""
    prefix = SUITE_STRING + _ENCODE_FRONT + salt + alpha
    for ctr in range(256):
        candidate = hashlib.sha512(prefix + bytes((ctr,)) + _BACK).digest()[:POINT_SIZE]
        if not _is_canonical_encoding(candidate):
            continue
        try:
            h = _times_cofactor(candidate)
        except _NotOnCurve:
            continue
        if h != IDENTITY:
            return h
    # Each try succeeds with probability about 1/2; 256 failures in a row do not happen.
    raise VRFError("hash-to-curve", "try-and-increment found no curve point in 256 tries")


def _challenge(*points: bytes) -> bytes:
    """ECVRF_challenge_generation (section 5.4.3): the 16-byte challenge string."""
    digest = hashlib.sha512(SUITE_STRING + _CHALLENGE_FRONT + b"".join(points) + _BACK).digest()
    return digest[:CHALLENGE_SIZE]


def _secret_scalar(secret_seed: bytes) -> tuple[int, bytes]:
    """RFC 8032 section 5.1.5: (x mod L, SHA-512(seed)[32:64]), the latter for nonce generation."""
    if not isinstance(secret_seed, (bytes, bytearray, memoryview)) or len(secret_seed) != SEED_SIZE:
        raise ValueError(f"a VRF secret key is a {SEED_SIZE}-byte Ed25519 seed")
    digest = hashlib.sha512(bytes(secret_seed)).digest()
    clamped = bytearray(digest[:32])
    clamped[0] &= 248
    clamped[31] &= 127
    clamped[31] |= 64
    return int.from_bytes(clamped, "little") % GROUP_ORDER, digest[32:]


def _decode_proof(pi: bytes) -> tuple[bytes, bytes, int, int]:
    """ECVRF_decode_proof (section 5.4.4): (Gamma string, 2*Gamma, c, s), or VRFError."""
    if len(pi) != PROOF_SIZE:
        raise VRFError("proof-length", f"a proof is {PROOF_SIZE} bytes, got {len(pi)}")
    gamma = pi[:POINT_SIZE]
    gamma_doubled = _decode_and_double(gamma)
    if gamma_doubled is None:
        raise VRFError("proof-gamma", "Gamma is not the encoding of a curve point")
    c = int.from_bytes(pi[POINT_SIZE : POINT_SIZE + CHALLENGE_SIZE], "little")
    s = int.from_bytes(pi[POINT_SIZE + CHALLENGE_SIZE :], "little")
    if s >= GROUP_ORDER:
        raise VRFError("proof-scalar", "s is not below the group order")
    return gamma, gamma_doubled, c, s


def _output(gamma_doubled: bytes) -> bytes:
    """Section 5.2 steps 3-5, given 2*Gamma: beta = Hash(suite || 0x03 || 8*Gamma || 0x00)."""
    return hashlib.sha512(SUITE_STRING + _HASH_FRONT + _double(_double(gamma_doubled)) + _BACK).digest()


# ---- public API ---------------------------------------------------------------------------------------


class SecretKey:
    """A VRF secret key with its derived values, for peers that prove many times (saves re-deriving them)."""

    __slots__ = ("_x", "_nonce_key", "public_key")

    def __init__(self, secret_seed: bytes) -> None:
        self._x, self._nonce_key = _secret_scalar(secret_seed)
        self.public_key: bytes = _base_mult(self._x)

    def __repr__(self) -> str:  # never print secrets
        return f"SecretKey(public_key={self.public_key.hex()})"

    def prove(self, alpha: bytes) -> bytes:
        """ECVRF_prove (section 5.1): the 80-byte proof for ``alpha``."""
        x, y = self._x, self.public_key
        h = _encode_to_curve(y, bytes(alpha))
        gamma = _prime_order_mult(x, h)
        # ECVRF_nonce_generation_RFC8032 (section 5.4.2.2).
        k = int.from_bytes(hashlib.sha512(self._nonce_key + h).digest(), "little") % GROUP_ORDER
        c_string = _challenge(y, h, gamma, _base_mult(k), _prime_order_mult(k, h))
        s = (k + int.from_bytes(c_string, "little") * x) % GROUP_ORDER
        return gamma + c_string + _scalar(s)


def public_key(secret_seed: bytes) -> bytes:
    """The public key (= Ed25519 public key) of a 32-byte secret seed."""
    x, _ = _secret_scalar(secret_seed)
    return _base_mult(x)


def prove(secret_seed: bytes, alpha: bytes) -> bytes:
    """ECVRF_prove (section 5.1): the 80-byte proof for ``alpha`` under the Ed25519 seed ``secret_seed``."""
    return SecretKey(secret_seed).prove(alpha)


def proof_to_hash(pi: bytes) -> bytes:
    """ECVRF_proof_to_hash (section 5.2): the 64-byte output ``beta`` of a proof (does NOT verify it)."""
    _, gamma_doubled, _, _ = _decode_proof(bytes(pi))
    return _output(gamma_doubled)


def verify(public_key: bytes, pi: bytes, alpha: bytes) -> bytes:
    """ECVRF_verify (section 5.3, with key validation): ``beta`` if ``pi`` is valid, else VRFError."""
    public_key, pi, alpha = bytes(public_key), bytes(pi), bytes(alpha)
    if len(public_key) != PUBLIC_KEY_SIZE or not _sodium.crypto_core_ed25519_is_valid_point(public_key):
        raise VRFError("public-key", "not a canonical Ed25519 public key of the prime-order subgroup")
    gamma, gamma_doubled, c, s = _decode_proof(pi)
    h = _encode_to_curve(public_key, alpha)
    u = _sodium.crypto_core_ed25519_sub(_base_mult(s), _prime_order_mult(c, public_key))
    v = _sodium.crypto_core_ed25519_sub(_prime_order_mult(s, h), _any_order_mult(c, gamma))
    if not hmac.compare_digest(_challenge(public_key, h, gamma, u, v), pi[POINT_SIZE : POINT_SIZE + CHALLENGE_SIZE]):
        raise VRFError("proof-invalid", "the proof does not verify for this public key and input")
    return _output(gamma_doubled)
