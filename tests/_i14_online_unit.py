"""The refresh unit's file-system view, read from systemd/modelward-repo-refresh.service:
a model of what the service can see (for tests/test_systemd.py), and the same directives
applied for real in a mount namespace under a test directory (tests/integration)."""

from __future__ import annotations

import shlex
from pathlib import Path

UNIT = Path(__file__).resolve().parents[1] / "systemd" / "modelward-repo-refresh.service"


def directives(text: str | None = None) -> dict[str, list[str]]:
    """``[Service]`` key -> values (whitespace-split, in order; repeated keys add up)."""
    out: dict[str, list[str]] = {}
    section = ""
    for raw in (text if text is not None else UNIT.read_text()).splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            section = line
            continue
        if section != "[Service]":
            continue
        key, _, value = line.partition("=")
        out.setdefault(key, []).extend(value.split() if key != "ExecStart" else [value])
    return out


def _under(path: str, prefix: str) -> bool:
    return path == prefix or path.startswith(prefix.rstrip("/") + "/")


def view(path: str, d: dict[str, list[str]]) -> str:
    """What the service sees at ``path``: ``hidden``, ``ro`` or ``rw``."""
    if any(_under(path, p.lstrip("-")) for p in d.get("InaccessiblePaths", [])):
        return "hidden"
    if d.get("ProtectHome") == ["yes"] and any(_under(path, h) for h in
                                               ("/home", "/root", "/run/user")):
        return "hidden"
    if d.get("PrivateTmp") == ["yes"] and any(_under(path, t) for t in ("/tmp", "/var/tmp")):
        return "hidden"  # a private, empty /tmp
    best, what = "", "ro" if d.get("ProtectSystem") == ["strict"] else "rw"
    for key, kind in (("TemporaryFileSystem", "hidden"), ("BindReadOnlyPaths", "ro"),
                      ("BindPaths", "rw")):  # the deepest mount wins
        for p in d.get(key, []):
            p = p.split(":")[0].lstrip("-")
            if _under(path, p) and len(p) > len(best):
                best, what = p, kind
    if what == "hidden":
        return what
    if any(_under(path, p.lstrip("-")) for p in d.get("ReadWritePaths", [])):
        return "rw" if what != "ro" or best == "" else what
    return what


def exec_args(d: dict[str, list[str]]) -> list[str]:
    return shlex.split(d["ExecStart"][0])


def confine_script(d: dict[str, list[str]], base: Path, stage: Path,
                   interpreter: Path | None = None) -> str:
    """A shell script for ``unshare -m`` that applies the unit's TemporaryFileSystem=,
    Bind[ReadOnly]Paths= and InaccessiblePaths= with every path moved under ``base``; then
    runs ``"$@"``.

    ``interpreter``: a Python installation under a private home directory (this sandbox's
    pyenv under /root; a production install lives in /usr): in the namespace that home is
    replaced by an empty file system showing only the installation, read-only.
    """
    lines = ["set -eu"]
    if interpreter is not None and len(interpreter.parts) > 2:
        home = Path(*interpreter.parts[:2])
        lines += [f"mkdir -p {stage}/py", f"mount --bind {interpreter} {stage}/py",
                  f"mount -t tmpfs -o mode=0755 tmpfs {home}", f"mkdir -p {interpreter}",
                  f"mount --bind {stage}/py {interpreter}",
                  f"mount -o remount,bind,ro {interpreter}"]
    binds = [(p, True) for p in d.get("BindReadOnlyPaths", [])] + \
        [(p, False) for p in d.get("BindPaths", [])]
    for i, (p, _) in enumerate(binds):  # keep the sources before they are covered
        lines += [f"mkdir -p {stage}/{i}", f"mount --bind {base}{p} {stage}/{i}"]
    tmpfs = [p.split(":") for p in d.get("TemporaryFileSystem", [])]
    for t in tmpfs:
        lines += [f"mkdir -p {base}{t[0]}", f"mount -t tmpfs -o mode=0755 tmpfs {base}{t[0]}"]
    for i, (p, ro) in enumerate(binds):
        lines += [f"mkdir -p {base}{p}", f"mount --bind {stage}/{i} {base}{p}"]
        if ro:
            lines.append(f"mount -o remount,bind,ro {base}{p}")
    for t in tmpfs:
        if len(t) > 1 and t[1] == "ro":
            lines.append(f"mount -o remount,ro {base}{t[0]}")
    for p in d.get("InaccessiblePaths", []):
        q = f"{base}{p.lstrip('-')}"
        lines.append(f"if [ -e {q} ]; then mount -t tmpfs -o ro,mode=000 tmpfs {q}; fi")
    lines.append('exec "$@"')
    return "\n".join(lines)
