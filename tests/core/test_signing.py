"""Ed25519 (through `cryptography`, no hand-written fallback): RFC 8032 vectors, malformed input, key files."""

from __future__ import annotations

import os
import stat
import subprocess
import sys

import pytest

from core import signing
from core.errors import SignatureError
from core.signing import PrivateKey, PublicKey

# RFC 8032 section 7.1: (secret key, public key, message, signature), all hex.
RFC8032 = [
    ("9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60",
     "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a", "",
     "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e065224901555fb8821590a33bacc61e39701cf9b46bd25bf5f0595bbe24655141438e7a100b"),
    ("4ccd089b28ff96da9db6c346ec114e0f5b8a319f35aba624da8cf6ed4fb8a6fb",
     "3d4017c3e843895a92b70aa74d1b7ebc9c982ccf2ec4968cc0cd55f12af4660c", "72",
     "92a009a9f0d4cab8720e820b5f642540a2b27b5416503f8fb3762223ebdb69da085ac1e43e15996e458f3613d0f11d8c387b2eaeb4302aeeb00d291612bb0c00"),
    ("c5aa8df43f9f837bedb7442f31dcb7b166d38535076f094b85ce3a2e0b4458f7",
     "fc51cd8e6218a1a38da47ed00230f0580816ed13ba3303ac5deb911548908025", "af82",
     "6291d657deec24024827e69c3abe01a30ce548a284743a445e3680d7db5ac3ac18ff9b538d16f290ae67f760984dc6594a7c15e9716ed28dc027beceea1ec40a"),
    ("833fe62409237b9d62ec77587520911e9a759cec1d19755b7da901b96dca3d42",
     "ec172b93ad5e563bf4932c70e1245034c35467ef2efd4d64ebf819683467e2bf",
     "ddaf35a193617abacc417349ae20413112e6fa4e89a97ea20a9eeee64b55d39a2192992a274fc1a836ba3c23a3feebbd454d4423643ce80e2a9ac94fa54ca49f",
     "dc2a4459e7369633a52b1bf277839a00201009a3efbf3ecb69bea2186c26b58909351fc9ac90b3ecfdfbc7c66431e0303dca179c138ac17ad9bef1177331a704"),
]

# RFC 8032 section 5.1: the group order; a signature with s >= L must be refused.
_L = 2**252 + 27742317777372353535851937790883648493


@pytest.mark.parametrize("vector", RFC8032, ids=["test1", "test2", "test3", "sha-abc"])
def test_rfc8032_vectors(vector: tuple[str, str, str, str]) -> None:
    sk, pk, msg, sig = (bytes.fromhex(v) for v in vector)
    priv = PrivateKey(sk)
    assert priv.public_key().raw == pk
    assert signing.sign(priv, msg) == sig
    assert signing.verify(PublicKey(pk), msg, sig)
    bad = bytes([sig[0] ^ 1]) + sig[1:]
    assert not signing.verify(PublicKey(pk), msg, bad)
    assert not signing.verify(PublicKey(pk), msg + b"x", sig)


def test_verify_rejects_malformed_input_without_raising() -> None:
    _, pub = signing.generate_keypair()
    for sig in (b"", b"\x00" * 63, b"\xff" * 64, b"\x00" * 65):
        assert not signing.verify(pub, b"m", sig)
    # s >= L must be refused (signature malleability, RFC 8032 5.1.7)
    priv, pub = signing.generate_keypair()
    sig = signing.sign(priv, b"m")
    s = int.from_bytes(sig[32:], "little") + _L
    assert not signing.verify(pub, b"m", sig[:32] + s.to_bytes(32, "little"))


def test_no_hand_written_fallback_when_cryptography_is_missing() -> None:
    # A device without `cryptography` gets one clear error naming the fix, never a
    # home-made (non-constant-time) implementation.  Key files still load.
    code = (
        "import sys; sys.modules['cryptography'] = None\n"
        "from core import signing\n"
        "from core.errors import SignatureError\n"
        "pub = signing.PublicKey(bytes(32))\n"
        "assert len(pub.key_id) == 16\n"
        "for call in (lambda: signing.verify(pub, b'abc', bytes(64)), signing.generate_keypair):\n"
        "    try:\n"
        "        call()\n"
        "    except SignatureError as exc:\n"
        "        assert 'edgeloop[agent]' in str(exc), exc\n"
        "    else:\n"
        "        raise AssertionError('no error without cryptography')\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.strip() == "ok", out.stderr[-2000:]
    assert not any(hasattr(signing, n) for n in ("_pure_verify", "_pure_sign", "available_backends"))


def test_key_files_round_trip(tmp_path: os.PathLike[str]) -> None:
    priv, pub = signing.generate_keypair()
    paths = signing.save_keypair(tmp_path, priv)
    assert paths.private.name == "edgeloop.key" and paths.public.name == "edgeloop.pub"
    assert stat.S_IMODE(os.stat(paths.private).st_mode) == 0o600
    assert paths.key_id == pub.key_id == signing.key_id(pub) == signing.key_id(priv)
    assert len(pub.key_id) == 16 and int(pub.key_id, 16) >= 0
    assert signing.load_private_key(paths.private) == priv
    assert signing.load_public_key(paths.public) == pub
    assert signing.load_public_key(str(paths.public)) == pub
    assert signing.load_public_key(pub.to_base64()) == pub  # the base64 string itself
    assert signing.load_public_key(paths.private) == pub  # the public half of a private key file
    assert pub.key_id in paths.public.read_text()
    assert priv.seed.hex() not in repr(priv)


def test_save_keypair_prefix_and_no_overwrite(tmp_path: os.PathLike[str]) -> None:
    prefix = os.path.join(tmp_path, "keys", "prod")
    paths = signing.save_keypair(prefix)
    assert paths.private.name == "prod.key" and paths.public.name == "prod.pub"
    with pytest.raises(SignatureError, match="already exists"):
        signing.save_keypair(prefix)
    again = signing.save_keypair(prefix, overwrite=True)
    assert again.key_id != paths.key_id
    assert stat.S_IMODE(os.stat(again.private).st_mode) == 0o600


def test_bad_key_files_are_refused(tmp_path: os.PathLike[str]) -> None:
    paths = signing.save_keypair(tmp_path)
    with pytest.raises(SignatureError, match="not an edgeloop private key file"):
        signing.load_private_key(paths.public)  # a public key is never taken as a private one
    garbage = paths.public.with_name("garbage.pub")
    garbage.write_text("# edgeloop ed25519 public key\nnot-base64!!\n")
    with pytest.raises(SignatureError, match="not an edgeloop public key"):
        signing.load_public_key(garbage)
    with pytest.raises(SignatureError, match="not found"):
        signing.load_public_key(paths.public.with_name("missing.pub"))
    with pytest.raises(SignatureError):
        PublicKey(b"short")
