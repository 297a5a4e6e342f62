"""C2SP tlog-checkpoint bodies: golang sumdb tlog and transparency-dev/formats vectors."""

from __future__ import annotations

import base64

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sle_events.ledger.checkpoint import (
    MAX_TREE_SIZE,
    Checkpoint,
    CheckpointError,
    open_checkpoint,
    sign_checkpoint,
)
from sle_events.ledger.merkle import leaf_hash
from sle_events.ledger.note import (
    InvalidSignatureError,
    MalformedNoteError,
    Signer,
    UnverifiedNoteError,
    parse_note,
)

from ledger_vectors import load

BODY = load("checkpoint_and_tlog_proof.json")["checkpoint_body"]
SUMDB = BODY["golang_mod_sumdb_tlog"]
FORMATS = BODY["formats_log_checkpoint"]
C2SP = load("signed_note.json")["c2sp"]
ROOT = bytes(range(32))
ORIGIN = "example.org/trial-log"


@pytest.mark.parametrize("case", SUMDB["good"], ids=lambda c: c["expect_origin"])
def test_sumdb_good(case: dict) -> None:
    cp = Checkpoint.parse(case["body"])
    assert cp.origin == case["expect_origin"]  # origin may contain spaces (SHOULD, not MUST)
    assert cp.size == case["expect_size"]
    assert cp.root_hash == leaf_hash(case["expect_root_is_leaf_hash_of_ascii"].encode())
    assert cp.extensions == ()
    assert cp.format() == case["body"]


@pytest.mark.parametrize("case", SUMDB["bad"] + FORMATS["bad"], ids=lambda c: c["desc"])
def test_bad_bodies(case: dict) -> None:
    with pytest.raises(CheckpointError):
        Checkpoint.parse(case["body"])


def test_c2sp_checkpoint_example_parses() -> None:
    ex = C2SP["checkpoint_example"]  # log key not published: structure only
    text, sigs = parse_note(ex["note"])
    cp = Checkpoint.parse(text)
    assert cp.origin == ex["expect_origin"] == sigs[0].name
    assert cp.size == ex["expect_size"]
    assert base64.b64encode(cp.root_hash).decode() == ex["expect_root_b64"]
    assert cp.format() == text


@pytest.mark.parametrize(
    "body",
    [
        "o\n007\n{root}\n",  # leading zeros
        "o\n+7\n{root}\n",  # explicit sign
        "o\n 7\n{root}\n",
        "o\n7 \n{root}\n",
        "o\n\u0667\n{root}\n",  # non-ASCII digit (Python int() would accept it)
        "o\n1_000\n{root}\n",  # underscores (Python int() would accept them)
        f"o\n{MAX_TREE_SIZE + 1}\n{{root}}\n",
        "o\n7\n{root}\n\n",  # empty extension line
        "o\n7\n{root}\next\n\n",
        "o\n7\n{root}",  # no final newline
        "o\n7\n{root_nopad}\n",  # missing base64 padding
        "o\n7\n{root_short}\n",  # 31-byte hash
        "o\n7\n{root} \n",
        "o\r\n7\n{root}\n",  # CR in origin
    ],
)
def test_more_bad_bodies(body: str) -> None:
    root = base64.b64encode(ROOT).decode()
    body = body.format(root=root, root_nopad=root.rstrip("="), root_short=base64.b64encode(ROOT[:31]).decode())
    with pytest.raises(CheckpointError):
        Checkpoint.parse(body)


def test_extensions_and_zero_size() -> None:
    cp = Checkpoint.parse("o\n0\n" + base64.b64encode(ROOT).decode() + "\nx y\n\u2014 z\n")
    assert cp.size == 0 and cp.extensions == ("x y", "\u2014 z")
    assert Checkpoint.parse(cp.format()) == cp


@pytest.mark.parametrize(
    "kwargs",
    [
        {"origin": ""},
        {"origin": "a\nb"},
        {"size": -1},
        {"size": MAX_TREE_SIZE + 1},
        {"root_hash": b"\x00" * 31},
        {"extensions": ("",)},
        {"extensions": ("a\nb",)},
    ],
)
def test_constructor_validation(kwargs: dict) -> None:
    args = {"origin": ORIGIN, "size": 1, "root_hash": ROOT, **kwargs}
    with pytest.raises(CheckpointError):
        Checkpoint(**args)


_origin = st.text(alphabet=st.characters(blacklist_categories=("Cs", "Cc")), min_size=1, max_size=30)


@settings(max_examples=60, deadline=None)
@given(
    _origin,
    st.integers(0, MAX_TREE_SIZE),
    st.binary(min_size=32, max_size=32),
    st.lists(_origin, max_size=3),
)
def test_round_trip(origin: str, size: int, root: bytes, ext: list[str]) -> None:
    cp = Checkpoint(origin, size, root, tuple(ext))
    assert Checkpoint.parse(cp.format()) == cp
    assert Checkpoint.parse(cp.format().encode()) == cp


# --------------------------------------------------------------------------- signed


@pytest.fixture(scope="module")
def log_signer() -> Signer:
    return Signer.generate(ORIGIN)


def test_sign_and_open(log_signer: Signer) -> None:
    cp = Checkpoint(ORIGIN, 12345, ROOT)
    note = sign_checkpoint(cp, log_signer)
    assert note.startswith(cp.format() + "\n\u2014 " + ORIGIN + " ")
    assert open_checkpoint(note, log_signer.verifier(), ORIGIN) == cp
    assert open_checkpoint(note.encode(), [log_signer.verifier()], ORIGIN) == cp


def test_open_rejects_wrong_origin(log_signer: Signer) -> None:
    note = sign_checkpoint(Checkpoint("example.org/other-log", 1, ROOT), log_signer)
    with pytest.raises(CheckpointError, match="origin"):
        open_checkpoint(note, log_signer.verifier(), ORIGIN)


def test_open_rejects_wrong_key(log_signer: Signer) -> None:
    note = sign_checkpoint(Checkpoint(ORIGIN, 1, ROOT), log_signer)
    with pytest.raises(UnverifiedNoteError):
        open_checkpoint(note, Signer.generate(ORIGIN).verifier(), ORIGIN)


def test_size_and_root_come_from_signed_text_only(log_signer: Signer) -> None:
    note = sign_checkpoint(Checkpoint(ORIGIN, 10, ROOT), log_signer)
    forged = note.replace("\n10\n", "\n11\n", 1)
    with pytest.raises(InvalidSignatureError):
        open_checkpoint(forged, log_signer.verifier(), ORIGIN)
    # an unsigned body after the signatures is not accepted either
    with pytest.raises(MalformedNoteError):
        open_checkpoint(note + Checkpoint(ORIGIN, 11, ROOT).format(), log_signer.verifier(), ORIGIN)


def test_signed_but_malformed_body(log_signer: Signer) -> None:
    from sle_events.ledger.note import sign_note

    note = sign_note(f"{ORIGIN}\n010\n{base64.b64encode(ROOT).decode()}\n", [log_signer])
    with pytest.raises(CheckpointError):
        open_checkpoint(note, log_signer.verifier(), ORIGIN)
