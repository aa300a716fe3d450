"""The auth value of modelward's TPM objects, in a file only the agent user can read.

The TPM objects (root anchor, update counter, record-MAC key, identity key) take a
random 32-byte authValue generated at provisioning. It lives in ``<state_dir>-tpm/tpm.auth``
(e.g. ``/var/lib/modelward-tpm/tpm.auth``), mode 0600, owned by the agent user: outside the
state directory, so that a state directory lost or rolled back still heals from the TPM.
Neither half is enough alone: a process that can open the TPM cannot read the file, and a
copy of the file is useless without this TPM.

The file and its directory are opened without following symlinks and checked
(regular file, owner, mode, exact size), so a planted link or a loosened mode is refused
instead of trusted.
"""

from __future__ import annotations

import os
import secrets
import stat
from pathlib import Path

from modelward.trust._secret_file import foreign_owner, loose_mode
from modelward.trust.errors import TpmAuthFileError

AUTH_FILE = "tpm.auth"
AUTH_SIZE = 32

_HINT_MIGRATE = (
    "run `modelward agent provision --config CONF --root ROOT_JSON`; on a device "
    "provisioned before TPM authorization existed, this migrates it"
)


def auth_dir_for(state_dir: Path) -> Path:
    """The directory of the auth value for the device whose state is ``state_dir``."""
    return state_dir.parent / f"{state_dir.name}-tpm"


def _open_dir(directory: Path, *, create: bool) -> int:
    if create:
        try:
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as e:
            raise TpmAuthFileError(
                f"cannot create the TPM auth directory {directory}: {e}",
                path=str(directory / AUTH_FILE),
                hint="create it for the agent user (0700), e.g. `systemd-tmpfiles --create "
                "modelward.tmpfiles.conf`, and run `agent provision` as that user",
            ) from e
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError as e:
        raise TpmAuthFileError(
            f"TPM auth file {directory / AUTH_FILE} is missing (no directory {directory})",
            path=str(directory / AUTH_FILE), hint=_HINT_MIGRATE) from e
    except OSError as e:
        raise TpmAuthFileError(
            f"cannot open {directory} without following links: {e}",
            path=str(directory / AUTH_FILE), hint="it must be a plain directory") from e
    return fd


def _check(fd: int, path: Path) -> None:
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        raise TpmAuthFileError(f"TPM auth file {path} is not a regular file", path=str(path))
    if owner := foreign_owner(st, root_ok=False):
        raise TpmAuthFileError(f"TPM auth file {path} {owner}", path=str(path))
    if mode := loose_mode(st):
        raise TpmAuthFileError(
            f"TPM auth file {path} {mode} (the value may have leaked: re-provision the TPM "
            "objects)", path=str(path), hint=f"chmod 600 {path} if you are sure nobody read it")
    if st.st_size != AUTH_SIZE:
        raise TpmAuthFileError(
            f"TPM auth file {path} has {st.st_size} bytes, not {AUTH_SIZE}", path=str(path))


def read_auth(directory: Path) -> bytes:
    """The auth value stored in ``directory``.

    Raises:
        TpmAuthFileError: missing, a symlink, not ours, readable by others or malformed.
    """
    path = directory / AUTH_FILE
    dfd = _open_dir(directory, create=False)
    try:
        try:
            fd = os.open(AUTH_FILE, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                         dir_fd=dfd)
        except FileNotFoundError as e:
            raise TpmAuthFileError(f"TPM auth file {path} is missing", path=str(path),
                                   hint=_HINT_MIGRATE) from e
        except OSError as e:
            raise TpmAuthFileError(f"cannot open TPM auth file {path} without following "
                                   f"links: {e}", path=str(path)) from e
        try:
            _check(fd, path)
            data = os.read(fd, AUTH_SIZE + 1)
        finally:
            os.close(fd)
    finally:
        os.close(dfd)
    if len(data) != AUTH_SIZE:
        raise TpmAuthFileError(f"TPM auth file {path} changed while read", path=str(path))
    return data


def ensure_auth(directory: Path) -> tuple[bytes, bool]:
    """The auth value in ``directory``, generated first if there is none.

    Returns:
        the value, and whether it was created now.

    Raises:
        TpmAuthFileError: as :func:`read_auth`, or the file cannot be written.
    """
    dfd = _open_dir(directory, create=True)
    path = directory / AUTH_FILE
    try:
        try:
            fd = os.open(AUTH_FILE, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                         | os.O_CLOEXEC, 0o600, dir_fd=dfd)
        except FileExistsError:
            return read_auth(directory), False
        except OSError as e:
            raise TpmAuthFileError(f"cannot create TPM auth file {path}: {e}",
                                   path=str(path)) from e
        secret = secrets.token_bytes(AUTH_SIZE)
        try:
            os.write(fd, secret)
            os.fsync(fd)
        except OSError as e:
            os.close(fd)
            os.unlink(AUTH_FILE, dir_fd=dfd)
            raise TpmAuthFileError(f"cannot write TPM auth file {path}: {e}",
                                   path=str(path)) from e
        os.close(fd)
        os.fsync(dfd)
        return secret, True
    finally:
        os.close(dfd)
