"""``modelward bundle diff OLD NEW``: what a device on OLD fetches for NEW, without publishing.

Both bundles are verified as ``publish`` verifies them (``extract_bundle``, hashing the
bytes verified), then cut into their chunk indexes (the cut checks the file still hashes
to what was verified). The numbers are those ``publish`` prints.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, cast

from modelward.publisher._chunking import build_index
from modelward.publisher._indexpub import VerifiedStream, human
from modelward.trust._display import escape
from modelward.updater.bundle._bundle import extract_bundle
from modelward.updater.bundle._chunkindex import ChunkIndex, chunk_hashes, fetch_bytes


@dataclass(frozen=True)
class BundleDiff:
    """The delta from ``old`` to ``new`` (both verified)."""

    old: ChunkIndex
    new: ChunkIndex
    index_length: int  # of the new release's index
    fetch: int  # file-data bytes fetched, plus the index
    reused: tuple[int, int]  # distinct chunks of new held by old: count, bytes
    fresh: tuple[int, int]  # distinct chunks of new not held: count, bytes

    def to_json(self) -> dict[str, Any]:
        """For ``--json``."""
        def side(ix: ChunkIndex) -> dict[str, Any]:
            return {"name": ix.manifest.name, "version": ix.manifest.version,
                    "bytes": ix.bundle_length, "sha256": ix.bundle_sha256,
                    "chunks": ix.chunk_count}

        return {"old": side(self.old), "new": side(self.new), "fetch_bytes": self.fetch,
                "full_bytes": self.new.bundle_length, "index_bytes": self.index_length,
                "chunks_reused": self.reused[0], "bytes_reused": self.reused[1],
                "chunks_new": self.fresh[0], "bytes_new": self.fresh[1]}

    def lines(self) -> list[str]:
        """For the operator."""
        o, n = self.old.manifest, self.new.manifest  # (a team's bundles: names escaped)
        other = "" if o.name == n.name else f" (another model: {escape(o.name, 64)})"
        return [
            f"{escape(n.name, 64)} {escape(o.version, 64)} -> {escape(n.version, 64)}{other}",
            f"devices on {escape(o.version, 64)} fetch {human(self.fetch)} of "
            f"{human(self.new.bundle_length)} (index {human(self.index_length)})",
            f"chunks: {self.reused[0]} reused ({human(self.reused[1])}), {self.fresh[0]} new "
            f"({human(self.fresh[1])})",
        ]


def verified_index(path: Path) -> ChunkIndex:
    """Verify a bundle file and cut it.

    Raises:
        BundleFormatError: it is not a valid bundle (names the member at fault).
        OperatorInputError: it changed while it was read.
        ChunkIndexError: its index would be refused by devices (too many chunks).
    """
    with open(path, "rb") as f:
        verified = VerifiedStream(f)
        extract_bundle(cast(IO[bytes], verified), None, str(path))
        verified.finish()
    return build_index(path, verified.target_file(path.name).hashes["sha256"])


def diff(old: ChunkIndex, new: ChunkIndex) -> BundleDiff:
    """The delta between two indexes (pure)."""
    held = chunk_hashes(old)
    seen: dict[bytes, int] = {}
    for f in new.files:
        for c in f.chunks:
            seen.setdefault(c.sha256, c.length)
    reused = [n for h, n in seen.items() if h in held]
    fresh = [n for h, n in seen.items() if h not in held]
    index_length = len(new.to_bytes())
    return BundleDiff(old, new, index_length, fetch_bytes(new, held) + index_length,
                      (len(reused), sum(reused)), (len(fresh), sum(fresh)))


def run(args: argparse.Namespace) -> int:
    """The ``bundle diff`` handler (the CLI checked that OLD and NEW are readable files:
    publisher does not import the CLI's input checks, see tests/unit/test_i15_layers.py).

    Raises:
        BundleFormatError: OLD or NEW is not a valid bundle.
    """
    d = diff(verified_index(args.old), verified_index(args.new))
    if args.json:
        print(json.dumps(d.to_json(), indent=1))
    else:
        print("\n".join(d.lines()))
    return 0
