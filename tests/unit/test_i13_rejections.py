"""Issue 13 finding 10: the pure rule over (rejections, candidates), and the MACed file."""

from __future__ import annotations

import hashlib
import hmac
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from modelward.updater.bundle._semver import SemVer
from modelward.updater.errors import (
    BundleFormatError,
    DownloadFailedError,
    FingerprintMismatchError,
    HealthCheckError,
    MetadataError,
    StagingError,
    TargetHashError,
)
from modelward.updater.install._rejections import (
    MAX_ENTRIES,
    MAX_FILE_BYTES,
    RELEASE_TTL,
    Rejection,
    RejectionsFileError,
    RejectionStore,
    add,
    choose_not_rejected,
    decode,
    encode,
    prune,
    read_bounded,
    rejection_for,
)

NOW = 1_800_000_000.0


@dataclass(frozen=True)
class T:
    path: str
    hashes: dict[str, str]


@dataclass(frozen=True)
class C:
    """A candidate: only what the rule may depend on (target path and hashes)."""

    version: SemVer
    target: T
    name: str = "classifier"
    channel: str = "stable"
    percent: float = 100.0
    halted: bool = False
    pinned: bool = False
    extra: dict[str, str] = field(default_factory=dict)
    withdrawn: bool = False
    role: str = "targets"


def cand(version: str, digest: str = "", **kw: object) -> C:
    d = digest or hashlib.sha256(version.encode()).hexdigest()
    return C(SemVer.parse(version), T(f"classifier/classifier-{version}.tar", {"sha256": d}),
             **kw)  # type: ignore[arg-type]


def health() -> HealthCheckError:
    return HealthCheckError("vectors differ", model="classifier", version="2.0.0",
                            detail="vectors")


def rej(c: C, error: BaseException | None = None, at: float = NOW) -> Rejection:
    r = rejection_for(c.target, c.name, str(c.version), error or health(), at)
    assert r is not None
    return r


class FakeTpm:
    def __init__(self, key: bytes = b"k" * 32) -> None:
        self.key = key
        self.macs = 0

    def mac(self, digest: bytes) -> bytes:
        self.macs += 1
        return hmac.new(self.key, digest, "sha256").digest()

    def mac_ok(self, digest: bytes, mac: bytes) -> bool:
        return hmac.compare_digest(self.mac(digest), mac)


# --- which errors reject ------------------------------------------------------------------


@pytest.mark.parametrize("error", [
    health(),
    BundleFormatError("bad", bundle="b"),
    FingerprintMismatchError("fp", model="m", version="v", expected="a", actual="b"),
])
def test_failures_of_the_verified_release_reject(error: BaseException) -> None:
    c = cand("2.0.0")
    r = rejection_for(c.target, "classifier", "2.0.0", error, NOW)
    assert r is not None and r.reason == type(error).__name__
    assert (r.at, r.until) == (NOW, NOW + RELEASE_TTL)


@pytest.mark.parametrize("error", [
    DownloadFailedError("origin down", url="u"),  # transport: backoff, not a rejection
    # not the signed bytes: the origin, the link or a planted partial download is at fault
    TargetHashError("hash", target="t"),
    MetadataError("delegated role rejected"),
    StagingError("disk full"),
    KeyboardInterrupt(),
    RuntimeError("bug"),
])
def test_hash_mismatch_transport_local_and_interrupts_do_not_reject(error: BaseException) -> None:
    assert rejection_for(cand("2.0.0").target, "classifier", "2.0.0", error, NOW) is None


# --- the rule over (rejections, candidates) -----------------------------------------------


def test_rejected_newest_is_skipped_and_the_next_eligible_chosen() -> None:
    v1, v2 = cand("1.5.0"), cand("2.0.0")
    choice, hit = choose_not_rejected([v1, v2], [rej(v2)], "dev-1", "stable", NOW + 10)
    assert choice is not None and choice.release is v1
    assert hit is not None and hit.path == v2.target.path


def test_nothing_left_means_nothing_to_do() -> None:
    v2 = cand("2.0.0")
    assert choose_not_rejected([v2], [rej(v2)], "dev-1", "stable", NOW)[0] is None


def test_new_hash_for_the_same_path_is_tried_again() -> None:
    old, new = cand("2.0.0", "a" * 64), cand("2.0.0", "b" * 64)
    choice, hit = choose_not_rejected([new], [rej(old)], "dev-1", "stable", NOW)
    assert choice is not None and choice.release is new and hit is None


def test_same_hash_at_another_path_is_tried_again() -> None:
    old = cand("2.0.0", "a" * 64)
    moved = C(old.version, T("classifier/renamed.tar", dict(old.target.hashes)))
    assert choose_not_rejected([moved], [rej(old)], "dev-1", "stable", NOW)[0] is not None


def test_an_added_hash_algorithm_is_new_signed_metadata() -> None:
    old = cand("2.0.0", "a" * 64)
    more = C(old.version, T(old.target.path, {"sha256": "a" * 64, "sha512": "c" * 128}))
    assert choose_not_rejected([more], [rej(old)], "dev-1", "stable", NOW)[0] is not None


def test_resigned_metadata_with_the_same_target_stays_rejected() -> None:
    # A new targets version that only bumps the rollout keeps path and hashes.
    v2 = cand("2.0.0")
    again = C(v2.version, T(v2.target.path, dict(v2.target.hashes)), percent=50.0)
    assert choose_not_rejected([again], [rej(v2)], "dev-1", "stable", NOW)[0] is None


def test_rejected_pin_keeps_what_runs_instead_of_following_the_rollout() -> None:
    pin, newest = cand("1.0.0", pinned=True), cand("3.0.0")
    choice, hit = choose_not_rejected([pin, newest], [rej(pin)], "dev-1", "stable", NOW)
    assert choice is None and hit is not None and hit.path == pin.target.path


def test_not_rejected_pin_wins() -> None:
    pin, newest = cand("1.0.0", pinned=True), cand("3.0.0")
    choice, hit = choose_not_rejected([pin, newest], [rej(newest)], "dev-1", "stable", NOW)
    assert choice is not None and choice.release is pin and choice.pinned and hit is None


def test_expired_and_future_entries_do_not_hold() -> None:
    v2 = cand("2.0.0")
    r = rej(v2)
    assert choose_not_rejected([v2], [r], "d", "stable", NOW + RELEASE_TTL)[0] is not None
    assert choose_not_rejected([v2], [r], "d", "stable", NOW + RELEASE_TTL - 1)[0] is None
    # a clock set back before the rejection: the entry is not believed (one retry)
    assert choose_not_rejected([v2], [r], "d", "stable", NOW - 1)[0] is not None


def test_other_channel_rejections_do_not_matter() -> None:
    v2, beta = cand("2.0.0"), cand("3.0.0", channel="beta")
    choice, _ = choose_not_rejected([v2, beta], [rej(beta)], "d", "stable", NOW)
    assert choice is not None and choice.release is v2


def test_prune_forgets_what_the_metadata_no_longer_signs() -> None:
    v1, v2, v3 = cand("1.0.0"), cand("2.0.0"), cand("3.0.0")
    kept = prune([rej(v1), rej(v2)], [v2.target, v3.target], NOW + 1)
    assert [r.path for r in kept] == [v2.target.path]
    assert prune([rej(v2)], [v2.target], NOW + RELEASE_TTL) == ()


def test_add_replaces_same_release_and_drops_the_oldest() -> None:
    cands = [cand(f"1.{i}.0") for i in range(MAX_ENTRIES + 3)]
    out: tuple[Rejection, ...] = ()
    for i, c in enumerate(cands):
        out = add(out, rej(c, at=NOW + i))
    assert len(out) == MAX_ENTRIES
    assert [r.path for r in out] == [c.target.path for c in cands[3:]]
    out = add(out, rej(cands[5], at=NOW + 100))
    assert len(out) == MAX_ENTRIES and out[-1].path == cands[5].target.path
    assert sum(r.path == cands[5].target.path for r in out) == 1


# --- the file -------------------------------------------------------------------------------


def test_store_round_trip_and_the_tpm_mac(tmp_path: Path) -> None:
    tpm = FakeTpm()
    s = RejectionStore(tmp_path, tpm, clock=lambda: NOW)
    v2 = cand("2.0.0")
    s.note_failure(v2.target, "classifier", "2.0.0", health())
    assert os.stat(tmp_path / "rejections.json").st_mode & 0o777 == 0o600
    again = RejectionStore(tmp_path, tpm, clock=lambda: NOW + 5)
    assert again.choose([v2], "dev-1", "stable") is None
    assert [r.reason for r in again.load()] == ["HealthCheckError"]
    # the metadata moved on: the entry is forgotten and the file removed
    v3 = cand("3.0.0")
    assert again.choose([v3], "dev-1", "stable") is not None
    assert not (tmp_path / "rejections.json").exists()


def test_transport_failure_and_hash_mismatch_write_nothing(tmp_path: Path) -> None:
    s = RejectionStore(tmp_path, FakeTpm(), clock=lambda: NOW)
    for e in (DownloadFailedError("down", url="u"), TargetHashError("x", target="t")):
        s.note_failure(cand("2.0.0").target, "classifier", "2.0.0", e)
    assert not (tmp_path / "rejections.json").exists()


def _plant(tmp_path: Path, entries: list[Rejection], key: bytes) -> None:
    from modelward.updater.install._rejections import digest

    data = encode(entries, hmac.new(key, digest(entries), "sha256").digest())
    (tmp_path / "rejections.json").write_bytes(data)


def test_disk_attacker_cannot_plant_a_rejection_of_a_good_release(tmp_path: Path) -> None:
    good = cand("2.0.0")
    _plant(tmp_path, [rej(good)], key=b"not the tpm key".ljust(32))
    s = RejectionStore(tmp_path, FakeTpm(), clock=lambda: NOW + 1)
    with pytest.raises(RejectionsFileError, match="MAC does not verify"):
        s.load()
    choice = s.choose([good], "dev-1", "stable")  # forgotten, logged: the release is tried
    assert choice is not None and choice.release is good


def test_edited_entry_breaks_the_mac(tmp_path: Path) -> None:
    tpm = FakeTpm()
    RejectionStore(tmp_path, tpm, clock=lambda: NOW).note_failure(
        cand("2.0.0").target, "classifier", "2.0.0", health())
    p = tmp_path / "rejections.json"
    doc = json.loads(p.read_bytes())
    doc["rejections"][0]["until"] = NOW + 100 * RELEASE_TTL  # hold the release back longer
    p.write_text(json.dumps(doc))
    with pytest.raises(RejectionsFileError, match="MAC"):
        RejectionStore(tmp_path, tpm).load()


def test_the_mac_is_domain_separated_from_the_trust_record(tmp_path: Path) -> None:
    from modelward.trust._record import TrustRecord
    from modelward.updater.install._rejections import digest

    rec = TrustRecord(counter=1, root_version=1, targets_version=1, active=None,
                      previous=None)
    assert digest([]) != rec.digest()
    assert digest([rej(cand("2.0.0"))]) != digest([])


@pytest.mark.parametrize("body", [
    b"", b"[]", b"{}", b"\xff", b'{"version": 1, "rejections": [], "mac": 5}',
    b'{"version": 2, "rejections": [], "mac": ""}',
    b'{"version": 1, "rejections": {}, "mac": ""}',
    b'{"version": 1, "rejections": [{}], "mac": ""}',
    b'{"version": 1, "rejections": [], "mac": "", "extra": 1}',
    b"[" * 100_000,
    b'{"version": 1, "rejections": [{"path": "p", "hashes": {"sha256": "x"}, "reason": "r",'
    b' "detail": "", "model": "m", "version": "v", "at": 1' + b"0" * 400 + b', "until": 1}],'
    b' "mac": ""}',
])
def test_malformed_files_are_refused_by_type(body: bytes) -> None:
    with pytest.raises(RejectionsFileError):
        decode(body, "rejections.json", lambda d, m: True)


def test_too_many_entries_are_refused() -> None:
    many = [rej(cand(f"1.{i}.0")) for i in range(MAX_ENTRIES + 1)]
    with pytest.raises(RejectionsFileError, match="at most"):
        decode(encode(many, b"m"), "r", lambda d, m: True)


def test_oversized_symlinked_and_fifo_files_are_not_read(tmp_path: Path) -> None:
    p = tmp_path / "rejections.json"
    with open(p, "wb") as f:
        f.truncate(1 << 30)  # sparse 1 GiB: refused from its size, not read
    with pytest.raises(RejectionsFileError, match="over"):
        read_bounded(p)
    p.unlink()
    secret = tmp_path / "elsewhere"
    secret.write_bytes(b"{}")
    p.symlink_to(secret)
    with pytest.raises(RejectionsFileError, match="symlink"):
        read_bounded(p)
    p.unlink()
    os.mkfifo(p)
    with pytest.raises(RejectionsFileError, match="not a regular file"):
        read_bounded(p)  # O_NONBLOCK: no hang
    p.unlink()
    assert read_bounded(p) is None
    p.write_bytes(b"x" * (MAX_FILE_BYTES + 1))
    with pytest.raises(RejectionsFileError):
        read_bounded(p)


def test_save_replaces_a_planted_symlink_not_its_target(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_bytes(b"keep")
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "rejections.json").symlink_to(victim)
    s = RejectionStore(tmp_path / "state", FakeTpm(), clock=lambda: NOW)
    s.note_failure(cand("2.0.0").target, "classifier", "2.0.0", health())
    assert victim.read_bytes() == b"keep"
    assert not (tmp_path / "state" / "rejections.json").is_symlink()


def test_a_failing_write_does_not_hide_the_error(tmp_path: Path) -> None:
    class BrokenTpm(FakeTpm):
        def mac(self, digest: bytes) -> bytes:
            from modelward.trust.errors import TpmError

            raise TpmError("gone", tcti="x")

    s = RejectionStore(tmp_path, BrokenTpm(), clock=lambda: NOW)
    s.note_failure(cand("2.0.0").target, "classifier", "2.0.0", health())  # logged only
    assert not (tmp_path / "rejections.json").exists()


def test_huge_signed_paths_keep_the_file_within_its_bound(tmp_path: Path) -> None:
    s = RejectionStore(tmp_path, FakeTpm(), clock=lambda: NOW)
    for i in range(4):
        long = T("classifier/" + str(i) * 30_000 + ".tar", {"sha256": str(i) * 64})
        s.note_failure(long, "classifier", f"{i}.0.0", health())
    data = (tmp_path / "rejections.json").read_bytes()
    assert len(data) <= MAX_FILE_BYTES
    kept = RejectionStore(tmp_path, FakeTpm()).load()  # still parses and verifies
    assert kept and kept[-1].version == "3.0.0"  # the newest kept, the oldest dropped


def test_the_stored_detail_is_short_and_printable() -> None:
    e = HealthCheckError("bad \x1b[31mred\x1b[0m\n" + "x" * 1000, model="m", version="v",
                         detail="")
    r = rejection_for(cand("2.0.0").target, "m", "v", e, NOW)
    assert r is not None and len(r.detail) <= 300 and r.detail.isprintable()
