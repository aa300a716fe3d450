"""Review r11 of issue 16 (dwall, 7b36c6d), attacked as a power cut: ``agent update`` now
ends with ``os._exit`` right after its last write. ``os._exit`` itself loses nothing the
kernel has (the process's files are closed by the kernel as at any exit; no Python buffer
is pending, tests/integration/test_r11_update_exit.py), so what a power cut after the
exit keeps is what was fsynced. Tried: the real update under ``strace -f -y`` (nginx,
swtpm), every file of the state directory renamed into place checked for an fsync before
its rename, and every directory a rename landed in for an fsync after it.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import World

_CALLS = ("openat,mkdir,mkdirat,symlink,symlinkat,rename,renameat,renameat2,fsync,fdatasync,"
          "exit_group")


def _trace(w: World, out: Path) -> list[str]:
    r = subprocess.run(["strace", "-f", "-qq", "-y", "-s", "300", "-o", str(out), "-e",
                        f"trace={_CALLS}", sys.executable, "-m", "modelward", "agent",
                        "update", "--once", "--config", str(w.conf_path)],
                       capture_output=True, text=True, timeout=600, check=False)
    assert r.returncode == 0, r.stderr
    return out.read_text().splitlines()


def _unsynced(lines: list[str], state: Path) -> list[str]:
    """What a power cut right after the exit could lose: ``file:`` a file renamed into
    place without an fsync of it first, ``dir:`` a directory a rename landed in without
    an fsync of it after."""
    s = str(state)
    synced: dict[str, int] = {}  # path -> index of its last fsync
    not_files: set[str] = set()  # made by mkdir/symlink: no fsync of their own
    renames: list[tuple[int, str, str]] = []
    for i, ln in enumerate(lines):
        if m := re.search(r"\bf(?:data)?sync\(\d+<([^>]*)>", ln):
            synced[m.group(1)] = i
        elif m := re.search(r"\b(?:mkdirat|symlinkat)\((?:\"[^\"]*\", )?\d+<([^>]*)>, \"([^\"]*)\"",
                            ln):
            not_files.add(f"{m.group(1)}/{m.group(2)}")
        elif m := re.search(r"\b(?:mkdir|symlink)\((?:\"[^\"]*\", )?\"([^\"]*)\"", ln):
            not_files.add(m.group(1))
        if m := re.search(r"\brenameat2?\(\d+<([^>]*)>, \"([^\"]*)\", \d+<([^>]*)>, "
                          r"\"([^\"]*)\"", ln):
            src, dst = f"{m.group(1)}/{m.group(2)}", f"{m.group(3)}/{m.group(4)}"
        elif m := re.search(r"\brename\(\"([^\"]*)\", \"([^\"]*)\"", ln):
            src, dst = m.group(1), m.group(2)
        else:
            continue
        if src in not_files or any(f"{src}/" in other for other in lines):
            not_files.update((src, dst))  # (a directory: its entries are fsynced in it)
        if src in synced:
            synced[dst] = synced[src]  # (the fsynced inode, under its new name)
        renames.append((i, src, dst))
    lost = []
    for i, src, dst in renames:
        if not dst.startswith(s):
            continue
        rel = dst.replace(s, "STATE")
        if src not in not_files and not synced.get(src, i) < i:
            lost.append(f"file: {rel} (from {Path(src).name})")
        parent = str(Path(dst).parent)
        if not any(p == parent and j > i for p, j in synced.items()):
            lost.append(f"dir: {parent.replace(s, 'STATE')} (after {rel})")
    return sorted(set(lost))


@pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace")
def test_every_file_an_update_renames_into_place_is_fsynced(world: World,
                                                             tmp_path: Path) -> None:
    """Happened: every file of ours is fsynced (journal, record, status, metrics,
    activated, chunk index, the staged files) and its directory after; but
    ``STATE/metadata/{timestamp,snapshot,targets}.json`` are written by python-tuf's
    ``Updater._persist_metadata`` (NamedTemporaryFile, write, ``os.replace``: no fsync)
    and ``STATE/metadata`` itself is never fsynced: a power cut after the exit can leave
    them empty or the old ones, i.e. the timestamp/snapshot rollback floor and the
    handled floor's input go back (the TPM-bound targets floor holds). Cause: the house
    style (7) names ``_persist_metadata`` as the model, but it does not fsync. Not caused
    by ``os._exit``: a normal exit fsyncs nothing either."""
    world.publish("1.0.0", seed=1)
    world.update()
    world.publish("2.0.0", seed=2)
    lines = _trace(world, tmp_path / "trace.txt")
    assert lines[-1].split(None, 1)[1].startswith("exit_group(0)")  # (the fast exit)
    lost = _unsynced(lines, world.state)
    assert lost == [], "\n".join(lost)
