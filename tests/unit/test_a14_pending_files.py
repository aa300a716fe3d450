"""Attacks (a14-operator) on the pending files `repo sign` reads, as someone who can write
``KEYS/pending``: special files, huge files, odd JSON, a swap between summary and
signature, several files for one role, a symlink.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from tuf.api.metadata import Metadata, TargetFile, Targets
from tuf.api.serialization.json import JSONSerializer

from modelward.publisher._repo import Repository
from modelward.publisher._summary import PendingMetadataError, PendingReviewError

PASS = b"a14 operator unit passphrase"
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("a14pending")
    Repository(base / "repo", base / "keys", PASS).init()
    return base


@pytest.fixture
def base(template: Path, tmp_path: Path) -> Path:
    shutil.copytree(template, tmp_path / "w", symlinks=True)
    (tmp_path / "w" / "keys" / "pending").mkdir(mode=0o700, exist_ok=True)
    return tmp_path / "w"


def _repo(base: Path) -> Repository:
    return Repository(base / "repo", base / "keys", PASS)


def _pending_targets(version: int = 2, path: str = "m/m-1.0.0.tar",
                     custom: object = None) -> bytes:
    tf = TargetFile(5, {"sha256": "00" * 32}, path)
    tf.unrecognized_fields["custom"] = custom if custom is not None else {
        "modelward": {"name": "m", "version": "1.0.0", "fingerprint": "ab" * 32}}
    md = Metadata(Targets(version=version, expires=datetime.now(UTC) + timedelta(days=30),
                          targets={path: tf}))
    return md.to_bytes(JSONSerializer(compact=False))


def _cli(base: Path, *argv: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "MODELWARD_KEY_PASSPHRASE": PASS.decode(), "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "modelward", *argv, "--repo",
                           str(base / "repo"), "--keys", str(base / "keys")],
                          capture_output=True, text=True, env=env, timeout=60, check=False,
                          stdin=subprocess.DEVNULL)


_CHILD = textwrap.dedent("""
    import re, resource, sys
    from pathlib import Path
    from modelward.publisher._repo import Repository
    from modelward.publisher._summary import PendingMetadataError
    vm = int(re.search(r"VmSize:\\s+(\\d+) kB", open("/proc/self/status").read()).group(1))
    cap = vm * 1024 + 256 * 1024 * 1024  # 256 MiB more than after the imports
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    base = Path(sys.argv[1])
    try:
        Repository(base / "repo", base / "keys", b"x" * 20).review_pending("targets")
    except PendingMetadataError as e:
        print("REFUSED", str(e)[:200])
    except BaseException as e:
        print("OTHER", type(e).__name__, str(e)[:200])
""")


def _review_in_child(base: Path, timeout: float) -> str:
    r = subprocess.run([sys.executable, "-c", _CHILD, str(base)], capture_output=True,
                       text=True, timeout=timeout, check=False,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    return r.stdout + r.stderr[-500:]


def test_a14_pending_symlinked_to_dev_zero_is_bounded(base: Path) -> None:
    (base / "keys" / "pending" / "2.targets.json").symlink_to("/dev/zero")
    out = _review_in_child(base, timeout=60)
    assert out.startswith("REFUSED"), out


def test_a14_pending_fifo_does_not_hang(base: Path) -> None:
    os.mkfifo(base / "keys" / "pending" / "2.targets.json")
    try:
        out = _review_in_child(base, timeout=5)
    except subprocess.TimeoutExpired:
        out = "HUNG"
    assert out.startswith("REFUSED"), out


def test_a14_pending_directory_is_a_clean_error(base: Path) -> None:
    (base / "keys" / "pending" / "2.targets.json").mkdir()
    r = _cli(base, "repo", "sign", "targets", "--key", "encfile:targets.pem", "--yes")
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr


def test_a14_pending_with_float_is_refused_before_the_summary(base: Path) -> None:
    data = _pending_targets(custom={"modelward": {"name": "m", "version": "1.0.0",
                                                  "fingerprint": "ab" * 32,
                                                  "rollout": {"basis_points": 50.5}}})
    (base / "keys" / "pending" / "2.targets.json").write_bytes(data)
    r = _cli(base, "repo", "sign", "targets", "--key", "encfile:targets.pem", "--yes")
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert "targets: version 1 -> 2" not in r.stdout  # refused before it is shown


# --- what resists ---------------------------------------------------------------------


def test_a14_swap_between_summary_and_signature_is_refused(base: Path) -> None:
    """TOCTOU: the file the signer reviewed is replaced before the signature."""
    pending = base / "keys" / "pending" / "2.targets.json"
    pending.write_bytes(_pending_targets())
    repo = _repo(base)
    checked, lines = repo.review_pending("targets")
    assert any("m/m-1.0.0.tar" in x for x in lines)
    pending.write_bytes(_pending_targets(path="m/m-6.6.6.tar"))
    with pytest.raises(PendingReviewError):
        repo.sign_pending("targets", "encfile:targets.pem", reviewed=checked.digest)
    assert not (base / "repo" / "metadata" / "2.targets.json").exists()


def test_a14_second_pending_file_planted_after_review_is_refused(base: Path) -> None:
    """Several files for one role: a later one planted after the review is not signed."""
    pending = base / "keys" / "pending"
    (pending / "2.targets.json").write_bytes(_pending_targets())
    repo = _repo(base)
    checked, _ = repo.review_pending("targets")
    (pending / "3.targets.json").write_bytes(_pending_targets(3, path="m/m-6.6.6.tar"))
    with pytest.raises(PendingMetadataError):
        repo.sign_pending("targets", "encfile:targets.pem", reviewed=checked.digest)
    assert sorted(p.name for p in (base / "repo" / "metadata").glob("*.targets.json")) == \
        ["1.targets.json"]


def test_a14_planted_version_skip_is_flagged(base: Path) -> None:
    """A planted later version is the one shown, and the skip is flagged."""
    pending = base / "keys" / "pending"
    (pending / "2.targets.json").write_bytes(_pending_targets())
    (pending / "3.targets.json").write_bytes(_pending_targets(3, path="m/m-6.6.6.tar"))
    checked, lines = _repo(base).review_pending("targets")
    assert checked.path.name == "3.targets.json"
    assert "NOT the next version" in lines[0] and any("m-6.6.6" in x for x in lines)


def test_a14_symlinked_pending_is_refused_and_leaves_the_target(base: Path,
                                                                 tmp_path: Path) -> None:
    """A pending name symlinked to a file elsewhere is not followed (O_NOFOLLOW, issue 14
    f14-summary; it was signed before): refused, nothing published, the file it points to
    untouched."""
    elsewhere = tmp_path / "elsewhere.json"
    elsewhere.write_bytes(_pending_targets())
    before = elsewhere.read_bytes()
    (base / "keys" / "pending" / "2.targets.json").symlink_to(elsewhere)
    repo = _repo(base)
    with pytest.raises(PendingMetadataError, match="symlink"):
        repo.review_pending("targets")
    with pytest.raises(PendingMetadataError, match="symlink"):
        repo.sign_pending("targets", "encfile:targets.pem")
    assert not (base / "repo" / "metadata" / "2.targets.json").exists()
    assert elsewhere.read_bytes() == before
