"""Issue 17 (must-show 5): ``repo sync`` to an S3-compatible server and to a directory,
then a device updates from nginx serving what was synced; an interrupted sync leaves the
device on the consistent older release, and the next sync completes it.

No S3-compatible server is packaged for Debian 12: moto's standalone server
(``python -m moto.server``, of the [dev] extra) speaks the S3 protocol on loopback. Its
request log is the record of the PUT order. ``MODELWARD_SYNC_FAIL_AFTER=N`` (a test hook of
``repo sync``) SIGKILLs the sync after its N-th write, as a crash would.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from modelward.simulator._demo import write_device_config
from modelward.simulator._origin import start_origin, stop_origin
from modelward.simulator._pki import CertPair
from modelward.simulator._proc import free_port, wait_for_port
from tests.conftest import PASSPHRASE, World, _new_repo

SECRET = "sEcReT-9f3a1c77-never-logged"
ACCESS_KEY = "AKIAMODELWARDTEST77"
BUCKET = "fleet-origin"
PREFIX = "prod/v1"


@dataclass
class Moto:
    url: str
    log: Path
    proc: subprocess.Popen[bytes]

    def client(self) -> Any:
        import boto3

        return boto3.client("s3", endpoint_url=self.url, region_name="us-east-1",
                            aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET)

    def puts(self) -> list[str]:
        """Object keys PUT so far, in the server's order (the bucket's creation left out)."""
        out = []
        for line in self.log.read_text(errors="replace").splitlines():
            m = re.search(r'"PUT /([^ ?]+)[^"]* HTTP/1\.[01]" 200', line)
            if m and "/" in m.group(1):
                out.append(m.group(1).split("/", 1)[1])
        return out

    def download(self, prefix: str, into: Path) -> None:
        """The objects under ``prefix`` as files (what a CDN in front of it serves)."""
        import shutil

        shutil.rmtree(into, ignore_errors=True)
        s3 = self.client()
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET,
                                                                  Prefix=prefix + "/"):
            for obj in page.get("Contents", []):
                rel = obj["Key"][len(prefix) + 1:]
                dest = into / rel
                dest.parent.mkdir(parents=True, exist_ok=True)
                dest.write_bytes(s3.get_object(Bucket=BUCKET, Key=obj["Key"])["Body"].read())


@pytest.fixture
def moto(tmp_path: Path) -> Iterator[Moto]:
    """moto's standalone S3 server on a free loopback port, a bucket made; stopped by pid."""
    port = free_port()
    log = tmp_path / "moto.log"
    with open(log, "wb") as f:
        proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1",
                                 "-p", str(port)], stdout=f, stderr=subprocess.STDOUT)
    try:
        assert wait_for_port(port, timeout=120), log.read_text()
        m = Moto(f"http://127.0.0.1:{port}", log, proc)
        m.client().create_bucket(Bucket=BUCKET)
        yield m
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(AWS_ACCESS_KEY_ID=ACCESS_KEY, AWS_SECRET_ACCESS_KEY=SECRET,
               AWS_DEFAULT_REGION="us-east-1", MODELWARD_KEY_PASSPHRASE=PASSPHRASE.decode(),
               AWS_CONFIG_FILE="/nonexistent", AWS_SHARED_CREDENTIALS_FILE="/nonexistent")
    env.update(extra)
    return env


def _sync(repo: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "modelward", "-vv", "repo", "sync",
                           "--repo", str(repo), *args], capture_output=True, text=True,
                          env=_env(**env), timeout=300, check=False)


def _planned(repo: Path, *args: str) -> list[str]:
    r = _sync(repo, *args, "--dry-run")
    assert r.returncode == 0, r.stderr
    return re.findall(r"^would put (\S+) ", r.stdout, re.M)


def _assert_consistent_order(keys: list[str]) -> None:
    """targets before any metadata, N.targets before N.snapshot, timestamp.json last."""
    assert keys and keys[-1].endswith("metadata/timestamp.json"), keys
    kinds = ["targets" if "/targets/" in f"/{k}" else "meta" for k in keys]
    assert kinds == sorted(kinds, key=lambda k: k != "targets"), keys  # all targets first
    snaps = [i for i, k in enumerate(keys) if k.endswith(".snapshot.json")]
    tgts = [i for i, k in enumerate(keys) if re.search(r"/\d+\.targets\.json$", k)]
    assert snaps and all(t < s for t in tgts for s in snaps), keys
    assert max(snaps) < len(keys) - 1


def _point_device_at(w: World, origin_url: str) -> None:
    write_device_config(w.conf_path, device_id="dev-1", state=w.tmp / "state",
                        tcti=w.tpm.tcti, origin_url=origin_url, ca=w.ca.cert)


def _trusted(w: World) -> tuple[bytes, int, str | None]:
    s = w.snapshot()
    return s.record, s.counter, s.current


def test_s3_sync_then_device_updates_and_interrupted_sync_keeps_it_consistent(
        world: World, moto: Moto, pki: tuple[CertPair, CertPair]) -> None:
    w = world
    to = ["--to", f"s3://{BUCKET}/{PREFIX}", "--endpoint-url", moto.url]
    mirror = w.tmp / "mirror"
    w.publish("1.0.0", seed=1)
    plan = _planned(w.repo_dir, *to)
    assert moto.puts() == []  # a dry run writes nothing
    r = _sync(w.repo_dir, *to)
    assert r.returncode == 0, r.stderr
    first = moto.puts()
    assert first == [f"{PREFIX}/{k}" for k in plan]
    _assert_consistent_order(first)
    assert any("/targets/classifier/" in k and k.endswith(".tar") for k in first)
    # credentials appear nowhere, whatever -vv asks for
    assert SECRET not in r.stdout + r.stderr and ACCESS_KEY not in r.stdout + r.stderr
    # caching: versioned and hash-prefixed immutable, timestamp revalidated
    s3 = moto.client()
    ts = s3.head_object(Bucket=BUCKET, Key=f"{PREFIX}/metadata/timestamp.json")
    assert ts["CacheControl"] == "no-cache" and ts["ContentType"] == "application/json"
    bundle_key = next(k for k in first if k.endswith(".tar"))
    head = s3.head_object(Bucket=BUCKET, Key=bundle_key)
    assert head["CacheControl"] == "public, max-age=31536000, immutable"
    assert re.fullmatch(r"[0-9a-f]{64}", head["Metadata"]["sha256"])
    assert bundle_key.rsplit("/", 1)[1].startswith(head["Metadata"]["sha256"])

    # unchanged: nothing is uploaded again
    n = len(moto.puts())
    r = _sync(w.repo_dir, *to)
    assert r.returncode == 0 and " 0 uploaded" in r.stdout, r.stdout
    assert len(moto.puts()) == n

    moto.download(PREFIX, mirror)
    origin = start_origin(mirror, w.tmp / "mirror-origin", pki[1])
    try:
        _point_device_at(w, origin.url)
        w.update()
        assert w.active_version() == "1.0.0"
        before = _trusted(w)

        # 2.0.0 published; the sync is killed after all but the last write
        w.publish("2.0.0", seed=2)
        plan = _planned(w.repo_dir, *to)
        assert plan[-1] == "metadata/timestamp.json" and len(plan) >= 4, plan
        old_ts = s3.get_object(Bucket=BUCKET,
                               Key=f"{PREFIX}/metadata/timestamp.json")["Body"].read()
        n = len(moto.puts())
        r = _sync(w.repo_dir, *to, MODELWARD_SYNC_FAIL_AFTER=str(len(plan) - 1))
        assert r.returncode == -9, (r.returncode, r.stderr)
        half = moto.puts()[n:]
        assert [k.removeprefix(PREFIX + "/") for k in half] == plan[:-1]
        assert s3.get_object(Bucket=BUCKET, Key=f"{PREFIX}/metadata/timestamp.json"
                             )["Body"].read() == old_ts
        moto.download(PREFIX, mirror)
        w.update()  # the half-synced origin: the older, complete set
        assert w.active_version() == "1.0.0"
        assert _trusted(w) == before

        # the second sync completes: only the timestamp is left to upload
        r = _sync(w.repo_dir, *to)
        assert r.returncode == 0, r.stderr
        assert " 1 uploaded" in r.stdout and "metadata/timestamp.json last" in r.stdout
        assert moto.puts()[-1] == f"{PREFIX}/metadata/timestamp.json"
        moto.download(PREFIX, mirror)
        w.update()
        assert w.active_version() == "2.0.0"
    finally:
        stop_origin(w.tmp / "mirror-origin")


def test_directory_sync_then_device_updates_and_interrupted_sync_keeps_it_consistent(
        world: World, pki: tuple[CertPair, CertPair]) -> None:
    w = world
    www = w.tmp / "www"
    w.publish("1.0.0", seed=1)
    r = _sync(w.repo_dir, "--to", str(www))
    assert r.returncode == 0, r.stderr
    assert sorted(p.relative_to(www).as_posix() for p in www.rglob("*") if p.is_file()) == \
        sorted(p.relative_to(w.repo_dir).as_posix() for p in w.repo_dir.rglob("*")
               if p.is_file())
    assert not list(www.rglob(".*"))  # no temporary file left
    origin = start_origin(www, w.tmp / "www-origin", pki[1])
    try:
        _point_device_at(w, origin.url)
        w.update()
        assert w.active_version() == "1.0.0"
        before = _trusted(w)
        old_ts = (www / "metadata" / "timestamp.json").read_bytes()

        w.publish("2.0.0", seed=2)
        plan = _planned(w.repo_dir, "--to", str(www))
        _assert_consistent_order(plan)
        for first in (True, False):  # killed after the first write, then all but the last
            left = _planned(w.repo_dir, "--to", str(www))  # (what the kill left, the 2nd time)
            assert left == (plan if first else plan[1:])
            k = 1 if first else len(left) - 1
            r = _sync(w.repo_dir, "--to", str(www), MODELWARD_SYNC_FAIL_AFTER=str(k))
            assert r.returncode == -9, (r.returncode, r.stderr)
            assert (www / "metadata" / "timestamp.json").read_bytes() == old_ts
            w.update()
            assert w.active_version() == "1.0.0"
            assert _trusted(w) == before
        assert _planned(w.repo_dir, "--to", str(www)) == ["metadata/timestamp.json"]

        r = _sync(w.repo_dir, "--to", str(www))
        assert r.returncode == 0 and " 1 uploaded" in r.stdout, r.stdout
        w.update()
        assert w.active_version() == "2.0.0"
    finally:
        stop_origin(w.tmp / "www-origin")


# --- refusals (no device needed) -------------------------------------------------------


@pytest.fixture
def repo_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    repo_dir, *_ = _new_repo(tmp_path, monkeypatch)
    (repo_dir / "targets" / "classifier").mkdir(parents=True)
    (repo_dir / "targets" / "classifier" / ("ab" * 32 + ".classifier-1.0.0.tar")
     ).write_bytes(b"bundle bytes")
    return repo_dir


def _one_line_error(r: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert r.returncode in (1, 2), (r.returncode, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    for n in needles:
        assert n in lines[0], lines[0]


@pytest.mark.parametrize("to", [f"s3://{BUCKET}/../other", f"s3://{BUCKET}/a/../../b",
                                f"s3://{BUCKET}/a//b", f"s3://{BUCKET}/./a",
                                f"s3://{BUCKET}/a%2F..", "s3://../x", "s3://UPPER/x"])
def test_an_s3_prefix_that_could_escape_is_refused_and_nothing_is_put(
        repo_dir: Path, moto: Moto, to: str) -> None:
    r = _sync(repo_dir, "--to", to, "--endpoint-url", moto.url)
    _one_line_error(r, "--to")
    assert moto.puts() == []


def test_credentials_in_the_endpoint_url_are_refused_and_not_echoed(
        repo_dir: Path, moto: Moto) -> None:
    url = moto.url.replace("http://", f"http://{ACCESS_KEY}:{SECRET}@")
    r = _sync(repo_dir, "--to", f"s3://{BUCKET}/p", "--endpoint-url", url)
    _one_line_error(r, "--endpoint-url", "credentials")
    assert SECRET not in r.stderr + r.stdout and ACCESS_KEY not in r.stderr + r.stdout
    assert moto.puts() == []


def test_wrong_credentials_are_an_error_that_names_neither(repo_dir: Path,
                                                           moto: Moto) -> None:
    # moto accepts any key unless told; a missing bucket stands in for a refusal
    r = _sync(repo_dir, "--to", "s3://no-such-bucket/p", "--endpoint-url", moto.url)
    _one_line_error(r, "no-such-bucket", "NoSuchBucket")
    assert SECRET not in r.stderr and ACCESS_KEY not in r.stderr


def test_a_symlink_in_the_repository_is_refused_before_anything_is_put(
        repo_dir: Path, moto: Moto, tmp_path: Path) -> None:
    secret = tmp_path / "outside.txt"
    secret.write_text("operator's private file")
    (repo_dir / "targets" / "classifier" / "leak.tar").symlink_to(secret)
    r = _sync(repo_dir, "--to", f"s3://{BUCKET}/p", "--endpoint-url", moto.url)
    _one_line_error(r, "leak.tar", "symlink")
    assert moto.puts() == []
    (repo_dir / "targets" / "classifier" / "leak.tar").unlink()
    (repo_dir / "targets" / "linkdir").symlink_to(tmp_path, target_is_directory=True)
    r = _sync(repo_dir, "--to", str(tmp_path / "www"))
    _one_line_error(r, "linkdir", "symlink")
    assert not (tmp_path / "www" / "metadata").exists()


def test_a_key_name_that_is_not_a_plain_name_is_refused(repo_dir: Path,
                                                        tmp_path: Path) -> None:
    (repo_dir / "targets" / "classifier" / "a\\..\\b.tar").write_bytes(b"x")
    r = _sync(repo_dir, "--to", str(tmp_path / "www"))
    _one_line_error(r, "not a plain name")
    assert not (tmp_path / "www" / "metadata").exists()


def test_directory_destination_symlinks_are_refused_and_not_followed(
        repo_dir: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep.json").write_text("untouched")
    link = tmp_path / "www-link"
    link.symlink_to(outside, target_is_directory=True)
    _one_line_error(_sync(repo_dir, "--to", str(link)), "--to", "symlink")

    www = tmp_path / "www"
    www.mkdir()
    (www / "targets").symlink_to(outside, target_is_directory=True)
    _one_line_error(_sync(repo_dir, "--to", str(www)), "targets", "symlink")
    (www / "targets").unlink()
    (www / "metadata").mkdir()
    (www / "metadata" / "timestamp.json").symlink_to(outside / "keep.json")
    _one_line_error(_sync(repo_dir, "--to", str(www)), "timestamp.json", "symlink")
    assert sorted(p.name for p in outside.iterdir()) == ["keep.json"]
    assert (outside / "keep.json").read_text() == "untouched"
    assert sorted(p.name for p in (www / "metadata").iterdir()) == ["timestamp.json"]


@pytest.mark.parametrize("to", ["https://cdn.example/repo", "gs://bucket/repo", "file:///x"])
def test_other_urls_for_to_are_refused(repo_dir: Path, tmp_path: Path, to: str) -> None:
    r = subprocess.run([sys.executable, "-m", "modelward", "repo", "sync", "--repo",
                        str(repo_dir), "--to", to], capture_output=True, text=True,
                       env=_env(), timeout=120, check=False, cwd=tmp_path)
    _one_line_error(r, "--to", "URL")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["repo", "keys", "builds"])


def test_sync_into_the_repository_is_refused(repo_dir: Path) -> None:
    _one_line_error(_sync(repo_dir, "--to", str(repo_dir / "mirror")), "overlaps --repo")
    assert not (repo_dir / "mirror").exists()
