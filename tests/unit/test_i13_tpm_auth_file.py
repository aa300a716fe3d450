"""The TPM auth-value file (trust/_tpmauth.py): only a private regular file is used."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from modelward.trust._tpmauth import AUTH_FILE, AUTH_SIZE, ensure_auth, read_auth
from modelward.trust.errors import TpmAuthFileError


def test_created_once_private_and_reused(tmp_path: Path) -> None:
    d = tmp_path / "trust"
    secret, created = ensure_auth(d)
    assert created and len(secret) == AUTH_SIZE
    assert (d / AUTH_FILE).stat().st_mode & 0o777 == 0o600
    assert d.stat().st_mode & 0o077 == 0
    again, created = ensure_auth(d)
    assert (again, created) == (secret, False)
    assert read_auth(d) == secret
    assert ensure_auth(tmp_path / "other")[0] != secret  # random per device


def test_missing_file_names_the_migration(tmp_path: Path) -> None:
    (tmp_path / "trust").mkdir()
    with pytest.raises(TpmAuthFileError, match="missing") as ei:
        read_auth(tmp_path / "trust")
    assert "agent provision" in ei.value.hint and ei.value.path.endswith(AUTH_FILE)
    with pytest.raises(TpmAuthFileError, match="missing"):
        read_auth(tmp_path / "absent")


def test_symlinked_file_is_refused(tmp_path: Path) -> None:
    d = tmp_path / "trust"
    d.mkdir(mode=0o700)
    elsewhere = tmp_path / "planted"
    elsewhere.write_bytes(b"x" * AUTH_SIZE)
    elsewhere.chmod(0o600)
    (d / AUTH_FILE).symlink_to(elsewhere)
    with pytest.raises(TpmAuthFileError, match="without following links"):
        read_auth(d)
    with pytest.raises(TpmAuthFileError, match="without following links"):
        ensure_auth(d)  # never replaced or followed
    assert elsewhere.read_bytes() == b"x" * AUTH_SIZE


def test_symlinked_directory_is_refused(tmp_path: Path) -> None:
    real = tmp_path / "real"
    ensure_auth(real)
    (tmp_path / "trust").symlink_to(real)
    with pytest.raises(TpmAuthFileError, match="without following links"):
        read_auth(tmp_path / "trust")


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644])
def test_readable_by_others_is_refused(tmp_path: Path, mode: int) -> None:
    d = tmp_path / "trust"
    ensure_auth(d)
    (d / AUTH_FILE).chmod(mode)
    with pytest.raises(TpmAuthFileError, match="must be 600"):
        read_auth(d)


@pytest.mark.parametrize("size", [0, 31, 33, 4096])
def test_wrong_size_is_refused(tmp_path: Path, size: int) -> None:
    d = tmp_path / "trust"
    ensure_auth(d)
    (d / AUTH_FILE).write_bytes(b"\0" * size)
    with pytest.raises(TpmAuthFileError, match=f"{size} bytes"):
        read_auth(d)


def test_not_a_regular_file_is_refused(tmp_path: Path) -> None:
    d = tmp_path / "trust"
    d.mkdir(mode=0o700)
    os.mkfifo(d / AUTH_FILE, 0o600)  # would block a plain open
    with pytest.raises(TpmAuthFileError, match="not a regular file"):
        read_auth(d)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to chown")
def test_file_of_another_user_is_refused(tmp_path: Path) -> None:
    d = tmp_path / "trust"
    ensure_auth(d)
    os.chown(d / AUTH_FILE, 65534, 65534)
    with pytest.raises(TpmAuthFileError, match="belongs to uid 65534"):
        read_auth(d)


def test_uncreatable_directory_is_a_typed_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_bytes(b"")
    with pytest.raises(TpmAuthFileError, match="cannot create the TPM auth directory") as ei:
        ensure_auth(blocker / "tpm")
    assert "tmpfiles" in ei.value.hint
