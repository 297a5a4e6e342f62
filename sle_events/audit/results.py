"""Verification results kept in the audited database, signed by the verifier so a forged "ok" shows as such.

`sle verify --sign-key FILE --actor ID` signs the canonical JSON of its result (when, ok, events, every
finding) with a key the study registered (role auditor, monitor or admin); the seal is stored beside the
run (`verification_seals`). Wherever a stored result is shown, `check_result` re-checks it against the study
registry as re-derived from the signed events: an unsigned, edited or foreign result reads "UNVERIFIABLE".
Someone with SQL can still delete runs (the previous signed one then shows) but cannot make one say "ok".
"""

from __future__ import annotations

import base64
import hashlib
from typing import Any

import sqlalchemy as sa

from sle_events.signing.canonical import canonical_json
from sle_events.signing.keys import Signer, verify_signature

RESULT_ROLES = ("auditor", "monitor", "admin")

metadata = sa.MetaData()
verification_seals = sa.Table(
    "verification_seals",
    metadata,
    sa.Column("run_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True, autoincrement=False),
    sa.Column("signed", sa.LargeBinary, nullable=False),  # canonical JSON of the result
    sa.Column("signature", sa.Text, nullable=False),  # base64 Ed25519
    sa.Column("actor", sa.Text, nullable=False),
    sa.Column("key", sa.String(64), nullable=False),
)


def result_document(run_at: str, ok: bool, events: int, findings: list[Any]) -> bytes:
    """The bytes a verifier signs: the run as stored (time, ok, count) and a digest of every finding."""
    rows = [[f.position, f.stream, f.version, f.kind, f.detail] for f in findings]
    digest = hashlib.sha256(canonical_json(rows)).hexdigest()
    return canonical_json(
        {"run_at": run_at, "ok": bool(ok), "events": int(events), "findings": len(rows), "findings_sha256": digest}
    )


def seal_result(conn: Any, run_id: int, document: bytes, signer: Signer) -> None:
    verification_seals.create(conn, checkfirst=True)
    conn.execute(
        verification_seals.insert().values(
            run_id=run_id,
            signed=document,
            actor=signer.actor,
            key=signer.key_id,
            signature=base64.b64encode(signer.sign(document)).decode(),
        )
    )


def check_result(conn: Any, run_id: int, document: bytes) -> str | None:
    """None if the stored run `run_id` (as `document` re-derives it from the stored rows) carries a valid seal by
    a key the study registry holds for a result role; else why it cannot be trusted."""
    if not sa.inspect(conn).has_table("verification_seals"):
        return "not signed by a verifier"
    seal = conn.execute(sa.select(verification_seals).where(verification_seals.c.run_id == run_id)).first()
    if seal is None:
        return "not signed by a verifier"
    if bytes(seal.signed) != document:
        return "the stored result differs from what the verifier signed"
    key = _registered_key(conn, seal.key, seal.actor)
    if key is None:
        return f"signed by key {seal.key}, which no study registered for {', '.join(RESULT_ROLES)}"
    try:
        signature = base64.b64decode(seal.signature, validate=True)
    except ValueError:
        return "its signature is malformed"
    if not verify_signature(key, signature, document):
        return f"the signature by {seal.actor} (key {seal.key}) does not verify"
    return None


def _registered_key(conn: Any, key: str, actor: str) -> Any:
    """The public key, if a study's registry (re-derived from its signed events) holds it for a result role."""
    from sle_events.audit.record_check import build_registry_timelines
    from sle_events.ledger.tables import events_table
    from sle_events.store.record import public_key

    table = events_table()
    timelines, _ = build_registry_timelines(conn, table, [])
    for _positions, states in timelines.values():
        entry = states[-1].keys.get(key)
        if entry and entry["actor"] == actor and entry["role"] in RESULT_ROLES and entry["status"] == "active":
            return public_key(states[-1].public_key(key))
    return None
