"""Agent commands that write the device's state run as the user who owns it.

The state directory (``/var/lib/modelward``) and the TPM auth directory next to it
(``/var/lib/modelward-tpm``) belong to the agent user (tmpfiles.d, ``StateDirectory=``).
``sudo modelward agent provision`` (or ``update``, ``run``, ``boot-check`` by hand) would
leave files there that the agent cannot rewrite or read (its TPM auth value must be its
own: trust/_tpmauth.py), so every boot check would fail and inference never start; and
root acting on names in a directory another user controls is how a link swapped in by
that user makes root's write land elsewhere. So such a command refuses, before it
touches the TPM or the disk, naming the owner and the command to run instead.

Refusing, rather than chown-ing what root made to the directory's owner: a chown would
have to reach every file and directory any layer creates (trust store, journal, stage,
slots, metadata, TPM auth, report sequence, status, metrics; and whatever is added
later), each through its fd so no swapped link is followed, and one missed would be the
same failed boot. A refusal is one check at the entry of each command, and makes root
never work in a directory another user controls.

The rule (:func:`refusal`), for the state directory and the TPM auth directory:

- existing, it must belong to the user running the command (root included: root's
  command in the agent's directory is refused; the agent's in a root-made one too, which
  is what an earlier root run left behind);
- missing, it is created by this command: root may create it only inside a directory
  root owns (never in one another user controls); another user may always try (the
  kernel decides whether it may write there).
"""

from __future__ import annotations

import os
import pwd
from pathlib import Path

from modelward.agent.errors import StateOwnerError
from modelward.trust._plain import Frozen
from modelward.trust._tpmauth import auth_dir_for


class DirOwner(Frozen):
    """Who owns a directory a command writes in (or, when it is missing, the nearest
    existing directory above it, where it would be created).

    Attributes:
        wanted: the directory the command writes.
        found: ``wanted`` itself, or the ancestor it would be created in.
        uid: the owner of ``found``.
    """

    __slots__ = ("wanted", "found", "uid")
    wanted: Path
    found: Path
    uid: int

    def __init__(self, wanted: Path, found: Path, uid: int) -> None:
        self._set(wanted, found, uid)

    @property
    def exists(self) -> bool:
        return self.found == self.wanted


def refusal(euid: int, dirs: list[DirOwner]) -> DirOwner | None:
    """The first directory that the user ``euid`` must not write the agent's state in, or
    None (see the module's rule)."""
    for d in dirs:
        if d.exists and d.uid != euid:
            return d
        if not d.exists and euid == 0 and d.uid != 0:
            return d
    return None


def _user(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def refusal_error(d: DirOwner, euid: int, command: str) -> StateOwnerError:
    """The typed error for :func:`refusal`'s answer: one line naming the directory, its
    owner and the command to run as that owner."""
    owner, me = _user(d.uid), _user(euid)
    run_as = f"`runuser -u {owner} -- modelward {command} ...` (the same arguments)"
    where = (f"{d.wanted}" if d.exists
             else f"{d.wanted} would be created in {d.found}, which")
    return StateOwnerError(
        f"`modelward {command}` as {me} (uid {euid}): {where} belongs to {owner} "
        f"(uid {d.uid}); the agent's state (its TPM auth "
        "value, trust record, slots) must all belong to the user the agent runs as: "
        "nothing was changed",
        path=str(d.found), owner=owner, uid=d.uid,
        hint=(f"run it as the owner: {run_as}" if euid == 0 else
              f"run it as the owner ({run_as}), or, if this device's agent runs as {me}, "
              f"give it back its state: `chown -R {me}: {d.found}`"),
    )


def _owner_of(path: Path) -> DirOwner:
    found = path
    while True:
        try:
            return DirOwner(path, found, os.stat(found).st_uid)
        except FileNotFoundError:
            if found.parent == found:
                raise
            found = found.parent


def check_state_owner(state_dir: Path, command: str) -> None:
    """Refuse ``command`` when the user running it must not write ``state_dir`` or its
    TPM auth directory (see the module's rule). Call it before the TPM or the disk is
    touched.

    Args:
        state_dir: the configured state directory (followed if it is a link: the
            operator's choice).
        command: the words after ``modelward``, e.g. ``agent provision``.

    Raises:
        StateOwnerError: names the directory, its owner and the command to run instead.
    """
    euid = os.geteuid()
    try:
        dirs = [_owner_of(state_dir), _owner_of(auth_dir_for(state_dir))]
    except OSError as e:
        raise StateOwnerError(f"cannot inspect the state directory {state_dir}: {e}",
                              path=str(state_dir), owner="", uid=-1,
                              hint="check that path and its permissions") from e
    d = refusal(euid, dirs)
    if d is not None:
        raise refusal_error(d, euid, command)
