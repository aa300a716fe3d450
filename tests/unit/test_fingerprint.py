"""The Merkle fingerprint (design.md "Fingerprint")."""

from __future__ import annotations

import hashlib
import random
from pathlib import Path

import pytest

from modelward.trust._fingerprint import (
    LEAF_SIZE,
    FileEntry,
    MerkleHasher,
    directory_entries,
    file_merkle_root,
    slot_fingerprint,
    tree_hash,
)


def _reference_mth(data: bytes) -> bytes:
    """RFC 6962 section 2.1, written out independently of the implementation."""
    chunks = [data[i:i + LEAF_SIZE] for i in range(0, len(data), LEAF_SIZE)]

    def mth(d: list[bytes]) -> bytes:
        if not d:
            return hashlib.sha256(b"").digest()
        if len(d) == 1:
            return hashlib.sha256(b"\x00" + d[0]).digest()
        k = 1
        while k * 2 < len(d):
            k *= 2
        return hashlib.sha256(b"\x01" + mth(d[:k]) + mth(d[k:])).digest()

    return mth(chunks)


@pytest.mark.parametrize(
    "size",
    [0, 1, LEAF_SIZE - 1, LEAF_SIZE, LEAF_SIZE + 1, 3 * LEAF_SIZE, 5 * LEAF_SIZE + 7],
)
def test_file_root_matches_rfc6962(tmp_path: Path, size: int) -> None:
    data = random.Random(size).randbytes(size)
    p = tmp_path / "f"
    p.write_bytes(data)
    assert file_merkle_root(p) == (size, _reference_mth(data).hex())
    h = MerkleHasher()
    rng = random.Random(1)
    i = 0
    while i < size:  # arbitrary chunking gives the same root
        n = rng.randint(1, LEAF_SIZE // 3)
        h.update(data[i:i + n])
        i += n
    assert h.hexdigest() == _reference_mth(data).hex()
    assert h.size == size


def test_empty_tree_is_hash_of_nothing() -> None:
    assert tree_hash([]) == hashlib.sha256(b"").digest()


def test_leaf_and_node_are_domain_separated() -> None:
    a, b = b"\x00" * 32, b"\x11" * 32
    # A two-leaf tree's root must not equal a leaf hash over the concatenation.
    assert tree_hash([a, b]) != hashlib.sha256(b"\x00" + a + b).digest()


def test_slot_fingerprint_is_order_independent_and_sensitive() -> None:
    e1 = FileEntry("model.onnx", 10, "aa" * 32)
    e2 = FileEntry("vectors.npz", 5, "bb" * 32)
    assert slot_fingerprint([e1, e2]) == slot_fingerprint([e2, e1])
    assert slot_fingerprint([e1, e2]) != slot_fingerprint([e1])
    assert slot_fingerprint([e1, e2]) != slot_fingerprint(
        [e1, FileEntry("vectors.npz", 6, "bb" * 32)])
    assert slot_fingerprint([e1, e2]) != slot_fingerprint(
        [e1, FileEntry("vectors2.npz", 5, "bb" * 32)])


def test_directory_entries_mark_links(tmp_path: Path) -> None:
    (tmp_path / "a").write_bytes(b"x")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b").write_bytes(b"yy")
    (tmp_path / "link").symlink_to("a")
    entries = {e.path: e for e in directory_entries(tmp_path)}
    assert entries["a"].size == 1
    assert entries["sub/b"].size == 2
    assert entries["link"].size == -1
