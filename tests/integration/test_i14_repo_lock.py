"""The careless operator runs repository-changing commands at once (two terminals, a CI
job, the refresh timer during a publish): the real `modelward` command, several
processes. Each locks the REPO/metadata directory (publisher/_lock.py), so every one
that exits 0 has its change in the published state, and stock python-tuf follows it.
Before (4 publishes at once, in-process): 2 or 3 returned without error and only 1
release was published (the others' targets overwritten)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from modelward.publisher._lock import repository_lock
from tests._stock_tuf import BASE, LocalFetcher, stock_refresh
from tests.conftest import PASSPHRASE, _new_repo


def _found(repo_dir: Path, paths: list[str]) -> list[bool]:
    import tempfile

    from tuf.ngclient import Updater

    md = repo_dir / "metadata"
    with tempfile.TemporaryDirectory(prefix="stock-tuf-") as d:
        u = Updater(d, BASE, fetcher=LocalFetcher(md), bootstrap=(md / "1.root.json").read_bytes())
        u.refresh()
        return [u.get_targetinfo(p) is not None for p in paths]


def test_concurrent_publishes_and_a_refresh_all_land(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from modelward.publisher._bundle_build import build_bundle
    from modelward.simulator._models import make_linear_model

    repo_dir, keys, builds, _, _ = _new_repo(tmp_path, monkeypatch)
    bundles = []
    for i in range(2):
        out = builds / f"b{i}.tar"
        build_bundle(make_linear_model(builds / f"m{i}.onnx", i + 1), "classifier", f"1.{i}.0",
                     out)
        bundles.append(out)
    env = {**os.environ, "MODELWARD_KEY_PASSPHRASE": PASSPHRASE.decode()}
    base = [sys.executable, "-I", "-m", "modelward"]
    where = ["--repo", str(repo_dir), "--keys", str(keys)]
    with repository_lock(repo_dir):  # held until the first command says it waits
        procs = [subprocess.Popen([*base, "publish", *where, str(b)], env=env, text=True,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE)
                 for b in bundles]
        procs.append(subprocess.Popen([*base, "repo", "refresh", *where], env=env, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE))
        assert procs[0].stderr is not None
        first = procs[0].stderr.readline()  # blocks until it writes: the wait warning
        assert "waiting for" in first and "another repository-changing command" in first
    done = [(p.wait(timeout=120), p.stderr.read() if p.stderr else "") for p in procs]
    assert [rc for rc, _ in done] == [0] * 3, done
    stock_refresh(repo_dir)
    assert _found(repo_dir, [f"classifier/classifier-1.{i}.0.tar" for i in range(2)]) == \
        [True] * 2
