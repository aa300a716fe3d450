"""Issue 14 must-show 5 and 6 through the real CLI: `repo sign` shows what it signs and
refuses a pending file edited after its first signature (device: swtpm, nginx), and expiry
warnings for every role inside its window (`repo status`, `repo refresh` under faketime).
"""

from __future__ import annotations

import json
import os
import pty
import re
import shutil
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from tests.conftest import PASSPHRASE, World, tree_digest

PY = [sys.executable, "-m", "modelward"]


def _run(*argv: str, env: dict[str, str] | None = None, stdin: int | None = subprocess.DEVNULL,
         faketime: str | None = None) -> subprocess.CompletedProcess[str]:
    e = {**os.environ, "MODELWARD_KEY_PASSPHRASE": PASSPHRASE.decode(), **(env or {})}
    pre = ["faketime", "-f", faketime] if faketime else []
    return subprocess.run([*pre, *PY, *argv], capture_output=True, text=True, env=e,
                          stdin=stdin, timeout=120, check=False)


def _pending_targets(w: World, tmp: Path) -> dict[str, str]:
    """targets made 2-of-2 (a CI key in an envvar); 1.0.0 published with both signatures
    and installed; 2.0.0 published with one, so it waits in KEYS/pending. Returns the CI
    key's environment."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    priv = ed25519.Ed25519PrivateKey.generate()
    env = {"CI_KEY": priv.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()).decode()}
    (tmp / "ci.pub.pem").write_bytes(priv.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    r = _run("repo", "add-key", "targets", "--uri", "envvar:CI_KEY", "--public-key",
             str(tmp / "ci.pub.pem"), "--threshold", "2", *_rk(w), env=env)
    assert r.returncode == 0, r.stderr  # root v2 re-signs targets with both keys
    r = _run("publish", *_rk(w), "--sign-with", "encfile:targets.pem", "--sign-with",
             "envvar:CI_KEY", str(w.bundle("1.0.0", seed=1)), env=env)
    assert r.returncode == 0, r.stderr
    w.update()
    assert w.active_version() == "1.0.0"
    r = _run("publish", *_rk(w), str(w.bundle("2.0.0", seed=2)))
    assert r.returncode == 1 and "1 of the 2 signatures" in r.stderr
    return env


def _rk(w: World) -> list[str]:
    return ["--repo", str(w.repo_dir), "--keys", str(w.keys)]


def _sign(w: World, *extra: str, env: dict[str, str], stdin: int | None = subprocess.DEVNULL
          ) -> subprocess.CompletedProcess[str]:
    return _run("repo", "sign", "targets", "--key", "envvar:CI_KEY", *extra, *_rk(w), env=env,
                stdin=stdin)


def _on_terminal(w: World, answer: bytes, env: dict[str, str]
                 ) -> subprocess.CompletedProcess[str]:
    master, slave = pty.openpty()
    try:
        os.write(master, answer)
        return _sign(w, env=env, stdin=slave)
    finally:
        os.close(master)
        os.close(slave)


def test_i14_repo_sign_prints_the_change_and_asks(world: World, tmp_path: Path) -> None:
    env = _pending_targets(world, tmp_path)
    (pending,) = (world.keys / "pending").glob("*.targets.json")
    fields = json.loads(pending.read_bytes())["signed"]["targets"][
        "classifier/classifier-2.0.0.tar"]["custom"]["modelward"]
    before, served, parked = world.snapshot(), tree_digest(world.repo_dir), pending.read_bytes()

    # No terminal and no --yes: the summary is printed, nothing is signed.
    r = _sign(world, env=env)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "not signed: no terminal to confirm on" in r.stderr and "--yes" in r.stderr
    assert "targets: version 3 -> 4" in r.stdout
    assert (f"  + classifier/classifier-2.0.0.tar: model classifier version 2.0.0 "
            f"fingerprint {fields['fingerprint']} channel stable rollout 100%") in r.stdout
    assert "already signed by 1 key(s)" in r.stdout
    # On a terminal the signer declines.
    r = _on_terminal(world, b"n\n", env)
    assert r.returncode == 1 and "the signer did not confirm" in r.stderr
    assert "sign this targets metadata with envvar:CI_KEY? [y/N]" in r.stdout
    assert pending.read_bytes() == parked and tree_digest(world.repo_dir) == served
    assert world.update().outcome.value == "up-to-date"
    assert world.snapshot() == before

    # Confirmed on the terminal: published, and the device installs what it showed.
    r = _on_terminal(world, b"y\n", env)
    assert r.returncode == 0, r.stderr
    assert "2 of 2 signatures; published" in r.stdout and not pending.exists()
    world.update()
    assert world.active_version() == "2.0.0"


def test_i14_pending_edited_after_first_signature_is_refused(world: World,
                                                             tmp_path: Path) -> None:
    env = _pending_targets(world, tmp_path)
    (pending,) = (world.keys / "pending").glob("*.targets.json")
    doc = json.loads(pending.read_bytes())
    keyid = doc["signatures"][0]["keyid"]
    # Someone with the key directory re-points the release to another channel, keeping
    # the first signature.
    f = doc["signed"]["targets"]["classifier/classifier-2.0.0.tar"]["custom"]["modelward"]
    f["channel"] = "beta"
    pending.write_text(json.dumps(doc, indent=1))
    edited, before, served = pending.read_bytes(), world.snapshot(), tree_digest(world.repo_dir)

    r = _sign(world, "--yes", env=env)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert f"{pending} was changed after it was signed" in r.stderr
    assert keyid[:16] in r.stderr and "no longer verify" in r.stderr
    assert "nothing published" in r.stderr
    assert r.stdout == ""  # no summary of bytes nobody signed
    assert pending.read_bytes() == edited and tree_digest(world.repo_dir) == served
    assert world.update().outcome.value == "up-to-date"
    assert world.snapshot() == before
    assert world.active_version() == "1.0.0"


@pytest.fixture
def cli_repo(tmp_path: Path) -> list[str]:
    """A repository made through the CLI, with a delegated team role."""
    rk = ["--repo", str(tmp_path / "repo"), "--keys", str(tmp_path / "keys")]
    assert _run("repo", "init", *rk).returncode == 0
    r = _run("repo", "delegate", "vision", "--paths", "detector/*", *rk)
    assert r.returncode == 0, r.stderr
    return rk


def _warned(stderr: str) -> set[str]:
    # a log line: "<time> WARNING <logger>: <role> metadata vN (...) expires in ..."
    return {m.group(1) for line in stderr.splitlines()
            if ("inside its" in line or "EXPIRED" in line)
            and (m := re.search(r"(?:^|: )(\S+) metadata v\d", line))}


@pytest.mark.skipif(shutil.which("faketime") is None, reason="faketime missing")
def test_i14_expiry_warnings_for_every_role_inside_its_window(cli_repo: list[str]) -> None:
    rk = cli_repo
    everyone = {"root", "targets", "vision", "snapshot", "timestamp"}
    for later, warned in (("+19h", {"timestamp"}), ("+29d", {"snapshot", "timestamp"}),
                          ("+336d", everyone)):
        st = _run("repo", "status", "--json", *rk, faketime=later)
        assert st.returncode == 0, st.stderr
        assert _warned(st.stderr) == warned, (later, st.stderr)  # WARNING log lines
        js = json.loads(st.stdout)
        assert {r["role"] for r in js if r["warning"]} == warned
        assert {r["role"]: r["warn_within_seconds"] for r in js} == {
            "root": 30 * 86400, "targets": 30 * 86400, "vision": 30 * 86400,
            "snapshot": 86400, "timestamp": 6 * 3600}
    table = _run("repo", "status", *rk, faketime="+336d").stdout.splitlines()
    assert {line.split()[0] for line in table[1:] if "expires in" in line} == \
        {"root", "targets", "vision"}
    assert {line.split()[0] for line in table[1:] if "EXPIRED" in line} == \
        {"snapshot", "timestamp"}

    # refresh re-signs what the online keys can, and warns about the rest.
    r = _run("repo", "refresh", *rk, faketime="+336d")
    assert r.returncode == 0 and "re-signed snapshot, timestamp" in r.stdout, r.stderr
    assert _warned(r.stderr) == {"root", "targets", "vision"}
    assert "the team holding role 'vision' must re-sign it" in r.stderr


def test_i14_set_expiry_is_persisted_and_used(cli_repo: list[str], tmp_path: Path) -> None:
    rk = cli_repo
    r = _run("repo", "set-expiry", "timestamp=12h", "--warn", "timestamp=3h", *rk)
    assert r.returncode == 0, r.stderr
    assert "timestamp  lifetime      12h  warned 3h ahead" in r.stdout
    bad = _run("repo", "set-expiry", "timestamp=400d", *rk)
    assert bad.returncode == 1 and "timestamp lifetime 400d is out of bounds" in bad.stderr
    assert "Traceback" not in bad.stderr
    assert _run("repo", "refresh", *rk).returncode == 0
    ts = json.loads((tmp_path / "repo" / "metadata" / "timestamp.json").read_bytes())
    st = json.loads(_run("repo", "status", "--json", *rk).stdout)
    row = next(x for x in st if x["role"] == "timestamp")
    assert row["warn_within_seconds"] == 3 * 3600 and row["expires"][:13] == \
        ts["signed"]["expires"][:13]
    left = datetime.fromisoformat(ts["signed"]["expires"].replace("Z", "+00:00")) - \
        datetime.now(UTC)
    assert timedelta(hours=11) < left <= timedelta(hours=12)

    # repo init --expiry: version 1 already has the lifetime, and it is kept.
    rk2 = ["--repo", str(tmp_path / "repo2"), "--keys", str(tmp_path / "keys2")]
    assert _run("repo", "init", "--expiry", "timestamp=2d", "--expiry", "root=730d",
                *rk2).returncode == 0
    root = json.loads((tmp_path / "repo2" / "metadata" / "1.root.json").read_bytes())
    left = datetime.fromisoformat(root["signed"]["expires"].replace("Z", "+00:00")) - \
        datetime.now(UTC)
    assert timedelta(days=729) < left <= timedelta(days=730)
    assert json.loads((tmp_path / "keys2" / "expiry.json").read_bytes())["lifetimes"][
        "timestamp"] == 2 * 86400
    bad = _run("repo", "init", "--expiry", "timestamp=1y", "--repo", str(tmp_path / "r3"),
               "--keys", str(tmp_path / "k3"))
    assert bad.returncode == 1 and "not a duration" in bad.stderr
    assert not (tmp_path / "r3").exists() and not (tmp_path / "k3").exists()
