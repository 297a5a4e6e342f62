"""c2sp.org/tlog-proof@v1 files: spec example, transparency-dev/formats vectors, end to end."""

from __future__ import annotations

import base64

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sle_events.ledger.checkpoint import Checkpoint, CheckpointError, sign_checkpoint
from sle_events.ledger.merkle import MemoryTree, ProofError
from sle_events.ledger.note import NoteError, Signer, UnverifiedNoteError
from sle_events.ledger.proof_file import (
    ProofFileError,
    TlogProof,
    format_consistency_proof,
    parse_consistency_proof,
    verify_proof_file,
)

from ledger_vectors import b64, load

VEC = load("checkpoint_and_tlog_proof.json")["tlog_proof"]
SPEC = VEC["c2sp_spec_example"]
ORIGIN = "example.org/trial-log"


def test_spec_example_structure() -> None:
    p = TlogProof.parse(SPEC["proof"])
    assert p.index == SPEC["expect_index"]
    assert len(p.hashes) == SPEC["expect_hash_count"]
    assert p.extra == b64(SPEC["expect_extra_b64"])
    # signatures are elided with "[...]" in the spec, so only the body is checked
    body = p.checkpoint.split("\n\n")[0] + "\n"
    cp = Checkpoint.parse(body)
    assert cp.origin == SPEC["expect_checkpoint_origin"]
    assert cp.size == SPEC["expect_checkpoint_size"]
    assert p.format() == SPEC["proof"]
    assert SPEC["proof"].endswith(p.checkpoint)


@pytest.mark.parametrize("case", VEC["formats_marshal"]["cases"], ids=lambda c: c["desc"])
def test_formats_marshal(case: dict) -> None:
    extra = None if case["extra_b64"] is None else b64(case["extra_b64"])
    p = TlogProof(case["index"], tuple(b64(h) for h in case["hashes_b64"]), case["checkpoint"], extra)
    assert p.format() == case["want"]
    assert TlogProof.parse(case["want"]) == p
    assert TlogProof.parse(case["want"].encode()) == p


def _error_case_text(case: dict) -> str:
    if "proof" in case:
        return case["proof"]
    parts = case["proof_parts"]
    return parts["prefix"] + parts["repeat_char"] * parts["repeat_count"] + parts["suffix"]


@pytest.mark.parametrize("case", VEC["formats_unmarshal_errors"]["cases"], ids=lambda c: c["desc"])
def test_formats_unmarshal_errors(case: dict) -> None:
    with pytest.raises(ProofFileError):
        TlogProof.parse(_error_case_text(case))


@pytest.mark.parametrize(
    "text",
    [
        "c2sp.org/tlog-proof@v1\nindex 007\n\ncheckpoint\n",  # leading zeros
        "c2sp.org/tlog-proof@v1\nindex +7\n\ncheckpoint\n",
        "c2sp.org/tlog-proof@v1\nindex 18446744073709551616\n\ncheckpoint\n",  # 2**64
        "c2sp.org/tlog-proof@v1\nindex 1\n\n",  # no checkpoint
        "c2sp.org/tlog-proof@v1\nindex 1\n\ncheckpoint",  # checkpoint without newline
        "c2sp.org/tlog-proof@v1\r\nindex 1\n\ncheckpoint\n",
        "c2sp.org/tlog-proof@v2\nindex 1\n\ncheckpoint\n",
        "c2sp.org/tlog-proof@v1\nindex 1\nextra AA==\n\ncheckpoint\n",  # extra after index
        "c2sp.org/tlog-proof@v1\nindex 1\nAAAA\n\ncheckpoint\n",  # 3-byte hash
        "c2sp.org/tlog-proof@v1\nindex 1",
    ],
)
def test_more_unmarshal_errors(text: str) -> None:
    with pytest.raises(ProofFileError):
        TlogProof.parse(text)


# --------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def log() -> tuple[Signer, MemoryTree, list[bytes], str]:
    signer = Signer.generate(ORIGIN)
    leaves = [b"event %d" % i for i in range(37)]
    tree = MemoryTree.from_leaves(leaves)
    note = sign_checkpoint(Checkpoint(ORIGIN, tree.size, tree.root()), signer)
    return signer, tree, leaves, note


def _proof(log: tuple, index: int, extra: bytes | None = None) -> str:
    _, tree, _, note = log
    return TlogProof(index, tuple(tree.inclusion_proof(index)), note, extra).format()


def test_verify_every_leaf(log: tuple) -> None:
    signer, tree, leaves, _ = log
    for i, leaf in enumerate(leaves):
        res = verify_proof_file(_proof(log, i, b"ctx"), leaf, signer.vkey)
        assert (res.index, res.checkpoint.size, res.extra) == (i, 37, b"ctx")
        assert res.checkpoint.root_hash == tree.root()
    res = verify_proof_file(_proof(log, 3).encode(), leaves[3], signer.verifier(), origin=ORIGIN)
    assert res.extra is None


def test_verify_rejects_wrong_leaf_and_index(log: tuple) -> None:
    signer, _, leaves, _ = log
    with pytest.raises(ProofError):
        verify_proof_file(_proof(log, 5), leaves[6], signer.vkey)
    text = _proof(log, 5).replace("index 5\n", "index 6\n")
    with pytest.raises(ProofError):
        verify_proof_file(text, leaves[5], signer.vkey)
    with pytest.raises(ProofError):
        verify_proof_file(text, leaves[6], signer.vkey)


def test_verify_rejects_index_beyond_size(log: tuple) -> None:
    signer, _, leaves, _ = log
    text = _proof(log, 5).replace("index 5\n", "index 37\n")
    with pytest.raises(ProofError, match="beyond size"):
        verify_proof_file(text, leaves[5], signer.vkey)


def test_verify_rejects_wrong_proof_length(log: tuple) -> None:
    signer, tree, leaves, note = log
    hashes = tree.inclusion_proof(5)
    for bad in (hashes[:-1], [*hashes, hashes[0]], []):
        text = TlogProof(5, tuple(bad), note).format()
        with pytest.raises(ProofError, match="wrong proof size"):
            verify_proof_file(text, leaves[5], signer.vkey)


def test_verify_rejects_tampered_hash(log: tuple) -> None:
    signer, tree, leaves, note = log
    hashes = tree.inclusion_proof(5)
    bad = [hashes[0][:-1] + bytes([hashes[0][-1] ^ 1]), *hashes[1:]]
    with pytest.raises(ProofError):
        verify_proof_file(TlogProof(5, tuple(bad), note).format(), leaves[5], signer.vkey)


def test_verify_rejects_wrong_key_origin_and_tampered_checkpoint(log: tuple) -> None:
    signer, _, leaves, _ = log
    text = _proof(log, 2)
    with pytest.raises(UnverifiedNoteError):
        verify_proof_file(text, leaves[2], Signer.generate(ORIGIN).vkey)
    with pytest.raises(CheckpointError, match="origin"):
        verify_proof_file(text, leaves[2], signer.vkey, origin="example.org/other")
    with pytest.raises(NoteError):
        verify_proof_file(text.replace("\n37\n", "\n38\n"), leaves[2], signer.vkey)
    with pytest.raises(NoteError):  # checkpoint must be byte for byte: no trailing junk
        verify_proof_file(text + "\n", leaves[2], signer.vkey)


def test_verify_with_cosigned_checkpoint(log: tuple) -> None:
    # unknown (witness) signatures on the checkpoint are ignored
    signer, tree, leaves, note = log
    from sle_events.ledger.cosignature import CosignatureSigner, Witness

    witness = Witness(CosignatureSigner.generate("witness.example/w"), signer.verifier(), ORIGIN)
    cosigned = witness.cosign(note, [])
    text = TlogProof(9, tuple(tree.inclusion_proof(9)), cosigned).format()
    assert verify_proof_file(text, leaves[9], signer.vkey).index == 9


# --------------------------------------------------------------------------- consistency files


@settings(max_examples=40, deadline=None)
@given(st.lists(st.binary(min_size=32, max_size=32), max_size=64))
def test_consistency_file_round_trip(hashes: list[bytes]) -> None:
    text = format_consistency_proof(hashes)
    assert parse_consistency_proof(text) == hashes
    assert parse_consistency_proof(text.encode()) == hashes
    assert text.count("\n") == len(hashes)


@pytest.mark.parametrize(
    "text",
    [
        "AAAA\n",
        base64.b64encode(bytes(32)).decode(),  # missing newline
        base64.b64encode(bytes(32)).decode() + "\n\n",  # blank line
        "\n",
        "!!notbase64!!\n",
        base64.b64encode(bytes(64)).decode() + "\n",
    ],
)
def test_consistency_file_errors(text: str) -> None:
    with pytest.raises(ProofFileError):
        parse_consistency_proof(text)
    with pytest.raises(ProofFileError):
        format_consistency_proof([b"short"])
