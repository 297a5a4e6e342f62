"""Merkle tree: property tests against an independent root computation, plus edge cases."""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from sle_events.ledger.merkle import (
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
    range_nodes,
    root_at,
    root_from_leaf_hashes,
    root_of_leaves,
    verify_consistency,
    verify_inclusion,
)

SETTINGS = settings(max_examples=40, deadline=None)


def _leaves(n: int) -> list[bytes]:
    return [b"leaf-%d" % i for i in range(n)]


def _mth(hashes: list[bytes]) -> bytes:
    """Independent RFC 6962 MTH straight from the recursive definition."""
    n = len(hashes)
    if n == 0:
        return hashlib.sha256(b"").digest()
    if n == 1:
        return hashes[0]
    k = 1 << ((n - 1).bit_length() - 1)
    return hashlib.sha256(b"\x01" + _mth(hashes[:k]) + _mth(hashes[k:])).digest()


def _flip(b: bytes, bit: int) -> bytes:
    ba = bytearray(b)
    ba[bit // 8] ^= 1 << (bit % 8)
    return bytes(ba)


def _fails_inclusion(*args: object) -> bool:
    try:
        verify_inclusion(*args)  # type: ignore[arg-type]  # malformed arguments on purpose
    except ProofError:
        return True
    return False


def _fails_consistency(*args: object) -> bool:
    try:
        verify_consistency(*args)  # type: ignore[arg-type]  # malformed arguments on purpose
    except ProofError:
        return True
    return False


# --------------------------------------------------------------------------- roots


@SETTINGS
@given(st.integers(0, 300))
def test_roots_agree_with_recursive_definition(n: int) -> None:
    hashes = [leaf_hash(x) for x in _leaves(n)]
    want = _mth(hashes)
    assert root_from_leaf_hashes(hashes) == want
    assert root_of_leaves(_leaves(n)) == want


def test_empty_root() -> None:
    assert EMPTY_ROOT.hex() == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    assert root_from_leaf_hashes([]) == EMPTY_ROOT == root_of_leaves([])
    assert CompactRange().root() == EMPTY_ROOT
    assert MemoryTree().root() == EMPTY_ROOT


def test_root_from_leaf_hashes_rejects_bad_length() -> None:
    with pytest.raises(ValueError, match="leaf hash 1"):
        root_from_leaf_hashes([b"\x00" * 32, b"short"])


# --------------------------------------------------------------------------- accumulator


@SETTINGS
@given(st.integers(0, 300))
@example(300)
def test_accumulator_root_equals_every_prefix(n: int) -> None:
    hashes = [leaf_hash(x) for x in _leaves(n)]
    acc = MerkleAccumulator()
    tree = MemoryTree()
    assert acc.root() == root_from_leaf_hashes([])
    for i, h in enumerate(hashes):
        created = acc.append(h)
        tree.append(h)
        assert created[0] == (0, i, h)
        # every node reported as created is the stored perfect subtree
        for level, index, nh in created:
            assert tree.get_node(level, index) == nh
        assert acc.size == i + 1
        assert acc.root() == root_from_leaf_hashes(hashes[: i + 1])


@SETTINGS
@given(st.integers(0, 300), st.integers(0, 20))
def test_accumulator_state_round_trip(n: int, more: int) -> None:
    hashes = [leaf_hash(x) for x in _leaves(n + more)]
    acc = CompactRange()
    acc.extend(hashes[:n])
    state = acc.to_state()
    assert state.size == n and len(state.hashes) == n.bit_count()
    restored = CompactRange.from_state(state)
    tree = MemoryTree(hashes[:n])
    assert CompactRange.from_get_node(n, tree.get_node).to_state() == state
    restored.extend(hashes[n:])
    assert restored.root() == root_from_leaf_hashes(hashes)


def test_accumulator_state_validation() -> None:
    with pytest.raises(ValueError):
        CompactRangeState(3, (b"\x00" * 32,))  # size 3 needs 2 hashes
    with pytest.raises(ValueError):
        CompactRangeState(1, (b"\x00" * 31,))
    with pytest.raises(ValueError):
        CompactRangeState(-1, ())
    with pytest.raises(ValueError):
        CompactRange().append(b"short")


# --------------------------------------------------------------------------- proofs


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 300))
@example(1)
@example(255)
@example(256)
@example(257)
@example(300)
def test_every_inclusion_proof_verifies(n: int) -> None:
    hashes = [leaf_hash(x) for x in _leaves(n)]
    tree = MemoryTree(hashes)
    root = _mth(hashes)
    for i in range(n):
        proof = inclusion_proof(i, n, tree.get_node)
        verify_inclusion(hashes[i], i, n, proof, root)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 300))
@example(1)
@example(255)
@example(256)
@example(257)
@example(300)
def test_every_consistency_proof_verifies(n: int) -> None:
    hashes = [leaf_hash(x) for x in _leaves(n)]
    tree = MemoryTree(hashes)
    acc = CompactRange()
    roots = [EMPTY_ROOT]
    for h in hashes:
        acc.append(h)
        roots.append(acc.root())
    assert roots[n] == _mth(hashes)
    for m in range(1, n + 1):
        proof = consistency_proof(m, n, tree.get_node)
        verify_consistency(m, n, proof, roots[m], roots[n])


@SETTINGS
@given(st.data())
def test_inclusion_proof_tampering_fails(data: st.DataObject) -> None:
    n = data.draw(st.integers(1, 300), label="size")
    i = data.draw(st.integers(0, n - 1), label="index")
    hashes = [leaf_hash(x) for x in _leaves(n)]
    tree = MemoryTree(hashes)
    root = _mth(hashes)
    proof = tree.inclusion_proof(i, n)
    verify_inclusion(hashes[i], i, n, proof, root)

    # every single bit of every proof hash, of the root and of the leaf hash
    for k in range(len(proof)):
        for bit in range(256):
            bad = list(proof)
            bad[k] = _flip(proof[k], bit)
            assert _fails_inclusion(hashes[i], i, n, bad, root)
    bit = data.draw(st.integers(0, 255), label="bit")
    assert _fails_inclusion(hashes[i], i, n, proof, _flip(root, bit))
    assert _fails_inclusion(_flip(hashes[i], bit), i, n, proof, root)

    # any other index in the same tree, and out-of-range indexes
    for j in range(n):
        if j != i:
            assert _fails_inclusion(hashes[i], j, n, proof, root)
    assert _fails_inclusion(hashes[i], n, n, proof, root)
    assert _fails_inclusion(hashes[i], i + n, n, proof, root)

    # wrong tree height (the probes of transparency-dev's verify_test.go)
    assert _fails_inclusion(hashes[i], i, n * 2, proof, root)
    if n // 2 != n:
        assert _fails_inclusion(hashes[i], i, n // 2, proof, root)

    # proof of the wrong length
    assert _fails_inclusion(hashes[i], i, n, [*proof, root], root)
    assert _fails_inclusion(hashes[i], i, n, [root, *proof], root)
    if proof:
        assert _fails_inclusion(hashes[i], i, n, proof[:-1], root)


@SETTINGS
@given(st.data())
def test_consistency_proof_tampering_fails(data: st.DataObject) -> None:
    n = data.draw(st.integers(2, 300), label="size2")
    m = data.draw(st.integers(1, n - 1), label="size1")
    hashes = [leaf_hash(x) for x in _leaves(n)]
    tree = MemoryTree(hashes)
    r1, r2 = _mth(hashes[:m]), _mth(hashes)
    proof = tree.consistency_proof(m, n)
    verify_consistency(m, n, proof, r1, r2)

    for k in range(len(proof)):
        for bit in range(256):
            bad = list(proof)
            bad[k] = _flip(proof[k], bit)
            assert _fails_consistency(m, n, bad, r1, r2)
    bit = data.draw(st.integers(0, 255), label="bit")
    assert _fails_consistency(m, n, proof, _flip(r1, bit), r2)
    assert _fails_consistency(m, n, proof, r1, _flip(r2, bit))
    assert _fails_consistency(m, n, proof, r2, r1)

    # wrong sizes (verify_test.go probes), incl. size1 = 0 and size1 > size2
    for m2 in {m - 1, m + 1, m ^ 2}:
        if m2 != m:
            assert _fails_consistency(m2, n, proof, r1, r2)
    assert _fails_consistency(m, n * 2, proof, r1, r2)
    if n // 2 != n:
        assert _fails_consistency(m, n // 2, proof, r1, r2)
    assert _fails_consistency(n, m, proof, r1, r2)

    # wrong length
    assert _fails_consistency(m, n, [], r1, r2)
    assert _fails_consistency(m, n, [*proof, r1], r1, r2)
    assert _fails_consistency(m, n, [proof[0], *proof], r1, r2)
    assert _fails_consistency(m, n, proof[:-1], r1, r2)


@SETTINGS
@given(st.integers(1, 1 << 40), st.data())
def test_proofs_need_olog_n_lookups(size: int, data: st.DataObject) -> None:
    index = data.draw(st.integers(0, size - 1))
    size1 = data.draw(st.integers(1, size))
    bound = 2 * size.bit_length() + 2
    inc = inclusion_proof_nodes(index, size)
    con = consistency_proof_nodes(size1, size)
    assert len(inc) <= bound and len(con) <= bound
    for level, idx in inc + con:  # only perfect subtrees inside the tree are requested
        assert (idx + 1) << level <= size


def test_get_node_backed_by_table_of_perfect_subtrees() -> None:
    # A dict keyed by (level, index) stands in for a DB table; count lookups.
    acc = CompactRange()
    table: dict[tuple[int, int], bytes] = {}
    hashes = [leaf_hash(x) for x in _leaves(1000)]
    for h in hashes:
        for level, index, nh in acc.append(h):
            table[(level, index)] = nh
    calls: list[tuple[int, int]] = []

    def get_node(level: int, index: int) -> bytes:
        calls.append((level, index))
        return table[(level, index)]

    proof = inclusion_proof(997, 999, get_node)
    verify_inclusion(hashes[997], 997, 999, proof, root_from_leaf_hashes(hashes[:999]))
    assert len(calls) <= 2 * 10 + 2
    assert root_at(999, lambda lv, ix: table[(lv, ix)]) == root_from_leaf_hashes(hashes[:999])
    calls.clear()
    proof = consistency_proof(513, 999, get_node)
    verify_consistency(513, 999, proof, root_from_leaf_hashes(hashes[:513]), root_from_leaf_hashes(hashes[:999]))
    assert len(calls) <= 2 * 10 + 2


def test_range_nodes() -> None:
    assert range_nodes(0, 0) == []
    assert range_nodes(0, 7) == [(2, 0), (1, 2), (0, 6)]
    assert range_nodes(4, 7) == [(1, 2), (0, 6)]
    assert range_nodes(0, 8) == [(3, 0)]
    with pytest.raises(ValueError):
        range_nodes(3, 2)


# --------------------------------------------------------------------------- errors


def test_generation_argument_errors() -> None:
    tree = MemoryTree.from_leaves(_leaves(5))
    with pytest.raises(ValueError):
        tree.inclusion_proof(5, 5)
    with pytest.raises(ValueError):
        tree.inclusion_proof(0, 6)
    with pytest.raises(ValueError):
        tree.consistency_proof(0, 5)
    with pytest.raises(ValueError):
        tree.consistency_proof(4, 3)
    assert tree.consistency_proof(5, 5) == []
    with pytest.raises(KeyError):
        tree.get_node(3, 0)  # not a perfect subtree of a 5-leaf tree
    with pytest.raises(ValueError):
        tree.root(6)


def test_verification_error_messages() -> None:
    hashes = [leaf_hash(x) for x in _leaves(5)]
    tree = MemoryTree(hashes)
    root = tree.root()
    proof = tree.inclusion_proof(2)
    with pytest.raises(ProofError, match="index is beyond size: 5 >= 5"):
        verify_inclusion(hashes[2], 5, 5, proof, root)
    with pytest.raises(ProofSizeError, match="wrong proof size 2, want 3"):
        verify_inclusion(hashes[2], 2, 5, proof[:2], root)
    with pytest.raises(ProofError, match="leaf hash has unexpected size 3"):
        verify_inclusion(b"abc", 2, 5, proof, root)
    with pytest.raises(RootMismatchError) as ei:
        verify_inclusion(hashes[3], 2, 5, proof, root)
    assert ei.value.expected == root
    with pytest.raises(ProofError, match="not a uint64"):
        verify_inclusion(hashes[2], -1, 5, proof, root)
    with pytest.raises(ProofError, match="empty tree is meaningless"):
        verify_consistency(0, 0, [], EMPTY_ROOT, EMPTY_ROOT)
    with pytest.raises(ProofError, match=r"size2 \(3\) < size1 \(5\)"):
        verify_consistency(5, 3, [], root, root)
    with pytest.raises(ProofSizeError, match="empty proof"):
        verify_consistency(3, 5, [], tree.root(3), root)
    with pytest.raises(ProofSizeError, match="proof is not empty"):
        verify_consistency(5, 5, [root], root, root)
    verify_consistency(5, 5, [], root, root)
    assert issubclass(ProofError, ValueError)
