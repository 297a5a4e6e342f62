"""RFC 9162 section 2.1 (= RFC 6962 section 2.1) Merkle tree hashing, proofs and verification.

Hashing (SHA-256, domain separated):

* leaf hash  ``SHA-256(0x00 || data)``
* node hash  ``SHA-256(0x01 || left || right)``
* the root of the empty tree is ``SHA-256("")`` (:data:`EMPTY_ROOT`).

Node addressing used for storage: ``(level, index)`` names the *perfect* subtree of
``2**level`` leaves covering leaves ``[index * 2**level, (index + 1) * 2**level)``;
level 0 holds the leaf hashes.  Only perfect subtrees are ever stored.  Subtrees on the
right edge of a tree whose size is not a power of two ("ephemeral" nodes) are always
recomputed from the O(log n) perfect subtrees covering them, so a table
``(level, index, hash)`` that is append-only can serve proofs for every past tree size.

Proof generation takes a ``get_node(level, index) -> bytes`` callback.  A store can
also ask for the list of node ids a proof needs (:func:`inclusion_proof_nodes`,
:func:`consistency_proof_nodes`) and fetch them in one query.

Verification follows github.com/transparency-dev/merkle ``proof/verify.go`` exactly
(the consistency edge cases are those of its current test data): every failure raises
a :class:`ProofError` (a :class:`ValueError`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from sle_events.picklable import Picklable

__all__ = [
    "HASH_SIZE",
    "EMPTY_ROOT",
    "NodeID",
    "GetNode",
    "ProofError",
    "RootMismatchError",
    "ProofSizeError",
    "leaf_hash",
    "node_hash",
    "root_from_leaf_hashes",
    "root_of_leaves",
    "CompactRange",
    "CompactRangeState",
    "MerkleAccumulator",
    "MemoryTree",
    "range_nodes",
    "root_at",
    "inclusion_proof",
    "inclusion_proof_nodes",
    "consistency_proof",
    "consistency_proof_nodes",
    "root_from_inclusion_proof",
    "root_from_consistency_proof",
    "verify_inclusion",
    "verify_consistency",
]

HASH_SIZE = 32
_MAX_UINT64 = (1 << 64) - 1

_sha256 = hashlib.sha256
EMPTY_ROOT: bytes = _sha256(b"").digest()

NodeID = tuple[int, int]
"""``(level, index)`` of a perfect subtree."""

GetNode = Callable[[int, int], bytes]
"""``get_node(level, index)`` returns the hash of a perfect subtree."""


# --------------------------------------------------------------------------- errors


class ProofError(ValueError):
    """A Merkle proof did not verify (wrong shape, out-of-range index/size, mismatch)."""


class ProofSizeError(ProofError):
    """The proof has the wrong number of hashes for the claimed index/sizes."""


class RootMismatchError(Picklable, ProofError):
    """The root recomputed from the proof differs from the expected root."""

    def __init__(self, expected: bytes, calculated: bytes) -> None:
        self.expected = bytes(expected)
        self.calculated = bytes(calculated)
        super().__init__(f"calculated root {self.calculated.hex()} does not match expected root {self.expected.hex()}")


# --------------------------------------------------------------------------- hashing


def leaf_hash(data: bytes) -> bytes:
    """RFC 6962 leaf hash: ``SHA-256(0x00 || data)``."""
    return _sha256(b"\x00" + bytes(data)).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    """RFC 6962 interior node hash: ``SHA-256(0x01 || left || right)``."""
    return _sha256(b"\x01" + bytes(left) + bytes(right)).digest()


# Pre-seeded hash states: copy() + update() avoids re-initialising an OpenSSL digest
# context per hash, which measurably beats sha256(prefix + data) for short inputs.
_LEAF_STATE = _sha256(b"\x00")
_NODE_STATE = _sha256(b"\x01")


def pair_level(level: bytes) -> bytes:
    """The next level up of concatenated 32-byte nodes: the hash of each complete pair (an odd last node is
    left out; the caller promotes it or not)."""
    new = _NODE_STATE.copy
    mv = memoryview(level)
    out: list[bytes] = []
    put = out.append
    step = 2 * HASH_SIZE
    for k in range(0, (len(level) // step) * step, step):
        h = new()
        h.update(mv[k : k + step])
        put(h.digest())
    return b"".join(out)


def perfect_levels(level0: bytes) -> list[bytes]:
    """Every perfect subtree over these concatenated leaf hashes, level by level (level 0 first)."""
    levels = [bytes(level0)]
    while len(levels[-1]) >= 2 * HASH_SIZE:
        levels.append(pair_level(levels[-1]))
    return levels


def _reduce(level: list[bytes]) -> bytes:
    # Pairwise reduction, level by level; an odd last node is promoted unchanged,
    # which yields exactly the RFC 6962 tree (left subtree = largest power of two).
    buf = b"".join(level)
    while len(buf) > HASH_SIZE:
        odd = buf[-HASH_SIZE:] if (len(buf) // HASH_SIZE) & 1 else b""
        buf = pair_level(buf) + odd
    return buf if buf else EMPTY_ROOT


def root_from_leaf_hashes(hashes: Sequence[bytes]) -> bytes:
    """Merkle tree hash (MTH) of a list of leaf hashes; :data:`EMPTY_ROOT` if empty."""
    level = [bytes(h) for h in hashes]
    for i, h in enumerate(level):
        if len(h) != HASH_SIZE:
            raise ValueError(f"leaf hash {i} has {len(h)} bytes, want {HASH_SIZE}")
    return _reduce(level)


def root_of_leaves(leaves: Iterable[bytes]) -> bytes:
    """Merkle tree hash of raw leaf data (hashes the leaves, then reduces pairwise).

    This is the fast path for recomputing a whole tree; it does no per-item checks.
    """
    new = _LEAF_STATE.copy
    hashes: list[bytes] = []
    put = hashes.append
    for x in leaves:
        h = new()
        h.update(x)
        put(h.digest())
    return _reduce(hashes)


# --------------------------------------------------------------------------- node ranges


def _largest_pow2_below(n: int) -> int:
    """Largest power of two strictly less than ``n`` (``n >= 2``)."""
    return 1 << ((n - 1).bit_length() - 1)


def range_nodes(start: int, end: int) -> list[NodeID]:
    """Decompose leaves ``[start, end)`` into maximal aligned perfect subtrees, left to right.

    For any subtree of the RFC 6962 tree (in particular ``[0, size)``) the hash of the
    range is the right fold of these nodes: ``h0 . (h1 . (... . hk))``.
    """
    if not 0 <= start <= end:
        raise ValueError(f"invalid range [{start}, {end})")
    nodes: list[NodeID] = []
    while start < end:
        level = (start & -start).bit_length() - 1 if start else end.bit_length() - 1
        while start + (1 << level) > end:
            level -= 1
        nodes.append((level, start >> level))
        start += 1 << level
    return nodes


def _fold(hashes: Sequence[bytes]) -> bytes:
    acc = hashes[-1]
    for h in reversed(hashes[:-1]):
        acc = node_hash(h, acc)
    return acc


def _hash_plan(plan: list[list[NodeID]], get_node: GetNode) -> list[bytes]:
    cache: dict[NodeID, bytes] = {}
    out: list[bytes] = []
    for ids in plan:
        hs = []
        for nid in ids:
            h = cache.get(nid)
            if h is None:
                h = cache[nid] = bytes(get_node(*nid))
            hs.append(h)
        out.append(_fold(hs))
    return out


def root_at(size: int, get_node: GetNode) -> bytes:
    """Root of the tree of ``size`` leaves, from stored perfect subtrees (O(log n) lookups)."""
    if size < 0:
        raise ValueError(f"negative tree size {size}")
    if size == 0:
        return EMPTY_ROOT
    return _hash_plan([range_nodes(0, size)], get_node)[0]


# --------------------------------------------------------------------------- proof generation


def _inclusion_plan(index: int, size: int) -> list[list[NodeID]]:
    if not 0 <= index < size:
        raise ValueError(f"index {index} out of range for tree size {size}")
    start, end = 0, size
    top_down: list[list[NodeID]] = []
    while end - start > 1:  # RFC 9162 2.1.3.1 PATH(m, D[n])
        k = _largest_pow2_below(end - start)
        if index < start + k:
            top_down.append(range_nodes(start + k, end))
            end = start + k
        else:
            top_down.append(range_nodes(start, start + k))
            start += k
    top_down.reverse()
    return top_down


def _consistency_plan(size1: int, size2: int) -> list[list[NodeID]]:
    if size1 < 0 or size2 < size1:
        raise ValueError(f"invalid sizes for a consistency proof: {size1} -> {size2}")
    if size1 == 0:
        raise ValueError("a consistency proof from the empty tree is meaningless")
    if size1 == size2:
        return []
    m, start, end, whole = size1, 0, size2, True
    top_down: list[list[NodeID]] = []
    while True:  # RFC 9162 2.1.4.1 SUBPROOF(m, D[n], b)
        n = end - start
        if m == n:
            if not whole:
                top_down.append(range_nodes(start, end))
            break
        k = _largest_pow2_below(n)
        if m <= k:
            top_down.append(range_nodes(start + k, end))
            end = start + k
        else:
            top_down.append(range_nodes(start, start + k))
            m -= k
            start += k
            whole = False
    top_down.reverse()
    return top_down


def _unique(plan: list[list[NodeID]]) -> list[NodeID]:
    return list(dict.fromkeys(nid for ids in plan for nid in ids))


def inclusion_proof_nodes(index: int, size: int) -> list[NodeID]:
    """Perfect-subtree ids needed to build the inclusion proof (for one batched fetch)."""
    return _unique(_inclusion_plan(index, size))


def consistency_proof_nodes(size1: int, size2: int) -> list[NodeID]:
    """Perfect-subtree ids needed to build the consistency proof ``size1 -> size2``."""
    return _unique(_consistency_plan(size1, size2))


def inclusion_proof(index: int, size: int, get_node: GetNode) -> list[bytes]:
    """RFC 9162 inclusion proof for leaf ``index`` in the tree of ``size`` leaves.

    Hashes are ordered from the leaf's sibling up to the root's child.  Raises
    :class:`ValueError` unless ``0 <= index < size``.
    """
    return _hash_plan(_inclusion_plan(index, size), get_node)


def consistency_proof(size1: int, size2: int, get_node: GetNode) -> list[bytes]:
    """RFC 9162 consistency proof from the tree of ``size1`` leaves to that of ``size2``.

    Returns ``[]`` when ``size1 == size2``; raises :class:`ValueError` when
    ``size1 == 0`` (such proofs never verify) or ``size1 > size2``.
    """
    return _hash_plan(_consistency_plan(size1, size2), get_node)


# --------------------------------------------------------------------------- incremental trees


@dataclass(frozen=True, slots=True)
class CompactRangeState:
    """Persistable frontier of a :class:`CompactRange`.

    ``hashes`` are the perfect subtrees covering ``[0, size)``, largest (leftmost) first;
    there is one per set bit of ``size``.
    """

    size: int
    hashes: tuple[bytes, ...]

    def __post_init__(self) -> None:
        if self.size < 0:
            raise ValueError(f"negative size {self.size}")
        if len(self.hashes) != self.size.bit_count():
            raise ValueError(
                f"a frontier of size {self.size} has {self.size.bit_count()} hashes, got {len(self.hashes)}"
            )
        for h in self.hashes:
            if len(h) != HASH_SIZE:
                raise ValueError(f"frontier hash has {len(h)} bytes, want {HASH_SIZE}")


class CompactRange:
    """Incremental Merkle accumulator over ``[0, size)``: O(log n) memory and appends.

    Only the frontier (one perfect-subtree hash per set bit of ``size``) is kept, so a
    sequencer can integrate new leaves and compute the new root without reading the
    tree back.  :meth:`append` returns the perfect nodes it completed, ready to be
    written to a ``(level, index, hash)`` table that backs ``get_node``.
    """

    __slots__ = ("_hashes", "_size")

    def __init__(self) -> None:
        self._size = 0
        self._hashes: list[bytes] = []

    @property
    def size(self) -> int:
        return self._size

    def append(self, leaf_hash_: bytes) -> list[tuple[int, int, bytes]]:
        """Append one leaf hash; return the new perfect nodes ``(level, index, hash)``.

        The first element is always the leaf itself ``(0, old_size, leaf_hash)``.
        """
        h = bytes(leaf_hash_)
        if len(h) != HASH_SIZE:
            raise ValueError(f"leaf hash has {len(h)} bytes, want {HASH_SIZE}")
        idx = self._size
        level = 0
        created = [(0, idx, h)]
        hashes = self._hashes
        while idx & 1:
            h = node_hash(hashes.pop(), h)
            level += 1
            idx >>= 1
            created.append((level, idx, h))
        hashes.append(h)
        self._size += 1
        return created

    def extend(self, leaf_hashes: Iterable[bytes]) -> None:
        for h in leaf_hashes:
            self.append(h)

    def root(self) -> bytes:
        """Root hash of the tree of the current size (:data:`EMPTY_ROOT` when empty)."""
        return _fold(self._hashes) if self._hashes else EMPTY_ROOT

    def to_state(self) -> CompactRangeState:
        return CompactRangeState(self._size, tuple(self._hashes))

    @classmethod
    def from_state(cls, state: CompactRangeState) -> CompactRange:
        # Re-validate in case the state object was built with object.__new__ / replace.
        state = CompactRangeState(int(state.size), tuple(bytes(h) for h in state.hashes))
        cr = cls()
        cr._size = state.size
        cr._hashes = list(state.hashes)
        return cr

    @classmethod
    def from_get_node(cls, size: int, get_node: GetNode) -> CompactRange:
        """Rebuild the frontier for ``size`` from stored perfect subtrees."""
        hashes = tuple(bytes(get_node(*nid)) for nid in range_nodes(0, size))
        return cls.from_state(CompactRangeState(size, hashes))

    def __repr__(self) -> str:
        return f"CompactRange(size={self._size}, root={self.root().hex()})"


MerkleAccumulator = CompactRange


class MemoryTree:
    """In-memory tree storing every perfect subtree (``levels[level][index]``).

    Implements ``get_node`` for the proof functions; for tests and small logs.
    """

    __slots__ = ("_levels",)

    def __init__(self, leaf_hashes: Iterable[bytes] = ()) -> None:
        self._levels: list[list[bytes]] = [[]]
        for h in leaf_hashes:
            self.append(h)

    @classmethod
    def from_leaves(cls, leaves: Iterable[bytes]) -> MemoryTree:
        return cls(leaf_hash(x) for x in leaves)

    @property
    def size(self) -> int:
        return len(self._levels[0])

    def append(self, leaf_hash_: bytes) -> int:
        """Append a leaf hash, returning its index."""
        h = bytes(leaf_hash_)
        if len(h) != HASH_SIZE:
            raise ValueError(f"leaf hash has {len(h)} bytes, want {HASH_SIZE}")
        levels = self._levels
        levels[0].append(h)
        index = len(levels[0]) - 1
        level = 0
        while len(levels[level]) % 2 == 0:
            row = levels[level]
            parent = node_hash(row[-2], row[-1])
            if level + 1 == len(levels):
                levels.append([])
            levels[level + 1].append(parent)
            level += 1
        return index

    def get_node(self, level: int, index: int) -> bytes:
        try:
            if level < 0 or index < 0:
                raise IndexError
            return self._levels[level][index]
        except IndexError:
            raise KeyError(f"no perfect subtree at level {level}, index {index}") from None

    def root(self, size: int | None = None) -> bytes:
        size = self.size if size is None else size
        if not 0 <= size <= self.size:
            raise ValueError(f"size {size} out of range (tree has {self.size} leaves)")
        return root_at(size, self.get_node)

    def inclusion_proof(self, index: int, size: int | None = None) -> list[bytes]:
        size = self.size if size is None else size
        if size > self.size:
            raise ValueError(f"size {size} beyond tree size {self.size}")
        return inclusion_proof(index, size, self.get_node)

    def consistency_proof(self, size1: int, size2: int | None = None) -> list[bytes]:
        size2 = self.size if size2 is None else size2
        if size2 > self.size:
            raise ValueError(f"size {size2} beyond tree size {self.size}")
        return consistency_proof(size1, size2, self.get_node)


# --------------------------------------------------------------------------- verification


def _check_u64(name: str, value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if not 0 <= value <= _MAX_UINT64:
        raise ProofError(f"{name} {value} is not a uint64")


def _decomp_incl_proof(index: int, size: int) -> tuple[int, int]:
    inner = (index ^ (size - 1)).bit_length()
    border = (index >> inner).bit_count()
    return inner, border


def _chain_inner(seed: bytes, proof: Sequence[bytes], index: int) -> bytes:
    for i, h in enumerate(proof):
        seed = node_hash(seed, h) if (index >> i) & 1 == 0 else node_hash(h, seed)
    return seed


def _chain_inner_right(seed: bytes, proof: Sequence[bytes], index: int) -> bytes:
    for i, h in enumerate(proof):
        if (index >> i) & 1 == 1:
            seed = node_hash(h, seed)
    return seed


def _chain_border_right(seed: bytes, proof: Sequence[bytes]) -> bytes:
    for h in proof:
        seed = node_hash(h, seed)
    return seed


def root_from_inclusion_proof(leaf_hash_: bytes, index: int, size: int, proof: Sequence[bytes]) -> bytes:
    """Root implied by an inclusion proof (requires ``0 <= index < size``)."""
    _check_u64("index", index)
    _check_u64("size", size)
    if index >= size:
        raise ProofError(f"index is beyond size: {index} >= {size}")
    if len(leaf_hash_) != HASH_SIZE:
        raise ProofError(f"leaf hash has unexpected size {len(leaf_hash_)}, want {HASH_SIZE}")
    inner, border = _decomp_incl_proof(index, size)
    if len(proof) != inner + border:
        raise ProofSizeError(f"wrong proof size {len(proof)}, want {inner + border}")
    proof = [bytes(h) for h in proof]
    res = _chain_inner(bytes(leaf_hash_), proof[:inner], index)
    return _chain_border_right(res, proof[inner:])


def verify_inclusion(leaf_hash_: bytes, index: int, size: int, proof: Sequence[bytes], root: bytes) -> None:
    """Verify an RFC 9162 inclusion proof; raise :class:`ProofError` if it does not hold."""
    calculated = root_from_inclusion_proof(leaf_hash_, index, size, proof)
    if calculated != bytes(root):
        raise RootMismatchError(bytes(root), calculated)


def root_from_consistency_proof(size1: int, size2: int, proof: Sequence[bytes], root1: bytes) -> bytes:
    """Root of tree ``size2`` implied by a consistency proof from (``size1``, ``root1``).

    Checks that the proof reproduces ``root1``.  Requires ``0 < size1 <= size2``.
    """
    _check_u64("size1", size1)
    _check_u64("size2", size2)
    if size2 < size1:
        raise ProofError(f"size2 ({size2}) < size1 ({size1})")
    if size1 == 0:
        raise ProofError("consistency proof from empty tree is meaningless")
    if size1 == size2:
        if len(proof) > 0:
            raise ProofSizeError("size1 == size2, but proof is not empty")
        return bytes(root1)
    if len(proof) == 0:
        raise ProofSizeError("empty proof")

    proof = [bytes(h) for h in proof]
    inner, border = _decomp_incl_proof(size1 - 1, size2)
    shift = (size1 & -size1).bit_length() - 1  # trailing zeros of size1
    inner -= shift  # shift < inner because size1 < size2

    # The proof starts with the root of the subtree of size 2**shift ending at size1,
    # unless size1 is that very 2**shift (then the verifier already knows it: root1).
    if size1 == 1 << shift:
        seed, start = bytes(root1), 0
    else:
        seed, start = proof[0], 1
    if len(proof) != start + inner + border:
        raise ProofSizeError(f"wrong proof size {len(proof)}, want {start + inner + border}")
    proof = proof[start:]

    mask = (size1 - 1) >> shift
    hash1 = _chain_inner_right(seed, proof[:inner], mask)
    hash1 = _chain_border_right(hash1, proof[inner:])
    if hash1 != bytes(root1):
        raise RootMismatchError(bytes(root1), hash1)

    hash2 = _chain_inner(seed, proof[:inner], mask)
    return _chain_border_right(hash2, proof[inner:])


def verify_consistency(size1: int, size2: int, proof: Sequence[bytes], root1: bytes, root2: bytes) -> None:
    """Verify an RFC 9162 consistency proof; raise :class:`ProofError` if it does not hold.

    As in transparency-dev/merkle: ``size1 == 0`` always fails (even with ``size2 == 0``);
    ``size1 == size2`` passes iff the proof is empty and ``root1 == root2`` (raw bytes).
    """
    calculated = root_from_consistency_proof(size1, size2, proof, root1)
    if calculated != bytes(root2):
        raise RootMismatchError(bytes(root2), calculated)
