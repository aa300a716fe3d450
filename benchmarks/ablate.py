"""Where the HTTPS install's time goes: the same 512 MiB install with one pass left out.

    .venv/bin/python benchmarks/ablate.py [--size-mib 512] [--rounds 3]

Each variant skips one piece of work (the TUF hash thread, the manifest sha256 of each
file, the Merkle leaves, the file writes, or all of them) by patching it out in this
process only; the install itself is otherwise the agent's. Prints wall and CPU seconds per
variant. Diagnostic, not a product figure: a variant that skips a check would accept what
the device refuses.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import run as bench  # noqa: E402

from modelward.trust._fingerprint import FileEntry, MerkleHasher  # noqa: E402
from modelward.updater.bundle import _bundle
from modelward.updater.install import _install, _stage
from modelward.updater.transport._fetcher import RequestsFetcher

VARIANTS = ("full", "no-tuf-hash", "no-file-sha256", "no-merkle", "no-write", "none")


def _copy_member(skip: set[str]) -> Callable[..., FileEntry]:
    def copy(tar: Any, member: Any, writer: Any, expected: Any, bundle: str) -> FileEntry:
        sha = None if "sha" in skip else hashlib.sha256()
        merkle = None if "merkle" in skip else MerkleHasher()
        sink = writer.open(member) if writer is not None else None
        for chunk in tar.data():
            if sha is not None:
                sha.update(chunk)
            if merkle is not None:
                merkle.update(chunk)
            if sink is not None:
                sink.write(chunk)
        if sink is not None:
            sink.close()
        return FileEntry(expected.path, expected.size, expected.merkle_root)

    return copy


def patched(variant: str) -> list[tuple[Any, str, Any]]:
    """(object, attribute, replacement) for ``variant``."""
    out: list[tuple[Any, str, Any]] = []
    everything = variant == "none"
    if variant == "no-tuf-hash" or everything:
        def run(self: Any) -> None:
            while self._q.get() is not None:  # noqa: SLF001
                pass
        out.append((_install._Hasher, "_run", run))  # noqa: SLF001
    skip = {"sha", "merkle"} if everything else {
        "no-file-sha256": {"sha"}, "no-merkle": {"merkle"}}.get(variant, set())
    if skip:
        out.append((_bundle, "_copy_member", _copy_member(skip)))
    if variant == "no-write" or everything:
        out.append((_stage.MemberSink, "write", lambda self, data: None))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-mib", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="modelward-ablate-"))
    env = bench.Env(work)
    try:
        payload = bench.random_file(work / "payload.bin", args.size_mib)
        path, _, _ = env.publish(payload, "1.0.0")
        payload.unlink()
        res: dict[str, list[tuple[float, float]]] = {v: [] for v in VARIANTS}
        order = list(VARIANTS)
        for _ in range(args.rounds):
            random.shuffle(order)
            for v in order:
                saved = [(o, a, getattr(o, a)) for o, a, _ in patched(v)]
                for o, a, new in patched(v):
                    setattr(o, a, new)
                try:
                    bench.touch_memory()
                    t0, w = os.times(), time.perf_counter()
                    # a variant may fail the final fingerprint check: only time matters
                    with contextlib.suppress(Exception):
                        env.fetch_once(RequestsFetcher(env.https), env.https.metadata_url,
                                       env.https.targets_url, path)
                    wall, t1 = time.perf_counter() - w, os.times()
                    res[v].append((wall, t1.user + t1.system - t0.user - t0.system))
                finally:
                    for o, a, old in saved:
                        setattr(o, a, old)
        print(f"HTTPS install of {args.size_mib} MiB, {args.rounds} rounds: median wall, "
              "median CPU of this process")
        for v, xs in res.items():
            walls, cpus = sorted(x for x, _ in xs), sorted(c for _, c in xs)
            print(f"  {v:16} wall {walls[len(walls) // 2]:.3f} s ({walls[0]:.3f}-{walls[-1]:.3f})"
                  f"  cpu {cpus[len(cpus) // 2]:.2f} s")
    finally:
        env.close()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
