"""Verification results kept in the audited database, signed by the verifier so a forged "ok" shows as such.

`sle verify --sign-key FILE --actor ID` signs the canonical JSON of its result (when, ok, events, every
finding) with a key the study registered (role auditor, monitor or admin); the seal is stored beside the
run (`verification_seals`). Wherever a stored result is shown, `check_result` re-checks it against the study
registry as re-derived from the signed events: an unsigned, edited or foreign result reads "UNVERIFIABLE".
Someone with SQL can still delete runs (the previous signed one then shows) but cannot make one say "ok".

A full run also seals the Merkle tree it checked (`verification_trees`: how many events, in log order, and the
RFC 9162 root of their stored bytes). That is what lets an export verify once per checkpoint: leaves proven to
rebuild a sealed, clean run's root carry events whose signatures that run checked (`vouched_tree`).
"""

from __future__ import annotations

import base64
import hashlib
from dataclasses import dataclass
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


verification_trees = sa.Table(
    "verification_trees",
    metadata,
    sa.Column("run_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True, autoincrement=False),
    sa.Column("size", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
    sa.Column("root", sa.String(64), nullable=False),  # base64 of the 32-byte root
)


def result_document(
    run_at: str, ok: bool, events: int, findings: list[Any], tree: tuple[int, str] | None = None
) -> bytes:
    """The bytes a verifier signs: the run as stored (time, ok, count), a digest of every finding and, for a full
    run, the tree it checked (size, root)."""
    rows = [[f.position, f.stream, f.version, f.kind, f.detail] for f in findings]
    digest = hashlib.sha256(canonical_json(rows)).hexdigest()
    doc: dict[str, Any] = {
        "run_at": run_at,
        "ok": bool(ok),
        "events": int(events),
        "findings": len(rows),
        "findings_sha256": digest,
    }
    if tree is not None:
        doc["tree"] = {"size": int(tree[0]), "root": tree[1]}
    return canonical_json(doc)


def save_tree(conn: Any, run_id: int, report: Any) -> tuple[int, str] | None:
    """Keep the tree of the integrated events a full run checked, if the record has a ledger (none for an
    incremental run, which re-hashed rather than re-verified the events before its checkpoint)."""
    logged = (report.ledger or {}).get("logged")
    if report.since is not None or not logged:
        return None
    verification_trees.create(conn, checkfirst=True)
    tree = (int(logged["size"]), str(logged["root"]))
    conn.execute(verification_trees.insert().values(run_id=run_id, size=tree[0], root=tree[1]))
    return tree


def run_tree(conn: Any, run_id: int) -> tuple[int, str] | None:
    if not sa.inspect(conn).has_table(verification_trees.name):
        return None
    row = conn.execute(sa.select(verification_trees).where(verification_trees.c.run_id == run_id)).first()
    return (int(row.size), str(row.root)) if row is not None else None


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


@dataclass(frozen=True)
class VouchedTree:
    """The first `size` events in log order were checked by sealed run `run_id` (signatures, keys, chains: no
    finding), and the ledger's leaves 0..size-1 rebuild the root that run sealed: an event whose stored bytes
    hash to its leaf there is one the run verified."""

    run_id: int
    actor: str
    key: str
    size: int

    def describe(self) -> str:
        return (
            f"verification run {self.run_id} sealed by {self.actor} (key {self.key}) checked every signature of "
            f"the first {self.size} events; each exported event's stored bytes were matched to that tree's leaf"
        )


def vouched_tree(conn: Any) -> VouchedTree | None:
    """The newest clean, sealed, full verification whose tree the ledger's leaves rebuild; None if there is none
    (an export then checks every signature itself)."""
    from sle_events.ledger.merkle import root_from_leaf_hashes
    from sle_events.ledger.tables import ledger_leaves

    insp = sa.inspect(conn)
    if not all(insp.has_table(t) for t in ("verification_runs", verification_trees.name, ledger_leaves.name)):
        return None
    runs = sa.table("verification_runs", sa.column("id"), sa.column("run_at"), sa.column("ok"), sa.column("events"))
    t = verification_trees
    candidates = conn.execute(
        sa.select(runs.c.id, runs.c.run_at, runs.c.ok, runs.c.events, t.c.size, t.c.root)
        .join(t, t.c.run_id == runs.c.id)
        .where(runs.c.ok == 1)
        .order_by(runs.c.id.desc())
        .limit(5)
    ).all()
    for run in candidates:
        tree = (int(run.size), str(run.root))
        if check_result(conn, run.id, result_document(run.run_at, True, run.events, [], tree)) is not None:
            continue
        lv = ledger_leaves.c
        leaves = [bytes(h) for (h,) in conn.execute(sa.select(lv.leaf_hash).where(lv.idx < tree[0]).order_by(lv.idx))]
        if len(leaves) != tree[0] or base64.b64encode(root_from_leaf_hashes(leaves)).decode() != tree[1]:
            continue  # the ledger no longer holds the tree that run checked: vouch for nothing
        seal = conn.execute(sa.select(verification_seals).where(verification_seals.c.run_id == run.id)).one()
        return VouchedTree(int(run.id), seal.actor, seal.key, min(int(run.events), tree[0]))
    return None
