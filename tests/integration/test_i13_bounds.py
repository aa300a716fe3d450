"""Issue 13, must-show 7: memory is bounded before anything is verified.

Through the real stack (swtpm, nginx, mosquitto), ``agent update --once`` runs in a child
process whose peak RSS (VmHWM) is compared with that of a normal install of a bundle of
the same size:

- a bundle of the signed length made only of pax headers, served by the origin in place
  of a signed release, or signed itself (a compromised build pipeline);
- a flood of large junk messages on the device's MQTT response topic, published with the
  bridge's credential (the only one the broker ACL lets write there), while the device
  downloads and health-checks a signed release that fails its health check.

Each time the update is refused with a typed error, peak RSS stays within the normal
install's peak + 16 MiB, and the trusted state (record, counter, anchor, ``current``,
slots) did not move: the last good model keeps serving.
"""

from __future__ import annotations

import json
import os
import tarfile
import threading
import time
from pathlib import Path

import pytest

from modelward.simulator._attacks import RepoAttacker, pax_record
from modelward.updater.bundle._tarstream import BLOCK
from modelward.updater.transport._mqtt import publish_properties
from modelward.updater.transport._mqttconn import MqttConnection, device_connection
from tests._helpers import update_peak_rss
from tests.conftest import FLEET, PASSPHRASE, DeviceState, MqttWorld, World

MIB = 1 << 20
SLACK_KIB = 16 * 1024  # the bound: normal peak + 16 MiB
PAD_MIB = 48


def _padding(path: Path, mib: int) -> Path:
    block = os.urandom(MIB)
    with open(path, "wb") as f:
        for i in range(mib):
            f.write(block[i % 251:] + block[:i % 251])
    return path


def _install_normally(w: World, version: str, seed: int, mib: int) -> int:
    """Publish and install a bundle with ``mib`` MiB of padding; its peak RSS in KiB."""
    pad = _padding(w.builds / f"pad-{version}", mib)
    w.publish(version, seed=seed, extra=[(pad, "data/pad.bin")])
    pad.unlink()
    rc, rss, err = update_peak_rss(w.conf_path)
    assert rc == 0, err
    assert w.active_version() == version
    return rss


def _xheader(records: bytes) -> bytes:
    info = tarfile.TarInfo("././@PaxHeader")
    info.type, info.size = tarfile.XHDTYPE, len(records)
    return info.tobuf(tarfile.USTAR_FORMAT) + records + b"\0" * (-len(records) % BLOCK)


def pax_only(length: int, header: str) -> bytes:
    """``length`` bytes of pax headers: "big" ones (60 KiB of small distinct records, what
    made the old reader hold ~7x the stream) or "small" ones (one record each)."""
    if header == "big":
        recs = b"".join(pax_record(f"k{i:016d}", "v") for i in range(60 * 1024 // 22))
    else:
        recs = pax_record("path", "model.onnx")
    one = _xheader(recs)
    data = one * (length // len(one))
    return data + b"\0" * (length - len(data))


def _trusted(s: DeviceState) -> tuple[object, ...]:
    """What must not move when an update is refused (the TUF metadata that verified may:
    the release is validly signed, and the spec's client persists what verified)."""
    return s.record, s.counter, s.anchor, s.current, s.slots


def _last_error(w: World) -> str:
    return str(json.loads((w.state / "status.json").read_bytes())["last_error"]["type"])


def _boot_check_passes(w: World) -> None:
    r = w.cli("agent", "boot-check", "--config", str(w.conf_path))
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize(("attacker", "header"), [("origin", "big"), ("signed", "small")])
@pytest.mark.xdist_group("machine")
def test_i13_pax_header_bundle_of_the_signed_length_is_refused_with_bounded_rss(
    world: World, attacker: str, header: str,
) -> None:
    normal = _install_normally(world, "1.0.0", 1, PAD_MIB)
    a = RepoAttacker(world.repo_dir, world.keys, PASSPHRASE)
    if attacker == "origin":  # the origin serves pax headers under a signed release
        signed = world.publish("2.0.0", seed=2, extra=[(_padding(world.builds / "p2", PAD_MIB),
                                                        "data/pad.bin")])
        a.replace_target("classifier", "2.0.0", pax_only(signed.stat().st_size, header))
    else:  # the operator's online keys sign a bundle made of pax headers
        a.sign_raw(pax_only(PAD_MIB * MIB + 10 * BLOCK, header), "classifier", "2.0.0",
                   "0" * 64)
    before = world.snapshot()
    rc, rss, err = update_peak_rss(world.conf_path)
    assert rc == 1, err
    if attacker == "origin":  # the hash is checked before a bundle error is believed
        assert _last_error(world) == "TargetHashError", err
    else:
        assert _last_error(world) == "BundleFormatError", err
        assert "extended header" in err, err
    print(f"peak RSS: normal install {normal / 1024:.1f} MiB, pax bundle {rss / 1024:.1f} MiB")
    assert rss <= normal + SLACK_KIB, (normal, rss)
    assert _trusted(world.snapshot()) == _trusted(before)
    assert world.active_version() == "1.0.0"
    _boot_check_passes(world)


def _flood(w: MqttWorld, stop: threading.Event, sent: list[int]) -> None:
    """Junk on dev-1's response topic with the bridge's credential: 1 MiB messages, which fit
    the device's Maximum Packet Size and reach it (larger ones the broker itself refuses
    since `fleet broker-config` sets max_packet_size)."""
    topic = f"modelward/{FLEET}/devices/dev-1/repo/resp"
    conn = MqttConnection(w.mqtt_cfg("modelward-bridge"), f"flood-{os.getpid()}", [])
    big, small = os.urandom(MIB), os.urandom(MIB - 4096)
    try:
        i = 0
        while not stop.is_set() and i < 300:
            p = publish_properties()
            p.CorrelationData = os.urandom(16)
            conn.publish(topic, big if i % 2 == 0 else small, p, wait=True)
            sent[0] += 1
            i += 1
    finally:
        conn.close()


@pytest.mark.xdist_group("machine")
def test_i13_junk_flood_on_the_response_topic_keeps_rss_bounded(
    mqtt_world: MqttWorld,
) -> None:
    w = mqtt_world
    normal = _install_normally(w, "1.0.0", 1, 16)
    # A validly signed release that fails its health check (another model's vectors):
    # the device downloads it whole, then spends a while verifying and checking it, the
    # time junk piled up in the receive queue before the response topic was subscribed
    # only while fetching.
    w.publish("2.0.0", seed=2, vectors_seed=99,
              extra=[(_padding(w.builds / "p2", 16), "data/pad.bin")])
    before = w.snapshot()
    stop, sent = threading.Event(), [0]
    t = threading.Thread(target=_flood, args=(w, stop, sent), daemon=True)
    t.start()
    time.sleep(0.5)  # the flood is on before the device connects
    try:
        rc, rss, err = update_peak_rss(w.conf_path)
    finally:
        stop.set()
        t.join(60)
    assert rc == 1, err
    assert _last_error(w) == "HealthCheckError", err
    print(f"peak RSS: normal install {normal / 1024:.1f} MiB, under a flood of {sent[0]} "
          f"junk messages {rss / 1024:.1f} MiB")
    assert sent[0] >= 10
    assert rss <= normal + SLACK_KIB, (normal, rss)
    assert _trusted(w.snapshot()) == _trusted(before)
    assert w.active_version() == "1.0.0"
    _boot_check_passes(w)


def test_i13_broker_honours_the_maximum_packet_size_asked_for(mqtt_world: MqttWorld) -> None:
    """mosquitto sends a client no packet over the Maximum Packet Size of its CONNECT."""
    w = mqtt_world
    topic = f"modelward/{FLEET}/devices/dev-1/repo/resp"
    got: list[int] = []
    dev = device_connection(w.mqtt_cfg("dev-1"), "fetch", [topic],
                         lambda m: got.append(len(m.payload)), max_packet_size=64 * 1024)
    bridge = MqttConnection(w.mqtt_cfg("modelward-bridge"), "i13-bridge", [])
    try:
        for size in (32 * 1024, 512 * 1024, 128 * 1024, 1000):  # the broker admits them all
            bridge.publish(topic, b"j" * size, wait=True)
        deadline = time.monotonic() + 5
        while len(got) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)
    finally:
        bridge.close()
        dev.close()
    assert got == [32 * 1024, 1000]


def test_i13_response_topic_is_subscribed_only_while_fetching(mqtt_world: MqttWorld) -> None:
    """Between fetches the device receives nothing on its response topic."""
    from modelward.updater.transport._mqtt import MqttFetcher

    w = mqtt_world
    topic = f"modelward/{FLEET}/devices/dev-1/repo/resp"
    f = MqttFetcher(w.mqtt_cfg("dev-1"))
    delivered: list[int] = []
    real = f._deliver  # noqa: SLF001
    f._deliver = lambda m: (delivered.append(len(m.payload)), real(m))[1]  # type: ignore[method-assign]  # noqa: SLF001
    bridge = MqttConnection(w.mqtt_cfg("modelward-bridge"), "i13-bridge", [])
    try:
        assert f.download_bytes("mqtt://repo/metadata/1.root.json", 1 << 20).startswith(b"{")
        assert delivered
        time.sleep(0.5)  # (UNSUBSCRIBE is not waited for; what races it the closed queue drops)
        answers = len(delivered)
        for _ in range(5):
            bridge.publish(topic, b"j" * MIB, wait=True)
        time.sleep(0.5)
        assert len(delivered) == answers  # nothing came in after the fetch
        assert f._inbox.bytes == 0  # noqa: SLF001
        assert f.download_bytes("mqtt://repo/metadata/1.root.json", 1 << 20).startswith(b"{")
    finally:
        bridge.close()
        f.close()
