"""What `repo status` says besides the published roles: changes waiting (pending for
signatures, or a root staged for the online host) and whether each still follows what is
published, and whether the offline side's own targets (``KEYS/targets-head.json``) are the
served ones.

Pure decisions (:func:`pending_note`, :func:`head_note`) over facts read bounded and never
through a symlink (:func:`notes`). Read only: nothing is written, nothing signed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tuf.api.metadata import Metadata

from modelward.publisher._rootflow import root_gaps
from modelward.publisher._served import ServedFileError, parse, read_file
from modelward.publisher.errors import RepositoryStateError

if TYPE_CHECKING:
    from modelward.publisher._repo import Repository
    from modelward.publisher._served import View

MAX_LISTED = 64  # pending/staged files looked at
_NAME = re.compile(r"([1-9][0-9]{0,15})\.(root|targets|snapshot|timestamp)\.json")


@dataclass(frozen=True)
class Note:
    """One line for the operator: ``level`` "WARNING" (needs action) or "INFO"."""

    level: str
    text: str


def pending_note(path: Path, role: str, version: int, published: int,
                 gaps: list[str] | None, staged: bool) -> Note:
    """What becomes of ``path`` (``role`` v``version``, waiting) given the published
    ``published`` version; ``gaps``: for a root that follows, the thresholds it lacks."""
    if version != published + 1:
        return Note("WARNING", f"{path}: {role} v{version} {'is staged' if staged else 'waits'} "
                               f"but no longer follows the published {role} v{published} "
                               f"(devices accept only v{published + 1}): it can never be "
                               "published; delete it and make the change again")
    if staged:
        return Note("INFO", f"{path}: root v{version} is staged: the online host's next "
                            "`repo refresh` publishes it with the snapshot and timestamp")
    lacking = "; ".join(gaps or []) or "signatures complete: `repo sign` publishes it"
    return Note("INFO", f"{path}: {role} v{version} waits for signatures ({lacking}); "
                        f"`repo sign {role}`")


def head_note(head_path: Path, head: tuple[int, bytes] | None,
              served: tuple[int, bytes], snapshot: str) -> Note | None:
    """The offline side's own newest targets against the ones the served snapshot names."""
    if head is None:
        return None
    (hv, hdata), (sv, sdata) = head, served
    if hv == sv and hdata == sdata:
        return None
    if hv > sv:
        return Note("WARNING", f"{head_path} holds targets v{hv}; the served {snapshot} "
                               f"lists v{sv}: devices do not see v{hv} yet (the online host "
                               "has not refreshed since, a publish did not finish, or the "
                               "snapshot was rolled back)")
    if hv < sv:
        return Note("WARNING", f"{head_path} holds targets v{hv}, older than the v{sv} the "
                               f"served {snapshot} lists (KEYS restored from an older "
                               "backup, or signed elsewhere?)")
    return Note("WARNING", f"{head_path} holds a targets v{hv} other than the served one "
                           f"({snapshot}): two copies of KEYS signed, or the served copy "
                           "was swapped")


def _read(path: Path) -> tuple[Metadata[Any], bytes] | Note:
    try:
        data = read_file(path)
        if data is None:
            raise ServedFileError(path, "is missing")
        return parse(path, data), data
    except RepositoryStateError as e:
        return Note("WARNING", f"{e}")


def _waiting(repo: Repository, view: View, published: dict[str, int]) -> list[Note]:
    out: list[Note] = []
    from modelward.publisher._rootstage import STAGE_DIR

    for folder, staged in ((repo.pending_dir, False), (repo.keys / STAGE_DIR, True)):
        if folder.is_symlink() or not folder.is_dir():
            continue
        for p in sorted(folder.iterdir())[:MAX_LISTED]:
            m = _NAME.fullmatch(p.name)
            if m is None or (staged and m.group(2) != "root"):
                continue
            version, role = int(m.group(1)), m.group(2)
            gaps: list[str] | None = None
            if role == "root" and version == published["root"] + 1 and not staged:
                got = _read(p)
                if isinstance(got, Note):
                    out.append(got)
                    continue
                try:
                    gaps = [f"{g.have} of {g.need} by root v{g.version}'s keys"
                            for g in root_gaps(view.root, got[0])]
                except RepositoryStateError as e:
                    out.append(Note("WARNING", f"{p}: {e}"))
                    continue
            out.append(pending_note(p, role, version, published[role], gaps, staged))
    return out


def notes(repo: Repository, view: View) -> list[Note]:
    """Every waiting change and the head/served comparison, for `repo status`."""
    from modelward.publisher._offline_base import HEAD_FILE, offline_side

    tv = view.snapshot.signed.meta["targets.json"].version
    head = _read(repo.keys / HEAD_FILE) if offline_side(repo) and \
        (repo.keys / HEAD_FILE).exists() else None
    published = {"root": view.root.version,  # targets: what the next change builds on
                 "targets": max(tv, head[0].signed.version if isinstance(head, tuple) else 0),
                 "snapshot": view.snapshot.signed.version,
                 "timestamp": view.timestamp.signed.version}
    out = _waiting(repo, view, published)
    if isinstance(head, Note):
        out.append(head)
    elif head is not None:
        try:
            served = read_file(repo.metadata_dir / f"{tv}.targets.json") or b""
        except ServedFileError:
            served = b""
        n = head_note(repo.keys / HEAD_FILE, (head[0].signed.version, head[1]), (tv, served),
                      f"{view.snapshot.signed.version}.snapshot.json")
        if n is not None:
            out.append(n)
    return out
