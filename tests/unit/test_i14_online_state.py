"""The online host's own state (ONLINE/state: the highest verified root, the floor of what
it signed) and its bounded reads of metadata/ (issue 14, must-show 4): the attacks of
whoever writes the served directory, and of the careless operator, against them."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import pytest
from tuf.api.metadata import Metadata, Targets

import modelward.publisher._served
from modelward.publisher._keys import load_signer_at
from modelward.publisher._online_state import STATE_DIR, STATE_FILE, STATE_ROOT, OnlineStateError
from modelward.publisher.errors import RepositoryStateError
from tests.unit.test_a14_online_trust import EVIL, _evil_entry
from tests.unit.test_i14_online import OFFLINE, Layout, stock_client_refresh


@pytest.fixture
def lay(tmp_path: Path) -> Layout:
    return Layout(tmp_path)


def _files(lay: Layout) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((lay.repo_dir / "metadata").iterdir())
            if p.is_file() and not p.is_symlink()}


def test_root_removed_later_does_not_bring_back_the_retired_targets_key(
        lay: Layout, tmp_path: Path) -> None:
    """The host verified root v2 (new targets key) once; the origin then deletes 2.root.json
    and plants targets v50 signed by the leaked old key: the host still trusts root v2."""
    leaked = load_signer_at(lay.keys / "targets.pem", OFFLINE, "targets")
    lay.offline.publish(lay.bundle("1.0.0"))
    lay.offline.rotate("targets")
    lay.online().refresh()
    assert (lay.online_dir / STATE_DIR / STATE_ROOT).read_bytes() == \
        (lay.repo_dir / "metadata" / "2.root.json").read_bytes()
    (lay.repo_dir / "metadata" / "2.root.json").unlink()
    pub = lay.md("3.targets.json").signed
    md = Metadata(Targets(version=50, expires=pub.expires,
                          targets={**pub.targets, EVIL: _evil_entry()}))
    md.sign(leaked)
    lay.write(md, "50.targets.json")
    lay.online().refresh()
    assert lay.snapshot_meta() == {"targets.json": 3}


def test_root_chain_walk_is_capped_per_run_and_resumes(
        lay: Layout, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    lay.offline.publish(lay.bundle("1.0.0"))
    lay.offline.rotate("root")  # root v2 (nothing re-keyed: published at once)
    lay.offline.rotate("root")  # root v3
    monkeypatch.setattr(modelward.publisher._served, "MAX_ROOTS_PER_RUN", 1)
    with caplog.at_level(logging.WARNING):
        lay.online().refresh()
    assert "verified 1 root versions" in caplog.text
    assert Metadata.from_bytes((lay.online_dir / STATE_DIR / STATE_ROOT).read_bytes()
                               ).signed.version == 2
    lay.online().refresh()
    assert Metadata.from_bytes((lay.online_dir / STATE_DIR / STATE_ROOT).read_bytes()
                               ).signed.version == 3
    assert lay.snapshot_meta() == {"targets.json": 2}


def test_corrupt_floor_is_a_typed_error_and_nothing_is_written(lay: Layout) -> None:
    (lay.online_dir / STATE_DIR / STATE_FILE).write_text('{"timestamp": "x"}')
    before = _files(lay)
    with pytest.raises(OnlineStateError, match="refresh.json is not the online host's"):
        lay.online().refresh()
    assert _files(lay) == before


def test_unwritable_state_is_a_typed_error_and_nothing_is_written(lay: Layout) -> None:
    shutil.rmtree(lay.online_dir / STATE_DIR)
    (lay.online_dir / STATE_DIR).write_text("not a directory")
    before = _files(lay)
    with pytest.raises(RepositoryStateError, match="cannot be (written|opened)"):
        lay.online().refresh()
    assert _files(lay) == before


def test_no_floor_and_an_unsigned_served_timestamp_is_refused(lay: Layout) -> None:
    """An online directory from before the state, and a served timestamp that does not
    verify: the host does not guess what it signed before."""
    (lay.online_dir / STATE_DIR / STATE_FILE).unlink()
    md = lay.md("timestamp.json")
    md.signed.version = 1 << 40
    md.signatures.clear()
    lay.write(md, "timestamp.json")
    before = _files(lay)
    with pytest.raises(OnlineStateError, match="does not know what it signed before"):
        lay.online().refresh()
    assert _files(lay) == before


def test_no_floor_builds_on_the_verified_served_timestamp(lay: Layout, tmp_path: Path
                                                          ) -> None:
    (lay.online_dir / STATE_DIR / STATE_FILE).unlink()
    for _ in range(3):
        lay.online().refresh()
    assert lay.md("timestamp.json").signed.version == 4
    stock_client_refresh(lay, tmp_path)


@pytest.mark.parametrize("kind", ["fifo", "symlink-to-online-key", "directory"])
def test_special_timestamp_or_snapshot_files_are_replaced_not_read(
        lay: Layout, tmp_path: Path, kind: str) -> None:
    """The origin makes timestamp.json and the current snapshot special files: the refresh
    builds on its floor, names no special file in what it signs, and a client follows."""
    md_dir = lay.repo_dir / "metadata"
    for name in ("timestamp.json", "1.snapshot.json"):
        (md_dir / name).unlink()
        if kind == "fifo":
            os.mkfifo(md_dir / name)
        elif kind == "directory":
            (md_dir / name).mkdir()
        else:
            (md_dir / name).symlink_to(lay.online_dir / "timestamp.pem")
    if kind == "directory":
        with pytest.raises(OSError):  # it cannot be replaced by a rename: it stays refused
            lay.online().refresh()
        return
    assert lay.online().refresh() == ["snapshot", "timestamp"]
    assert lay.md("timestamp.json").signed.snapshot_meta.version == 2
    stock_client_refresh(lay, tmp_path)


def test_nested_registry_without_key_files_is_refused(lay: Layout) -> None:
    """KEYS' signers.json alone, copied into a subdirectory: still a copy of KEYS."""
    (lay.online_dir / "old").mkdir()
    shutil.copyfile(lay.keys / "signers.json", lay.online_dir / "old" / "signers.json")
    before = _files(lay)
    with pytest.raises(RepositoryStateError, match="looks like a copy of a key directory"):
        lay.online().refresh()
    assert _files(lay) == before


def test_online_dir_with_too_many_entries_is_refused(lay: Layout,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("modelward.publisher._online.MAX_ONLINE_ENTRIES", 20)
    deep = lay.online_dir / "junk"
    for i in range(25):
        (deep / str(i)).mkdir(parents=True)
    with pytest.raises(RepositoryStateError, match="more than 20 entries"):
        lay.online().refresh()
