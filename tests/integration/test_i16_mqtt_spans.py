"""Issue 16, MQTT at full speed, through mosquitto and the real ``serve-mqtt``: a full
install asks for its ranges in spans (format 3, one request for up to 8 blocks) and the
bridge sends exactly the bytes of the bundle; a device with only its own credentials that
asks for a span past the end of a file gets only what the file has, and another device is
still served."""

from __future__ import annotations

import json
import queue
import re

from modelward.updater.transport._mqtt import BLOCK_HEADER, publish_properties
from modelward.updater.transport._mqttconn import MqttConnection, device_connection
from tests.conftest import FLEET, MqttWorld
from tests.integration._i16_delta import publish


def _queued(w: MqttWorld, needle: str) -> list[tuple[int, int, int]]:
    """(offset, length, format) of the requests for ``needle`` the bridge queued."""
    pat = re.compile(r"queued path='[^']*" + re.escape(needle) +
                     r"' offset=(\d+) length=(\d+) format=(\d)")
    return [(int(m[1]), int(m[2]), int(m[3]))
            for m in pat.finditer(w.bridge_log.read_text())]


def test_a_full_install_over_mqtt_asks_in_spans(mqtt_world: MqttWorld) -> None:
    w = mqtt_world
    bundle, _ = publish(w, "1.0.0")
    before = w.snapshot()
    w.update()
    assert w.active_version() == "1.0.0"
    assert w.snapshot() != before
    size = bundle.stat().st_size
    reqs = _queued(w, bundle.name)
    blocks = -(-size // (1 << 20))
    assert any(f == 3 for _, _, f in reqs), reqs
    assert len(reqs) <= -(-blocks // 8) + 2, (len(reqs), blocks)  # (not one a block)
    served = w.served_bytes(bundle.name)  # each byte asked for sent once, nothing more
    assert served == sum(n for _, n, _ in reqs) <= size, (served, reqs)


def test_a_device_span_past_the_end_of_a_file_gets_only_the_file(
        mqtt_world: MqttWorld) -> None:
    """Amplification with one device's credentials: a 16-block span asked 10 bytes before
    the end of the root metadata, and one past it: one block of 10 bytes and one 416;
    the device's byte budget (16 MiB/s) is charged for what it asked, not for what was
    sent: the next span is refused 429. The other device is answered meanwhile."""
    w = mqtt_world
    root = w.repo_dir / "metadata" / "1.root.json"
    size = root.stat().st_size
    got: queue.Queue[tuple[bytes, bytes]] = queue.Queue()

    def on_message(msg) -> None:  # type: ignore[no-untyped-def]
        got.put((bytes(msg.properties.CorrelationData), bytes(msg.payload)))

    evil = device_connection(w.mqtt_cfg("dev-1"), "fetch", [], on_message)
    honest = device_connection(w.mqtt_cfg("dev-2"), "fetch", [], on_message)
    try:
        for conn, dev in ((evil, "dev-1"), (honest, "dev-2")):
            conn.subscribe(f"modelward/{FLEET}/devices/{dev}/repo/resp")

        def ask(conn: MqttConnection, dev: str, corr: bytes, off: int, n: int,
                fmt: int) -> None:
            p = publish_properties()
            p.ResponseTopic = f"modelward/{FLEET}/devices/{dev}/repo/resp"
            p.CorrelationData = corr
            body = json.dumps({"path": "metadata/1.root.json", "offset": off,
                               "length": n, "format": fmt}).encode()
            conn.publish(f"modelward/{FLEET}/repo/req/{dev}", body, p, wait=True)

        ask(evil, "dev-1", b"P" * 16, size + 1, 4 << 20, 3)
        ask(evil, "dev-1", b"E" * 16, size - 10, 8 << 20, 3)
        ask(evil, "dev-1", b"B" * 16, 0, 8 << 20, 3)
        ask(honest, "dev-2", b"H" * 16, 0, 100, 2)
        answers: dict[bytes, list[tuple[int, int, int]]] = {}
        while sum(len(v) for v in answers.values()) < 4:
            corr, payload = got.get(timeout=20)
            _, status, off, _ = BLOCK_HEADER.unpack(payload[:BLOCK_HEADER.size])
            answers.setdefault(corr, []).append(
                (status, off, len(payload) - BLOCK_HEADER.size))
        try:  # nothing more comes for the spans
            corr, payload = got.get(timeout=1.0)
            raise AssertionError(f"another answer: {corr!r} {payload[:16]!r}")
        except queue.Empty:
            pass
        assert answers[b"E" * 16] == [(200, size - 10, 10)]
        assert answers[b"P" * 16] == [(416, size + 1, 0)]
        assert answers[b"B" * 16] == [(429, 0, 0)]
        assert answers[b"H" * 16] == [(200, 0, 100)]
    finally:
        evil.close()
        honest.close()


def test_a_hostile_bridge_s_extra_blocks_are_never_taken(mqtt_world: MqttWorld) -> None:
    """A bridge (or the broker, on the device's response topic) that follows every real
    block of a span with: the block again with other bytes, the block after the span
    (not asked for), a block one byte off, and the block with more bytes than asked. The
    device takes none of them (a taken one would fail its chunk hash and the install):
    it installs, and the bridge's real answers are exactly what it asked for."""
    from modelward.publisher._bridge import Bridge
    from modelward.updater.transport._mqtt import block_header

    class Hostile(Bridge):
        junk = 0

        def _answer(self, topic: str, corr: bytes, fmt: int, status: int, offset: int,
                    size: int, data: bytes) -> None:
            super()._answer(topic, corr, fmt, status, offset, size, data)
            if status != 200 or fmt != 2 or not data or offset % (2 << 20):
                return  # (every other block: more would overflow the broker's queue bound
                # for the device, 16 blocks, and only cost time-outs)
            props = publish_properties()
            props.CorrelationData = corr
            n = len(data)
            for off, body in ((offset, b"D" * n), (offset + (8 << 20), b"N" * n),
                              (offset + 1, b"O" * n), (offset, bytes(data) + b"EXTRA")):
                self._send(topic, block_header(200, off, size) + body, props)
                self.junk += 1

    w = mqtt_world
    bundle, _ = publish(w, "1.0.0")
    w.stop_bridge()
    bridge = Hostile(w.repo_dir, w.mqtt_cfg("modelward-bridge"))
    try:
        before = w.snapshot()
        w.update()
    finally:
        bridge.close()
    assert w.active_version() == "1.0.0" and w.snapshot() != before
    assert bridge.junk > 0
    assert bridge.stats.served_bytes <= bundle.stat().st_size
