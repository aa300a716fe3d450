"""a10-dynsec: ``fleet status`` of a fleet far larger than ``max_queued_messages`` (real
mosquitto with the generated dynamic-security config and settings).

The bridge answers at QoS 0, so the count of packets mosquitto holds for a connected
client (``max_queued_messages``) is what bounds a fetcher that never reads, and it is a
small constant now (24), no longer ``devices + 16``. ``fleet status`` must then never
need more: :func:`collect_reports` asks for the retained reports in batches of
``STATUS_BATCH`` topics, each ended by its UNSUBACK. Here 240 devices each retain a
report of 60 KiB (near the 64 KiB bound, so ``max_queued_bytes`` is tested too), and
one of them (an attacker with its own credentials) ~1 MiB, all the broker takes: every
one arrives. The one wildcard subscription of before loses most of them (mosquitto drops
what is beyond the in-flight window and the queue bound) on the same broker, and the
reports on the broker are unchanged by being read.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from modelward.publisher._broker_config import (
    MAX_PACKET,
    MAX_QUEUED_MESSAGES,
    write_broker_config,
)
from modelward.publisher._fleet import collect_reports
from modelward.simulator._broker import start_broker, stop_broker
from modelward.simulator._pki import CertPair
from modelward.trust._report import MAX_REPORT_BYTES
from modelward.updater._config import MqttConfig
from modelward.updater.transport._mqttconn import MqttConnection, device_connection

FLEET = "big"
DEVICES = int(os.environ.get("MODELWARD_STATUS_DEVICES", "240"))
REPORT = 60 * 1024


def _cfg(port: int, ca: Path, user: str, creds: dict[str, Path]) -> MqttConfig:
    return MqttConfig(host="127.0.0.1", port=port, fleet=FLEET, client_name=user,
                      ca_file=str(ca), password=creds[user].read_text().strip())


HOSTILE = "d0005"  # retains as much as the broker takes (a packet: ~1 MiB, not 64 KiB)


def _payload(device: str) -> bytes:
    size = MAX_PACKET - 4096 if device == HOSTILE else REPORT
    head = f'{{"device": "{device}", "pad": "'.encode()
    return head + b"x" * (size - len(head) - 2) + b'"}'


def _old_wildcard_collect(cfg: MqttConfig, wait: float) -> set[str]:
    """What collect_reports did before: one ``devices/+/status`` subscription."""
    got: set[str] = set()
    lock = threading.Lock()

    def on_message(msg: object) -> None:
        with lock:
            got.add(msg.topic.split("/")[3])  # type: ignore[attr-defined]

    conn = MqttConnection(cfg, "modelward-operator-old", [cfg.topic("devices/+/status")],
                          on_message)
    try:
        time.sleep(wait)
    finally:
        conn.close()
    return got


@pytest.mark.xdist_group("machine")
def test_a10_fleet_status_of_many_devices_fits_a_small_queue(
        tmp_path: Path, pki: tuple[CertPair, CertPair]) -> None:
    ca, server = pki
    devices = [f"d{i:04d}" for i in range(DEVICES)]
    bc = write_broker_config(FLEET, devices, tmp_path / "bc")
    conf = bc.conf.read_text()
    assert f"max_queued_messages {MAX_QUEUED_MESSAGES}\n" in conf and MAX_QUEUED_MESSAGES < 32
    assert "queue_qos0_messages false\n" in conf
    broker = start_broker(tmp_path / "broker", server, ca.cert, bc.conf)
    try:
        t = time.monotonic()
        for d in devices:  # each device retains its own report, as its listener
            c = device_connection(_cfg(broker.port, ca.cert, d, bc.credentials), "listen", [])
            try:
                c.publish(f"modelward/{FLEET}/devices/{d}/status", _payload(d), retain=True,
                          wait=True)
            finally:
                c.close()
        print(f"{DEVICES} reports retained in {time.monotonic() - t:.1f} s")
        op = _cfg(broker.port, ca.cert, "modelward-operator", bc.credentials)
        for _ in range(2):  # and read again: reading changes nothing on the broker
            t = time.monotonic()
            got = collect_reports(op, devices, wait=2.0)
            took = time.monotonic() - t
            print(f"collect_reports: {len(got)} of {DEVICES} reports of {REPORT >> 10} KiB "
                  f"in {took:.2f} s")
            assert sorted(got) == devices  # every row arrives
            # (cut as it arrives) and the hostile one delays or drops no other row
            assert all(got[d] == _payload(d)[:MAX_REPORT_BYTES + 1] for d in devices)
            assert took < 2.0 + DEVICES / 100, took
        old = _old_wildcard_collect(op, 2.0)
        print(f"one wildcard subscription: {len(old)} of {DEVICES} reports")
        assert len(old) < DEVICES  # what batching avoids: the broker dropped the rest
        assert sorted(collect_reports(op, devices, wait=2.0)) == devices
    finally:
        stop_broker(tmp_path / "broker")
