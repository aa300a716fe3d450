"""Issue 14, must-show 7, against the real ``modelward sim fleet up`` (not a hand-built copy):
the broker it starts with the generated config, its ``serve-mqtt`` bridge process and its two
agents. The attacker is ``dev-002``, using only the credentials the fleet gave it; ``dev-001``
is the other device, asking for blocks on its own topics.

1. a deep-JSON request and an out-of-range offset leave the bridge serving dev-001;
2. a flood keeps the bridge's peak RSS under 200 MiB and dev-001's block latency within 2x
   its baseline;
3. a 200 MiB retained status and a 100 MiB request are refused by the broker.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import paho.mqtt.client as mqtt
import pytest

from modelward.simulator._fleet import Fleet
from modelward.simulator._flood import Flooder, Prober, vm_hwm
from modelward.updater._config import fetch_client_id, fetch_username, listen_client_id
from modelward.updater.transport._mqttconn import MqttConnection
from tests.integration.test_i14_broker import Broker, RawClient

MIB = 1 << 20
FLOOD_FILE = "targets/flood.bin"
PAUSE = 0.08  # between dev-1's block requests


def _modelward(*argv: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-I", "-m", "modelward", *argv],
                          capture_output=True, text=True, timeout=timeout, check=False)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    d = tmp_path_factory.mktemp("simfleet") / "fleet"
    up = _modelward("sim", "fleet", "up", "--dir", str(d), "--devices", "2", "--poll", "600")
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        f = Fleet.load(d)
        with open(f.repo / FLOOD_FILE, "wb") as sparse:  # read costs no disk
            sparse.truncate(64 * MIB)
        yield f
    finally:
        down = _modelward("sim", "fleet", "down", "--dir", str(d))
        assert down.returncode == 0, down.stderr


def _bridge_pid(f: Fleet) -> int:
    return int((f.dir / "bridge.pid").read_text())


def _alive(pid: int) -> bool:
    return Path(f"/proc/{pid}").exists()


def _as_broker(f: Fleet) -> Broker:
    handle = SimpleNamespace(port=f.broker_port, pid=0, work=f.dir / "broker")
    return Broker(handle, f.ca(), {u.name: u for u in f.creds.iterdir()})  # type: ignore[arg-type]


def test_sim_fleet_deep_json_and_out_of_range_offset_leave_the_bridge_serving(
    fleet: Fleet,
) -> None:
    pid = _bridge_pid(fleet)
    evil = Flooder(fleet.mqtt("dev-002"), FLOOD_FILE, 4 * MIB)
    try:
        for payload in [b"[" * 100_000, b"[" * 15_000,
                        json.dumps({"path": FLOOD_FILE, "offset": 2 ** 64, "length": MIB,
                                    "format": 2}).encode(),
                        json.dumps({"path": FLOOD_FILE, "offset": -1,
                                    "length": 10 ** 40}).encode()]:
            evil.send_raw(payload)
        deadline = time.monotonic() + 10
        while evil.received < 3 and time.monotonic() < deadline:  # the broker drops 100,000
            time.sleep(0.05)
        assert evil.statuses == {400: 3}, evil.statuses
    finally:
        evil.stop()
    assert _alive(pid)
    honest = Prober(fleet.mqtt("dev-001"), FLOOD_FILE)
    try:
        assert honest.once()[0] == 200  # the bridge still serves the other device
    finally:
        honest.close()
    log = (fleet.dir / "bridge.log").read_text()
    assert "refusing a request from dev-002" in log
    assert "Traceback" not in log and "RecursionError" not in log


@pytest.mark.xdist_group("machine")
def test_sim_fleet_flood_keeps_the_bridge_bounded_and_the_other_device_fast(
    fleet: Fleet,
) -> None:
    pid = _bridge_pid(fleet)
    honest = Prober(fleet.mqtt("dev-001"), FLOOD_FILE)
    evil = Flooder(fleet.mqtt("dev-002"), FLOOD_FILE, 64 * MIB)
    try:
        honest.latencies(5, pause=PAUSE)  # warm up
        base = honest.latencies(30, pause=PAUSE)
        evil.start(rate=2000)
        time.sleep(1.0)
        flooded = honest.latencies(30, pause=PAUSE)
    finally:
        evil.stop()
        honest.close()
    hwm = vm_hwm(pid)
    b, f = statistics.median(base), statistics.median(flooded)
    print(f"sim fleet bridge: dev-001 block latency {b * 1e3:.1f} -> {f * 1e3:.1f} ms; "
          f"dev-002 sent {evil.sent}, got {evil.statuses}; VmHWM {hwm >> 20} MiB; "
          f"cores {os.cpu_count()}")
    assert _alive(pid)
    assert evil.sent > 5000 and evil.statuses.get(429, 0) > 0
    assert hwm < 200 * MIB
    assert f <= 2 * b, (b, f)


def test_sim_fleet_broker_refuses_a_200mib_status_and_a_100mib_request(fleet: Fleet) -> None:
    broker = _as_broker(fleet)
    status = fleet.mqtt("dev-002").topic("devices/dev-002/status")
    # as dev-002's listener (the identity that writes its status, its bound client id)
    accepted = RawClient(broker, "dev-002", listen_client_id("dev-002")).publish(
        status, 200 * MIB, retain=True)
    assert not accepted, "the fleet's broker acknowledged a 200 MiB status"
    req = fleet.mqtt("dev-002").topic("repo/req/dev-002")
    seen: list[int] = []
    lock = threading.Lock()

    def got(m: mqtt.MQTTMessage) -> None:
        with lock:
            seen.append(len(m.payload))

    # listening as the bridge does (its own credential, its own shared subscription aside)
    spy = MqttConnection(fleet.mqtt("modelward-bridge"), "spy-bridge",
                         [fleet.mqtt("modelward-bridge").topic("repo/req/+")], got,
                         max_packet_size=255 * MIB)
    try:
        raw = RawClient(broker, "dev-002", fetch_client_id("dev-002"), fetch_username("dev-002"))
        accepted = raw.publish(req, 100 * MIB, retain=False)
        time.sleep(0.5)
    finally:
        spy.close()
    assert not accepted and raw.sent < 32 * MIB, raw.sent
    assert all(n < MIB for n in seen), seen  # nothing of it reached a bridge subscriber
    retained: list[bytes] = []
    op = MqttConnection(fleet.mqtt("modelward-operator"), "op-check", [status],
                        lambda m: retained.append(bytes(m.payload)), max_packet_size=255 * MIB)
    try:
        time.sleep(0.5)
    finally:
        op.close()
    assert all(len(p) < MIB for p in retained), "the 200 MiB status was retained"
