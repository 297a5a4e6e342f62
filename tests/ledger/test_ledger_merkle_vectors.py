"""transparency-dev/merkle vectors: inclusion/consistency probes, reference tree, hasher."""

from __future__ import annotations

import pytest

from sle_events.ledger.merkle import (
    EMPTY_ROOT,
    MemoryTree,
    ProofError,
    leaf_hash,
    node_hash,
    root_from_leaf_hashes,
    root_of_leaves,
    verify_consistency,
    verify_inclusion,
)

from ledger_vectors import b64, b64_list, load

INCLUSION = load("merkle_inclusion.json")["vectors"]
CONSISTENCY = load("merkle_consistency.json")["vectors"]
REFERENCE = load("merkle_reference_tree.json")
TREE = REFERENCE["reference_tree"]
LEAVES = [bytes.fromhex(x) for x in TREE["leaf_inputs_hex"]]


def test_vector_counts() -> None:
    # README: 98 probes each, 6 positive; guards against silently dropping vectors.
    assert len(INCLUSION) == 98 and sum(not v["wantErr"] for v in INCLUSION) == 6
    assert len(CONSISTENCY) == 98 and sum(not v["wantErr"] for v in CONSISTENCY) == 6


@pytest.mark.parametrize("v", INCLUSION, ids=[v["source"] for v in INCLUSION])
def test_inclusion_vector(v: dict) -> None:
    args = (b64(v["leafHash"]), v["leafIdx"], v["treeSize"], b64_list(v["proof"]), b64(v["root"]))
    if v["wantErr"]:
        with pytest.raises(ProofError):
            verify_inclusion(*args)
    else:
        verify_inclusion(*args)


@pytest.mark.parametrize("v", CONSISTENCY, ids=[v["source"] for v in CONSISTENCY])
def test_consistency_vector(v: dict) -> None:
    args = (v["size1"], v["size2"], b64_list(v["proof"]), b64(v["root1"]), b64(v["root2"]))
    if v["wantErr"]:
        with pytest.raises(ProofError):
            verify_consistency(*args)
    else:
        verify_consistency(*args)


@pytest.mark.parametrize("n", range(len(TREE["root_hashes_hex"])))
def test_reference_roots(n: int) -> None:
    want = bytes.fromhex(TREE["root_hashes_hex"][n])
    assert root_of_leaves(LEAVES[:n]) == want
    assert root_from_leaf_hashes([leaf_hash(x) for x in LEAVES[:n]]) == want
    assert MemoryTree.from_leaves(LEAVES).root(n) == want


def test_reference_node_hashes() -> None:
    tree = MemoryTree.from_leaves(LEAVES)
    for level, row in enumerate(TREE["node_hashes_hex"]):
        for index, want in enumerate(row):
            assert tree.get_node(level, index).hex() == want, (level, index)


def test_reference_tree_proofs_verify() -> None:
    tree = MemoryTree.from_leaves(LEAVES)
    for n in range(1, len(LEAVES) + 1):
        root = tree.root(n)
        for i in range(n):
            verify_inclusion(leaf_hash(LEAVES[i]), i, n, tree.inclusion_proof(i, n), root)
        for m in range(1, n + 1):
            verify_consistency(m, n, tree.consistency_proof(m, n), tree.root(m), root)


@pytest.mark.parametrize("case", REFERENCE["hasher"]["cases"], ids=lambda c: c["desc"])
def test_hasher(case: dict) -> None:
    if case["op"] == "empty_root":
        got = EMPTY_ROOT
    elif case["op"] == "leaf":
        got = leaf_hash(case["input_ascii"].encode())
    else:
        got = node_hash(case["left_ascii"].encode(), case["right_ascii"].encode())
    assert got.hex() == case["want_hex"]
