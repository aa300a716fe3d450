"""a14-bridge: one compromised device against the bridge's state and paths, in memory
(``Bridge(connect=False)`` with a recording stand-in for paho's client)."""

from __future__ import annotations

import json
import os
import threading
import time
import tracemalloc
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import MQTTProtocolVersion

from modelward.publisher._bridge import Bridge
from modelward.publisher._fairness import BridgeLimits, Scheduler
from modelward.updater._config import MqttConfig
from modelward.updater.transport._mqtt import BLOCK_HEADER
from modelward.updater.transport._mqttconn import publish_properties

FLEET = "f"
PREFIX = f"modelward/{FLEET}"


class _Client:
    """paho's publish as the bridge uses it: the broker acknowledges at once."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes]] = []
        self.corr: list[bytes] = []
        self._mid = 0

    def publish(self, topic: str, payload: bytes, qos: int = 0,
                properties: Any = None) -> mqtt.MQTTMessageInfo:
        self._mid += 1
        info = mqtt.MQTTMessageInfo(self._mid)
        info.rc = mqtt.MQTT_ERR_SUCCESS
        info._set_as_published()
        self.sent.append((topic, bytes(payload)[:64]))  # the header is enough here
        self.corr.append(bytes(getattr(properties, "CorrelationData", b"")))
        return info


def _bridge(repo: Path, limits: BridgeLimits | None = None) -> tuple[Bridge, _Client]:
    (repo / "metadata").mkdir(parents=True, exist_ok=True)
    (repo / "targets").mkdir(exist_ok=True)
    b = Bridge(repo, MqttConfig(host="", port=0, fleet=FLEET, client_name="modelward-bridge"),
               limits=limits, connect=False)
    client = _Client()
    b._conn = SimpleNamespace(client=client, lost=threading.Event(), close=lambda: None)  # type: ignore[assignment]
    return b, client


def _msg(device: str, payload: bytes, corr: bytes = b"c" * 16,
         resp: str | None = None) -> Any:
    props = SimpleNamespace(CorrelationData=corr,
                            ResponseTopic=resp or f"{PREFIX}/devices/{device}/repo/resp")
    return SimpleNamespace(topic=f"{PREFIX}/repo/req/{device}", payload=payload,
                           properties=props, retain=False)


def _req(path: str, offset: int = 0, length: int = 1 << 20) -> bytes:
    return json.dumps({"path": path, "offset": offset, "length": length,
                       "format": 2}).encode()


def _status(payload: bytes) -> int:
    return int(BLOCK_HEADER.unpack(payload[:BLOCK_HEADER.size])[1])


def _wait(pred: Any, timeout: float = 5.0) -> None:
    end = time.monotonic() + timeout
    while not pred() and time.monotonic() < end:
        time.sleep(0.01)


def test_a14_refusals_while_nobody_is_served_are_freed(tmp_path: Path) -> None:
    b, client = _bridge(tmp_path / "repo",
                        BridgeLimits(requests_per_s=1e6, request_burst=10**6))
    try:
        msgs = [_msg("dev-2", b"x" * 10, corr=i.to_bytes(4, "big")) for i in range(5000)]
        tracemalloc.start()
        start = tracemalloc.get_traced_memory()[0]
        for m in msgs:  # not JSON: 400, answered from the network thread
            b._on_message(m)
        time.sleep(1.2)  # the worker idles (take() times out twice)
        grown = tracemalloc.get_traced_memory()[0] - start - sum(
            len(t) + len(p) + 200 for t, p in client.sent)  # what the stand-in keeps
        tracemalloc.stop()
        print(f"{len(b._sent)} entries in _sent, {grown / 5000:.0f} bytes per refusal")
        assert len(client.sent) == 5000  # every one was answered (and acknowledged)
        assert len(b._sent) <= 64, len(b._sent)
    finally:
        b.close()


@pytest.mark.xdist_group("machine")
def test_a14_decoding_one_request_is_cheap_whatever_its_properties() -> None:
    """~3,800 empty user properties in a 20 KiB request (within the bridge's packet limit):
    paho's own decoder takes 40-90 ms on it (quadratic); the decoder our clients run
    refuses it in one linear pass before paho sees it."""
    from modelward.updater.transport import _pahofast

    topic = f"{PREFIX}/repo/req/dev-2".encode()
    p = publish_properties()
    p.ResponseTopic = f"{PREFIX}/devices/dev-2/repo/resp"
    p.CorrelationData = b"c" * 16
    p.UserProperty = [("", "")] * 3800
    packet = len(topic).to_bytes(2, "big") + topic + b"\x00\x01" + p.pack() + b"{}"
    assert len(packet) < 20 * 1024  # the bridge's Maximum Packet Size lets it through
    assert _pahofast.decode_publish is not None
    t = time.perf_counter()
    with pytest.raises(_pahofast.PropertiesTooLarge):
        _pahofast.decode_publish(0x32, packet, MQTTProtocolVersion.MQTTv5)
    dt = time.perf_counter() - t
    print(f"one {len(packet)}-byte request refused in {dt * 1e3:.2f} ms")
    assert dt < 0.005, dt


def test_a14_another_devices_response_topic_is_never_answered(tmp_path: Path) -> None:
    b, client = _bridge(tmp_path / "repo")
    (tmp_path / "repo" / "targets" / "a.bin").write_bytes(b"a" * 100)
    try:
        for resp in (f"{PREFIX}/devices/dev-1/repo/resp", f"{PREFIX}/devices/+/repo/resp",
                     f"{PREFIX}/devices/dev-2/repo/resp/x", f"{PREFIX}/devices/dev-2"):
            b._on_message(_msg("dev-2", _req("targets/a.bin"), resp=resp))
        b._on_message(_msg("dev-2", _req("targets/a.bin"), corr=b"c" * 65))
        # a topic whose id is not one device (the broker's ACL only lets dev-2 write its own)
        for topic in (f"{PREFIX}/repo/req/dev-1/x", f"{PREFIX}/repo/req/", f"{PREFIX}/x"):
            m = _msg("dev-2", _req("targets/a.bin"))
            m.topic = topic
            b._on_message(m)
        time.sleep(0.7)
        assert client.sent == []
        assert b._sched.queued("dev-1") == 0 and "dev-1" not in b._sched._devices
    finally:
        b.close()


def test_a14_paths_outside_metadata_and_targets_are_refused(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    b, client = _bridge(repo)
    secret = tmp_path / "secret"
    secret.write_bytes(b"S" * 10)
    (repo / "metadata" / "root.json").write_bytes(b"{}")
    (repo / "private").mkdir()
    (repo / "private" / "k").write_bytes(b"K" * 10)
    t = repo / "targets"
    (t / "out").symlink_to(secret)  # symlinks the origin placed (a mistake, or a mirror)
    (t / "up").symlink_to("../private/k")
    (t / "dirlink").symlink_to(tmp_path)
    (t / "loop").symlink_to("loop")
    os.mkfifo(t / "fifo")  # would block the worker if opened
    (t / "sub").mkdir()
    paths = ["targets/../private/k", "targets/%2e%2e/private/k", "/etc/passwd",
             "targets/out", "targets/dirlink/secret",
             "targets/fifo", "targets/sub", "targets", "private/k", "targets\\..\\secret",
             "targets/a\x00b", "targets//out", "targets/./out", "targets/" + "a/" * 500,
             "metadata/root.json/", "targets/\u2024\u2024/private/k", "targets/" + "a" * 1000,
             "targets/\ud800"]
    try:
        for i, p in enumerate(paths):
            b._on_message(_msg("dev-2", _req(p, length=100), corr=i.to_bytes(2, "big")))
        _wait(lambda: len(client.sent) >= len(paths))
        got = {paths[int.from_bytes(c, "big")]: _status(s[1])
               for c, s in zip(client.corr, client.sent, strict=True)}
        assert len(client.sent) == len(paths)
        assert all(st in (400, 404) for st in got.values()), got
        assert not any(b"S" * 10 in s[1] or b"K" * 10 in s[1] for s in client.sent)
    finally:
        b.close()


def test_a14_one_device_cannot_make_another_device_busy() -> None:
    """Scheduler alone: dev-2 at its queue and byte limits, with no byte limit even, cannot
    fill the bridge's shared bound (256 MiB) that would answer dev-1 503."""
    lim = BridgeLimits(bytes_per_s=0, byte_burst=0)
    s: Scheduler[int] = Scheduler(lim)
    refusals = [s.offer("dev-2", i, 1 << 20, 0.0) for i in range(1000)]
    assert {r[0] for r in refusals if r is not None} == {429}
    assert s.offer("dev-1", -1, 1 << 20, 0.0) is None
    assert s.take(0) == -1 or s.take(0) == -1  # dev-1 within the first two served


def test_a14_symlink_loop_under_targets_is_a_quiet_404(
    tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    b, client = _bridge(tmp_path / "repo")
    (tmp_path / "repo" / "targets" / "loop").symlink_to("loop")
    try:
        for i in range(20):  # 100 bytes each: 20 MiB would pass the byte bucket (429)
            b._on_message(_msg("dev-2", _req("targets/loop", length=100),
                               corr=i.to_bytes(2, "big")))
        _wait(lambda: len(client.sent) >= 20)
        statuses = {_status(p) for _, p in client.sent}
        errors = [r for r in caplog.records if r.levelname == "ERROR"]
        assert statuses == {404}, statuses
        assert len(errors) <= 5, len(errors)
    finally:
        b.close()


def test_a14_symlink_from_targets_to_elsewhere_in_the_repository_is_refused(
    tmp_path: Path,
) -> None:
    repo = tmp_path / "repo"
    b, client = _bridge(repo)
    (repo / "private").mkdir()
    (repo / "private" / "k").write_bytes(b"K" * 10)
    (repo / "targets" / "up").symlink_to("../private/k")
    try:
        b._on_message(_msg("dev-2", _req("targets/up", length=100)))
        _wait(lambda: len(client.sent) >= 1)
        assert [_status(p) for _, p in client.sent] == [404]
        assert b"K" * 10 not in client.sent[0][1]
    finally:
        b.close()
