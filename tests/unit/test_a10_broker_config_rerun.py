"""a10-dynsec fix: rerunning broker-config keeps each existing identity's password, reads
the existing credential files as untrusted input, deletes the files of dropped identities,
and rotates only what ``rotate`` names."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from modelward.publisher._broker_config import BRIDGE_USER, OPERATOR_USER, write_broker_config
from modelward.publisher.errors import OperatorInputError


def _pw(bc_dir: Path, user: str) -> str:
    return (bc_dir / "credentials" / user).read_text()


def _snapshot(d: Path) -> dict[str, str]:
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(d.rglob("*")) if p.is_file() and not p.is_symlink()}


def test_rerun_keeps_adds_and_removes(tmp_path: Path) -> None:
    out = tmp_path / "bc"
    first = write_broker_config("f1", ["dev-1", "dev-2"], out)
    assert first.created == [BRIDGE_USER, OPERATOR_USER, "dev-1", "dev-2"]
    old = {u: _pw(out, u) for u in first.credentials}
    bc = write_broker_config("f1", ["dev-1", "dev-3"], out)
    assert bc.kept == [BRIDGE_USER, OPERATOR_USER, "dev-1"]
    assert bc.created == ["dev-3"] and bc.removed == ["dev-2"] and bc.rotated == []
    assert {u: _pw(out, u) for u in bc.kept} == {u: old[u] for u in bc.kept}
    assert not (out / "credentials" / "dev-2").exists()
    assert _pw(out, "dev-3") not in old.values()


def test_rotate_named_and_all(tmp_path: Path) -> None:
    out = tmp_path / "bc"
    write_broker_config("f1", ["dev-1", "dev-2"], out)
    old = {u: _pw(out, u) for u in (BRIDGE_USER, OPERATOR_USER, "dev-1", "dev-2")}
    bc = write_broker_config("f1", ["dev-1", "dev-2"], out, rotate=["dev-1"])
    assert bc.rotated == ["dev-1"] and "dev-2" in bc.kept
    assert _pw(out, "dev-1") != old["dev-1"] and _pw(out, "dev-2") == old["dev-2"]
    bc = write_broker_config("f1", ["dev-1", "dev-2"], out, rotate=True)
    assert bc.rotated == [BRIDGE_USER, OPERATOR_USER, "dev-1", "dev-2"] and bc.kept == []
    assert _pw(out, "dev-2") != old["dev-2"]
    with pytest.raises(OperatorInputError, match="--rotate dev-9"):
        write_broker_config("f1", ["dev-1"], out, rotate=["dev-9"])


@pytest.mark.parametrize("planted", ["garbage", "long", "link", "dir", "fifo"])
def test_a_foreign_credential_file_is_refused_and_nothing_changes(
        tmp_path: Path, planted: str) -> None:
    out = tmp_path / "bc"
    write_broker_config("f1", ["dev-1", "dev-2"], out)
    cred = out / "credentials" / "dev-1"
    cred.unlink()
    if planted == "garbage":
        cred.write_text("not a password\n")
    elif planted == "long":
        cred.write_bytes(b"A" * 32 + b"\n" + b"B" * 10_000_000)
    elif planted == "link":
        (tmp_path / "secret").write_text("A" * 32 + "\n")
        cred.symlink_to(tmp_path / "secret")
    elif planted == "dir":
        cred.mkdir()
    else:
        os.mkfifo(cred)
    before = _snapshot(out)
    with pytest.raises(OperatorInputError, match="credential file .*dev-1"):
        write_broker_config("f1", ["dev-1", "dev-3"], out)
    assert _snapshot(out) == before
    assert (out / "credentials" / "dev-2").exists()
    if planted in ("garbage", "link"):  # --rotate replaces it, never reading it
        bc = write_broker_config("f1", ["dev-1", "dev-3"], out, rotate=["dev-1"])
        assert bc.rotated == ["dev-1"] and not cred.is_symlink()
        assert (tmp_path / "secret").exists() or planted == "garbage"


def test_without_the_broker_group_the_file_stays_0600_and_the_note_says_what_to_run(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import grp

    def no_group(name: str) -> grp.struct_group:
        raise KeyError(name)

    monkeypatch.setattr(grp, "getgrnam", no_group)
    bc = write_broker_config("f1", ["dev-1"], tmp_path / "bc")
    assert bc.dynsec.stat().st_mode & 0o777 == 0o600 and bc.dynsec_group is None
    assert bc.note is not None and f"chmod 0640 {bc.dynsec}" in bc.note
    with pytest.raises(OperatorInputError, match="--broker-group staff: no such group"):
        write_broker_config("f1", ["dev-1"], tmp_path / "bc2", broker_group="staff")
    assert not (tmp_path / "bc2").exists()
