"""Root changes by TUF's rules (issue 14, must-show 1 and 2): many variants, on disk.

``root_gaps`` is the one decision for "may root N+1 be published"; the repository parks
anything short of it, keeps the old key in use until it is published, and its pre-publish
gate refuses anything a stock python-tuf client would reject. A stock ngclient Updater
(tests/_stock_tuf.py) checks each state.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
from securesystemslib.signer import CryptoSigner
from tuf.api.exceptions import RepositoryError
from tuf.api.metadata import Metadata, Root

from modelward.publisher import _rootstage as rootstage
from modelward.publisher._bundle_build import BuildOptions, build_bundle
from modelward.publisher._keys import load_signer_at
from modelward.publisher._repo import Repository
from modelward.publisher._rootflow import RootNotPublishableError, root_gaps
from modelward.publisher._summary import PendingChangedError
from modelward.publisher._tufcheck import StockClientWouldRejectError, check_state
from modelward.publisher.errors import RepositoryStateError
from modelward.simulator._models import make_linear_model
from tests._stock_tuf import stock_refresh
from tests.conftest import tree_digest

PW = b"unit test passphrase"


# -- the pure decision ---------------------------------------------------------------------

def _root(signers: list[CryptoSigner], threshold: int, version: int = 1) -> Root:
    r = Root(version=version)
    for s in signers:
        r.add_key(s.public_key, "root")
    r.roles["root"].threshold = threshold
    return r


def _signed(root: Root, *by: CryptoSigner) -> Metadata[Root]:
    md = Metadata(root)
    for s in by:
        md.sign(s, append=True)
    return md


def test_gaps_need_previous_and_own_thresholds() -> None:
    a, b, c = (CryptoSigner.generate_ed25519() for _ in range(3))
    old = _root([a, b], 2)
    new = _root([a, b, c], 1, version=2)  # add-key root --threshold 1 on a 2-of-2 root
    gaps = root_gaps(old, _signed(new, a))
    assert [(g.which, g.version, g.have, g.need) for g in gaps] == [("previous", 1, 1, 2)]
    assert gaps[0].unsigned == (b.public_key.keyid,)
    assert root_gaps(old, _signed(new, c, a)) == root_gaps(old, _signed(new, a))  # c: new only
    assert root_gaps(old, _signed(new, a, b)) == []


def test_gaps_of_a_root_rotation() -> None:
    old_key, new_key = CryptoSigner.generate_ed25519(), CryptoSigner.generate_ed25519()
    old, new = _root([old_key], 1), _root([new_key], 1, version=2)
    assert [g.which for g in root_gaps(old, _signed(new, new_key))] == ["previous"]
    assert [g.which for g in root_gaps(old, _signed(new, old_key))] == ["own"]
    assert root_gaps(old, _signed(new, old_key, new_key)) == []
    assert root_gaps(None, _signed(old, old_key)) == []  # version 1: its own threshold


def test_gaps_ignore_forged_signatures_and_refuse_a_version_jump() -> None:
    a, b = CryptoSigner.generate_ed25519(), CryptoSigner.generate_ed25519()
    old = _root([a, b], 2)
    md = _signed(_root([a, b], 2, version=2), a, b)
    md.signatures[b.public_key.keyid].signature = "00" * 64  # a disk attacker's "signature"
    assert [g.have for g in root_gaps(old, md)] == [1, 1]
    md.signed.version = 3
    with pytest.raises(RepositoryStateError, match="cannot follow the published root v1"):
        root_gaps(old, _signed(md.signed, a, b))


# -- the repository ------------------------------------------------------------------------

def _repo(tmp: Path, root_threshold: int = 2) -> Repository:
    r = Repository(tmp / "repo", tmp / "keys", PW)
    r.init({"root": root_threshold}, {"root": root_threshold})
    return r


def _bundle(tmp: Path, version: str, seed: int) -> Path:
    out = tmp / f"b-{version}.tar"
    build_bundle(make_linear_model(tmp / f"m-{version}.onnx", seed), "classifier", version,
                 out, options=BuildOptions())
    return out


def _targets_signer(repo: Repository) -> set[str]:
    targets, _, _ = repo.current()
    md = Metadata.from_bytes(
        (repo.metadata_dir / f"{targets.version}.targets.json").read_bytes())
    return set(md.signatures)


def test_rotate_targets_parks_until_both_root_keys_sign(tmp_path: Path) -> None:
    repo = _repo(tmp_path)
    old_key = _targets_signer(repo)
    before = tree_digest(repo.metadata_dir)
    with pytest.raises(RootNotPublishableError) as e:
        repo.rotate("targets")
    msg = str(e.value)
    assert "previous root v1" in msg and "root v2's own" in msg and "encfile:root-2.pem" in msg
    assert [g.missing for g in e.value.gaps] == [1, 1]
    assert tree_digest(repo.metadata_dir) == before  # nothing devices fetch moved
    assert stock_refresh(repo.repo) == 1
    # Meanwhile the old targets key stays the one in use, and devices accept it.
    repo.publish(_bundle(tmp_path, "1.0.0", 1))
    assert _targets_signer(repo) == old_key
    assert stock_refresh(repo.repo) == 1
    # A second root change is refused while one waits (its signatures would be lost).
    with pytest.raises(RepositoryStateError, match="already waiting"):
        repo.add_key("snapshot", "envvar:X", CryptoSigner.generate_ed25519().public_key)
    assert repo.sign_pending("root", "encfile:root-2.pem") == (2, 2)
    assert stock_refresh(repo.repo) == 2
    new_key = _targets_signer(repo)  # re-signed by the new key and the old one (a device
    assert new_key > old_key  # that walked the root chain a moment before follows too)
    repo.publish(_bundle(tmp_path, "1.1.0", 2))
    new_key = _targets_signer(repo)
    assert new_key and new_key.isdisjoint(old_key)  # from then on by the new key only
    assert not list((repo.keys / "rotating").glob("*.pem"))
    assert len(list((repo.keys / "retired").glob("targets-*.pem"))) == 1
    assert not (repo.pending_dir / "2.root.json").exists()


def test_add_key_root_threshold_one_needs_both_old_signatures(tmp_path: Path) -> None:
    repo = _repo(tmp_path)
    extra = CryptoSigner.generate_ed25519()
    with pytest.raises(RootNotPublishableError) as e:
        repo.add_key("root", "envvar:EXTRA", extra.public_key, threshold=1)
    assert [(g.which, g.have, g.need) for g in e.value.gaps] == [("previous", 1, 2)]
    assert repo.latest_root_version() == 1
    repo.sign_pending("root", "encfile:root-2.pem")
    assert stock_refresh(repo.repo) == 2
    # Now 1-of-3: one root signature publishes the next change.
    assert repo.rotate("timestamp") == 3
    assert stock_refresh(repo.repo) == 3


def test_rotate_root_is_signed_by_old_and_new_key(tmp_path: Path) -> None:
    repo = _repo(tmp_path, root_threshold=1)
    old = Metadata.from_bytes((repo.metadata_dir / "1.root.json").read_bytes())
    assert repo.rotate("root") == 2
    new = Metadata.from_bytes((repo.metadata_dir / "2.root.json").read_bytes())
    assert set(old.signed.roles["root"].keyids) < set(new.signatures)
    assert len(new.signatures) == 2
    assert stock_refresh(repo.repo) == 2
    assert repo.rotate("root") == 3  # the new key (now root.pem) signs the next one
    assert stock_refresh(repo.repo) == 3


def test_rotate_root_of_a_two_key_root_is_refused(tmp_path: Path) -> None:
    repo = _repo(tmp_path)
    with pytest.raises(RepositoryStateError, match="replaces a single key"):
        repo.rotate("root")


def test_abandoned_rotation_is_harmless(tmp_path: Path) -> None:
    repo = _repo(tmp_path)
    with pytest.raises(RootNotPublishableError):
        repo.rotate("targets")
    (repo.pending_dir / "2.root.json").unlink()  # the operator abandons it
    repo.publish(_bundle(tmp_path, "1.0.0", 1))  # the old key still publishes
    assert stock_refresh(repo.repo) == 1
    repo.refresh()
    assert stock_refresh(repo.repo) == 1
    with pytest.raises(RootNotPublishableError):  # and a new rotation starts afresh
        repo.rotate("targets")
    repo.sign_pending("root", "encfile:root-2.pem")
    assert stock_refresh(repo.repo) == 2


def test_stale_pending_root_cannot_be_replayed(tmp_path: Path) -> None:
    repo = _repo(tmp_path)
    with pytest.raises(RootNotPublishableError):
        repo.rotate("targets")
    stale = (repo.pending_dir / "2.root.json").read_bytes()
    repo.sign_pending("root", "encfile:root-2.pem")
    with pytest.raises(RootNotPublishableError):
        repo.rotate("snapshot")  # root v3 waits
    (repo.pending_dir / "3.root.json").unlink()
    (repo.pending_dir / "2.root.json").write_bytes(stale)  # the old, half-signed v2 back
    before = tree_digest(repo.metadata_dir)
    with pytest.raises(RepositoryStateError, match="version 2 is published already"):
        repo.sign_pending("root", "encfile:root-2.pem")
    assert tree_digest(repo.metadata_dir) == before


def test_sign_root_with_a_key_of_no_root_is_refused(tmp_path: Path) -> None:
    repo = _repo(tmp_path)
    with pytest.raises(RootNotPublishableError):
        repo.rotate("targets")
    with pytest.raises(RepositoryStateError, match="is not a root key"):
        repo.sign_pending("root", "encfile:targets.pem")  # a team-level key cannot stand in
    assert repo.latest_root_version() == 1


def test_pending_root_edited_after_signing_loses_that_signature(tmp_path: Path) -> None:
    """A disk attacker adds their key to the parked root: the first signature no longer
    verifies, so the file is refused as edited after signing, and nothing is published."""
    repo = _repo(tmp_path)
    with pytest.raises(RootNotPublishableError):
        repo.rotate("targets")
    path = repo.pending_dir / "2.root.json"
    md = Metadata.from_bytes(path.read_bytes())
    md.signed.add_key(CryptoSigner.generate_ed25519().public_key, "root")
    path.write_bytes(md.to_bytes())
    with pytest.raises(PendingChangedError, match="changed after it was signed"):
        repo.sign_pending("root", "encfile:root-2.pem")
    assert repo.latest_root_version() == 1


def test_retired_key_of_a_published_rotation_cannot_sign(tmp_path: Path) -> None:
    repo = _repo(tmp_path, root_threshold=1)
    repo.rotate("targets")
    retired = next((repo.keys / "retired").glob("targets-*.pem"))
    targets, _, _ = repo.current()
    targets.version += 1
    evil = Metadata(targets)
    evil.sign(load_signer_at(retired, PW))
    (repo.metadata_dir / f"{targets.version}.targets.json").write_bytes(evil.to_bytes())
    ts = (repo.metadata_dir / "timestamp.json").read_bytes()
    with pytest.raises(StockClientWouldRejectError, match="targets was signed by 0/1"):
        repo._snapshot_and_timestamp(targets.version)  # noqa: SLF001
    assert (repo.metadata_dir / "timestamp.json").read_bytes() == ts


def test_gate_refuses_rollback_and_bad_hashes(tmp_path: Path) -> None:
    repo = _repo(tmp_path, root_threshold=1)
    repo.publish(_bundle(tmp_path, "1.0.0", 1))
    md = repo.metadata_dir

    def read(n: str) -> bytes | None:
        p = md / n
        return p.read_bytes() if p.exists() else None

    now = repo._clock()  # noqa: SLF001
    check_state(read, now, read)
    snap_v = json.loads((md / "timestamp.json").read_bytes())["signed"]["meta"][
        "snapshot.json"]["version"]
    bad = (md / f"{snap_v}.snapshot.json").read_bytes().replace(b'"version"', b'"version" ', 1)
    with pytest.raises(StockClientWouldRejectError, match="snapshot"):
        check_state(lambda n: bad if n == f"{snap_v}.snapshot.json" else read(n), now)
    older = read("timestamp.json")  # a validly signed timestamp, replayed after a newer
    repo.refresh()
    with pytest.raises(StockClientWouldRejectError, match="older than the published"):
        check_state(lambda n: older if n == "timestamp.json" else read(n), now, read)


@pytest.mark.xdist_group("machine")
def test_gate_is_fast(tmp_path: Path) -> None:
    repo = _repo(tmp_path, root_threshold=1)
    for role in ("root", "targets", "snapshot", "timestamp", "root"):
        repo.rotate(role)
    md = repo.metadata_dir

    def read(n: str) -> bytes | None:
        p = md / n
        return p.read_bytes() if p.exists() else None

    started = time.perf_counter()
    for _ in range(20):
        check_state(read, repo._clock(), read)  # noqa: SLF001
    per_check = (time.perf_counter() - started) / 20
    assert per_check < 0.05, per_check  # measured: see the report
    print(f"gate: {per_check * 1000:.1f} ms per check with six roots")


def test_stock_client_rejects_what_the_gate_rejects(tmp_path: Path) -> None:
    """The test hook's own client agrees: a root signed by one of two keys is refused."""
    repo = _repo(tmp_path)
    with pytest.raises(RootNotPublishableError):
        repo.rotate("targets")
    shutil.copy(repo.pending_dir / "2.root.json", repo.metadata_dir / "2.root.json")
    with pytest.raises(RepositoryError, match="signed by 1/2"):
        stock_refresh(repo.repo)


def test_crash_after_root_publish_is_completed_by_the_next_change(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    repo = _repo(tmp_path, root_threshold=1)

    def crash(*_a: object) -> None:
        raise KeyboardInterrupt  # the power goes after N.root.json is written

    monkeypatch.setattr(rootstage, "retire_key_files", crash)
    with pytest.raises(KeyboardInterrupt):
        repo.rotate("targets")
    monkeypatch.undo()
    assert (repo.metadata_dir / "2.root.json").is_file()
    assert stock_refresh(repo.repo) == 2  # the re-keyed targets were signed before it
    repo.refresh()  # the timer keeps working
    assert stock_refresh(repo.repo) == 2
    assert repo.rotate("snapshot") == 3  # the next root change completes the filing first
    assert len(list((repo.keys / "retired").glob("targets-*.pem"))) == 1
    assert stock_refresh(repo.repo) == 3
    assert repo.complete_root_change() is False


def test_a_root_dropped_into_metadata_blocks_every_write(tmp_path: Path) -> None:
    """A disk attacker (or a copy by hand) puts a half-signed root where clients look:
    the gate names it on the next write, and nothing is built on it."""
    repo = _repo(tmp_path)
    with pytest.raises(RootNotPublishableError):
        repo.rotate("targets")
    shutil.copy(repo.pending_dir / "2.root.json", repo.metadata_dir / "2.root.json")
    ts = (repo.metadata_dir / "timestamp.json").read_bytes()
    with pytest.raises(StockClientWouldRejectError, match=r"2\.root\.json.*signed by 1/2"):
        repo.refresh()
    assert (repo.metadata_dir / "timestamp.json").read_bytes() == ts


def test_a_team_key_cannot_stand_in_for_a_root_key(tmp_path: Path) -> None:
    """One team key: its holder tries to supply the missing root signature."""
    repo = _repo(tmp_path)
    repo.delegate("cls-team", ["classifier/*"])
    with pytest.raises(RootNotPublishableError):
        repo.rotate("targets")
    for uri in ("encfile:delegated-cls-team.pem", "encfile:snapshot.pem"):
        with pytest.raises(RepositoryStateError, match="is not a root key"):
            repo.sign_pending("root", uri)
    from modelward.publisher.errors import KeyError_

    with pytest.raises(KeyError_, match="no key with URI"):
        repo.sign_pending("root", "encfile:../elsewhere.pem")
    assert repo.latest_root_version() == 1
    assert stock_refresh(repo.repo) == 1


def test_careless_operator_cannot_stack_root_changes(tmp_path: Path) -> None:
    repo = _repo(tmp_path)
    with pytest.raises(RootNotPublishableError):
        repo.rotate("targets")
    pending = (repo.pending_dir / "2.root.json").read_bytes()
    with pytest.raises(RepositoryStateError, match="already waiting"):
        repo.rotate("snapshot")
    assert (repo.pending_dir / "2.root.json").read_bytes() == pending  # kept as it was
    assert len(list((repo.keys / "rotating").glob("snapshot-*.pem"))) == 0


def test_a_published_version_is_never_rewritten(tmp_path: Path) -> None:
    """A stale pending file of an already published version (here: a root, signed again)
    cannot overwrite what devices may hold."""
    repo = _repo(tmp_path)
    with pytest.raises(RootNotPublishableError):
        repo.rotate("targets")
    stale = (repo.pending_dir / "2.root.json").read_bytes()
    repo.sign_pending("root", "encfile:root-2.pem")
    published = (repo.metadata_dir / "2.root.json").read_bytes()
    md = Metadata.from_bytes(stale)
    md.sign(load_signer_at(repo.keys / "root-2.pem", PW), append=True)
    with pytest.raises(RepositoryStateError, match="published already"):
        repo._publish_or_park(md, "root", 2, md.signed)  # noqa: SLF001
    assert (repo.metadata_dir / "2.root.json").read_bytes() == published


def test_a_refused_publish_leaves_nothing_that_blocks_the_next(tmp_path: Path) -> None:
    """The gate refuses the timestamp; the unreferenced targets/snapshot it leaves are
    replaced by the next good write, never served."""
    repo = _repo(tmp_path, root_threshold=1)
    repo.rotate("targets")
    retired = next((repo.keys / "retired").glob("targets-*.pem"))
    targets, _, _ = repo.current()
    targets.version += 1
    evil = Metadata(targets)
    evil.sign(load_signer_at(retired, PW))
    (repo.metadata_dir / f"{targets.version}.targets.json").write_bytes(evil.to_bytes())
    with pytest.raises(StockClientWouldRejectError):
        repo._snapshot_and_timestamp(targets.version)  # noqa: SLF001
    repo.publish(_bundle(tmp_path, "1.0.0", 1))
    assert stock_refresh(repo.repo) == 2
    assert repo.current()[0].version == targets.version


def test_the_same_root_key_twice_counts_once(tmp_path: Path) -> None:
    """A careless operator (or one holder of one root key) signs the parked root again."""
    repo = _repo(tmp_path)
    with pytest.raises(RootNotPublishableError):
        repo.rotate("targets")
    for _ in range(2):
        with pytest.raises(RootNotPublishableError) as e:
            repo.sign_pending("root", "encfile:root.pem")
        assert [g.have for g in e.value.gaps] == [1, 1]
    assert repo.latest_root_version() == 1
