"""a11 (attack on the resend change): one device crowds the other devices' requests out at
the broker. It WORKED (below); the fix: the bridge reads up to 256 packets a turn of
paho's loop and drops a request over its device's rate on its topic, before paho decodes
it (~94 -> ~15 us a request in process: tests/unit/test_a11_request_prefilter.py). These
tests assert issue 14's bound under the same flood: on the idle machine dev-1 8.9 ->
8.8 ms (before the fix, idle too: 8.8 -> 418 ms, and 7.5 -> 121 ms in CI's machine
group), the bridge at 37 % of a core. Real mosquitto with the generated config +
``modelward serve-mqtt``; docs/brokers.md tells what remains (a flood faster than one
bridge core reads, ~40,000 requests a second).

Tried: dev-2, with only its own credentials (its fetcher identity and bound client id),
writes pre-built MQTT 5 QoS 0 block requests (each for a 1 MiB block, with its own
response topic and correlation data) to its own request topic from a raw TLS socket, at
10,000 a second (~2.6 MB/s of requests); dev-1 meanwhile asks for one block at a time, as
in issue 14 must-show 7 (:class:`~modelward.simulator._flood.Prober`).

What happened (2 shared cores, shared with other work, mosquitto 2.0.11): dev-1's
median block latency 10-16 ms before the flood; under it 2, 8, 6 and 15 of 10-15 of
dev-1's requests were lost (no answer within 2 s) in four runs at 10,000 requests/s, and
the answered ones took a median 1.2-1.8 s; 30 of 30 lost at 228,000/s (unthrottled).
Lower rates lost none but missed the 2x bound: 3,000/s 10 -> 49 ms, 5,000/s 16 -> 270 ms
(sent in bursts of 50-500 packets). The broker logs "Outgoing messages are being dropped
for client modelward-bridge-...". Not new with the resend change: the same flood against
the bridge patched back to the previous QoS (requests and answers at QoS 1, send time-out
30 s) and ``max_queued_messages 64`` lost 0 and 9 of 10 in two runs (median 0.54 and
1.17 s); requests at QoS 1 with answers at QoS 0 lost 9 of 10 (1.3 s). The change's
QoS 0 moved which bound drops them, not whether.

Cause: the bridges subscribe to the requests at QoS 0 (``REQUEST_QOS``) and broker-config
writes ``max_queued_messages 24``. mosquitto delivers a QoS 0 message to a connected
client only while fewer than ``max_queued_messages`` packets wait to be written to it
(``out_packet_count``), else drops it. The bridge's one network thread reads one packet a
loop turn and also writes its 1 MiB answers, so it reads far fewer requests a second than
one device can send; the socket's buffers fill, the 24 packets fill, and mosquitto then
drops requests of every device alike, before the bridge's per-device buckets (50/s) see
them. Nothing bounds a device's request rate at the broker.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import ssl
import statistics
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from modelward.publisher._broker_config import write_broker_config
from modelward.simulator._broker import start_broker, stop_broker
from modelward.simulator._flood import Prober
from modelward.simulator._pki import CertPair
from modelward.updater._config import MqttConfig, fetch_client_id, fetch_username
from modelward.updater.install._install import Outcome
from tests._helpers import mqtt_str, mqtt_varint
from tests.conftest import FLEET as WORLD_FLEET
from tests.conftest import MqttWorld

FLEET = "crowd"
MIB = 1 << 20
FILE = "targets/flood.bin"
RATE = 10_000  # dev-2's requests a second
PROBES = 10


class _RawFlooder:
    """dev-2's fetcher identity writing pre-built MQTT 5 QoS 0 requests at ``rate``."""

    def __init__(self, port: int, ca: Path, password: str, rate: float,
                 fleet: str = FLEET) -> None:
        ctx = ssl.create_default_context(cafile=str(ca))
        self.sock = ctx.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=10),
                                    server_hostname="127.0.0.1")
        body = (mqtt_str(b"MQTT") + bytes([5, 0xC2]) + struct.pack(">H", 60) + b"\x00"
                + mqtt_str(fetch_client_id("dev-2").encode())
                + mqtt_str(fetch_username("dev-2").encode())
                + mqtt_str(password.encode()))
        self.sock.sendall(b"\x10" + mqtt_varint(len(body)) + body)
        ack = self.sock.recv(64)
        assert ack[:1] == b"\x20" and ack[3] == 0, ack
        topic = f"modelward/{fleet}/repo/req/dev-2".encode()
        resp = f"modelward/{fleet}/devices/dev-2/repo/resp".encode()
        packets = []
        for i in range(50):
            props = b"\x08" + mqtt_str(resp) + b"\x09" + mqtt_str(secrets.token_bytes(16))
            payload = json.dumps({"path": FILE, "offset": (i % 64) * MIB, "length": MIB,
                                  "format": 2}).encode()
            var = mqtt_str(topic) + mqtt_varint(len(props)) + props
            packets.append(b"\x30" + mqtt_varint(len(var) + len(payload)) + var + payload)
        self.chunk, self.per_chunk, self.rate = b"".join(packets), len(packets), rate
        self.sent = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        start = time.monotonic()
        try:
            while not self._stop.is_set():
                self.sock.sendall(self.chunk)
                self.sent += self.per_chunk
                ahead = self.sent / self.rate - (time.monotonic() - start)
                if ahead > 0:
                    self._stop.wait(ahead)
        except OSError:
            pass

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)
        self.sock.close()


def _cpu(pid: int) -> float:
    """Seconds of CPU the process ``pid`` has used (user and system)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _probe(p: Prober, n: int) -> tuple[list[float], int]:
    """dev-1's latencies of answered blocks and its count of unanswered requests."""
    got, lost = [], 0
    for i in range(n):
        status, dt = p.once(offset=(i % 4) * MIB, timeout=2.0)
        if status == 200:
            got.append(dt)
        else:
            lost += 1
        time.sleep(0.08)
    return got, lost


@pytest.mark.xdist_group("machine")
def test_a11_one_device_flooding_requests_does_not_crowd_out_another(
        tmp_path: Path, pki: tuple[CertPair, CertPair]) -> None:
    ca, server = pki
    repo = tmp_path / "repo"
    (repo / "metadata").mkdir(parents=True)
    (repo / "targets").mkdir()
    (repo / "metadata" / "timestamp.json").write_bytes(b'{"signed": {"version": 1}}')
    with open(repo / FILE, "wb") as sparse:  # read costs no disk
        sparse.truncate(64 * MIB)
    bc = write_broker_config(FLEET, ["dev-1", "dev-2"], tmp_path / "bc")
    broker = start_broker(tmp_path / "broker", server, ca.cert, bc.conf)
    pw = {u: p.read_text().strip() for u, p in bc.credentials.items()}
    log = open(tmp_path / "bridge.log", "w")  # noqa: SIM115 - the child owns it
    bridge = subprocess.Popen(
        [sys.executable, "-m", "modelward", "serve-mqtt", "--repo", str(repo),
         "--broker", f"mqtts://127.0.0.1:{broker.port}", "--fleet", FLEET,
         "--tls-ca", str(ca.cert), "--username", "modelward-bridge",
         "--password-file", str(bc.credentials["modelward-bridge"])],
        stdout=subprocess.PIPE, stderr=log, text=True)
    honest: Prober | None = None
    try:
        assert bridge.stdout is not None
        assert bridge.stdout.readline().startswith("serving")
        honest = Prober(MqttConfig(host="127.0.0.1", port=broker.port, fleet=FLEET,
                                   client_name="dev-1", ca_file=str(ca.cert),
                                   password=pw["dev-1"]), FILE)
        _probe(honest, 3)  # warm up
        base, base_lost = _probe(honest, PROBES)
        evil = _RawFlooder(broker.port, ca.cert, pw["dev-2"], RATE)
        try:
            time.sleep(1.0)
            cpu0, t0 = (_cpu(bridge.pid), _cpu(broker.pid)), time.monotonic()
            flooded, lost = _probe(honest, PROBES)
            cpu1, t1 = (_cpu(bridge.pid), _cpu(broker.pid)), time.monotonic()
        finally:
            evil.stop()
        time.sleep(1.0)
        after, after_lost = _probe(honest, 3)
        b = statistics.median(base)
        f = statistics.median(flooded) if flooded else float("inf")
        dropped = "Outgoing messages are being dropped for client modelward-bridge" in \
            (tmp_path / "broker" / "mosquitto.log").read_text()
        print(f"dev-1 block latency {b * 1e3:.1f} ms -> {f * 1e3:.1f} ms, lost {lost} of "
              f"{PROBES}; dev-2 sent {evil.sent}; broker dropped to the bridge: {dropped}; "
              f"CPU under the flood: bridge {(cpu1[0] - cpu0[0]) / (t1 - t0):.0%}, "
              f"mosquitto {(cpu1[1] - cpu0[1]) / (t1 - t0):.0%}")
        # unchanged by the flood: the bridge runs and serves dev-1 once it ends
        assert bridge.poll() is None
        assert base_lost == 0 and after_lost == 0 and len(after) == 3
        # what issue 14 must-show 7 asks for: no request of dev-1 lost, latency within 2x
        assert lost == 0, f"{lost} of dev-1's {PROBES} requests unanswered"
        assert f <= 2 * b, (b, f)
    finally:
        if honest is not None:
            honest.close()
        bridge.terminate()
        bridge.wait(10)
        log.close()
        stop_broker(tmp_path / "broker")


@pytest.mark.xdist_group("machine")
def test_a11_another_device_installs_over_mqtt_during_a_request_flood(
        mqtt_world: MqttWorld) -> None:
    """The same flood (dev-2, 10,000 QoS 0 requests a second from its own fetcher
    identity) while dev-1's agent installs a release over MQTT only.

    What happened: alone the install took 0.8 s; under the flood it took 35.7 s and
    15.6 s in two runs (19-45x), finishing only because some of each block's up to
    ``max_retries`` requests, one per ``block_timeout`` (5 s), got through. Cause as in
    the module docstring: dev-1's requests and re-requests are dropped by mosquitto
    with dev-2's, before the bridge sees them."""
    w = mqtt_world
    assert w.creds is not None
    with open(w.repo_dir / FILE, "wb") as sparse:
        sparse.truncate(64 * MIB)
    w.publish("1.0.0", seed=1)
    t = time.monotonic()
    assert w.update().outcome is Outcome.INSTALLED
    base = time.monotonic() - t
    w.publish("2.0.0", seed=2)
    evil = _RawFlooder(w.broker_port, w.ca.cert, w.creds["dev-2"].read_text().strip(), RATE,
                       fleet=WORLD_FLEET)
    outcome: object = None
    try:
        time.sleep(1.0)
        t = time.monotonic()
        try:
            outcome = w.update().outcome
        except Exception as e:  # noqa: BLE001 - what the agent did is the finding
            outcome = f"{type(e).__name__}: {str(e)[:200]}"
        took = time.monotonic() - t
    finally:
        evil.stop()
    print(f"dev-1 MQTT install: {base:.1f} s alone; under dev-2's flood ({evil.sent} "
          f"requests): {outcome} after {took:.1f} s")
    assert w.bridge is not None and w.bridge.poll() is None  # the bridge still runs
    if outcome is not Outcome.INSTALLED:  # nothing half-installed
        assert w.active_version() == "1.0.0"
    assert outcome is Outcome.INSTALLED
    assert took <= 2 * base + 2, (base, took)
