"""C2SP signed notes: spec and golang.org/x/mod/sumdb/note vectors, plus rejection cases."""

from __future__ import annotations

import base64
import pickle

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sle_events.ledger.note import (
    InvalidSignatureError,
    KeyFormatError,
    MalformedNoteError,
    NoteError,
    Signer,
    UnverifiedNoteError,
    Verifier,
    generate_key,
    key_id,
    open_note,
    parse_note,
    parse_vkey,
    sign_note,
    vkey_for,
)

from ledger_vectors import load

VEC = load("signed_note.json")
C2SP = VEC["c2sp"]
GO = VEC["golang_mod_sumdb_note"]
PETER = Verifier.from_vkey(GO["peter_vkey"])
ENOCH = Verifier.from_vkey(GO["enoch_vkey"])
TEXT = GO["note_text"]


# --------------------------------------------------------------------------- C2SP examples


def test_c2sp_signed_note_example() -> None:
    ex = C2SP["signed_note_example"]
    v = Verifier.from_vkey(ex["vkey"])
    assert v.vkey == ex["vkey"]
    text, sigs = open_note(ex["note"], [v])
    assert text == ex["expect_text"]
    assert [s.name for s in sigs] == ["example.com/foo"]
    assert sigs[0].key_id == 0x530D903A


def test_c2sp_intro_example_parses() -> None:
    ex = C2SP["signed_note_intro_example"]  # key not published: structure only
    text, sigs = parse_note(ex["note"])
    assert text == ex["expect_text"]  # the text itself contains an empty line
    assert [s.name for s in sigs] == ex["expect_sig_names"]
    with pytest.raises(UnverifiedNoteError):
        open_note(ex["note"], [PETER])


# --------------------------------------------------------------------------- Go vectors


def test_go_sign_is_reproduced_exactly() -> None:
    signer = Signer.from_skey(GO["peter_skey"])
    assert signer.vkey == GO["peter_vkey"]
    assert signer.key_id == 0xC74F20A3
    assert sign_note(TEXT, [signer]) == GO["expect_signed_by_peter"]
    assert signer.export_skey() == GO["peter_skey"]


def test_go_open_single_and_double_signed() -> None:
    text, sigs = open_note(GO["expect_signed_by_peter"], [PETER])
    assert text == TEXT and [s.name for s in sigs] == ["PeterNeumann"]
    both = TEXT + "\n" + GO["peter_sig_line"] + "\n" + GO["enoch_sig_line"] + "\n"
    text, sigs = open_note(both, [PETER, ENOCH])
    assert [s.name for s in sigs] == ["PeterNeumann", "EnochRoot"]
    # Enoch unknown: his signature is ignored, Peter's suffices
    text, sigs = open_note(both, [PETER])
    assert [s.name for s in sigs] == ["PeterNeumann"]
    text, sigs = open_note(both, [ENOCH])
    assert [s.name for s in sigs] == ["EnochRoot"]


def test_go_resign_adds_signature_after_existing() -> None:
    signer = Signer.from_skey(GO["peter_skey"])
    text, sigs = parse_note(TEXT + "\n" + GO["enoch_sig_line"] + "\n")
    out = sign_note(text, [signer], existing=sigs)
    assert out == TEXT + "\n" + GO["enoch_sig_line"] + "\n" + GO["peter_sig_line"] + "\n"
    # re-signing by the same key replaces its old line instead of duplicating it
    text, sigs = parse_note(out)
    assert sign_note(text, [signer], existing=sigs) == out


@pytest.mark.parametrize("case", GO["bad_vkeys"], ids=lambda c: c["desc"])
def test_go_bad_vkeys(case: dict) -> None:
    with pytest.raises(KeyFormatError):
        Verifier.from_vkey(case["vkey"])


def _vkey_manglings(vkey: str) -> list[str]:
    # GO["bad_vkey_rule"]: every proper substring and every single-byte +1 mangling.
    raw = vkey.encode()
    out = {raw[i:j].decode("utf-8", "ignore") for i in range(len(raw) + 1) for j in range(i, len(raw) + 1)}
    out.discard(vkey)
    for i in range(len(raw)):
        m = bytearray(raw)
        m[i] = (m[i] + 1) & 0xFF
        out.add(bytes(m).decode("utf-8", "surrogateescape"))
    return sorted(out)


def test_go_bad_vkey_rule() -> None:
    assert "proper substring" in GO["bad_vkey_rule"]
    manglings = _vkey_manglings(GO["peter_vkey"])
    assert len(manglings) > 2000
    for bad in manglings:
        with pytest.raises((KeyFormatError, ValueError)):
            Verifier.from_vkey(bad)


def test_go_invalid_signature_rejects_note() -> None:
    with pytest.raises(InvalidSignatureError, match="PeterNeumann\\+c74f20a3"):
        open_note(GO["invalid_signature_msg"]["msg"], [PETER])
    # unknown-only: the bad signature is not checked, but nothing verifies either
    with pytest.raises(UnverifiedNoteError):
        open_note(GO["invalid_signature_msg"]["msg"], [ENOCH])


@pytest.mark.parametrize("case", GO["malformed_msgs"], ids=lambda c: c["desc"])
def test_go_malformed_notes(case: dict) -> None:
    msg = case["msg"] if "msg" in case else bytes.fromhex(case["msg_hex"])
    with pytest.raises(MalformedNoteError):
        open_note(msg, [PETER])


# --------------------------------------------------------------------------- rejection cases


def _signed(signer: Signer, text: str = TEXT) -> str:
    return sign_note(text, [signer])


@pytest.fixture(scope="module")
def alice() -> Signer:
    return Signer.generate("example.org/alice")


def test_known_key_bad_signature_rejects_even_with_a_good_one(alice: Signer) -> None:
    good = _signed(alice)
    text, sigs = parse_note(good)
    blob = bytearray(base64.b64decode(sigs[0].base64))
    blob[-1] ^= 1
    bad_line = "\u2014 example.org/alice " + base64.b64encode(bytes(blob)).decode() + "\n"
    with pytest.raises(InvalidSignatureError):
        open_note(good + bad_line, [alice.verifier()])
    with pytest.raises(InvalidSignatureError):
        open_note(text + "\n" + bad_line + sigs[0].line(), [alice.verifier()])


def test_wrong_key(alice: Signer) -> None:
    other = Signer.generate("example.org/alice")  # same name, different key id
    with pytest.raises(UnverifiedNoteError):
        open_note(_signed(alice), [other.verifier()])
    with pytest.raises(UnverifiedNoteError):
        open_note(_signed(alice), [])


def test_same_name_and_id_but_different_key_is_a_bad_signature(alice: Signer) -> None:
    class Impostor:
        name = alice.name
        key_id = alice.key_id

        def verify(self, msg: bytes, sig: bytes) -> bool:
            return Signer.generate("x").verifier().verify(msg, sig)

    with pytest.raises(InvalidSignatureError):
        open_note(_signed(alice), [Impostor()])


@pytest.mark.parametrize(
    "mangle",
    [
        pytest.param(lambda n: n.replace("\u2014 ", "- "), id="hyphen instead of em dash"),
        pytest.param(lambda n: n.replace("\u2014 ", "\u2014"), id="no space after em dash"),
        pytest.param(lambda n: n.replace("\u2014 ", "\u2013 "), id="en dash"),
        pytest.param(lambda n: n[:-2] + "!\n", id="bad base64 char"),
        pytest.param(lambda n: n[:-3] + "\n", id="truncated base64"),
        pytest.param(lambda n: n.replace("=\n", "\n"), id="missing padding"),
        pytest.param(lambda n: n + "\n", id="extra trailing newline"),
        pytest.param(lambda n: n[:-1], id="no final newline"),
        pytest.param(lambda n: n.replace("\n", "\r\n"), id="CRLF"),
        pytest.param(lambda n: n.replace("you", "y\rou", 1), id="CR in text"),
        pytest.param(lambda n: n.replace("you", "y\tou", 1), id="tab in text"),
        pytest.param(lambda n: n.replace("\n\n", "\n"), id="no blank line"),
        pytest.param(lambda n: n.replace("alice ", "alice  "), id="double space"),
        pytest.param(lambda n: n.replace("example.org/alice", "bad name"), id="name with space"),
        pytest.param(lambda n: n.replace("example.org/alice", "a+b"), id="name with plus"),
        pytest.param(lambda n: n.replace("example.org/alice ", ""), id="no name"),
        pytest.param(lambda n: n + "trailing junk\n", id="junk after signatures"),
    ],
)
def test_malformed_signature_block(alice: Signer, mangle: object) -> None:
    note = _signed(alice)
    open_note(note, [alice.verifier()])
    with pytest.raises(MalformedNoteError):
        open_note(mangle(note), [alice.verifier()])  # type: ignore[operator]  # mangle is a parametrized lambda


def test_short_signature_and_too_many_signatures(alice: Signer) -> None:
    short = TEXT + "\n\u2014 x " + base64.b64encode(b"1234").decode() + "\n"
    with pytest.raises(MalformedNoteError, match="too short"):
        parse_note(short)
    line = _signed(alice).split("\n\n")[-1]
    with pytest.raises(MalformedNoteError, match="more than 100"):
        parse_note(TEXT + "\n" + line * 101)
    _text, sigs = open_note(TEXT + "\n" + line * 16, [alice.verifier()])
    assert len(sigs) == 1  # duplicates verified, reported once


def test_sign_rejects_bad_text(alice: Signer) -> None:
    for text in ["no newline", "a\r\nb\n", "\x00\n"]:
        with pytest.raises(MalformedNoteError):
            sign_note(text, [alice])
    with pytest.raises(NoteError):
        sign_note("x\n", [])


# --------------------------------------------------------------------------- keys


def test_vkey_format_and_key_id() -> None:
    signer = Signer.generate("log.example/x")
    vkey = signer.vkey
    name, kid, alg, raw = parse_vkey(vkey)
    assert (name, kid, alg, raw) == ("log.example/x", signer.key_id, 1, signer.public_key)
    assert vkey == vkey_for("log.example/x", signer.public_key)
    assert kid == key_id("log.example/x", b"\x01" + signer.public_key)
    assert vkey.split("+")[1] == f"{kid:08x}"
    # base64 of the key may itself contain '+': only the first two '+' split
    assert Verifier.from_vkey(GO["enoch_vkey"]).name == "EnochRoot"


@pytest.mark.parametrize("name", ["", "a b", "a+b", "a\tb", "a\nb", "a\u00a0b", "a\u2003b"])
def test_invalid_key_names(name: str) -> None:
    with pytest.raises(KeyFormatError):
        Signer.generate(name)
    with pytest.raises(KeyFormatError):
        vkey_for(name, b"\x00" * 32)


def test_private_key_never_in_repr_or_str() -> None:
    skey, vkey = generate_key("secret.example/log")
    signer = Signer.from_skey(skey)
    seed = base64.b64decode(skey.split("+", 4)[-1])[1:]
    forms = [repr(signer), str(signer), f"{signer}", f"{signer!r}", repr(signer.verifier())]
    for text in forms:
        for secret in (skey.split("+", 4)[-1], seed.hex(), base64.b64encode(seed).decode()):
            assert secret not in text
    assert "secret.example/log" in repr(signer)
    with pytest.raises(TypeError):
        pickle.dumps(signer)
    assert signer.vkey == vkey


@pytest.mark.parametrize(
    "skey",
    [
        "PRIVATE+KEY+PeterNeumann+c74f20a4+AYEKFALVFGyNhPJEMzD1QIDr+Y7hfZx09iUvxdXHKDFz",
        "PRIVATE+KEY+PeterNeumann+c74f20a3+AoEKFALVFGyNhPJEMzD1QIDr+Y7hfZx09iUvxdXHKDFz",
        "PUBLIC+KEY+PeterNeumann+c74f20a3+AYEKFALVFGyNhPJEMzD1QIDr+Y7hfZx09iUvxdXHKDFz",
        "PRIVATE+KEY+PeterNeumann+c74f20a3",
    ],
)
def test_bad_skeys(skey: str) -> None:
    with pytest.raises(KeyFormatError):
        Signer.from_skey(skey)


# --------------------------------------------------------------------------- round trip

_line = st.text(
    alphabet=st.characters(blacklist_categories=["Cs"], blacklist_characters="\n", min_codepoint=0x20),
    max_size=40,
)


@settings(max_examples=50, deadline=None)
@given(st.lists(_line, min_size=1, max_size=6))
def test_note_round_trip(lines: list[str]) -> None:
    signer = Signer.from_skey(GO["peter_skey"])
    enoch = Signer.generate("EnochRoot")
    text = "\n".join(lines) + "\n"
    note = sign_note(text, [signer, enoch])
    got, sigs = open_note(note, [PETER, enoch.verifier()])
    assert got == text
    assert [s.name for s in sigs] == ["PeterNeumann", "EnochRoot"]
    got_bytes, _ = open_note(note.encode(), [PETER])
    assert got_bytes == text
