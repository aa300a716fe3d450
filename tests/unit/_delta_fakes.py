"""Fakes shared by the unit tests of the delta install (updater/install/_delta.py)."""

from __future__ import annotations

import hashlib

from tuf.api.metadata import TargetFile

from modelward.updater.bundle._chunkindex import ChunkIndex


class IndexSession:
    """The TUF session as the delta path sees it: it finds ``ix`` as the release's index
    target, signed by ``role``, and serves ``data`` (default: the index's own bytes)."""

    def __init__(self, ix: ChunkIndex | None, role: str = "targets",
                 data: bytes | None = None) -> None:
        self.ix, self.role, self.data = ix, role, data

    def find_target(self, model: str, path: str) -> tuple[TargetFile, str] | None:
        if self.ix is None:
            return None
        data = self.data if self.data is not None else self.ix.to_bytes()
        return TargetFile(len(data), {"sha256": hashlib.sha256(data).hexdigest()}, path), \
            self.role

    def fetch_target_bytes(self, target: TargetFile, max_bytes: int) -> bytes:
        return self.data if self.data is not None else self.ix.to_bytes()  # type: ignore[union-attr]

    def target_url(self, target: TargetFile) -> str:
        return "https://o/" + target.path
