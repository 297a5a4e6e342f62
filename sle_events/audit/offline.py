"""The offline proof check (`sle ledger verify-proof`): a proof or checkpoint file and the log's vkey, nothing
else. Stdlib and the ledger's pure core only: no database code is imported (tested)."""

from __future__ import annotations

import base64
import json

from sle_events.audit.errors import ProofRejected
from sle_events.ledger.checkpoint import Checkpoint, CheckpointError, ExtensionError, check_extension, open_checkpoint
from sle_events.ledger.merkle import ProofError, RootMismatchError
from sle_events.ledger.note import InvalidSignatureError, NoteError, UnverifiedNoteError, Verifier
from sle_events.ledger.proof_file import TLOG_PROOF_HEADER, ProofFileError, parse_consistency_proof, verify_proof_file

__all__ = ["is_inclusion_proof", "check_proof"]


def _b64(h: bytes) -> str:
    return base64.b64encode(h).decode("ascii")


def is_inclusion_proof(text: str) -> bool:
    """A tlog-proof (which needs its leaf bytes) rather than a bare checkpoint."""
    return text.startswith(TLOG_PROOF_HEADER + "\n")


def check_proof(
    text: str,
    verifier: Verifier,
    origin: str,
    *,
    leaf: bytes | None = None,
    old_checkpoint: str | None = None,
    consistency: str | None = None,
) -> list[str]:
    """What the files prove, one line each; `ProofRejected` (with the reason) if they do not verify."""

    def why(e: Exception, what: str) -> str:
        if isinstance(e, InvalidSignatureError):
            return f"{what}'s signature does not verify with {verifier.vkey}"
        if isinstance(e, UnverifiedNoteError):
            return f"{what} is not signed by {verifier.vkey} (no signature from that key)"
        if isinstance(e, RootMismatchError):
            return f"{what}: the proof leads to root {_b64(e.calculated)}, but the checkpoint signs {_b64(e.expected)}"
        return f"{what}: {e}"

    lines: list[str] = []
    cp: Checkpoint
    if is_inclusion_proof(text):
        try:
            result = verify_proof_file(text, leaf or b"", verifier, origin)
        except (NoteError, CheckpointError) as e:
            raise ProofRejected(why(e, "the proof's checkpoint")) from None
        except RootMismatchError as e:
            raise ProofRejected(
                why(e, "the leaf is not in the checkpoint's tree") + " (wrong leaf bytes or altered proof)"
            ) from None
        except (ProofFileError, ProofError) as e:
            raise ProofRejected(f"the inclusion proof is not valid: {e}") from None
        cp = result.checkpoint
        lines.append(
            f"OK: leaf {result.index}{_describe_leaf(leaf or b'')} is in the tree of {cp.size} signed by {cp.origin}"
        )
    else:
        try:
            cp = open_checkpoint(text, verifier, origin)
        except (NoteError, CheckpointError) as e:
            raise ProofRejected(why(e, "the checkpoint")) from None
        lines.append(f"OK: checkpoint of {cp.origin}, size {cp.size}, root {_b64(cp.root_hash)}, signature verified")
    if old_checkpoint is not None and consistency is not None:
        try:
            old = open_checkpoint(old_checkpoint, verifier, origin)
        except (NoteError, CheckpointError) as e:
            raise ProofRejected(why(e, "the old checkpoint")) from None
        try:
            hashes = parse_consistency_proof(consistency)
        except ProofFileError as e:
            raise ProofRejected(f"the consistency proof is malformed: {e}") from None
        try:
            check_extension(old.size, old.root_hash, cp.size, cp.root_hash, hashes)
        except ExtensionError as e:
            raise ProofRejected(str(e)) from None
        lines.append(f"OK: the tree of {cp.size} extends the old checkpoint of {old.size} (append-only)")
    return lines


def _describe_leaf(data: bytes) -> str:
    """The event the leaf bytes claim to be (authenticated only as far as the inclusion proof goes)."""
    try:
        env = json.loads(data)["envelope"]
        return f" ({env['stream']} v{env['version']} {str(env['type']).rsplit(':', 1)[-1]})"
    except Exception:
        return ""
