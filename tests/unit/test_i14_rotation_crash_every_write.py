"""Ctrl-C at every write of a rotation, then the same command again (issue 14, fixrot).

tests/unit/test_a14_rootkeys.py crashes at the writes of _repo, _keys and _rootstage; here
every ``write_atomic`` of every publisher module counts, so also KEYS/targets-head.json,
KEYS/signed-targets.json, KEYS/published.json and KEYS/trusted-root.json (the files the
offline side builds on and trusts). The layouts: one machine without an online directory,
one machine with KEYS and the online directory (single14), and the operator who, after the
crash, publishes instead of retrying. A stock python-tuf client judges every step.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import pkgutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import modelward.publisher
from modelward.publisher import _keyfile as kf
from modelward.publisher._repo import Repository
from modelward.publisher._rootflow import RootNotPublishableError
from modelward.publisher.errors import RepositoryStateError
from modelward.trust import _atomic
from tests._stock_tuf import stock_refresh
from tests.unit.test_i14_online import OFFLINE, Layout, _pw, attach

PW = b"unit test passphrase"


class Crash(BaseException):
    """The operator's Ctrl-C (or the power) before a write."""


@pytest.fixture(autouse=True)
def _cheap_scrypt(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kf, "DEFAULT_SCRYPT", kf.ScryptParams(2**10, 8, 1))


@pytest.fixture
def crash_at(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[int], list[str]]]:
    """crash_at(k): the k-th write_atomic of any publisher module raises Crash before
    writing (0: none); returns the list the written names are appended to."""
    mods = [importlib.import_module(f"modelward.publisher.{m.name}")
            for m in pkgutil.iter_modules(modelward.publisher.__path__)]
    mods = [m for m in mods if getattr(m, "write_atomic", None) is _atomic.write_atomic]
    real = _atomic.write_atomic

    def arm(k: int) -> list[str]:
        names: list[str] = []

        def write(path: Path, data: bytes, mode: int = 0o644) -> None:
            if len(names) + 1 == k:
                names.append(f"CRASH {path.parent.name}/{path.name}")
                raise Crash(path.name)
            names.append(f"{path.parent.name}/{path.name}")
            real(path, data, mode)

        for m in mods:
            monkeypatch.setattr(m, "write_atomic", write)
        return names

    yield arm
    for m in mods:
        monkeypatch.setattr(m, "write_atomic", real)


def _single(d: Path) -> Repository:
    r = Repository(d / "repo", d / "keys", PW)
    r.init({"root": 1}, {"root": 1})
    return r


def _with_online(d: Path) -> Repository:
    lay = Layout(d)
    return attach(Repository(lay.repo_dir, lay.keys, OFFLINE), lay.online_dir, _pw)


LAYOUTS: dict[str, Callable[[Path], Repository]] = {"single": _single,
                                                     "keys+online": _with_online}


def _again(repo: Repository) -> Repository:
    if repo.online is None:
        return Repository(repo.repo, repo.keys, PW)
    return attach(Repository(repo.repo, repo.keys, OFFLINE), repo.online.dir, _pw)


def _retry(repo: Repository, role: str) -> None:
    try:
        repo.rotate(role)
    except RootNotPublishableError as e:  # root: the new root key signs too
        reg = json.loads((repo.keys / "signers.json").read_text())
        uri = next(reg[x] for g in e.gaps for x in g.unsigned)
        repo.sign_pending("root", uri)


@pytest.mark.parametrize(("role", "layout"), [  # `repo rotate` leaves the online dir's keys
    *((r, "single") for r in ("targets", "snapshot", "timestamp", "root")),
    ("targets", "keys+online"), ("root", "keys+online")])
def test_crash_at_every_write_then_retry(tmp_path: Path, role: str, layout: str,
                                         crash_at: Callable[[int], list[str]]) -> None:
    k = 0
    while True:
        k += 1
        repo = LAYOUTS[layout](tmp_path / f"k{k}")
        before = stock_refresh(repo.repo)
        names = crash_at(k)
        try:
            _retry(repo, role)  # root: the crash may come in `repo sign root` as well
        except Crash:
            pass
        else:
            break  # k is past the last write
        # a device refreshing right after the crash still updates (the root version it
        # sees may be either side of the rotation)
        assert stock_refresh(repo.repo) >= before, (k, names)
        crash_at(0)
        repo = _again(repo)
        _retry(repo, role)
        assert stock_refresh(repo.repo) == repo.latest_root_version() >= 2, (k, names)
        repo.refresh()
        assert stock_refresh(repo.repo) == repo.latest_root_version(), (k, names)
        assert repo.current()[0].version >= 1
    assert k > 5


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_crash_in_targets_rotation_then_publish_instead(
        tmp_path: Path, layout: str, crash_at: Callable[[int], list[str]]) -> None:
    """The operator, after the Ctrl-C, publishes a model instead of retrying the rotation:
    the publish completes the staged root first; the model and the rotation both land."""
    from modelward.publisher._bundle_build import build_bundle
    from modelward.simulator._models import make_linear_model

    k = 0
    while True:
        k += 1
        d = tmp_path / f"k{k}"
        repo = LAYOUTS[layout](d)
        names = crash_at(k)
        try:
            repo.rotate("targets")
        except Crash:
            pass
        else:
            break
        crash_at(0)
        repo = _again(repo)
        bundle = d / "b.tar"
        build_bundle(make_linear_model(d / "m.onnx", 1), "classifier", "1.0.0", bundle)
        with contextlib.suppress(Exception):  # refusing is fine; stranding is not
            repo.publish(bundle)
        assert stock_refresh(repo.repo) == repo.latest_root_version(), (k, names)
        repo = _again(repo)
        repo.complete_root_change()
        assert stock_refresh(repo.repo) == repo.latest_root_version(), (k, names)


def test_two_machine_targets_rotation_crash_at_every_write_then_retry(
        tmp_path: Path, crash_at: Callable[[int], list[str]]) -> None:
    """The offline side's `repo rotate targets`, then the online host's `repo refresh`,
    as one sequence: a Ctrl-C at any write of either, the same command again, and devices
    end on root v2 with targets its new key signed."""
    k = 0
    while True:
        k += 1
        lay = Layout(tmp_path / f"k{k}")
        lay.online().refresh()
        names = crash_at(k)
        step = "rotate"
        try:
            with contextlib.suppress(RepositoryStateError):  # waiting for the online host
                lay.offline.rotate("targets")
            step = "refresh"
            lay.online().refresh()
        except Crash:
            pass
        else:
            break
        assert stock_refresh(lay.repo_dir) >= 1, (k, names)
        crash_at(0)
        offline = Repository(lay.repo_dir, lay.keys, OFFLINE)
        if step == "rotate":
            with contextlib.suppress(RepositoryStateError):
                offline.rotate("targets")
        lay.online().refresh()
        offline = Repository(lay.repo_dir, lay.keys, OFFLINE)
        offline.complete_root_change()  # the offline side's next command files the old key
        assert stock_refresh(lay.repo_dir) == offline.latest_root_version() >= 2, (k, names)
        root = offline._trusted_root()  # noqa: SLF001
        targets = offline._load(f"{offline.current()[0].version}.targets.json")  # noqa: SLF001
        root.verify_delegate("targets", targets.signed_bytes, targets.signatures)
    assert k > 5
