"""Attacks a16disk (power loss): a real ``modelward agent update`` process SIGKILLed in the
middle of a delta (while fetching, after assembly, between the commit and the hint write)
and restarted: it fetches only what is missing (counted in nginx's log), never activates
unverified bytes, and the journal stays consistent (issue 16, must show 4, with SIGKILL)."""

from __future__ import annotations

import hashlib
import json
import signal
import subprocess
import sys

from modelward.updater.bundle._chunkindex import ChunkIndex
from modelward.updater.install._delta import coalesce, hint_path, index_fingerprint
from tests.conftest import World
from tests.integration._i16_delta import bundle_gets, publish

# The real CLI, SIGKILLed by itself once ``after`` fetched chunks were hashed (a power cut
# while the delta is fetching: chunks before it are written, or in flight).
_KILLER = """
import os, signal, sys, runpy
import modelward.updater.install._delta as d
after = int(sys.argv[1]); seen = [0]; orig = d._digest
def digest(data):
    seen[0] += 1
    if seen[0] > after:
        os.kill(os.getpid(), signal.SIGKILL)
    return orig(data)
d._digest = digest
sys.argv = ["modelward", *sys.argv[2:]]
runpy.run_module("modelward", run_name="__main__")
"""


def _served(w: World, version: str) -> int:
    return sum(n for _, n, _ in bundle_gets(w, version))


def _journal(w: World) -> dict[str, str]:
    doc: dict[str, str] = json.loads((w.state / "journal.json").read_bytes())
    return doc


def _missing(w: World, old: ChunkIndex, new: ChunkIndex) -> int:
    """Bytes (chunks + gaps) a device must still fetch: chunks neither in ``old`` nor
    already valid at their place in ``staging/incoming``."""
    have = {c.sha256 for f in old.files for c in f.chunks}
    inc = w.state / "staging" / "incoming"
    for f in new.files:
        p = inc / f.path
        if not p.is_file():
            continue
        blob = p.read_bytes()
        for c in f.chunks:
            at = f.file_offset(c)
            if hashlib.sha256(blob[at:at + c.length]).digest() == c.sha256:
                have.add(c.sha256)
    seen: set[bytes] = set()
    spans = []
    for f in new.files:
        for c in f.chunks:
            if c.sha256 not in have and c.sha256 not in seen:
                seen.add(c.sha256)
                spans.append((c.offset, c.length))
    return sum(n for _, n in spans) + sum(r.gap_bytes for r in coalesce(spans))


def _restart_and_check(w: World, version: str) -> None:
    boot = w.cli("agent", "boot-check", "--config", str(w.conf_path))
    assert boot.returncode == 0, boot.stderr
    assert w.active_version() == "1.0.0"  # nothing unverified activated by the kill
    again = w.cli("agent", "update", "--config", str(w.conf_path), "--once")
    assert again.returncode == 0, again.stderr
    assert w.active_version() == version
    j = _journal(w)
    assert (j["step"], j["version"]) == ("active", version)
    assert w.cli("agent", "boot-check", "--config", str(w.conf_path)).returncode == 0


def test_sigkill_while_fetching_a_delta_resumes_with_only_the_missing_bytes(
        world: World) -> None:
    _, ix1 = publish(world, "1.0.0")
    world.update()
    _, ix2 = publish(world, "2.0.0", changed_rows=200)
    killed = subprocess.run(
        [sys.executable, "-c", _KILLER, "3", "agent", "update", "--config",
         str(world.conf_path), "--once"], capture_output=True, text=True, timeout=120,
        check=False)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert _journal(world)["step"] == "downloading"
    first = _served(world, "2.0.0")
    missing = _missing(world, ix1, ix2)
    assert first > 0 and missing > 0
    _restart_and_check(world, "2.0.0")
    assert _served(world, "2.0.0") - first == missing  # only what is still missing


def test_sigkill_after_assembly_then_between_commit_and_hint_write(world: World) -> None:
    """The two later kill points in one shared set-up (CI time): v2 killed right after
    assembly ("staged"), then its restart killed between the commit and the hint write
    ("active"), then a third release by delta from that hint-less slot."""
    _, ix1 = publish(world, "1.0.0")
    world.update()
    _, ix2 = publish(world, "2.0.0", changed_rows=200)
    killed = world.cli("agent", "update", "--config", str(world.conf_path), "--once",
                       env={"MODELWARD_TEST_KILL_AT": "staged"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    first = _served(world, "2.0.0")
    assert first > 0
    assert world.active_version() == "1.0.0"  # nothing unverified activated by the kill
    # (the restart: re-hashed in place, nothing fetched again; the hint is written right
    # after "active" is journaled: killed in between)
    killed = world.cli("agent", "update", "--config", str(world.conf_path), "--once",
                       env={"MODELWARD_TEST_KILL_AT": "active"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert _served(world, "2.0.0") == first
    boot = world.cli("agent", "boot-check", "--config", str(world.conf_path))
    assert boot.returncode == 0, boot.stderr
    assert world.active_version() == "2.0.0"
    j = _journal(world)
    assert (j["step"], j["version"]) == ("active", "2.0.0")
    assert not hint_path(world.state, index_fingerprint(ix2)).exists()
    world.update()  # (the agent's next poll: nothing to do, nothing fetched)
    assert world.active_version() == "2.0.0" and _served(world, "2.0.0") == first
    # v3 from a slot without its hint: the same-path same-offset guesses, still a delta
    publish(world, "3.0.0", changed_rows=200, change_seed=3)
    world.update()
    assert world.active_version() == "3.0.0"
    assert _served(world, "3.0.0") < ix2.data_bytes // 2
