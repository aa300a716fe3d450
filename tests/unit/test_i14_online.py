"""The online host with online keys only (issue 14, must-show 4): the layout, the pure
snapshot decision, the refresh's verification of what the offline side left, and the
attacks on it. No device here: tests/integration/test_i14_online.py runs the real stack."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from securesystemslib.signer import CryptoSigner
from tuf.api.metadata import Metadata, Root, Snapshot, TargetFile, Targets, Timestamp
from tuf.api.serialization.json import JSONSerializer
from tuf.ngclient import Updater
from tuf.ngclient.fetcher import FetcherInterface

from modelward.publisher._bundle_build import build_bundle
from modelward.publisher._keys import load_signer_at
from modelward.publisher._online import (
    ANCHOR_FILE,
    LAYOUT_FILE,
    attach,
    env_passphrases,
    next_snapshot_meta,
)
from modelward.publisher._repo import Repository
from modelward.publisher.errors import KeyError_, RepositoryStateError
from modelward.simulator._models import make_linear_model

OFFLINE = b"offline passphrase, root and targets"
PASS = {"snapshot": b"snapshot passphrase online", "timestamp": b"timestamp passphrase online"}


def _pw(role: str) -> bytes:
    return PASS[role]


class Layout:
    """KEYS (offline), ONLINE and REPO side by side; ``offline`` is the offline machine's
    view (no online directory), ``online()`` the online host's (no KEYS)."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.repo_dir, self.keys, self.online_dir = tmp / "repo", tmp / "keys", tmp / "online"
        init = attach(Repository(self.repo_dir, self.keys, OFFLINE), self.online_dir, _pw)
        self.root_path = init.init()
        self.offline = Repository(self.repo_dir, self.keys, OFFLINE)
        self.n = 0

    def online(self) -> Repository:
        return attach(Repository(self.repo_dir, self.online_dir, b""), self.online_dir, _pw)

    def bundle(self, version: str) -> Path:
        self.n += 1
        out = self.tmp / f"b{self.n}.tar"
        build_bundle(make_linear_model(self.tmp / f"m{self.n}.onnx", self.n), "classifier",
                     version, out)
        return out

    def md(self, name: str) -> Metadata[Any]:
        return Metadata.from_bytes((self.repo_dir / "metadata" / name).read_bytes())

    def snapshot_meta(self) -> dict[str, int]:
        ts = self.md("timestamp.json").signed
        snap = self.md(f"{ts.snapshot_meta.version}.snapshot.json").signed
        return {k: v.version for k, v in snap.meta.items()}

    def write(self, md: Metadata[Any], name: str) -> None:
        (self.repo_dir / "metadata" / name).write_bytes(md.to_bytes(JSONSerializer()))


@pytest.fixture
def lay(tmp_path: Path) -> Layout:
    return Layout(tmp_path)


class _DirFetcher(FetcherInterface):
    def __init__(self, base: Path) -> None:
        self.base = base

    def _fetch(self, url: str) -> Iterator[bytes]:
        from tuf.api.exceptions import DownloadHTTPError

        path = self.base / url.split("/metadata/", 1)[-1]
        if not path.is_file():
            raise DownloadHTTPError(f"{url} not found", 404)
        yield path.read_bytes()


def stock_client_refresh(lay: Layout, tmp: Path) -> Updater:
    """Stock python-tuf, trusting 1.root.json, refreshes from the repository's files."""
    d = tmp / f"client-{len(list(tmp.glob('client-*')))}"
    d.mkdir()
    u = Updater(str(d), "https://origin.invalid/metadata/", str(tmp / "dl"),
                "https://origin.invalid/targets/", fetcher=_DirFetcher(lay.repo_dir / "metadata"),
                bootstrap=lay.root_path.read_bytes())
    u.refresh()
    return u


# --- the layout ----------------------------------------------------------------


def test_init_puts_online_keys_apart_with_their_own_passphrases(lay: Layout) -> None:
    assert sorted(p.name for p in lay.keys.glob("*.pem")) == ["root.pem", "targets.pem"]
    assert sorted(p.name for p in lay.online_dir.glob("*.pem")) == ["snapshot.pem",
                                                                    "timestamp.pem"]
    offline = json.loads((lay.keys / "signers.json").read_text())
    online = json.loads((lay.online_dir / "signers.json").read_text())
    root: Root = lay.md("1.root.json").signed
    assert set(offline) == set(root.roles["root"].keyids) | set(root.roles["targets"].keyids)
    assert set(online) == set(root.roles["snapshot"].keyids) | \
        set(root.roles["timestamp"].keyids)
    assert (lay.online_dir / ANCHOR_FILE).read_bytes() == lay.root_path.read_bytes()
    assert json.loads((lay.keys / LAYOUT_FILE).read_text())["online_roles"] == \
        ["snapshot", "timestamp"]
    load_signer_at(lay.online_dir / "snapshot.pem", PASS["snapshot"], "snapshot")
    for pw in (OFFLINE, PASS["timestamp"]):  # neither the offline nor another role's
        with pytest.raises(KeyError_, match="cannot decrypt the snapshot key"):
            load_signer_at(lay.online_dir / "snapshot.pem", pw, "snapshot")
    with pytest.raises(KeyError_, match="cannot decrypt the root key"):
        load_signer_at(lay.keys / "root.pem", PASS["snapshot"], "root")


@pytest.mark.parametrize("where", ["inside-keys", "holds-keys", "inside-repo"])
def test_overlapping_online_dir_is_refused(tmp_path: Path, where: str) -> None:
    repo, keys = tmp_path / "repo", tmp_path / "keys"
    online = {"inside-keys": keys / "online", "holds-keys": tmp_path,
              "inside-repo": repo / "online"}[where]
    with pytest.raises(RepositoryStateError, match="is inside the"):
        attach(Repository(repo, keys, OFFLINE), online, _pw).init()
    assert not (repo / "metadata").exists()


def test_cli_init_refuses_overlap_in_one_line(tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "modelward", "repo", "init", "--repo",
                        str(tmp_path / "r"), "--keys", str(tmp_path / "k"), "--online-dir",
                        str(tmp_path / "k" / "online")], capture_output=True, text=True,
                       env={"MODELWARD_KEY_PASSPHRASE": "x" * 20, "PATH": "/usr/bin"},
                       check=False)
    assert r.returncode == 1, r.stderr
    assert r.stderr.startswith("modelward: error: online directory") and \
        "Traceback" not in r.stderr


# --- passphrases -----------------------------------------------------------------


def test_env_passphrases_per_role_then_credential_then_generic(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "key-passphrase-timestamp").write_text("from the credential\n")
    get = env_passphrases({"MODELWARD_KEY_PASSPHRASE_SNAPSHOT": "snap",
                           "CREDENTIALS_DIRECTORY": str(tmp_path)}, lambda _r: b"generic")
    assert get("snapshot") == b"snap"
    assert get("timestamp") == b"from the credential"
    with caplog.at_level(logging.WARNING):
        assert get("targets") == b"generic"
    assert "MODELWARD_KEY_PASSPHRASE_TARGETS" in caplog.text
    with pytest.raises(KeyError_, match="no passphrase for the snapshot key"):
        env_passphrases({})("snapshot")
    with pytest.raises(KeyError_, match="snapshot passphrase .* is empty"):
        env_passphrases({"MODELWARD_KEY_PASSPHRASE_SNAPSHOT": ""})("snapshot")


def test_hsm_pin_from_the_credential(tmp_path: Path) -> None:
    from modelward.publisher._online import credential_secrets

    asked: list[str] = []
    get = credential_secrets({"CREDENTIALS_DIRECTORY": str(tmp_path)},
                             lambda what: asked.append(what) or "prompted")
    assert get("pin") == "prompted" and asked == ["pin"]
    (tmp_path / "hsm-pin").write_text("1234\n")
    assert get("pin") == "1234" and asked == ["pin"]


# --- the pure decision -------------------------------------------------------------


def test_next_snapshot_meta_never_drops_or_lowers() -> None:
    prev = {"targets": 3, "team": 2}
    assert next_snapshot_meta(prev, {"targets": 3, "team": 2}) is None
    assert next_snapshot_meta(prev, {"targets": 2}) is None  # never lowered
    assert next_snapshot_meta(prev, {"targets": 4}) == {"targets": 4, "team": 2}
    assert next_snapshot_meta(prev, {"other": 1}) == {"targets": 3, "team": 2, "other": 1}


# --- the two-machine flow ------------------------------------------------------------


def test_offline_publishes_then_online_refresh_lists_them(lay: Layout, tmp_path: Path) -> None:
    lay.offline.publish(lay.bundle("1.0.0"))
    r2 = lay.offline.publish(lay.bundle("1.1.0"))  # builds on the unsnapshotted v2
    assert r2.targets_version == 3
    assert lay.snapshot_meta() == {"targets.json": 1}  # no online key offline
    assert sorted(lay.md("3.targets.json").signed.targets) == [  # (each with its index)
        "classifier/classifier-1.0.0.tar", "classifier/classifier-1.0.0.tar.chunks.json",
        "classifier/classifier-1.1.0.tar", "classifier/classifier-1.1.0.tar.chunks.json"]
    assert lay.online().refresh() == ["snapshot", "timestamp"]
    assert lay.snapshot_meta() == {"targets.json": 3}
    u = stock_client_refresh(lay, tmp_path)
    assert u.get_targetinfo("classifier/classifier-1.1.0.tar") is not None
    assert lay.online().refresh() == ["timestamp"]  # nothing new: the timestamp only


def test_offline_refresh_without_online_dir_is_refused(lay: Layout) -> None:
    with pytest.raises(RepositoryStateError, match="timestamp key lives in the online"):
        lay.offline.refresh()


def test_refresh_needs_no_key_directory(lay: Layout) -> None:
    lay.offline.publish(lay.bundle("1.0.0"))
    lay.keys.rename(lay.tmp / "carried-away")  # the offline machine is elsewhere
    assert lay.online().refresh() == ["snapshot", "timestamp"]
    assert lay.snapshot_meta() == {"targets.json": 2}


def test_targets_rotation_offline_is_followed_by_the_online_chain(
        lay: Layout, tmp_path: Path) -> None:
    lay.offline.publish(lay.bundle("1.0.0"))
    lay.offline.rotate("targets")  # root v2 staged, targets v3 (the old and the new key)
    assert lay.online().refresh() == ["root", "snapshot", "timestamp"]
    assert lay.snapshot_meta() == {"targets.json": 3}
    assert stock_client_refresh(lay, tmp_path).get_targetinfo(
        "classifier/classifier-1.0.0.tar") is not None


def test_rotating_an_online_key_with_repo_rotate_is_refused(lay: Layout) -> None:
    with pytest.raises(RepositoryStateError, match="does not rotate keys of the online"):
        lay.offline.rotate("timestamp")
    assert lay.offline.latest_root_version() == 1


def test_team_publish_offline_is_snapshotted_online(lay: Layout) -> None:
    lay.offline.delegate("team", ["classifier/*"])
    lay.offline.publish(lay.bundle("2.0.0"), role="team")
    lay.online().refresh()
    assert lay.snapshot_meta() == {"targets.json": 2, "team.json": 2}


# --- attacks: what the online host is handed ----------------------------------------


def _forged_targets(lay: Layout, signer: CryptoSigner, version: int) -> None:
    t = Targets(version=version, expires=lay.md("1.targets.json").signed.expires)
    t.targets["classifier/classifier-9.9.9.tar"] = TargetFile(1, {"sha256": "00" * 32},
                                                              "classifier/classifier-9.9.9.tar")
    md = Metadata(t)
    md.sign(signer)
    lay.write(md, f"{version}.targets.json")


@pytest.mark.parametrize("who", ["origin-random-key", "online-host-snapshot-key"])
def test_forged_targets_are_not_snapshotted(lay: Layout, who: str,
                                            caplog: pytest.LogCaptureFixture) -> None:
    """The origin (any key) or the compromised online host (its own snapshot key) drops a
    newer targets file: refresh lists only what the targets keys signed."""
    lay.offline.publish(lay.bundle("1.0.0"))
    signer = CryptoSigner.generate_ed25519() if who == "origin-random-key" else \
        load_signer_at(lay.online_dir / "snapshot.pem", PASS["snapshot"], "snapshot")
    _forged_targets(lay, signer, 3)
    with caplog.at_level(logging.WARNING):
        lay.online().refresh()
    assert lay.snapshot_meta() == {"targets.json": 2}
    assert "ignoring 3.targets.json" in caplog.text


def test_forged_root_does_not_let_forged_targets_in(lay: Layout) -> None:
    """An attacker root v2 (their own root and targets keys) is not chained from the anchor:
    the targets it would make valid are ignored."""
    evil = CryptoSigner.generate_ed25519()
    root: Root = lay.md("1.root.json").signed
    for role in ("root", "targets"):
        for k in list(root.roles[role].keyids):
            root.revoke_key(k, role)
        root.add_key(evil.public_key, role)
    root.version = 2
    md = Metadata(root)
    md.sign(evil)
    lay.write(md, "2.root.json")
    _forged_targets(lay, evil, 2)
    before = _metadata_files(lay)
    with pytest.raises(RepositoryStateError, match=r"2\.root\.json does not chain to root v1"):
        lay.online().refresh()  # named, never a silent fall-back to root v1
    assert _metadata_files(lay) == before
    assert lay.snapshot_meta() == {"targets.json": 1}


def test_forged_team_metadata_keeps_the_verified_team_version(lay: Layout) -> None:
    lay.offline.delegate("team", ["classifier/*"])
    lay.online().refresh()
    md = lay.md("1.team.json")
    md.signed.version = 2
    md.signatures.clear()
    md.sign(CryptoSigner.generate_ed25519())
    lay.write(md, "2.team.json")
    lay.online().refresh()
    assert lay.snapshot_meta()["team.json"] == 1


def test_lower_targets_version_cannot_roll_the_snapshot_back(lay: Layout) -> None:
    lay.offline.publish(lay.bundle("1.0.0"))
    lay.offline.publish(lay.bundle("1.1.0"))
    lay.online().refresh()
    (lay.repo_dir / "metadata" / "3.targets.json").rename(lay.tmp / "held-back")
    with pytest.raises(RepositoryStateError, match="3.targets.json is missing"):
        lay.online().refresh()
    (lay.tmp / "held-back").rename(lay.repo_dir / "metadata" / "3.targets.json")
    lay.online().refresh()
    assert lay.snapshot_meta() == {"targets.json": 3}


@pytest.mark.parametrize("mistake", ["root.pem copied", "root key registered"])
def test_online_dir_holding_an_offline_key_is_refused(lay: Layout, mistake: str) -> None:
    """The careless operator copies KEYS into the online directory."""
    if mistake == "root.pem copied":
        (lay.online_dir / "root.pem").write_bytes((lay.keys / "root.pem").read_bytes())
    else:
        doc = json.loads((lay.online_dir / "signers.json").read_text())
        doc.update(json.loads((lay.keys / "signers.json").read_text()))
        (lay.online_dir / "signers.json").write_text(json.dumps(doc))
    ts = (lay.repo_dir / "metadata" / "timestamp.json").read_bytes()
    with pytest.raises(RepositoryStateError, match="online directory must hold only"):
        lay.online().refresh()
    assert (lay.repo_dir / "metadata" / "timestamp.json").read_bytes() == ts


def test_missing_anchor_is_refused(lay: Layout) -> None:
    (lay.online_dir / ANCHOR_FILE).unlink()
    with pytest.raises(RepositoryStateError, match="trusts no root"):
        lay.online().refresh()


def test_online_refresh_signature_threshold(lay: Layout) -> None:
    """Snapshot and timestamp verify with the root's online keys (stock TUF rules)."""
    lay.online().refresh()
    root: Root = lay.md("1.root.json").signed
    ts = lay.md("timestamp.json")
    assert isinstance(ts.signed, Timestamp)
    root.verify_delegate("timestamp", ts.signed_bytes, ts.signatures)
    snap = lay.md(f"{ts.signed.snapshot_meta.version}.snapshot.json")
    assert isinstance(snap.signed, Snapshot)
    root.verify_delegate("snapshot", snap.signed_bytes, snap.signatures)
    pub = serialization.load_pem_private_key(
        (lay.online_dir / "timestamp.pem").read_bytes(), PASS["timestamp"]).public_key()
    assert pub is not None


def test_added_online_key_is_registered_online_and_signs(lay: Layout) -> None:
    """`repo add-key snapshot` with the online directory (MODELWARD_ONLINE_DIR): the URI goes
    to ONLINE/signers.json, never KEYS; root v2 chains and refresh signs with both keys."""
    extra = CryptoSigner.generate_ed25519()
    pem = extra._private_key.private_bytes(  # noqa: SLF001 - a test key
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()).decode()
    both = attach(Repository(lay.repo_dir, lay.keys, OFFLINE), lay.online_dir, _pw)
    assert both.add_key("snapshot", "envvar:SNAP2", extra.public_key) == 2
    assert extra.public_key.keyid in json.loads((lay.online_dir / "signers.json").read_text())
    assert extra.public_key.keyid not in json.loads((lay.keys / "signers.json").read_text())
    online = attach(Repository(lay.repo_dir, lay.online_dir, b""), lay.online_dir, _pw,
                    environ={"SNAP2": pem})
    lay.offline.publish(lay.bundle("1.0.0"))
    online.refresh()
    ts = lay.md("timestamp.json").signed
    snap = lay.md(f"{ts.snapshot_meta.version}.snapshot.json")
    assert extra.public_key.keyid in snap.signatures and len(snap.signatures) == 2


def test_cli_refresh_pointed_at_the_offline_keys_is_refused(lay: Layout) -> None:
    """The careless operator gives the timer KEYS as its online directory."""
    ts = (lay.repo_dir / "metadata" / "timestamp.json").read_bytes()
    r = subprocess.run([sys.executable, "-m", "modelward", "repo", "refresh", "--repo",
                        str(lay.repo_dir), "--online-dir", str(lay.keys)], capture_output=True,
                       text=True, env={"MODELWARD_KEY_PASSPHRASE": OFFLINE.decode(),
                                       "PATH": "/usr/bin"}, check=False)
    assert r.returncode == 1 and r.stderr.startswith("modelward: error: ")
    assert "Traceback" not in r.stderr
    assert (lay.repo_dir / "metadata" / "timestamp.json").read_bytes() == ts


def test_deep_or_huge_targets_file_is_ignored(lay: Layout) -> None:
    """The origin drops unparseable newer targets: refresh logs and goes on."""
    (lay.repo_dir / "metadata" / "2.targets.json").write_bytes(b"[" * 100_000)
    (lay.repo_dir / "metadata" / "3.targets.json").write_bytes(b" " * (17 << 20))
    assert lay.online().refresh() == ["timestamp"]
    assert lay.snapshot_meta() == {"targets.json": 1}


def test_online_key_symlinked_to_an_offline_key_is_refused(lay: Layout) -> None:
    """The disk of the online host: signers.json or a key file pointing into KEYS."""
    (lay.online_dir / "timestamp.pem").unlink()
    (lay.online_dir / "timestamp.pem").symlink_to(lay.keys / "root.pem")
    with pytest.raises(KeyError_, match="points outside"):
        lay.online().refresh()


def _metadata_files(lay: Layout) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in (lay.repo_dir / "metadata").iterdir()}


def test_wrong_timestamp_passphrase_writes_nothing(lay: Layout) -> None:
    """Both online keys load before anything is written: no snapshot without a timestamp."""
    lay.offline.publish(lay.bundle("1.0.0"))
    before = _metadata_files(lay)
    wrong = {**PASS, "timestamp": b"not the timestamp passphrase"}
    online = attach(Repository(lay.repo_dir, lay.online_dir, b""), lay.online_dir,
                    wrong.__getitem__)
    with pytest.raises(KeyError_, match="cannot decrypt the timestamp key"):
        online.refresh()
    assert _metadata_files(lay) == before


def test_online_threshold_not_met_writes_nothing(lay: Layout) -> None:
    """Timestamp threshold 2, one key in the online directory: a typed error, no file (the
    unit's online directory is read-only: nothing can wait there for more signatures)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    priv = ed25519.Ed25519PrivateKey.generate()
    env = {"ELSEWHERE": priv.private_bytes(  # at hand while root v2 is published only
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()).decode()}
    both = attach(Repository(lay.repo_dir, lay.keys, OFFLINE, environ=env), lay.online_dir,
                  _pw, environ=env)
    other = CryptoSigner(priv).public_key
    both.add_key("timestamp", "envvar:ELSEWHERE", other, threshold=2)
    doc = json.loads((lay.online_dir / "signers.json").read_text())
    del doc[other.keyid]  # that key is held on another host
    (lay.online_dir / "signers.json").write_text(json.dumps(doc))
    before = _metadata_files(lay)
    with pytest.raises(RepositoryStateError, match="do not meet its threshold in root v2"):
        lay.online().refresh()
    assert _metadata_files(lay) == before
    assert not (lay.online_dir / "pending").exists()


def test_stale_timestamp_copied_back_never_overwrites_a_snapshot(lay: Layout) -> None:
    """The careless operator copies the offline machine's old timestamp.json over the served
    one: the next snapshot takes a new file name, never an existing one."""
    stale = (lay.repo_dir / "metadata" / "timestamp.json").read_bytes()
    lay.offline.publish(lay.bundle("1.0.0"))
    lay.online().refresh()  # 2.snapshot.json
    second = (lay.repo_dir / "metadata" / "2.snapshot.json").read_bytes()
    (lay.repo_dir / "metadata" / "timestamp.json").write_bytes(stale)
    lay.online().refresh()
    assert (lay.repo_dir / "metadata" / "2.snapshot.json").read_bytes() == second
    assert lay.snapshot_meta() == {"targets.json": 2}
    assert lay.md("timestamp.json").signed.snapshot_meta.version >= 2  # 2: nothing changed
    assert lay.md("timestamp.json").signed.version == 3  # above the one signed before


def test_signed_targets_replayed_under_a_higher_name_is_ignored(lay: Layout) -> None:
    """The origin copies the genuine 2.targets.json to 5.targets.json: its signatures verify,
    but the name is not its version, so the snapshot does not claim v5."""
    lay.offline.publish(lay.bundle("1.0.0"))
    meta = lay.repo_dir / "metadata"
    (meta / "5.targets.json").write_bytes((meta / "2.targets.json").read_bytes())
    lay.online().refresh()
    assert lay.snapshot_meta() == {"targets.json": 2}


def test_lifetimes_reach_the_online_host_and_refresh_warns(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """`repo init --expiry` lifetimes are in ONLINE/expiry.json, so the online host signs
    with them; its refresh warns for the offline roles inside their windows."""
    from datetime import UTC, datetime, timedelta

    keys, online_dir, repo_dir = tmp_path / "keys", tmp_path / "online", tmp_path / "repo"
    init = attach(Repository(repo_dir, keys, OFFLINE), online_dir, _pw)
    init.expiry = init.expiry.changed({"timestamp": timedelta(hours=12),
                                       "targets": timedelta(days=40)},
                                      {"targets": timedelta(days=39)})
    init.init()
    later = datetime.now(UTC).replace(microsecond=0) + timedelta(days=2)  # targets: 38 d left
    online = attach(Repository(repo_dir, online_dir, b"", clock=lambda: later), online_dir,
                    _pw)
    assert online.expiry.timestamp == timedelta(hours=12)
    with caplog.at_level(logging.WARNING):
        online.refresh()
    ts = Metadata.from_bytes((repo_dir / "metadata" / "timestamp.json").read_bytes()).signed
    assert ts.expires - later == timedelta(hours=12)
    assert "targets" in caplog.text and "expires" in caplog.text


def test_set_expiry_offline_says_to_copy_it(lay: Layout, caplog: pytest.LogCaptureFixture
                                            ) -> None:
    from datetime import timedelta

    with caplog.at_level(logging.WARNING):
        lay.offline.set_expiry({"snapshot": timedelta(days=3)})
    assert "copy" in caplog.text and "expiry.json" in caplog.text
    both = attach(Repository(lay.repo_dir, lay.keys, OFFLINE), lay.online_dir, _pw)
    both.set_expiry({"snapshot": timedelta(days=4)})
    assert lay.online().expiry.snapshot == timedelta(days=4)
