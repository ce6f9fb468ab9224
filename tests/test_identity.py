"""Peer identity: libp2p-compatible peer IDs and safe key files."""

from __future__ import annotations

import os
import stat

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from libp2p.crypto.ed25519 import Ed25519PrivateKey
from libp2p.peer.id import ID

from p2pinfer.errors import KeyFileError
from p2pinfer.identity import Identity, peer_id_from_public_key, public_key_from_peer_id, verify_signature


@settings(max_examples=50)
@given(st.binary(min_size=32, max_size=32))
def test_peer_id_equals_py_libp2p(seed):
    identity = Identity(seed)
    libp2p_key = Ed25519PrivateKey.from_bytes(seed)
    assert libp2p_key.get_public_key().to_bytes() == identity.public_key
    assert ID.from_pubkey(libp2p_key.get_public_key()).to_base58() == identity.peer_id
    assert public_key_from_peer_id(identity.peer_id) == identity.public_key


def test_peer_id_shape():
    assert Identity(bytes(32)).peer_id.startswith("12D3KooW")
    with pytest.raises(ValueError):
        peer_id_from_public_key(b"short")
    with pytest.raises(ValueError):
        public_key_from_peer_id("QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N")  # an RSA-style (sha256) ID


def test_signatures():
    identity = Identity.generate()
    sig = identity.sign(b"hello")
    assert verify_signature(identity.public_key, b"hello", sig)
    assert not verify_signature(identity.public_key, b"hellO", sig)
    assert not verify_signature(Identity.generate().public_key, b"hello", sig)
    assert not verify_signature(identity.public_key, b"hello", sig[:-1])


def test_repr_hides_the_secret():
    identity = Identity(bytes([9]) * 32)
    assert bytes([9]).hex() * 4 not in repr(identity)
    assert identity.peer_id in repr(identity)


def test_key_file_round_trip_with_mode_0600(tmp_path):
    path = tmp_path / "keys" / "peer.key"
    identity = Identity.generate()
    identity.save(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert Identity.load(path) == identity
    assert [p.name for p in path.parent.iterdir()] == ["peer.key"]  # no temporary file left behind


def test_save_refuses_to_overwrite(tmp_path):
    path = tmp_path / "peer.key"
    Identity.generate().save(path)
    with pytest.raises(KeyFileError, match="already exists"):
        Identity.generate().save(path)
    other = Identity.generate()
    other.save(path, overwrite=True)
    assert Identity.load(path) == other


def test_group_readable_key_refused(tmp_path):
    path = tmp_path / "peer.key"
    Identity.generate().save(path)
    os.chmod(path, 0o640)
    with pytest.raises(KeyFileError, match="chmod 600"):
        Identity.load(path)


@pytest.mark.parametrize(
    "content, match",
    [
        ("", "no 'ed25519-seed:' line"),
        ("hello\n", "unexpected line"),
        ("ed25519-seed: zz\n", "not hex"),
        ("ed25519-seed: abcd\n", "must be 32 bytes"),
        ("ed25519-seed: " + "00" * 32 + "\ned25519-seed: " + "00" * 32 + "\n", "unexpected line"),
    ],
)
def test_malformed_key_files(tmp_path, content, match):
    path = tmp_path / "peer.key"
    path.write_text(content)
    os.chmod(path, 0o600)
    with pytest.raises(KeyFileError, match=match):
        Identity.load(path)


def test_binary_garbage_key_file(tmp_path):
    path = tmp_path / "peer.key"
    path.write_bytes(os.urandom(64) + b"\xff")
    os.chmod(path, 0o600)
    with pytest.raises(KeyFileError, match="not a p2pinfer key file|malformed"):
        Identity.load(path)


def test_missing_key_file(tmp_path):
    with pytest.raises(KeyFileError, match="p2pinfer keys new"):
        Identity.load(tmp_path / "nope.key")


def test_directory_is_not_a_key_file(tmp_path):
    with pytest.raises(KeyFileError, match="not a regular file"):
        Identity.load(tmp_path)


def test_load_or_create(tmp_path):
    path = tmp_path / "peer.key"
    first = Identity.load_or_create(path)
    assert Identity.load_or_create(path) == first
