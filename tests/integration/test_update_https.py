"""Updates over HTTPS from nginx, on a real swtpm device (issue #2 must-show 1, 2, 3, 6)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from modelward.updater.errors import (
    DownloadFailedError,
    HealthCheckError,
    MetadataError,
    RollbackError,
    TargetHashError,
)
from modelward.updater.install._install import Outcome
from tests._helpers import publish_root_v2
from tests.conftest import PASSPHRASE, World, copytree, tree_digest
from tests.integration._i16_delta import drop_index


def _record(w: World) -> dict[str, object]:
    rec: dict[str, object] = json.loads((w.state / "trust" / "record.json").read_bytes())["record"]
    return rec


def test_happy_path_v1_then_v2_then_nothing_to_do(world: World) -> None:
    world.publish("1.0.0", seed=1)
    r1 = world.update()
    assert r1.outcome is Outcome.INSTALLED
    assert world.active_version() == "1.0.0"
    c1 = world.snapshot().counter

    world.publish("2.0.0", seed=2)
    r2 = world.update()
    assert r2.outcome is Outcome.INSTALLED
    assert world.active_version() == "2.0.0"
    rec = _record(world)
    assert rec["active"]["version"] == "2.0.0"  # type: ignore[index]
    assert rec["previous"]["version"] == "1.0.0"  # type: ignore[index]
    assert world.snapshot().counter == c1 + 1  # one increment per committed install
    assert not list((world.state / "staging").iterdir())  # staging cleaned up

    before = world.snapshot()
    r3 = world.update()
    assert r3.outcome is Outcome.UP_TO_DATE
    assert "nothing to do" in r3.message
    assert world.snapshot() == before  # no NV write, no file moved


def test_update_cli_reports_nothing_to_do(world: World) -> None:
    world.publish("1.0.0", seed=1)
    first = world.cli("agent", "update", "--config", str(world.conf_path), "--once")
    assert first.returncode == 0, first.stderr
    assert "installed classifier 1.0.0" in first.stdout
    again = world.cli("agent", "update", "--config", str(world.conf_path), "--once")
    assert again.returncode == 0
    assert "nothing to do" in again.stdout
    st = world.cli("agent", "status", "--config", str(world.conf_path), "--json")
    doc = json.loads(st.stdout)
    assert doc["active"]["version"] == "1.0.0" and doc["previous"] is None
    assert doc["last_error"] is None
    assert set(doc["active"]) == {"name", "version", "fingerprint"}


def test_bundle_altered_on_origin_is_rejected_and_v1_keeps_serving(world: World) -> None:
    world.publish("1.0.0", seed=1)
    world.update()
    served = world.publish("2.0.0", seed=2)
    # (a release from before chunk indexes: TUF's whole-bundle check; the delta's own
    # check of each chunk is test_i16_delta_attacks / test_i16_reg_attacks)
    drop_index(world.repo, world.repo_dir, "classifier/classifier-2.0.0.tar")
    data = bytearray(served.read_bytes())
    data[len(data) // 2] ^= 0x01
    served.write_bytes(bytes(data))
    before = world.snapshot()

    with pytest.raises(TargetHashError) as ei:
        world.update()
    assert "does not match the signed target" in str(ei.value)
    after = world.snapshot()
    assert world.active_version() == "1.0.0"
    assert (after.record, after.counter, after.anchor, after.current, after.slots) == (
        before.record, before.counter, before.anchor, before.current, before.slots)
    # The device's metadata holds only what the repository signed (now the v2 targets).
    assert after.metadata["timestamp.json"] == tree_digest(world.repo_dir / "metadata")[
        "timestamp.json"]
    assert not list((world.state / "staging").iterdir())  # the bad download is gone
    status = json.loads((world.state / "status.json").read_bytes())
    assert status["last_error"]["type"] == "TargetHashError"


def test_bundle_longer_than_signed_length_is_cut_off(world: World) -> None:
    world.publish("1.0.0", seed=1)
    world.update()
    served = world.publish("2.0.0", seed=2)
    # (a release from before chunk indexes: TUF's whole-bundle check; the delta's own
    # check of each chunk is test_i16_delta_attacks / test_i16_reg_attacks)
    drop_index(world.repo, world.repo_dir, "classifier/classifier-2.0.0.tar")
    with open(served, "ab") as f:
        f.write(b"\0" * (1 << 20))  # endless-data style: more bytes than signed
    before = world.snapshot()
    with pytest.raises(TargetHashError, match="more than the signed"):
        world.update()
    after = world.snapshot()
    assert (after.record, after.current, after.slots) == (
        before.record, before.current, before.slots)


def test_model_failing_its_vectors_is_never_activated(world: World) -> None:
    world.publish("1.0.0", seed=1)
    world.update()
    world.publish("2.0.0", seed=2, vectors_seed=3)  # signed and published correctly
    before = world.snapshot()
    with pytest.raises(HealthCheckError) as ei:
        world.update()
    assert ei.value.version == "2.0.0"
    assert "differs from the test vectors" in ei.value.detail
    after = world.snapshot()
    assert world.active_version() == "1.0.0"
    assert (after.record, after.counter, after.current, after.slots) == (
        before.record, before.counter, before.current, before.slots)
    assert not (world.state / "staging" / "incoming").exists()
    assert not (world.state / "slots" / "b").exists()


def test_older_metadata_copied_back_locally_does_not_roll_back(world: World) -> None:
    world.publish("1.0.0", seed=1)
    world.update()
    old_local = world.tmp / "old-local-metadata"
    copytree(world.state / "metadata", old_local)
    world.publish("2.0.0", seed=2)
    world.update()
    before = world.snapshot()

    copytree(old_local, world.state / "metadata")  # attacker with disk access
    r = world.update()
    assert r.outcome is Outcome.UP_TO_DATE
    assert world.active_version() == "2.0.0"
    after = world.snapshot()
    assert (after.record, after.counter, after.current, after.slots) == (
        before.record, before.counter, before.current, before.slots)
    assert after.metadata == before.metadata  # TUF refreshed back to the newest signed


def test_older_metadata_locally_and_on_the_origin_is_refused(world: World) -> None:
    world.publish("1.0.0", seed=1)
    world.update()
    old_local = world.tmp / "old-local-metadata"
    old_origin = world.tmp / "old-origin-metadata"
    copytree(world.state / "metadata", old_local)
    copytree(world.repo_dir / "metadata", old_origin)
    world.publish("2.0.0", seed=2)
    world.update()
    before = world.snapshot()

    # A mirror that serves the old (validly signed, unexpired) repository, plus the
    # device's own metadata put back to match: TUF alone sees nothing wrong.
    copytree(old_origin, world.repo_dir / "metadata")
    copytree(old_local, world.state / "metadata")
    tampered = tree_digest(world.state / "metadata")
    with pytest.raises(RollbackError) as ei:
        world.update()
    assert ei.value.what == "targets"
    after = world.snapshot()
    assert world.active_version() == "2.0.0"
    assert (after.record, after.counter, after.current, after.slots) == (
        before.record, before.counter, before.current, before.slots)
    assert after.metadata == tampered  # nothing older was persisted on top


def test_origin_serving_older_metadata_is_refused_by_tuf(world: World) -> None:
    world.publish("1.0.0", seed=1)
    world.update()
    old_origin = world.tmp / "old-origin-metadata"
    copytree(world.repo_dir / "metadata", old_origin)
    world.publish("2.0.0", seed=2)
    world.update()
    before = world.snapshot()
    copytree(old_origin, world.repo_dir / "metadata")
    with pytest.raises(MetadataError, match="BadVersionNumberError"):
        world.update()
    assert world.snapshot() == before


def test_origin_down_is_a_transport_error_and_nothing_moves(world: World) -> None:
    world.publish("1.0.0", seed=1)
    world.update()
    before = world.snapshot()
    from modelward.simulator._origin import stop_origin

    stop_origin(world.tmp / "origin")
    with pytest.raises(DownloadFailedError):
        world.update()
    assert world.snapshot() == before


def test_wrong_ca_is_refused(world: World, tmp_path: Path) -> None:
    from modelward.simulator._pki import make_ca

    other = tmp_path / "other-ca"
    other.mkdir()
    ca = make_ca(other, "some other CA")
    text = world.conf_path.read_text().replace(str(world.ca.cert), str(ca.cert))
    world.conf_path.write_text(text)
    world.publish("1.0.0", seed=1)
    with pytest.raises(DownloadFailedError, match="TLS verification"):
        world.update()
    assert world.active_version() is None


def test_root_rotation_updates_the_tpm_anchor(world: World) -> None:
    import hashlib

    world.publish("1.0.0", seed=1)
    world.update()
    publish_root_v2(world.repo_dir, world.keys, PASSPHRASE)
    world.publish("2.0.0", seed=2)
    world.update()
    snap = world.snapshot()
    anchored = (world.state / "trust" / "root.json").read_bytes()
    assert json.loads(anchored)["signed"]["version"] == 2
    assert snap.anchor == hashlib.sha256(anchored).digest()
    assert _record(world)["root_version"] == 2


def test_root_dropped_on_disk_is_not_trusted(world: World) -> None:
    world.publish("1.0.0", seed=1)
    world.update()
    before = world.snapshot()
    root = world.state / "trust" / "root.json"
    doc = json.loads(root.read_bytes())
    doc["signed"]["expires"] = "2099-01-01T00:00:00Z"  # attacker-made root
    root.write_text(json.dumps(doc))
    import hashlib

    from modelward.trust.errors import RootAnchorError

    store = world.store()
    try:
        with pytest.raises(RootAnchorError):
            store.anchored_root()
    finally:
        store.tpm.close()
    # the next update fetches the anchored root again (issue 13): the planted one is gone
    world.update()
    assert hashlib.sha256(root.read_bytes()).digest() == before.anchor
    assert world.snapshot().record == before.record


def test_no_update_refresh_is_two_gets_on_one_connection(
    world: World, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A refresh with nothing new asks for the next root (404) and the timestamp, on the
    connection it already has: the 404 body is read so the connection is reused."""
    import urllib3.connection

    from modelward.updater.install._tuf import TufSession
    from modelward.updater.transport._fetcher import RequestsFetcher

    connects: list[object] = []
    real_connect = urllib3.connection.HTTPSConnection.connect

    def counting_connect(self: urllib3.connection.HTTPSConnection) -> None:
        connects.append(self)
        real_connect(self)

    monkeypatch.setattr(urllib3.connection.HTTPSConnection, "connect", counting_connect)

    world.publish("1.0.0", seed=1)
    world.update()
    https = world.cfg.updater.https
    assert https is not None
    fetcher = RequestsFetcher(https)
    root = (world.state / "trust" / "root.json").read_bytes()
    log = world.tmp / "origin" / "access.log"
    connects.clear()  # the update above had its own fetcher
    md = world.state / "metadata"
    on_disk = {p: p.lstat().st_mtime_ns for p in md.rglob("*")}
    try:
        for _ in range(3):
            log.write_text("")
            s = TufSession(world.state / "metadata", https.metadata_url, https.targets_url,
                           fetcher, root)
            s.refresh()

            def gets() -> list[str]:
                return [line.split('"')[1].split()[1].rsplit("/", 1)[1]
                        for line in log.read_text().splitlines()]

            # nginx logs a request after answering it: give the last line a moment
            deadline = time.monotonic() + 5
            while len(gets()) < 2 and time.monotonic() < deadline:
                time.sleep(0.01)
            time.sleep(0.2)  # and any third request the time to show up
            assert gets() == ["2.root.json", "timestamp.json"], gets()
        assert len(connects) == 1  # one TLS handshake for three refreshes
        # and nothing written: the root already on disk is not rewritten, nor its link
        assert {p: p.lstat().st_mtime_ns for p in md.rglob("*")} == on_disk
    finally:
        fetcher.close()


def test_an_unchanged_timestamp_is_verified_once_and_a_bad_one_never_skipped(
        world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    from tuf.ngclient._internal.trusted_metadata_set import TrustedMetadataSet

    world.publish("1.0.0", seed=1)
    world.update()
    calls: list[bytes] = []
    orig = TrustedMetadataSet.update_timestamp

    def counting(self: TrustedMetadataSet, data: bytes) -> object:
        calls.append(data)
        return orig(self, data)

    monkeypatch.setattr(TrustedMetadataSet, "update_timestamp", counting)
    assert world.update().outcome is Outcome.UP_TO_DATE
    assert len(calls) == 1  # the local copy; the same bytes from the origin are not redone

    # The same altered bytes on the device and on the origin: the local copy fails to
    # verify, so the remote one is verified (and refused), never taken as "the same".
    before = world.snapshot()
    ts = json.loads((world.state / "metadata" / "timestamp.json").read_bytes())
    ts["signed"]["expires"] = "2099-01-01T00:00:00Z"
    bad = json.dumps(ts).encode()
    (world.state / "metadata" / "timestamp.json").write_bytes(bad)
    (world.repo_dir / "metadata" / "timestamp.json").write_bytes(bad)
    tampered = tree_digest(world.state / "metadata")
    calls.clear()
    with pytest.raises(MetadataError, match="timestamp"):
        world.update()
    assert calls == [bad, bad]
    after = world.snapshot()
    assert (after.record, after.counter, after.current, after.slots) == (
        before.record, before.counter, before.current, before.slots)
    assert after.metadata == tampered  # nothing persisted on top
