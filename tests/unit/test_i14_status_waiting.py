"""`repo status` shows what waits and whether it still follows what is published
(publisher/_pending_status.py): a root pending for signatures (with what it lacks), a
pending root that no longer follows the published root (a KEYS backup put back after the
root moved on: it can never be published), and KEYS' own newest targets against the
served ones (ahead: not refreshed or rolled back; behind: KEYS from an older backup)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from tuf.api.metadata import Metadata
from tuf.api.serialization.json import JSONSerializer

from modelward.cli import main
from modelward.publisher._keys import generate_key_at
from modelward.publisher._repo import Repository
from tests.unit.test_i14_offline_base import single
from tests.unit.test_i14_online import OFFLINE, Layout


def _status(repo: Path, keys: Path, capsys: pytest.CaptureFixture[str],
            *extra: str) -> tuple[str, str]:
    capsys.readouterr()
    assert main(["repo", "status", "--repo", str(repo), "--keys", str(keys), *extra]) == 0
    got = capsys.readouterr()
    return got.out, got.err


def _pending_root(repo: Path, keys: Path, version: int) -> Path:
    md = Metadata.from_bytes((repo / "metadata" / "1.root.json").read_bytes())
    md.signed.version = version
    md.signatures.clear()
    (keys / "pending").mkdir(exist_ok=True)
    path = keys / "pending" / f"{version}.root.json"
    path.write_bytes(md.to_bytes(JSONSerializer()))
    return path


def test_pending_root_shows_what_it_lacks_then_that_it_no_longer_follows(
        tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    repo, keys = tmp_path / "repo", tmp_path / "keys"
    Repository(repo, keys, OFFLINE).init()
    path = _pending_root(repo, keys, 2)
    out, _ = _status(repo, keys, capsys)
    assert f"INFO: {path}: root v2 waits for signatures (0 of 1 by root v1's keys; " \
           "0 of 1 by root v2's keys); `repo sign root`" in out
    stale = path.read_bytes()
    path.unlink()
    # meanwhile root v2 is published another way (a targets key added); then the KEYS
    # backup holding the parked v2 is put back
    monkeypatch.setenv("MODELWARD_KEY_PASSPHRASE", OFFLINE.decode())
    r = Repository(repo, keys, OFFLINE)
    key = generate_key_at(keys / "targets-2.pem", OFFLINE, "targets")
    assert r.add_key("targets", "encfile:targets-2.pem", key) == 2
    path.write_bytes(stale)
    out, _ = _status(repo, keys, capsys)
    assert f"WARNING: {path}: root v2 waits but no longer follows the published root v2 " \
           "(devices accept only v3): it can never be published" in out
    out, err = _status(repo, keys, capsys, "--json")
    json.loads(out)  # stdout stays one JSON document; the note goes to stderr
    assert "no longer follows the published root v2" in err


def test_stale_pending_targets_is_shown(tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    repo, keys = tmp_path / "repo", tmp_path / "keys"
    Repository(repo, keys, OFFLINE).init()
    (keys / "pending").mkdir(exist_ok=True)
    shutil.copyfile(repo / "metadata" / "1.targets.json", keys / "pending" / "1.targets.json")
    out, _ = _status(repo, keys, capsys)
    assert "targets v1 waits but no longer follows the published targets v1" in out


@pytest.mark.parametrize("how", ["ahead", "behind", "fork"])
def test_keys_head_against_the_served_targets(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], how: str) -> None:
    lay = Layout(tmp_path)
    single(lay).publish(lay.bundle("1.0.0"))  # targets v2
    head = lay.keys / "targets-head.json"
    out, _ = _status(lay.repo_dir, lay.keys, capsys)
    assert "targets-head.json" not in out  # in step: nothing to say
    if how == "ahead":
        lay.offline.withdraw("classifier", "1.0.0")  # v3, offline: not refreshed yet
        want = f"{head} holds targets v3; the served 2.snapshot.json lists v2"
    elif how == "behind":
        old = head.read_bytes()
        single(lay).withdraw("classifier", "1.0.0")  # v3
        head.write_bytes(old)  # KEYS from an older backup
        want = f"{head} holds targets v2, older than the v3 the served"
    else:
        md = Metadata.from_bytes(head.read_bytes())
        md.signed.expires = md.signed.expires.replace(year=md.signed.expires.year - 1)
        head.write_bytes(md.to_bytes(JSONSerializer()))
        want = f"{head} holds a targets v2 other than the served one"
    out, _ = _status(lay.repo_dir, lay.keys, capsys)
    assert f"WARNING: {want}" in out
