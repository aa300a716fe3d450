"""An online host with online keys only (issue 14, must-show 4), through the real stack.

The offline machine signs targets with KEYS; the online host runs ``repo refresh`` exactly
as systemd/modelward-repo-refresh.service sets it up: in a mount namespace built from the
unit's TemporaryFileSystem=/Bind*Paths=/InaccessiblePaths= lines (paths moved under a test
directory), as a separate unprivileged user, its passphrases as credential files. A real
device (swtpm, nginx) follows what it publishes. The attacks: the online host's own keys
cannot ship a model, and refresh never reads KEYS.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from tuf.api.metadata import Metadata, MetaFile, Snapshot, TargetFile, Targets, Timestamp
from tuf.api.serialization.json import JSONSerializer

from modelward.agent._commands import provision as agent_provision
from modelward.publisher._keys import load_signer_at
from modelward.publisher._online import CREDENTIAL, attach
from modelward.publisher._repo import Repository
from modelward.publisher._tufcheck import StockClientWouldRejectError
from modelward.simulator._demo import write_device_config
from modelward.simulator._origin import start_origin, stop_origin
from modelward.simulator._pki import CertPair
from modelward.simulator._swtpm import SwtpmHandle
from modelward.updater.errors import MetadataError
from modelward.updater.install._install import Outcome
from tests._i14_online_unit import confine_script, directives, exec_args
from tests.conftest import World

OFFLINE = b"offline passphrase for root+targets"
PASS = {"snapshot": b"online snapshot passphrase", "timestamp": b"online timestamp passphrase"}
UID = 64123  # a throwaway uid with no entry anywhere: the refresh user
WORKTREE = Path(__file__).resolve().parents[2]
# runs as another uid (setpriv, unshare): one worker, alone (scripts/test)
pytestmark = [pytest.mark.xdist_group("machine"),
              pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None or
                                 shutil.which("setpriv") is None,
                                 reason="needs root, unshare and setpriv (the CI sandbox)")]


class OnlineWorld(World):
    """A World in the two-machine layout: ``repo`` is the offline machine's view."""

    base: Path
    online_dir: Path
    creds: Path

    def refresh_as_unit(self, *probe: str) -> subprocess.CompletedProcess[str]:
        """Run the unit's ExecStart (or ``probe``) confined as the unit says, as UID."""
        d = directives()
        argv = exec_args(d)
        cmd = [sys.executable, "-m", "modelward", *argv[1:]]
        for flag in ("--repo", "--online-dir"):
            i = cmd.index(flag) + 1
            cmd[i] = f"{self.base}{cmd[i]}"
        stage = Path(tempfile.mkdtemp(prefix="stage-", dir=self.base.parent))
        try:
            return subprocess.run(
                ["unshare", "-m", "sh", "-c", confine_script(d, self.base, stage, _python()),
                 "sh",
                 "setpriv", f"--reuid={UID}", f"--regid={UID}", "--clear-groups", "--",
                 "env", "-i", "PATH=/usr/bin:/bin", f"PYTHONPATH={WORKTREE}",
                 "HOME=/nonexistent", "TSS2_LOG=all+NONE",
                 f"CREDENTIALS_DIRECTORY={self.creds}", *(probe or cmd)],
                capture_output=True, text=True, timeout=120, check=False)
        finally:
            shutil.rmtree(stage, ignore_errors=True)


def _python() -> Path | None:
    """This interpreter's installation when it sits in a private home (see confine_script)."""
    prefix = Path(os.path.realpath(sys.base_prefix))
    return prefix if prefix.parts[1:2] in (("root",), ("home",)) else None


def _chown(path: Path) -> None:
    for p in [path, *path.rglob("*")]:
        os.chown(p, UID, UID)


@pytest.fixture
def online_world(tmp_path: Path, swtpm: SwtpmHandle, pki: tuple[CertPair, CertPair]
                 ) -> Iterator[OnlineWorld]:
    ca, server = pki
    base = Path(tempfile.mkdtemp(prefix="i14-online-"))  # traversable by the refresh user
    os.chmod(base, 0o755)  # noqa: S103 - the refresh user must traverse it
    keys = base / "var/lib/modelward-keys"  # a single machine: KEYS next to ONLINE
    online = base / "var/lib/modelward-online"
    repo_dir = base / "srv/modelward"
    attach(Repository(repo_dir, keys, OFFLINE), online, PASS.__getitem__).init()
    for p in (base / "var", base / "var/lib", base / "srv"):
        os.chmod(p, 0o755)  # noqa: S103 - as on a real host
    _chown(online)
    _chown(repo_dir / "metadata")
    creds = base / "creds"  # what systemd's LoadCredential= would put in a private ramfs
    creds.mkdir(mode=0o700)
    for role, pw in PASS.items():
        (creds / CREDENTIAL.format(role=role)).write_bytes(pw)
    _chown(creds)
    work = tmp_path / "origin"
    origin = start_origin(repo_dir, work, server)
    builds = tmp_path / "builds"
    builds.mkdir()
    try:
        conf = write_device_config(tmp_path / "agent.toml", device_id="dev-1",
                                   state=tmp_path / "state", tcti=swtpm.tcti,
                                   origin_url=origin.url, ca=ca.cert)
        w = OnlineWorld(tmp_path, repo_dir, keys, Repository(repo_dir, keys, OFFLINE), builds,
                        conf, swtpm, origin.url, ca)
        w.base, w.online_dir, w.creds = base, online, creds
        agent_provision(w.cfg, repo_dir / "metadata" / "1.root.json")
        yield w
    finally:
        stop_origin(work)
        shutil.rmtree(base, ignore_errors=True)


def test_refresh_unit_publishes_offline_targets_without_seeing_keys(
        online_world: OnlineWorld) -> None:
    """Must-show 4: the unit's refresh, as its own user with only the online directory in
    view, puts the offline machine's targets in a snapshot; the device installs it."""
    w = online_world
    w.update()  # the device knows version 1 of everything
    w.publish("1.0.0", seed=1)  # offline: targets v2, no snapshot/timestamp
    before = w.snapshot()
    assert w.update().outcome is Outcome.UP_TO_DATE
    assert w.snapshot() == before  # nothing published yet

    root_pem = w.keys / "root.pem"
    # two layers: the user cannot read KEYS, and in the unit's view KEYS does not exist
    plain = subprocess.run(["setpriv", f"--reuid={UID}", f"--regid={UID}", "--clear-groups",
                            "cat", str(root_pem)], capture_output=True, text=True, check=False)
    assert plain.returncode != 0 and "Permission denied" in plain.stderr
    probe = w.refresh_as_unit("sh", "-c", f"ls -a {w.keys.parent}; cat {root_pem}; "
                              f"ls {w.online_dir}; touch {w.online_dir}/x")
    assert probe.returncode != 0
    assert "modelward-keys" not in probe.stdout and "No such file" in probe.stderr
    assert "snapshot.pem" in probe.stdout and "Read-only file system" in probe.stderr

    r = w.refresh_as_unit()
    assert r.returncode == 0, r.stderr
    assert "re-signed snapshot, timestamp" in r.stdout
    assert w.update().outcome is Outcome.INSTALLED
    assert w.active_version() == "1.0.0"


def test_online_host_keys_cannot_ship_a_model(online_world: OnlineWorld) -> None:
    """The online host compromised: with its snapshot key it forges targets v3 listing its
    own (valid) bundle. Its refresh does not list it; signing snapshot and timestamp over it
    by hand gets a typed error on the device, and nothing trusted moves."""
    w = online_world
    w.publish("1.0.0", seed=1)
    assert w.refresh_as_unit().returncode == 0
    w.update()
    assert w.active_version() == "1.0.0"
    before = w.snapshot()

    evil = w.bundle("9.9.9", seed=666)
    path = "classifier/classifier-9.9.9.tar"
    tf = TargetFile.from_file(path, str(evil), ["sha256"])
    tf.unrecognized_fields["custom"] = {"modelward": {
        "name": "classifier", "version": "9.9.9", "fingerprint": "00" * 32,
        "channel": "stable", "rollout": {"basis_points": 10000, "halted": False},
        "pinned": False}}
    shutil.copyfile(evil, w.repo_dir / "targets" / "classifier" /
                    f"{tf.hashes['sha256']}.classifier-9.9.9.tar")
    published = w.repo.current()[0]
    forged = Targets(version=3, expires=published.expires,
                     targets={**published.targets, path: tf})
    md = Metadata(forged)
    snap_key = load_signer_at(w.online_dir / "snapshot.pem", PASS["snapshot"], "snapshot")
    md.sign(snap_key)
    (w.repo_dir / "metadata" / "3.targets.json").write_bytes(md.to_bytes(JSONSerializer()))

    r = w.refresh_as_unit()
    assert r.returncode == 0, r.stderr
    assert "ignoring 3.targets.json" in r.stderr
    assert w.update().outcome is Outcome.UP_TO_DATE
    assert w.snapshot().current == before.current and w.active_version() == "1.0.0"

    # by hand: snapshot and timestamp (online keys) over the forged targets
    hand = attach(Repository(w.repo_dir, w.online_dir, b""), w.online_dir,
                  PASS.__getitem__)
    with pytest.raises(StockClientWouldRejectError):  # the repository tool refuses it
        hand._snapshot_and_timestamp(3)
    md_dir = w.repo_dir / "metadata"  # so the attacker signs by hand
    ts_md = Metadata[Timestamp].from_bytes((md_dir / "timestamp.json").read_bytes())
    snap_md = Metadata[Snapshot].from_bytes(
        (md_dir / f"{ts_md.signed.snapshot_meta.version}.snapshot.json").read_bytes())
    snap = snap_md.signed
    snap.version += 1
    snap.meta["targets.json"] = MetaFile(version=3)
    snap_md = Metadata(snap)
    snap_md.sign(snap_key)
    (md_dir / f"{snap.version}.snapshot.json").write_bytes(snap_md.to_bytes(JSONSerializer()))
    ts = ts_md.signed
    ts.version += 1
    ts.snapshot_meta = MetaFile(version=snap.version)
    ts_md = Metadata(ts)
    ts_md.sign(load_signer_at(w.online_dir / "timestamp.pem", PASS["timestamp"], "timestamp"))
    (md_dir / "timestamp.json").write_bytes(ts_md.to_bytes(JSONSerializer()))
    with pytest.raises(MetadataError):
        w.update()
    after = w.snapshot()
    assert (after.record, after.counter, after.anchor, after.current, after.slots) == (
        before.record, before.counter, before.anchor, before.current, before.slots)


def test_refresh_never_opens_the_key_directory(tmp_path: Path) -> None:
    """strace of the real command: no file-system call names KEYS (or its files)."""
    assert shutil.which("strace"), "strace is missing: scripts/setup installs it"
    keys, online, repo_dir = tmp_path / "keys", tmp_path / "online", tmp_path / "repo"
    trace = tmp_path / "trace"
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(WORKTREE), "TSS2_LOG": "all+NONE",
           "MODELWARD_KEY_PASSPHRASE_SNAPSHOT": PASS["snapshot"].decode(),
           "MODELWARD_KEY_PASSPHRASE_TIMESTAMP": PASS["timestamp"].decode()}
    init = subprocess.run([sys.executable, "-m", "modelward", "repo", "init", "--repo",
                           str(repo_dir), "--keys", str(keys), "--online-dir", str(online)],
                          capture_output=True, text=True, timeout=120, check=False,
                          env={**env, "MODELWARD_KEY_PASSPHRASE": OFFLINE.decode()})
    assert init.returncode == 0, init.stderr
    assert "move that directory to the online host" in init.stdout
    assert sorted(p.name for p in online.glob("*.pem")) == ["snapshot.pem", "timestamp.pem"]
    r = subprocess.run(["strace", "-f", "-qq", "-e", "trace=%file", "-o", str(trace),
                        sys.executable, "-m", "modelward", "repo", "refresh", "--repo",
                        str(repo_dir), "--online-dir", str(online)],
                       capture_output=True, text=True, env=env, timeout=120, check=False)
    assert r.returncode == 0, r.stderr
    text = trace.read_text()
    assert str(online / "timestamp.pem") in text  # the trace sees the files it opens
    assert str(keys) not in text
