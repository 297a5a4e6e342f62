"""Stage 4: inclusion and consistency proofs from the stored tree, each checked before it is handed out."""

from __future__ import annotations

from typing import TYPE_CHECKING
from uuid import UUID

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from .base import ConsistencyProof, InclusionProof, LeafRecord, LedgerError, StoredCheckpoint, _utcnow
from .checkpoint import Checkpoint, CheckpointError, check_extension, follow_key_rotations
from .merkle import (
    ProofError,
    consistency_proof,
    consistency_proof_nodes,
    inclusion_proof,
    inclusion_proof_nodes,
    leaf_hash,
    verify_inclusion,
)
from .note import NoteError, Verifier, open_note, parse_note
from .tables import ledger_checkpoints, ledger_leaves

if TYPE_CHECKING:  # the mixin works on LedgerBase's state; at run time Ledger inherits both
    from .base import LedgerBase as _Ledger
else:
    _Ledger = object


class Proving(_Ledger):
    """`Ledger.inclusion_proof`, `Ledger.consistency_proof`, `Ledger.prove_consistency`."""

    def _verifiers(self, conn: Connection) -> list[Verifier]:
        """The log's key and the earlier keys its rotation checkpoints (signed by both keys) link to it."""
        vkey = self._read_state(conn).vkey
        if not vkey:
            return []
        notes = list(conn.execute(sa.select(ledger_checkpoints.c.note).order_by(ledger_checkpoints.c.id)).scalars())
        return [Verifier.from_vkey(k) for k in follow_key_rotations(notes, vkey).linked]

    def _resolve_checkpoint(self, conn: Connection, note: str | None) -> tuple[int, bytes, str]:
        """(size, root, note): the given checkpoint note, checked against this log, or the latest stored one."""
        if note is None:
            latest = self._latest_checkpoint(conn)
            if latest is None:
                raise LedgerError("no checkpoint has been issued yet: run `sle ledger checkpoint`")
            return latest.size, latest.root, latest.note
        verifiers = self._verifiers(conn)
        try:
            text = open_note(note, verifiers)[0] if verifiers else parse_note(note)[0]
            cp = Checkpoint.parse(text)
        except (NoteError, CheckpointError) as e:
            raise LedgerError(f"the given checkpoint is not one of this log's: {e}") from None
        st = self._read_state(conn)
        if st.origin is not None and cp.origin != st.origin:
            raise LedgerError(f"the given checkpoint is for origin {cp.origin!r}, this log is {st.origin!r}")
        if cp.size > st.size:
            raise LedgerError(f"the given checkpoint covers {cp.size} leaves; this ledger has integrated {st.size}")
        if self._root_at(conn, cp.size) != cp.root_hash:
            raise LedgerError(
                f"this log's tree at size {cp.size} does not have the given checkpoint's root: "
                "the log is not consistent with it"
            )
        return cp.size, cp.root_hash, note

    # --- leaves and proofs ------------------------------------------------------------------------------
    def _leaf(self, conn: Connection, *, index: int | None = None, position: int | None = None) -> LeafRecord:
        lv = ledger_leaves.c
        cond = lv.idx == index if index is not None else lv.position == position
        row = conn.execute(sa.select(lv.idx, lv.position, lv.leaf_hash, lv.stream, lv.version).where(cond)).first()
        if row is not None:
            return LeafRecord(row.idx, row.position, bytes(row.leaf_hash), row.stream, row.version)
        st = self._read_state(conn)
        if index is not None:
            raise LedgerError(f"leaf index {index} does not exist: the tree has {st.size} leaves")
        exists = conn.execute(sa.select(self.events.c.id).where(self.events.c.id == position)).first()
        if exists is None:
            raise LedgerError(f"there is no event at log position {position}")
        if position is not None and position > st.position:
            raise LedgerError(f"the event at log position {position} is not integrated yet: run `sle ledger integrate`")
        raise LedgerError(f"the event at log position {position} is not in the ledger: run `sle verify`")

    def leaf(self, *, index: int | None = None, position: int | None = None) -> LeafRecord:
        if (index is None) == (position is None):
            raise ValueError("give exactly one of index or position")
        with self.engine.connect() as conn:
            return self._leaf(conn, index=index, position=position)

    def position_of(self, stream: UUID | str, version: int) -> int:
        """Log position of an event given its stream and version."""
        ev = self.events
        stream_id = stream if isinstance(stream, UUID) else UUID(str(stream))
        with self.engine.connect() as conn:
            pos = conn.execute(
                sa.select(ev.c.id).where(ev.c.originator_id == stream_id, ev.c.originator_version == version)
            ).scalar()
        if pos is None:
            raise LedgerError(f"there is no event {stream_id} v{version}")
        return int(pos)

    def leaf_bytes(self, position: int) -> bytes:
        with self.engine.connect() as conn:
            state = conn.execute(sa.select(self.events.c.state).where(self.events.c.id == position)).scalar()
        if state is None:
            raise LedgerError(f"there is no event at log position {position}")
        return bytes(state)

    def inclusion_proof(
        self,
        position: int | None = None,
        *,
        index: int | None = None,
        checkpoint: str | None = None,
        with_leaf: bool = True,
    ) -> InclusionProof:
        """Inclusion proof for the leaf at log ``position`` (or leaf ``index``) in a checkpoint's tree.

        ``checkpoint`` is a signed checkpoint note of this log (e.g. one an auditor holds); default the latest
        stored checkpoint. The proof is checked against the checkpoint before it is returned, and the leaf
        bytes (the event's stored state) against the logged leaf hash.
        """
        if (index is None) == (position is None):
            raise ValueError("give exactly one of position or index")
        with self.engine.connect() as conn:
            leaf = self._leaf(conn, index=index, position=position)
            size, root, note = self._resolve_checkpoint(conn, checkpoint)
            if leaf.index >= size:
                raise LedgerError(
                    f"leaf {leaf.index} (log position {leaf.position}) is not covered by the "
                    f"checkpoint (size {size}) yet: run `sle ledger checkpoint`"
                )
            nodes = self._fetch_nodes(conn, inclusion_proof_nodes(leaf.index, size))
            hashes = inclusion_proof(leaf.index, size, lambda level, i: nodes[(level, i)])
            data: bytes | None = None
            if with_leaf:
                state = conn.execute(sa.select(self.events.c.state).where(self.events.c.id == leaf.position)).scalar()
                if state is None:
                    raise LedgerError(
                        f"the event of leaf {leaf.index} (log position {leaf.position}, "
                        f"{leaf.stream} v{leaf.version}) is gone from the record: run `sle verify`"
                    )
                data = bytes(state)
                if leaf_hash(data) != leaf.leaf_hash:
                    raise LedgerError(
                        f"the event at log position {leaf.position} no longer matches its logged leaf "
                        "hash: it was altered after it was logged; run `sle verify`"
                    )
        try:
            verify_inclusion(leaf.leaf_hash, leaf.index, size, hashes, root)
        except ProofError as e:
            raise LedgerError(
                f"the stored tree does not prove leaf {leaf.index} in its own checkpoint ({e}): "
                "the ledger tables were altered; run `sle verify`"
            ) from None
        return InclusionProof(leaf, size, tuple(hashes), note, data)

    def consistency_proof(self, old_size: int, new_size: int | None = None) -> list[bytes]:
        """RFC 9162 consistency proof between two sizes of the stored tree (``new_size`` default: current)."""
        with self.engine.connect() as conn:
            current = self._read_state(conn).size
            new_size = current if new_size is None else new_size
            if not 0 < old_size <= new_size <= current:
                raise LedgerError(
                    f"no consistency proof from size {old_size} to {new_size} (need 0 < old <= new <= {current})"
                )
            nodes = self._fetch_nodes(conn, consistency_proof_nodes(old_size, new_size))
            return consistency_proof(old_size, new_size, lambda level, i: nodes[(level, i)])

    def prove_consistency(self, old_note: str, new_note: str | None = None) -> ConsistencyProof:
        """Consistency proof from a checkpoint an auditor saved to a newer one (default: the latest).

        Refuses with :class:`LedgerError` if this log's tree does not reproduce the old checkpoint's root.
        """
        with self.engine.connect() as conn:
            old_size, old_root, _ = self._resolve_checkpoint(conn, old_note)
            if new_note is None:
                latest = self._latest_checkpoint(conn)
                if latest is None:
                    raise LedgerError("no checkpoint has been issued yet: run `sle ledger checkpoint`")
                new = latest
            else:
                size, root, note = self._resolve_checkpoint(conn, new_note)
                new = StoredCheckpoint(0, size, root, note, _utcnow())
            if self._root_at(conn, new.size) != new.root:
                raise LedgerError(
                    f"this log's tree at size {new.size} does not have the root of the newest "
                    "checkpoint: the ledger was altered; run `sle verify`"
                )
            if old_size > new.size:
                raise LedgerError(f"the old checkpoint (size {old_size}) is newer than the new one ({new.size})")
            if old_size == 0:
                return ConsistencyProof(0, new, ())
            nodes = self._fetch_nodes(conn, consistency_proof_nodes(old_size, new.size))
            hashes = consistency_proof(old_size, new.size, lambda level, i: nodes[(level, i)])
        check_extension(old_size, old_root, new.size, new.root, hashes)
        return ConsistencyProof(old_size, new, tuple(hashes))


def parse_event_id(text: str) -> tuple[UUID, int] | int:
    """``<stream uuid>:<version>`` -> (stream, version); a decimal -> log position. ValueError otherwise."""
    text = text.strip()
    if ":" in text:
        stream_s, _, version_s = text.rpartition(":")
        try:
            stream = UUID(stream_s)
        except ValueError:
            raise ValueError(f"{stream_s!r} is not a stream UUID") from None
        if not version_s.isdigit() or int(version_s) < 1:
            raise ValueError(f"{version_s!r} is not a version (a positive integer)")
        return stream, int(version_s)
    if text.isdigit() and int(text) > 0:
        return int(text)
    raise ValueError(f"{text!r} is neither <stream uuid>:<version> nor a log position")
