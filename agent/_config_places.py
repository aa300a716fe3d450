"""Checks of the agent configuration across keys, and of the places its paths name.

``_config_schema.validate`` checks each key alone; :func:`check_places` runs after every
key resolved, before the loader reads a secret or builds anything:

- the config file (it names the commands the agent runs): writable only by its owner
  (the agent or root); the state directory: a directory if it exists, writable only by
  its owner; neither, nor any file the agent trusts, under an existing directory where
  another user may replace it (writable by group or others without the sticky bit, or
  owned by another user);
- keys pointing into each other's places: no file the agent trusts (the config itself,
  a CA, the client certificate and key, the password file) inside the state directory or
  the TPM auth directory (whoever writes those would choose it), the inference
  application's ``busy_file`` outside them too, and ``[metrics] textfile`` neither any
  other key's file, nor in ``STATE_DIR/trust`` or the TPM auth directory, nor in the
  state directory other than as ``STATE_DIR/*.prom``;
- secrets: ``[mqtt] password_file`` and ``key_file`` mode 600 and owned by the agent's
  user or root (``trust._secret_file``, the TPM auth file's rule); an inline
  ``[mqtt] password`` only in a config file others cannot read.

Every problem is an error (a :class:`ConfigError` naming the key, the other key and the
file), never a warning: a careless operator is stopped before a secret is used or a
directory trusted. Paths are compared both as written (normalised) and with symlinks
resolved. Only ``stat`` and ``open`` of what the keys name; nothing is written.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from modelward.agent._config_schema import TOP, Resolved, _open_regular, dotted, where
from modelward.agent.errors import ConfigError
from modelward.trust._secret_file import foreign_owner, loose_mode
from modelward.trust._tpmauth import auth_dir_for

#: the files the agent trusts (read, never written): none in a place others may write
TRUSTED_FILES = (("https", "ca_file"), ("mqtt", "ca_file"), ("mqtt", "cert_file"),
                 ("mqtt", "key_file"), ("mqtt", "password_file"))
SECRET_FILES = (("mqtt", "password_file"), ("mqtt", "key_file"))


def _forms(p: Path) -> tuple[Path, Path]:
    """``p`` normalised as written, and with its symlinks resolved."""
    return Path(os.path.normpath(p)), Path(os.path.realpath(p))


def _inside(p: Path, d: Path) -> bool:
    """Whether ``p`` is ``d`` or below it, written or resolved."""
    return any(a.is_relative_to(b) for a in _forms(p) for b in _forms(d))


def _same(a: Path, b: Path) -> bool:
    if any(x == y for x in _forms(a) for y in _forms(b)):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _fail(r: Resolved, section: str, key: str, problem: str, hint: str = "") -> ConfigError:
    return ConfigError(f"{r.path}: {where(section, key)}: {problem}", path=str(r.path),
                       key=dotted(section, key), hint=hint)


def check_places(r: Resolved) -> None:
    """Refuse a configuration whose paths expose the agent (see the module).

    Raises:
        ConfigError: the first problem, naming the key (and the other key) and the file.
    """
    state: Path = r.values[TOP]["state_dir"]
    _config_file(r)
    _state_dir(r, state)
    _cross(r, state)
    _secrets(r)


def _mode(st: os.stat_result) -> str:
    return f"{stat.S_IMODE(st.st_mode):o}"


def _state_dir(r: Resolved, state: Path) -> None:
    try:
        st = os.stat(state)
    except FileNotFoundError:
        st = None
    except OSError as e:
        raise _fail(r, TOP, "state_dir", f"cannot look at {state}: {e.strerror or e}") from e
    if st is not None:
        if not stat.S_ISDIR(st.st_mode):
            raise _fail(r, TOP, "state_dir", f"{state} exists and is not a directory")
        if st.st_mode & 0o022:
            raise _fail(r, TOP, "state_dir", f"{state} has mode {_mode(st)}: writable by "
                        "group or others, who could plant its files (trust record, staged "
                        "models, status)", hint=f"chmod go-w {state} (the package uses 750)")
        # (root reading a state dir its agent user owns is fine here: `check-config` and
        # `status` run so; the commands that write refuse root, naming the owner and the
        # `runuser` to type: agent/_owner.py)
        if os.geteuid() != 0 and (owner := foreign_owner(st, root_ok=True)):
            raise _fail(r, TOP, "state_dir", f"{state} {owner}")
    if problem := _replaceable(state):
        raise _fail(r, TOP, "state_dir", f"{state}: {problem}, who could replace the state "
                    "directory", hint="chmod go-w that directory, or choose another state_dir")


def _replaceable(p: Path) -> str | None:
    """Why another user could rename or replace ``p``: an existing directory above it
    writable by group or others without the sticky bit, or owned by another user."""
    for parent in Path(os.path.realpath(p)).parents:
        try:
            pst = os.stat(parent)
        except OSError:
            continue  # not there yet: the agent (or tmpfiles) creates it
        if pst.st_mode & 0o022 and not pst.st_mode & stat.S_ISVTX:
            return f"the directory {parent} above it has mode {_mode(pst)}: group or others"
        if owner := foreign_owner(pst, root_ok=True):
            return f"the directory {parent} above it {owner}"
    return None


def _config_file(r: Resolved) -> None:
    """The config names the commands the agent runs ([activation] command): only its
    owner (the agent's user or root) may change it or the directories above it."""
    try:
        st = os.stat(r.path)
    except OSError as e:
        raise ConfigError(f"cannot look at config {r.path}: {e}", path=str(r.path)) from e
    problem = (f"has mode {_mode(st)}: group or others may change it" if st.st_mode & 0o022
               else foreign_owner(st, root_ok=True) or _replaceable(r.path))
    if problem:
        raise ConfigError(f"config {r.path} {problem}, and with it the commands the agent "
                          "runs", path=str(r.path),
                          hint=f"chmod go-w {r.path} (the package installs it 644 root)")


def _cross(r: Resolved, state: Path) -> None:
    if state.name in ("", ".."):  # (the TPM auth directory is named after the last part)
        raise _fail(r, TOP, "state_dir", f"{state} ends in '..': the TPM auth directory "
                    "beside it would be named after '..' and could lie inside it",
                    hint="write the state directory's path so that it ends in its own name")
    auth = auth_dir_for(state)
    if _inside(auth, state) or _inside(state, auth):
        raise _fail(r, TOP, "state_dir", f"the TPM auth directory {auth} and the state "
                    f"directory {state} overlap", hint="write the state directory's plain "
                    "path (the auth directory is <state_dir>-tpm beside it)")
    trust = state / "trust"
    places = ((state, "state_dir", "whoever writes the state directory"),
              (auth, "state_dir's TPM auth directory", "whoever writes it"))
    if _inside(r.path, state) or _inside(r.path, auth):
        raise _fail(r, TOP, "state_dir", f"{state} contains the config file {r.path}: "
                    "whoever writes the state directory could rewrite the configuration",
                    hint="keep the config in /etc/modelward, outside the state directory")
    files = [(s, k, p) for s, k in TRUSTED_FILES if (p := r.values[s][k]) is not None]
    for s, k, p in files:
        if problem := _replaceable(p):
            raise _fail(r, s, k, f"{p}: {problem}, who could replace this file the agent "
                        "trusts", hint="keep it in /etc/modelward")
        for d, name, who in places:
            if _inside(p, d):
                raise _fail(r, s, k, f"{p} is inside {name} ({d}): {who} would choose this "
                            "file the agent trusts", hint="keep it in /etc/modelward")
    busy: Path | None = r.values["idle"]["busy_file"]
    if busy is not None:
        for d, name, _ in places:
            if _inside(busy, d):
                raise _fail(r, "idle", "busy_file", f"{busy} is inside {name} ({d}): the "
                            "inference application writes it and must not get write access "
                            "there", hint="e.g. /run/inference/busy")
        _not_same(r, "idle", "busy_file", busy, files)
    metrics: Path | None = r.values["metrics"]["textfile"]
    if metrics is None:
        return
    if busy is not None and _same(metrics, busy):
        raise _fail(r, "metrics", "textfile", f"{metrics} is also [idle] busy_file")
    _not_same(r, "metrics", "textfile", metrics, files)
    for d, name in ((trust, "state_dir's trust directory"), (auth, "state_dir's TPM auth "
                                                              "directory")):
        if _inside(metrics, d):
            raise _fail(r, "metrics", "textfile", f"{metrics} is inside {name} ({d}): the "
                        "agent would overwrite what it trusts with metrics")
    if _inside(metrics, state) and not (
            any(m.parent == s for m, s in zip(_forms(metrics), _forms(state), strict=True))
            and metrics.name.endswith(".prom")):
        raise _fail(r, "metrics", "textfile", f"{metrics} is inside state_dir ({state}) but "
                    "not STATE_DIR/NAME.prom: it could overwrite a state file",
                    hint="leave it out (STATE_DIR/metrics.prom), or name a file elsewhere")


def _not_same(r: Resolved, section: str, key: str, p: Path,
              files: list[tuple[str, str, Path]]) -> None:
    if _same(p, r.path):
        raise _fail(r, section, key, f"{p} is the config file itself")
    for s, k, q in files:
        if _same(p, q):
            raise _fail(r, section, key, f"{p} is also {where(s, k)}")


def _secrets(r: Resolved) -> None:
    for s, k in SECRET_FILES:
        p: Path | None = r.values[s][k]
        if p is None:
            continue
        try:
            fd = _open_regular(p)
        except (OSError, ValueError) as e:  # validate opened it a moment ago
            raise _fail(r, s, k, f"cannot read {p}: {e}") from e
        try:
            st = os.fstat(fd)
        finally:
            os.close(fd)
        if problem := loose_mode(st) or foreign_owner(st, root_ok=True):
            raise _fail(r, s, k, f"{p} {problem}: no other user may read a credential",
                        hint=f"chmod 600 {p} and chown it to the agent's user; if others "
                        "could read it, replace the credential")
    mq = r.values["mqtt"]
    if mq["password"] is not None and mq["password_file"] is None:  # both: build_config
        try:
            st = os.stat(r.path)
        except OSError as e:
            raise _fail(r, "mqtt", "password", f"cannot look at {r.path}: {e}") from e
        if st.st_mode & 0o004:
            raise _fail(r, "mqtt", "password", f"set inline in {r.path}, which every user "
                        f"may read (mode {_mode(st)})",
                        hint="move it to password_file (mode 600), or chmod o-r the config "
                        "(e.g. 640 root:modelward); if others read it, replace the password")
