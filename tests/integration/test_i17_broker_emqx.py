"""Issue 17, "Clustered brokers": ``fleet broker-config --format emqx`` emits the same
identities, passwords and ACL as the mosquitto configuration.

No EMQX runs here (none is packaged for Debian 12, and nothing may be downloaded), so
the EMQX side is checked as far as it can be:

* the ACL: every identity's publish and subscribe decisions on a set of probe topics,
  decided by real mosquitto with the generated dynamic-security file (PUBACK and SUBACK
  reason codes), equal the decisions of the emitted EMQX rules evaluated as EMQX
  documents them (first matching rule wins, ``no_match = deny``, MQTT filter matching);
* the users: each hash verifies the identity's credential file by EMQX's documented
  PBKDF2 (hex, the salt string's bytes), and the same credential files log in to
  mosquitto;
* the settings carry the byte bounds the mosquitto settings carry.
"""

from __future__ import annotations

import hashlib
import json
import re
import ssl
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from modelward.publisher._broker_config import MAX_PACKET, write_broker_config
from modelward.simulator._broker import start_broker, stop_broker
from modelward.simulator._pki import CertPair
from modelward.updater._config import fetch_client_id, fetch_username, listen_client_id

FLEET = "fx"
F = f"modelward/{FLEET}"
DEVICES = ["dev-1", "dev-2"]
TOPICS = [f"{F}/announce", f"{F}/devices/dev-1/status", f"{F}/devices/dev-2/status",
          f"{F}/repo/req/dev-1", f"{F}/repo/req/dev-2", f"{F}/devices/dev-1/repo/resp",
          f"{F}/devices/dev-2/repo/resp", f"{F}/other", "elsewhere/x"]
FILTERS = [*TOPICS, f"{F}/repo/req/+", f"{F}/devices/+/status", f"{F}/devices/+/repo/resp",
           f"$share/any-group-0123456789/{F}/repo/req/+", f"{F}/#", "#", "$SYS/#",
           "$CONTROL/dynamic-security/#"]
IDENTITIES = {  # username -> client id (None: any)
    "modelward-bridge": None, "modelward-operator": None,
    "dev-1": listen_client_id("dev-1"), fetch_username("dev-1"): fetch_client_id("dev-1")}


def _matches(rule: str, topic: str) -> bool:
    """MQTT filter ``rule`` matches topic (or filter) ``topic``: ``+`` one level, ``#``
    the rest; a wildcard in ``topic`` is matched only by the same wildcard or a wider
    one (EMQX: a subscription is allowed when its filter is within the rule's)."""
    r, t = rule.split("/"), topic.split("/")
    for i, part in enumerate(r):
        if part == "#":
            return True
        if i >= len(t):
            return False
        if part == "+":
            if t[i] == "#":
                return False
            continue
        if part != t[i]:
            return False
    return len(r) == len(t)


def _emqx_allows(rules: list[dict[str, Any]], action: str, topic: str) -> bool:
    for rule in rules:
        if rule["action"] in (action, "all") and _matches(rule["topic"], topic):
            return rule["permission"] == "allow"
    return False  # no_match = deny


def _mosquitto_decisions(port: int, ca: Path, user: str, client_id: str | None,
                         password: str) -> dict[tuple[str, str], bool]:
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id or f"{user}-probe",
                    protocol=mqtt.MQTTv5)
    c.tls_set_context(ssl.create_default_context(cafile=str(ca)))
    c.username_pw_set(user, password)
    done: dict[int, list[Any]] = {}
    cv = threading.Condition()

    def on_connect(*_a: Any) -> None:
        with cv:
            done[-1] = [True]
            cv.notify_all()

    def on_subscribe(_c: Any, _u: Any, mid: int, rcs: list[Any], _p: Any) -> None:
        with cv:
            done[mid] = rcs
            cv.notify_all()

    def on_publish(_c: Any, _u: Any, mid: int, rc: Any, _p: Any) -> None:
        with cv:
            done[mid] = [rc]
            cv.notify_all()

    c.on_connect, c.on_subscribe, c.on_publish = on_connect, on_subscribe, on_publish
    c.connect("127.0.0.1", port)
    c.loop_start()
    out: dict[tuple[str, str], bool] = {}
    try:
        with cv:
            assert cv.wait_for(lambda: -1 in done, 10), f"{user} did not connect"
        for f in FILTERS:
            mid = c.subscribe(f, qos=1)[1]
            with cv:
                assert cv.wait_for(lambda m=mid: m in done, 10), (user, f)  # type: ignore[misc]
            out["subscribe", f] = not done[mid][0].is_failure
            if not done[mid][0].is_failure:
                c.unsubscribe(f)
        for t in TOPICS:
            props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            info = c.publish(t, b"probe", qos=1, properties=props)
            with cv:
                assert cv.wait_for(lambda m=info.mid: m in done, 10), (user, t)  # type: ignore[misc]
            out["publish", t] = not done[info.mid][0].is_failure
    finally:
        c.disconnect()
        c.loop_stop()
    return out


@pytest.mark.xdist_group("machine")
def test_i17_emqx_rules_decide_as_mosquitto_does_and_the_hashes_verify(
        tmp_path: Path, pki: tuple[CertPair, CertPair]) -> None:
    ca, server = pki
    out = tmp_path / "bc"
    mosq = write_broker_config(FLEET, DEVICES, out)
    # the CLI, as an operator runs it, into the same directory: the passwords are kept
    r = subprocess.run([sys.executable, "-m", "modelward", "fleet", "broker-config",
                        "--fleet", FLEET, "--devices", ",".join(DEVICES), "-o", str(out),
                        "--format", "emqx"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "emqx" in r.stdout and "Traceback" not in r.stderr
    emqx = out / "emqx"
    assert (emqx / "users.json").stat().st_mode & 0o077 == 0  # hashes: owner only
    users = {u["user_id"]: u for u in json.loads((emqx / "users.json").read_text())}
    rules = {u["username"]: u["rules"] for u in json.loads(
        (emqx / "authz-rules.json").read_text())}
    passwords = {u: p.read_text().strip() for u, p in mosq.credentials.items()}
    # every identity, both of each device's, with the password of its credential file
    assert set(users) == set(rules) == {"modelward-bridge", "modelward-operator",
                                        *DEVICES, *map(fetch_username, DEVICES)}
    for name, u in users.items():
        pw = passwords[name.removesuffix(":fetch")]
        want = hashlib.pbkdf2_hmac("sha512", pw.encode(), u["salt"].encode(),
                                   int(re.search(r"iterations = (\d+)", (
                                       emqx / "modelward.hocon").read_text())[1]), 64).hex()
        assert u["password_hash"] == want and u["is_superuser"] is False, name
    hocon = (emqx / "modelward.hocon").read_text()
    assert "no_match = deny" in hocon and f"max_packet_size = {MAX_PACKET}B" in hocon
    assert "mqueue_store_qos0 = false" in hocon
    # the mosquitto files of the first run are untouched by the emqx run
    assert json.loads(mosq.dynsec.read_text())["roles"]

    broker = start_broker(tmp_path / "broker", server, ca.cert, mosq.conf)
    try:
        for user, client_id in IDENTITIES.items():
            real = _mosquitto_decisions(broker.port, ca.cert, user, client_id,
                                        passwords[user.removesuffix(":fetch")])
            emqx_says = {(a, t): _emqx_allows(rules[user], a, t) for a, t in real}
            differ = {k: (real[k], emqx_says[k]) for k in real if real[k] != emqx_says[k]}
            assert not differ, f"{user}: (mosquitto, emqx) differ on {differ}"
            # and the probe set is not vacuous: each identity may do something, not all
            assert any(real.values()) and not all(real.values()), user
    finally:
        stop_broker(tmp_path / "broker")
