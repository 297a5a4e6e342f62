"""Pure transparency-log core (no database): Merkle tree, signed notes, checkpoints, proofs.

Modules and main exports:

* :mod:`.merkle` -- RFC 9162/6962 Merkle tree.  ``leaf_hash``, ``node_hash``,
  ``EMPTY_ROOT``, ``root_from_leaf_hashes``, ``root_of_leaves`` (fast whole-tree
  recompute), ``CompactRange`` (= ``MerkleAccumulator``; O(log n) append, persistable
  via ``to_state``/``from_state``), ``MemoryTree``, proof generation from a
  ``get_node(level, index)`` source (``inclusion_proof``, ``consistency_proof``,
  ``inclusion_proof_nodes``, ``consistency_proof_nodes``, ``root_at``) and verification
  (``verify_inclusion``, ``verify_consistency``) raising ``ProofError``.
* :mod:`.note` -- C2SP signed notes with Ed25519: ``Signer``, ``Verifier``,
  ``sign_note``, ``open_note``, ``parse_note``, ``vkey_for``, ``generate_key``,
  errors ``NoteError`` (``MalformedNoteError``, ``InvalidSignatureError``,
  ``UnverifiedNoteError``) and ``KeyFormatError``.
* :mod:`.checkpoint` -- C2SP tlog-checkpoint: ``Checkpoint`` (``format``/``parse``),
  ``sign_checkpoint``, ``open_checkpoint``, ``CheckpointError``.
* :mod:`.proof_file` -- c2sp.org/tlog-proof@v1: ``TlogProof`` (``format``/``parse``),
  ``verify_proof_file``, ``format_consistency_proof``, ``parse_consistency_proof``,
  ``ProofFileError``.
* :mod:`.cosignature` -- C2SP tlog-cosignature (Ed25519 ``cosignature/v1``):
  ``CosignatureSigner``, ``CosignatureVerifier``, ``cosignature_message``,
  ``cosignature_timestamp``, and ``Witness`` (``WitnessState``, ``WitnessError``).

All failures are ``ValueError`` subclasses.
"""

from .checkpoint import Checkpoint, CheckpointError, open_checkpoint, sign_checkpoint
from .cosignature import (
    CosignatureSigner,
    CosignatureVerifier,
    Witness,
    WitnessError,
    WitnessState,
    cosignature_message,
    cosignature_timestamp,
    cosignature_vkey,
)
from .merkle import (
    EMPTY_ROOT,
    CompactRange,
    CompactRangeState,
    MemoryTree,
    MerkleAccumulator,
    ProofError,
    ProofSizeError,
    RootMismatchError,
    consistency_proof,
    consistency_proof_nodes,
    inclusion_proof,
    inclusion_proof_nodes,
    leaf_hash,
    node_hash,
    root_at,
    root_from_leaf_hashes,
    root_of_leaves,
    verify_consistency,
    verify_inclusion,
)
from .note import (
    InvalidSignatureError,
    KeyFormatError,
    MalformedNoteError,
    NoteError,
    Signature,
    Signer,
    UnverifiedNoteError,
    Verifier,
    generate_key,
    open_note,
    parse_note,
    sign_note,
    vkey_for,
)
from .proof_file import (
    ProofFileError,
    TlogProof,
    VerifiedProof,
    format_consistency_proof,
    parse_consistency_proof,
    verify_proof_file,
)

__all__ = [
    # merkle
    "EMPTY_ROOT",
    "CompactRange",
    "CompactRangeState",
    "MemoryTree",
    "MerkleAccumulator",
    "ProofError",
    "ProofSizeError",
    "RootMismatchError",
    "consistency_proof",
    "consistency_proof_nodes",
    "inclusion_proof",
    "inclusion_proof_nodes",
    "leaf_hash",
    "node_hash",
    "root_at",
    "root_from_leaf_hashes",
    "root_of_leaves",
    "verify_consistency",
    "verify_inclusion",
    # note
    "InvalidSignatureError",
    "KeyFormatError",
    "MalformedNoteError",
    "NoteError",
    "Signature",
    "Signer",
    "UnverifiedNoteError",
    "Verifier",
    "generate_key",
    "open_note",
    "parse_note",
    "sign_note",
    "vkey_for",
    # checkpoint
    "Checkpoint",
    "CheckpointError",
    "open_checkpoint",
    "sign_checkpoint",
    # proof files
    "ProofFileError",
    "TlogProof",
    "VerifiedProof",
    "format_consistency_proof",
    "parse_consistency_proof",
    "verify_proof_file",
    # cosignatures
    "CosignatureSigner",
    "CosignatureVerifier",
    "Witness",
    "WitnessError",
    "WitnessState",
    "cosignature_message",
    "cosignature_timestamp",
    "cosignature_vkey",
]
