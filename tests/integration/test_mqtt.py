"""MQTT transport on real mosquitto (TLS + ACL) and swtpm (issue #3 must-show 1-6)."""

from __future__ import annotations

import grp
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest

from modelward.publisher._bridge import Bridge
from modelward.publisher._broker_config import MAX_PACKET
from modelward.simulator._broker import stop_broker
from modelward.updater.errors import DownloadFailedError, TargetHashError
from modelward.updater.install._install import Outcome
from modelward.updater.install._stage import Stage
from modelward.updater.transport._mqttconn import MqttConnection
from tests.conftest import FLEET, MqttWorld
from tests.integration._i16_delta import drop_index


def _wait_for(pred: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def test_full_update_over_mqtt_only(mqtt_world: MqttWorld) -> None:
    w = mqtt_world
    assert w.cfg.updater.https is None and w.cfg.updater.transports == ("mqtt",)
    w.publish("1.0.0", seed=1)
    assert w.update().outcome is Outcome.INSTALLED
    assert w.active_version() == "1.0.0"
    w.publish("2.0.0", seed=2)
    assert w.update().outcome is Outcome.INSTALLED
    assert w.active_version() == "2.0.0"
    before = w.snapshot()
    assert w.update().outcome is Outcome.UP_TO_DATE
    assert w.snapshot() == before
    assert w.served_bytes("classifier-2.0.0.tar") > 0


@pytest.mark.xdist_group("machine")
def test_missing_root_version_is_a_404_over_mqtt(mqtt_world: MqttWorld) -> None:
    # TUF probes N+1.root.json on every refresh; the bridge must say "not found", not hang.
    mqtt_world.publish("1.0.0", seed=1)
    t = time.monotonic()
    mqtt_world.update()
    assert time.monotonic() - t < 20
    assert "path='metadata/2.root.json'" in mqtt_world.bridge_log.read_text()
    assert "status=404" in mqtt_world.bridge_log.read_text()


def _daemon(w: MqttWorld) -> tuple[subprocess.Popen[str], Path]:
    log = w.tmp / "daemon.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "modelward", "-v", "--log-format", "json", "agent", "run",
         "--config", str(w.conf_path)],
        stdout=subprocess.DEVNULL, stderr=open(log, "w"), text=True,  # noqa: SIM115
    )
    return proc, log


def _daemon_lines(log: Path) -> list[dict[str, Any]]:
    out = []
    for line in log.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


def test_announcement_triggers_update_and_forgery_only_refreshes(mqtt_world: MqttWorld) -> None:
    w = mqtt_world
    w.publish("1.0.0", seed=1)
    proc, log = _daemon(w)
    try:
        _wait_for(lambda: w.active_version() == "1.0.0", 30, "the first update")
        w.publish("2.0.0", seed=2)
        time.sleep(3)  # the poll interval is an hour: nothing happens unannounced
        assert w.active_version() == "1.0.0"
        r = w.cli("announce", "--repo", str(w.repo_dir), *w.broker_args("modelward-operator"))
        assert r.returncode == 0, r.stderr
        assert "announced timestamp v3" in r.stdout
        _wait_for(lambda: w.active_version() == "2.0.0", 30, "the announced update")

        # A forged hint: valid JSON, wrong version, from an identity allowed to announce.
        before = w.snapshot()
        refreshes = sum("nothing to do" in d.get("msg", "") for d in _daemon_lines(log))
        conn = MqttConnection(w.mqtt_cfg("modelward-operator"), "forger", [])
        conn.publish(f"modelward/{FLEET}/announce",
                     json.dumps({"timestamp_version": 999, "published_at": "x"}).encode(),
                     retain=True, wait=True)
        conn.close()
        _wait_for(lambda: sum("nothing to do" in d.get("msg", "")
                              for d in _daemon_lines(log)) > refreshes, 30, "the refresh")
        assert any(d.get("timestamp_version") == 999 for d in _daemon_lines(log))
        assert w.snapshot() == before  # nothing installed, nothing moved
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
    assert any(d.get("msg") == "agent stopped" for d in _daemon_lines(log))


class _AlteringBridge(Bridge):
    def _read(self, path: str, offset: int, length: int) -> tuple[int, bytes]:
        size, data = super()._read(path, offset, length)
        if path.startswith("targets/") and data:
            data = bytes([data[0] ^ 1]) + data[1:]
        return size, data


def test_bridge_altering_blocks_is_caught(mqtt_world: MqttWorld) -> None:
    w = mqtt_world
    w.publish("1.0.0", seed=1)
    w.update()
    w.publish("2.0.0", seed=2)
    w.stop_bridge()
    evil = _AlteringBridge(w.repo_dir, w.mqtt_cfg("modelward-bridge"))
    try:
        before = w.snapshot()
        with pytest.raises(TargetHashError):
            w.update()
        after = w.snapshot()
        assert (after.record, after.counter, after.current, after.slots) == (
            before.record, before.counter, before.current, before.slots)
        assert w.active_version() == "1.0.0"
    finally:
        evil.close()


class _SlowBridge(Bridge):
    """Answers at about 20 blocks a second, so a test can act mid-download."""

    def _read(self, path: str, offset: int, length: int) -> tuple[int, bytes]:
        time.sleep(0.05)
        return super()._read(path, offset, length)


def test_broker_restart_mid_download_resumes_from_staged_offset(mqtt_world: MqttWorld) -> None:
    import os

    from modelward.agent._commands import update

    w = mqtt_world
    pad = w.builds / "pad"
    pad.write_bytes(os.urandom(48 << 20))
    served = w.publish("1.0.0", seed=1, extra=[(pad, "data/pad.bin")])
    # (a release from before chunk indexes: this is the whole-bundle stage's resume; the
    # delta's own resume is test_i16_delta_attacks / test_a16_disk_kill)
    drop_index(w.repo, w.repo_dir, "classifier/classifier-1.0.0.tar")
    total = served.stat().st_size
    w.stop_bridge()
    bridge = _SlowBridge(w.repo_dir, w.mqtt_cfg("modelward-bridge"))
    staging = w.state / "staging"
    errors: list[BaseException] = []

    def run() -> None:
        try:
            update(w.cfg)
        except BaseException as e:  # noqa: BLE001 - handed to the test thread
            errors.append(e)

    try:
        t = threading.Thread(target=run)
        t.start()
        stage = Stage(staging, staging / "incoming", served.name.split(".", 1)[0])
        _wait_for(lambda: stage.resumable(total) > total // 3, 60, "a third")
        stop_broker(w.broker_work)  # the broker goes away mid-download
        t.join(60)
        assert errors and isinstance(errors[0], DownloadFailedError), errors
        staged = stage.resumable(total)  # what the stage can rebuild
        assert 0 < staged < total
        before_restart = bridge.stats.served_bytes

        conf = w.broker_work / "mosquitto.conf"
        subprocess.run(["mosquitto", "-c", str(conf), "-d"], check=True)
        _wait_for(lambda: bridge._conn.connected.is_set() and  # noqa: SLF001
                  not bridge._conn.lost.is_set(), 30, "the bridge to reconnect")  # noqa: SLF001
        update(w.cfg)
    finally:
        bridge.close()
    assert w.active_version() == "1.0.0"
    again = bridge.stats.served_bytes - before_restart
    missing = total - staged
    print(f"bundle {total} B, staged {staged} B, re-served {again} B for {missing} missing")
    # Metadata is fetched again too (a few KiB); the bundle only from the staged offset.
    assert missing <= again <= 1.1 * missing + (1 << 20)


def test_garbage_on_the_response_topic_is_ignored(
    mqtt_world: MqttWorld, caplog: pytest.LogCaptureFixture
) -> None:
    from modelward.updater.transport._mqtt import publish_properties

    w = mqtt_world
    pad = w.builds / "pad"  # a bundle of several blocks: the response topic is subscribed
    pad.write_bytes(os.urandom(6 << 20))  # only while a fetch runs (issue 13)
    w.publish("1.0.0", seed=1, extra=[(pad, "data/pad.bin")])
    topic = f"modelward/{FLEET}/devices/dev-1/repo/resp"
    stop = threading.Event()
    # Only bridges may write response topics; a rogue or broken bridge does this:
    rogue = MqttConnection(w.mqtt_cfg("modelward-bridge"), "rogue", [])

    def flood() -> None:
        i = 0
        while not stop.is_set():
            kind = i % 4
            if kind == 0:
                rogue.publish(topic, b"\x00garbage")  # no properties at all
            elif kind == 1:
                p = publish_properties()
                p.CorrelationData = b"x" * 16  # someone else's correlation
                p.UserProperty = [("status", "200"), ("offset", "0"), ("size", "5")]
                rogue.publish(topic, b"hello", p)
            elif kind == 2:
                p = publish_properties()
                p.CorrelationData = b"\xff" * 3
                # the largest the broker admits (a 2 MiB one ends the rogue's connection:
                # max_packet_size, tests/integration/test_i14_broker.py)
                rogue.publish(topic, b"\x00" * (MAX_PACKET - 1024), p)
            else:
                p = publish_properties()
                p.CorrelationData = b"y" * 16
                p.UserProperty = [("status", "404")]
                rogue.publish(topic, b"", p)
            i += 1
            time.sleep(0.002)

    t = threading.Thread(target=flood)
    t.start()
    try:
        with caplog.at_level(logging.WARNING, logger="modelward.updater.transport._mqtt"):
            assert w.update().outcome is Outcome.INSTALLED
    finally:
        stop.set()
        t.join()
        rogue.close()
    assert w.active_version() == "1.0.0"
    assert any("unknown correlation data" in r.getMessage() for r in caplog.records)


def _client(w: MqttWorld, user: str,
            identity: str) -> tuple[mqtt.Client, dict[Any, Any], list[str]]:
    from modelward.updater._config import fetch_client_id, fetch_username, listen_client_id

    got: list[str] = []
    res: dict[Any, Any] = {}
    login, cid = ((fetch_username(user), fetch_client_id(user)) if identity == "fetch"
                  else (user, listen_client_id(user)))
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=cid, protocol=mqtt.MQTTv5)
    c.tls_set(ca_certs=str(w.ca.cert))
    assert w.creds is not None
    c.username_pw_set(login, w.creds[user].read_text().strip())
    c.on_publish = lambda _c, _u, mid, rc, _p: res.__setitem__(mid, rc)
    c.on_message = lambda _c, _u, m: got.append(m.topic)
    c.connect("127.0.0.1", w.broker_port)
    c.loop_start()
    return c, res, got


def test_acl_keeps_devices_to_their_own_topics(mqtt_world: MqttWorld) -> None:
    w = mqtt_world
    f = f"modelward/{FLEET}"
    bl, blres, blgot = _client(w, "dev-2", "listen")
    bf, bfres, bfgot = _client(w, "dev-2", "fetch")
    attacker = [_client(w, "dev-1", "listen"), _client(w, "dev-1", "fetch")]
    try:
        time.sleep(0.5)
        # B publishes its retained status; A tries to read B's status and responses.
        info = bl.publish(f"{f}/devices/dev-2/status", b"{}", qos=1, retain=True)
        info.wait_for_publish(5)
        assert not blres[info.mid].is_failure
        for a, _, _ in attacker:
            a.subscribe([(f"{f}/devices/dev-2/status", 1), (f"{f}/devices/dev-2/repo/resp", 1),
                         (f"{f}/devices/+/status", 1), (f"{f}/#", 1)])
        for b in (bl, bf):
            b.subscribe([(f"{f}/devices/dev-2/status", 1), (f"{f}/devices/dev-2/repo/resp", 1)])
        # A publishing its request as B, and announcing, are refused by the broker.
        for a, ares, _ in attacker:
            for topic in (f"{f}/repo/req/dev-2", f"{f}/announce", f"{f}/devices/dev-2/status",
                          f"{f}/devices/dev-1/repo/resp"):
                info = a.publish(topic, b"{}", qos=1)
                info.wait_for_publish(5)
                assert ares[info.mid].is_failure, topic
                assert ares[info.mid].getName() == "Not authorized"
        # B's listener may not ask; its fetcher gets a response to a request of its own.
        body = json.dumps({"path": "metadata/1.root.json", "offset": 0,
                           "length": 100}).encode()
        info = bl.publish(f"{f}/repo/req/dev-2", body, qos=1, properties=_props_for("dev-2"))
        info.wait_for_publish(5)
        assert blres[info.mid].getName() == "Not authorized"
        info = bf.publish(f"{f}/repo/req/dev-2", body, qos=1, properties=_props_for("dev-2"))
        info.wait_for_publish(5)
        time.sleep(1.5)
        assert f"{f}/devices/dev-2/repo/resp" in bfgot  # the control: B reads its answer
        assert f"{f}/devices/dev-2/repo/resp" not in blgot  # ... on its fetcher only
        # ... but not its own status: a device reads no topic it writes (issue 14: else
        # it fills its own parked sessions with whatever it publishes)
        assert f"{f}/devices/dev-2/status" not in bfgot + blgot
        for _, _, agot in attacker:
            assert not [t for t in agot if "dev-2" in t], agot  # A saw nothing of B's
    finally:
        for c in (bl, bf, *(a for a, _, _ in attacker)):
            c.loop_stop()


def _props_for(device: str) -> Any:
    from modelward.updater.transport._mqtt import publish_properties

    p = publish_properties()
    p.ResponseTopic = f"modelward/{FLEET}/devices/{device}/repo/resp"
    p.CorrelationData = b"c" * 16
    return p


def test_bridge_refuses_paths_outside_the_repository(mqtt_world: MqttWorld) -> None:
    from modelward.updater.transport._mqtt import MqttFetcher

    w = mqtt_world
    (w.tmp / "secret.txt").write_text("not served")
    f = MqttFetcher(w.mqtt_cfg("dev-1"))
    try:
        for url in ("mqtt://repo/../secret.txt", "mqtt://repo/metadata/../../secret.txt",
                    "mqtt://repo/keys/root.pem", "mqtt://repo/metadata/nope.json"):
            with pytest.raises(Exception) as ei:  # noqa: PT011 - either refusal is fine
                b"".join(f.fetch(url))
            assert "not found" in str(ei.value) or "status 400" in str(ei.value), url
        assert b"".join(f.fetch("mqtt://repo/metadata/1.root.json")).startswith(b"{")
    finally:
        f.close()
    assert "refusing a request" in w.bridge_log.read_text()


def test_auto_transport_falls_back_to_mqtt(mqtt_world: MqttWorld) -> None:
    w = mqtt_world
    text = w.conf_path.read_text().replace(
        "[mqtt]", '[https]\nmetadata_url = "https://127.0.0.1:1/metadata/"\n'
                  'targets_url = "https://127.0.0.1:1/targets/"\n\n[mqtt]')
    w.conf_path.write_text(text)
    assert w.cfg.updater.transports == ("https", "mqtt")
    w.publish("1.0.0", seed=1)
    assert w.update().outcome is Outcome.INSTALLED  # https is down; mqtt delivers


def test_connections_send_small_packets_without_delay(mqtt_world: MqttWorld) -> None:
    """Block requests and metadata answers are request/response: with Nagle's algorithm
    each waited for a delayed ACK (~90 ms per metadata file). Both ends turn it off (the
    broker through ``set_tcp_nodelay``, which every broker in these tests runs with)."""
    import socket

    conn = MqttConnection(mqtt_world.mqtt_cfg("modelward-bridge"), "nodelay-probe", [])
    try:
        sock = conn.client.socket()
        assert isinstance(sock, socket.socket)
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
    finally:
        conn.close()
    conf = (mqtt_world.broker_work / "mosquitto.conf").read_text().splitlines()
    assert "set_tcp_nodelay true" in conf


def test_broker_config_cli(tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "modelward", "fleet", "broker-config", "--fleet",
                        "f9", "--devices", "a,b", "-o", str(tmp_path)], capture_output=True,
                       text=True, check=False)
    assert r.returncode == 0, r.stderr
    dynsec = json.loads((tmp_path / "dynamic-security.json").read_text())
    fetcher = next(c for c in dynsec["clients"] if c["username"] == "a:fetch")
    assert fetcher["clientid"] == "a-fetch"
    assert (tmp_path / "credentials" / "a").stat().st_mode & 0o077 == 0
    st = (tmp_path / "dynamic-security.json").stat()  # 0600, or 0640 for mosquitto's group
    assert st.st_mode & 0o777 == 0o600 or (
        st.st_mode & 0o777 == 0o640 and st.st_gid == grp.getgrnam("mosquitto").gr_gid)
    settings = (tmp_path / "modelward.conf").read_text().splitlines()
    assert "set_tcp_nodelay true" in settings and "allow_anonymous false" in settings
    assert (f"plugin_opt_config_file {(tmp_path / 'dynamic-security.json').resolve()}"
            in settings)
    assert not any(s.startswith(("acl_file", "password_file")) for s in settings)
    bad = subprocess.run([sys.executable, "-m", "modelward", "fleet", "broker-config",
                          "--fleet", "f9", "--devices", "a/#", "-o", str(tmp_path / "x")],
                         capture_output=True, text=True, check=False)
    assert bad.returncode == 1 and "must be 1-64" in bad.stderr


class _UnreliableBridge(Bridge):
    """Drops, duplicates and reorders its answers (deterministically)."""

    def __init__(self, *a: Any, **kw: Any) -> None:
        self.n = 0
        self.held: tuple[str, bytes, Any] | None = None
        self.dropped = self.duplicated = self.reordered = 0
        super().__init__(*a, **kw)

    def _send(self, topic: str, data: bytes, props: Any) -> None:
        self.n += 1
        if self.n % 7 == 3:
            self.dropped += 1
            return
        if self.n % 5 == 1:
            self.duplicated += 1
            super()._send(topic, data, props)
        if self.n % 4 == 2 and self.held is None:
            self.held = (topic, data, props)  # sent after the next answer
            self.reordered += 1
            return
        super()._send(topic, data, props)
        if self.held is not None:
            held, self.held = self.held, None
            super()._send(*held)


def test_fetcher_survives_lost_duplicated_and_reordered_blocks(mqtt_world: MqttWorld) -> None:
    import dataclasses
    import os

    from modelward.updater.transport._mqtt import MqttFetcher

    w = mqtt_world
    pad = w.builds / "pad"
    pad.write_bytes(os.urandom(12 << 20))
    served = w.publish("1.0.0", seed=1, extra=[(pad, "data/pad.bin")])
    w.stop_bridge()
    bad = _UnreliableBridge(w.repo_dir, w.mqtt_cfg("modelward-bridge"))
    cfg = dataclasses.replace(w.mqtt_cfg("dev-1"), block_size=256 << 10, block_timeout=0.5,
                              window=8)
    f = MqttFetcher(cfg)
    try:
        data = b"".join(f.fetch(f"mqtt://repo/targets/classifier/{served.name}"))
    finally:
        f.close()
        bad.close()
    assert data == served.read_bytes()
    assert bad.dropped and bad.duplicated and bad.reordered


def test_bridge_refuses_blocks_over_its_bound(mqtt_world: MqttWorld) -> None:
    import dataclasses

    from tuf.api.exceptions import DownloadHTTPError

    from modelward.updater.transport._mqtt import MqttFetcher

    w = mqtt_world
    f = MqttFetcher(dataclasses.replace(w.mqtt_cfg("dev-1"), block_size=4 << 20))
    try:
        with pytest.raises(DownloadHTTPError) as ei:
            b"".join(f.fetch("mqtt://repo/metadata/1.root.json"))
        assert ei.value.status_code == 400
    finally:
        f.close()
    assert "refusing a request from dev-1" in w.bridge_log.read_text()


class _FormatOneBridge(Bridge):
    """A bridge from before block format 2: status, offset and size as user properties."""

    formats = (1,)


class _RecordingBridge(Bridge):
    sent: list[tuple[bytes, object]]

    def _send(self, topic: str, data: bytes, props: Any) -> None:
        self.sent.append((data[:64], getattr(props, "UserProperty", None)))
        super()._send(topic, data, props)


@pytest.mark.parametrize("bridge_cls", [_FormatOneBridge, _RecordingBridge])
def test_blocks_in_either_format_install_the_same_model(
    mqtt_world: MqttWorld, bridge_cls: type[Bridge],
) -> None:
    """A device reads format 2 (header in the payload) from a current bridge and format 1
    (user properties) from an older one; the model and its fingerprint are the same."""
    from modelward.updater.transport._mqtt import BLOCK_HEADER, BLOCK_MAGIC

    w = mqtt_world
    w.publish("1.0.0", seed=1)
    w.stop_bridge()
    bridge = bridge_cls(w.repo_dir, w.mqtt_cfg("modelward-bridge"))
    bridge.sent = []  # type: ignore[attr-defined]
    try:
        assert w.update().outcome is Outcome.INSTALLED
    finally:
        bridge.close()
    assert w.active_version() == "1.0.0"
    if bridge_cls is _RecordingBridge:
        sent = bridge.sent  # type: ignore[attr-defined]
        assert sent and all(head[:4] == BLOCK_MAGIC and props is None for head, props in sent)
        statuses = {BLOCK_HEADER.unpack(head[:BLOCK_HEADER.size])[1] for head, _ in sent}
        assert statuses == {200, 404}  # the blocks, and the next root that is not there
