"""C2SP tlog-cosignature (Ed25519 cosignature/v1) and the Witness."""

from __future__ import annotations

import base64
import hashlib

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from sle_events.ledger.checkpoint import Checkpoint, open_checkpoint, sign_checkpoint
from sle_events.ledger.cosignature import (
    ALG_COSIGNATURE_V1,
    CosignatureSigner,
    CosignatureVerifier,
    Witness,
    WitnessError,
    WitnessState,
    cosignature_message,
    cosignature_timestamp,
    cosignature_vkey,
)
from sle_events.ledger.merkle import MemoryTree, leaf_hash
from sle_events.ledger.note import (
    InvalidSignatureError,
    KeyFormatError,
    Signer,
    UnverifiedNoteError,
    Verifier,
    key_id,
    open_note,
    parse_note,
    parse_vkey,
    sign_note,
)

from ledger_vectors import load

EX = load("signed_note.json")["c2sp"]["cosignature_example"]
ORIGIN = "example.org/trial-log"


# --------------------------------------------------------------------------- spec example


def test_spec_example_timestamp_and_message() -> None:
    text, sigs = parse_note(EX["note"])
    (cosig,) = [s for s in sigs if s.name == EX["cosigner"]]
    blob = base64.b64decode(cosig.base64)
    assert len(blob) == 4 + 8 + 64
    assert cosignature_timestamp(cosig) == EX["expect_timestamp"]
    assert cosignature_message(EX["expect_timestamp"], text).decode() == EX["expect_signed_message"]
    # the log's own signature is a plain Ed25519 note signature (4 + 64 bytes)
    (log_sig,) = [s for s in sigs if s.name != EX["cosigner"]]
    assert len(base64.b64decode(log_sig.base64)) == 4 + 64


def test_cosignature_message_rules() -> None:
    body = "o\n1\n" + base64.b64encode(bytes(32)).decode() + "\n"
    assert cosignature_message(0, body) == b"cosignature/v1\ntime 0\n" + body.encode()
    for bad_ts in (-1, 1 << 63):
        with pytest.raises(ValueError):
            cosignature_message(bad_ts, body)
    with pytest.raises(ValueError):
        cosignature_message(1, "o\n1\n")


# --------------------------------------------------------------------------- keys and sigs


def test_key_id_uses_type_0x04() -> None:
    key = Ed25519PrivateKey.generate()
    s = CosignatureSigner("witness.example/w1", key)
    want = int.from_bytes(hashlib.sha256(b"witness.example/w1\n\x04" + s.public_key).digest()[:4], "big")
    assert s.key_id == want == s.verifier().key_id
    name, kid, alg, raw = parse_vkey(s.vkey)
    assert (name, kid, alg, raw) == ("witness.example/w1", want, ALG_COSIGNATURE_V1, s.public_key)
    assert CosignatureVerifier.from_vkey(s.vkey).key_id == want
    assert s.vkey == cosignature_vkey("witness.example/w1", s.public_key)
    # a plain Ed25519 vkey of the same key is accepted and converted
    plain = Signer("witness.example/w1", key).vkey
    assert CosignatureVerifier.from_vkey(plain).key_id == want
    assert "PRIVATE" not in repr(s) and s.public_key.hex() not in repr(s)


def test_cosign_and_verify_with_fixed_clock() -> None:
    log = Signer.generate(ORIGIN)
    key = Ed25519PrivateKey.generate()
    w = CosignatureSigner("witness.example/w1", key, clock=lambda: 1679315147)
    note = sign_checkpoint(Checkpoint(ORIGIN, 5, bytes(32)), log)
    text, sigs = parse_note(note)
    cosigned = sign_note(text, [w], existing=sigs)
    got, verified = open_note(cosigned, [w.verifier()])
    assert got == text and [s.name for s in verified] == ["witness.example/w1"]
    assert cosignature_timestamp(verified[0]) == 1679315147
    # log signature and cosignature both verify; the log key ignores the cosignature
    assert len(open_note(cosigned, [log.verifier(), w.verifier()])[1]) == 2
    assert open_checkpoint(cosigned, log.verifier(), ORIGIN).size == 5
    # a cosignature verifier does not accept a plain Ed25519 signature by the same key
    plain = Signer("witness.example/w1", key)
    with pytest.raises(UnverifiedNoteError):
        open_note(sign_note(text, [plain]), [w.verifier()])


def test_tampered_timestamp_or_body_fails() -> None:
    log = Signer.generate(ORIGIN)
    w = CosignatureSigner.generate("witness.example/w1", clock=lambda: 1000)
    note = sign_checkpoint(Checkpoint(ORIGIN, 5, bytes(32)), log)
    text, sigs = parse_note(note)
    cosigned = sign_note(text, [w], existing=sigs)
    line = cosigned.rstrip("\n").split("\n")[-1]
    blob = bytearray(base64.b64decode(line.split(" ")[-1]))
    blob[11] ^= 1  # timestamp low byte
    bad = cosigned.replace(line.split(" ")[-1], base64.b64encode(bytes(blob)).decode())
    with pytest.raises(InvalidSignatureError):
        open_note(bad, [w.verifier()])


def test_bad_cosigner_vkeys() -> None:
    s = CosignatureSigner.generate("w")
    typed = b"\x02" + s.public_key
    vkey = f"w+{key_id('w', typed):08x}+{base64.b64encode(typed).decode()}"
    with pytest.raises(KeyFormatError):
        CosignatureVerifier.from_vkey(vkey)
    with pytest.raises(KeyFormatError):
        CosignatureVerifier.from_vkey(s.vkey.replace("+", "-", 1))


# --------------------------------------------------------------------------- witness


class Log:
    def __init__(self) -> None:
        self.signer = Signer.generate(ORIGIN)
        self.tree = MemoryTree()

    def grow(self, n: int) -> str:
        for _ in range(n):
            self.tree.append(leaf_hash(b"entry %d" % self.tree.size))
        return self.checkpoint(self.tree.size)

    def checkpoint(self, size: int) -> str:
        return sign_checkpoint(Checkpoint(ORIGIN, size, self.tree.root(size)), self.signer)


@pytest.fixture
def setup() -> tuple[Log, Witness]:
    log = Log()
    w = Witness(CosignatureSigner.generate("witness.example/w1"), log.signer.verifier(), ORIGIN)
    return log, w


def test_witness_happy_path(setup: tuple[Log, Witness]) -> None:
    log, w = setup
    first = log.grow(5)
    out = w.cosign(first, [])
    assert w.state == WitnessState(5, log.tree.root())
    assert len(open_note(out, [log.signer.verifier(), w.verifier])[1]) == 2
    for add in (1, 7, 0, 100):
        size1 = w.state.size if w.state else 0
        note = log.grow(add)
        out = w.cosign(note, log.tree.consistency_proof(size1, log.tree.size))
        assert w.state == WitnessState(log.tree.size, log.tree.root())
        _, sigs = open_note(out, [w.verifier])
        assert sigs[0].name == "witness.example/w1"
    # cosigning an already cosigned note replaces the witness's own line
    again = w.cosign(out, [])
    assert again.count("witness.example/w1") == 1


def test_witness_follows_a_key_rotation_signed_by_both_keys_and_no_other(setup: tuple[Log, Witness]) -> None:
    from sle_events.ledger.checkpoint import KEY_ROTATION

    log, w = setup
    old = log.signer
    w.cosign(log.grow(3), [])
    new = Signer.generate(ORIGIN)
    # A "rotation" signed by the new key alone is not even accepted: the witness's key did not sign it.
    size = log.tree.size
    line = f"{KEY_ROTATION} {old.vkey} {new.vkey}"
    with pytest.raises(WitnessError, match="not acceptable"):
        w.cosign(sign_checkpoint(Checkpoint(ORIGIN, size, log.tree.root(size), (line,)), new), [])
    # Signed by the old key but not by the new one: refused too, and the witness keeps its key.
    with pytest.raises(WitnessError, match="not acceptable"):
        w.cosign(sign_checkpoint(Checkpoint(ORIGIN, size, log.tree.root(size), (line,)), old), [])
    # log_verifier is typed as the NoteVerifier protocol (no vkey); the witness holds a Verifier
    assert isinstance(w.log_verifier, Verifier) and w.state is not None
    assert w.log_verifier.vkey == old.vkey and w.state.size == 3
    w.cosign(sign_checkpoint(Checkpoint(ORIGIN, size, log.tree.root(size), (line,)), old, new), [])
    assert isinstance(w.log_verifier, Verifier)
    assert w.log_verifier.vkey == new.vkey
    log.signer = new
    w.cosign(log.grow(2), log.tree.consistency_proof(3, 5))  # signed by the new key alone
    assert w.state == WitnessState(5, log.tree.root())
    log.signer = old
    with pytest.raises(WitnessError, match="not acceptable"):
        w.cosign(log.grow(1), log.tree.consistency_proof(5, 6))  # the old key signs no more


def test_witness_refuses_bad_log_signature(setup: tuple[Log, Witness]) -> None:
    log, w = setup
    imposter = Signer.generate(ORIGIN)
    note = sign_checkpoint(Checkpoint(ORIGIN, 3, bytes(32)), imposter)
    with pytest.raises(WitnessError, match="log checkpoint not acceptable"):
        w.cosign(note, [])
    forged = log.grow(3).replace("\n3\n", "\n4\n")
    with pytest.raises(WitnessError, match="invalid signature"):
        w.cosign(forged, [])
    assert w.state is None


def test_witness_refuses_wrong_origin(setup: tuple[Log, Witness]) -> None:
    log, w = setup
    note = sign_checkpoint(Checkpoint("example.org/elsewhere", 1, bytes(32)), log.signer)
    with pytest.raises(WitnessError, match="origin"):
        w.cosign(note, [])


def test_witness_refuses_inconsistent(setup: tuple[Log, Witness]) -> None:
    log, w = setup
    w.cosign(log.grow(6), [])
    before = w.state
    good_note = log.grow(4)
    proof = log.tree.consistency_proof(6, 10)
    with pytest.raises(WitnessError, match="not proven consistent"):
        w.cosign(good_note, proof[:-1])
    with pytest.raises(WitnessError, match="not proven consistent"):
        w.cosign(good_note, [bytes(32)] * len(proof))
    with pytest.raises(WitnessError, match="not proven consistent"):
        w.cosign(good_note, [])
    assert w.state == before  # never advanced on refusal

    # a forked log: same signer, different history
    fork = Log()
    fork.signer = log.signer
    for i in range(10):
        fork.tree.append(leaf_hash(b"fork %d" % i))
    with pytest.raises(WitnessError):
        w.cosign(fork.checkpoint(10), fork.tree.consistency_proof(6, 10))
    with pytest.raises(WitnessError, match="split view"):
        w.cosign(fork.checkpoint(6), [])
    with pytest.raises(WitnessError, match="rollback"):
        w.cosign(log.checkpoint(5), [])
    assert w.state == before
    w.cosign(good_note, proof)
    assert w.state == WitnessState(10, log.tree.root())


def test_witness_first_checkpoint_needs_empty_proof(setup: tuple[Log, Witness]) -> None:
    log, w = setup
    note = log.grow(4)
    with pytest.raises(WitnessError, match="empty proof"):
        w.cosign(note, [bytes(32)])
    restored = Witness(
        CosignatureSigner.generate("w2"), log.signer.verifier(), ORIGIN, WitnessState(2, log.tree.root(2))
    )
    restored.cosign(note, log.tree.consistency_proof(2, 4))
    assert restored.state == WitnessState(4, log.tree.root())
