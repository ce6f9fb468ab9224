"""A peer's identity: one Ed25519 key, from which its libp2p peer ID is derived.

The peer ID is the libp2p one (an identity multihash of the protobuf-encoded public key, base58btc), so the
key that signs our protocol messages is the same key that authenticates the peer's Noise connections.

Key files are small text files holding the 32-byte Ed25519 seed in hex. They are written atomically with
mode 0600, and a key file that group or others can read is refused.
"""

from __future__ import annotations

import functools
import os
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path

import base58
import nacl.exceptions
import nacl.signing

from .errors import KeyFileError

SEED_SIZE = 32
PUBLIC_KEY_SIZE = 32
SIGNATURE_SIZE = 64

_KEY_FILE_HEADER = "# p2pinfer peer key. Keep this file secret: whoever holds it is this peer."
_SEED_PREFIX = "ed25519-seed:"

# libp2p's PublicKey protobuf: field 1 (KeyType) = 1 (Ed25519), field 2 (Data) = 32 bytes.
_LIBP2P_ED25519_PUBKEY_PREFIX = bytes([0x08, 0x01, 0x12, 0x20])
# Multihash "identity" (code 0x00) of the 36-byte protobuf above.
_IDENTITY_MULTIHASH_PREFIX = bytes([0x00, 0x24])


def peer_id_from_public_key(public_key: bytes) -> str:
    """The libp2p peer ID (``12D3KooW...``) of an Ed25519 public key."""
    if len(public_key) != PUBLIC_KEY_SIZE:
        raise ValueError(f"an Ed25519 public key is {PUBLIC_KEY_SIZE} bytes, got {len(public_key)}")
    return base58.b58encode(_IDENTITY_MULTIHASH_PREFIX + _LIBP2P_ED25519_PUBKEY_PREFIX + public_key).decode()


def public_key_from_peer_id(peer_id: str) -> bytes:
    """Inverse of :func:`peer_id_from_public_key`; raises ValueError for anything but an Ed25519 peer ID."""
    try:
        raw = base58.b58decode(peer_id)
    except ValueError:
        raise ValueError(f"peer ID {peer_id!r} is not base58") from None
    prefix = _IDENTITY_MULTIHASH_PREFIX + _LIBP2P_ED25519_PUBKEY_PREFIX
    if len(raw) != len(prefix) + PUBLIC_KEY_SIZE or not raw.startswith(prefix):
        raise ValueError(f"peer ID {peer_id!r} is not an Ed25519 libp2p peer ID")
    return raw[len(prefix):]


def verify_signature(public_key: bytes, message: bytes, signature: bytes) -> bool:
    """True when ``signature`` is ``public_key``'s Ed25519 signature of ``message``."""
    if len(public_key) != PUBLIC_KEY_SIZE or len(signature) != SIGNATURE_SIZE:
        return False
    try:
        nacl.signing.VerifyKey(public_key).verify(message, signature)
    except (nacl.exceptions.BadSignatureError, nacl.exceptions.ValueError, nacl.exceptions.TypeError):
        return False
    return True


@dataclass(frozen=True)
class Identity:
    """An Ed25519 key pair. ``seed`` is the 32-byte secret; everything else derives from it."""

    seed: bytes

    def __post_init__(self) -> None:
        if len(self.seed) != SEED_SIZE:
            raise ValueError(f"an Ed25519 seed is {SEED_SIZE} bytes, got {len(self.seed)}")

    def __repr__(self) -> str:  # never print the secret
        return f"Identity(peer_id={self.peer_id!r})"

    @classmethod
    def generate(cls) -> "Identity":
        return cls(bytes(nacl.signing.SigningKey.generate()))

    # Derived once: deriving the key pair from the seed costs a SHA-512 and a scalar multiplication, and the
    # executor signs every token chunk. (cached_property writes the instance dict, which frozen allows.)
    @functools.cached_property
    def signing_key(self) -> nacl.signing.SigningKey:
        return nacl.signing.SigningKey(self.seed)

    @functools.cached_property
    def public_key(self) -> bytes:
        return bytes(self.signing_key.verify_key)

    @property
    def peer_id(self) -> str:
        return peer_id_from_public_key(self.public_key)

    def sign(self, message: bytes) -> bytes:
        """The 64-byte Ed25519 signature of ``message``."""
        return self.signing_key.sign(message).signature

    # ---- key files ---------------------------------------------------------------------------------

    def save(self, path: Path, *, overwrite: bool = False) -> None:
        """Write the key to ``path`` atomically, with mode 0600 from the first byte on."""
        path = Path(path)
        if path.exists() and not overwrite:
            raise KeyFileError(f"key file {path} already exists; refusing to overwrite it: choose another --out, "
                               "or pass --force to replace it (the identity it holds is then lost)")
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        text = f"{_KEY_FILE_HEADER}\n{_SEED_PREFIX} {self.seed.hex()}\n"
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        try:
            os.fchmod(fd, 0o600)
            with os.fdopen(fd, "w", encoding="ascii") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp_name, path)
        except BaseException:
            try:
                os.unlink(tmp_name)
            except FileNotFoundError:
                pass
            raise

    @classmethod
    def load(cls, path: Path) -> "Identity":
        """Read a key file, refusing one that is missing, malformed or readable by group/others."""
        path = Path(path)
        try:
            st = path.stat()
        except FileNotFoundError:
            raise KeyFileError(f"key file {path} does not exist; create one with `p2pinfer keys new --out {path}`") from None
        except PermissionError:
            raise KeyFileError(f"key file {path} cannot be accessed: permission denied") from None
        if not stat.S_ISREG(st.st_mode):
            raise KeyFileError(f"key file {path} is not a regular file")
        if st.st_mode & 0o077:
            raise KeyFileError(
                f"key file {path} is readable by group or others (mode {stat.S_IMODE(st.st_mode):04o}); "
                f"run `chmod 600 {path}`"
            )
        try:
            text = path.read_text(encoding="ascii")
        except PermissionError:
            raise KeyFileError(f"key file {path} is not readable: permission denied") from None
        except (UnicodeDecodeError, OSError) as exc:
            raise KeyFileError(f"key file {path} is not a p2pinfer key file ({exc.__class__.__name__})") from None
        seed_hex = None
        for line in text.splitlines():
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            if line.startswith(_SEED_PREFIX) and seed_hex is None:
                seed_hex = line[len(_SEED_PREFIX):].strip()
            else:
                raise KeyFileError(f"key file {path} is malformed: unexpected line {line[:40]!r}")
        if seed_hex is None:
            raise KeyFileError(f"key file {path} is malformed: no '{_SEED_PREFIX}' line")
        try:
            seed = bytes.fromhex(seed_hex)
        except ValueError:
            raise KeyFileError(f"key file {path} is malformed: the seed is not hex") from None
        if len(seed) != SEED_SIZE:
            raise KeyFileError(f"key file {path} is malformed: the seed must be {SEED_SIZE} bytes, got {len(seed)}")
        return cls(seed)

    @classmethod
    def load_or_create(cls, path: Path) -> "Identity":
        """The key at ``path``, creating (and saving) a new one if there is none yet."""
        if Path(path).exists():
            return cls.load(path)
        identity = cls.generate()
        identity.save(path)
        return identity
