"""Issue 14 finding 6 / must-show 8 through the real stack: mosquitto with the generated
broker config (passwords, ACL), each device publishing its retained status with its own
credentials, and the real ``modelward fleet status`` command reading them.

Hostile devices send validly signed reports of odd shapes, NaN, 20000-deep JSON, a huge
counter and control characters. ``evil-tty``, the one whose strings try to take over the
terminal (OSC retitle, ``ESC[8m``, a newline forging a row, bidi override), signs with its
own real TPM identity key (swtpm); the others sign with their own software P-256 keys,
exactly as a TPM identity key signs (the operator cannot tell). ``fleet status`` must print
every honest device's row right, escape the hostile strings, show each bad report as one
``REJECTED`` row, exit 0, and ``--json`` must parse with a strict parser. The operator's
fleet state (enrolled keys, newest seq seen) moves only for the reports it believed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from modelward.publisher._broker_config import write_broker_config
from modelward.publisher._fleet import add_device
from modelward.simulator._broker import start_broker, stop_broker
from modelward.simulator._pki import CertPair
from modelward.simulator._swtpm import SwtpmHandle
from modelward.trust._report import sign_report
from modelward.trust._tpm import Tpm
from modelward.updater._config import MqttConfig
from modelward.updater.transport._mqttconn import device_connection
from tests.conftest import tree_digest
from tests.unit.test_i14_fleetview import (
    FORGED_ROW,
    HIDE,
    ODD_SHAPES,
    OSC_RETITLE,
    WIRE_ATTACKS,
    good_report,
    hostile_strings_report,
)
from tests.unit.test_report import _SoftKey

FLEET = "f1"
HONEST = ["dev-1", "dev-2"]
SHAPES = {"evil-noname": dict(ODD_SHAPES)["active without name"],
          "evil-errstr": dict(ODD_SHAPES)["last_error as a string"],
          "evil-huge": dict(ODD_SHAPES)["counter huge"],
          "evil-list": dict(ODD_SHAPES)["counters as a list"],
          "evil-surrogate": dict(ODD_SHAPES)["lone surrogate in state"]}
WIRES = {"evil-nan": WIRE_ATTACKS["NaN poll interval"],
         "evil-deep": WIRE_ATTACKS["20000-deep JSON"]}
TTY = "evil-tty"
DEVICES = sorted([*HONEST, *SHAPES, *WIRES, TTY])


@dataclass
class Fleet:
    tmp: Path
    broker_port: int
    ca: Path
    creds: dict[str, Path]
    fleet_dir: Path

    def cfg(self, user: str) -> MqttConfig:
        return MqttConfig(host="127.0.0.1", port=self.broker_port, fleet=FLEET,
                          client_name=user, ca_file=str(self.ca),
                          password=self.creds[user].read_text().strip())

    def publish_as(self, device: str, payload: bytes) -> None:
        """Retained, on the device's own status topic, with its own credentials."""
        conn = device_connection(self.cfg(device), "listen", [])
        try:
            conn.publish(f"modelward/{FLEET}/devices/{device}/status", payload, retain=True,
                         wait=True)
        finally:
            conn.close()

    def status(self, *extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "modelward", "fleet", "status", "--fleet-dir",
             str(self.fleet_dir), "--wait", "1", *extra, "--broker",
             f"mqtts://127.0.0.1:{self.broker_port}", "--fleet", FLEET, "--tls-ca",
             str(self.ca), "--username", "modelward-operator", "--password-file",
             str(self.creds["modelward-operator"])],
            capture_output=True, text=True, env=dict(os.environ), timeout=120, check=False)


@pytest.fixture
def fleet(tmp_path: Path, pki: tuple[CertPair, CertPair]) -> Iterator[Fleet]:
    ca, server = pki
    bc = write_broker_config(FLEET, DEVICES, tmp_path / "broker-config")
    broker = start_broker(tmp_path / "broker", server, ca.cert, bc.conf)
    try:
        yield Fleet(tmp_path, broker.port, ca.cert, bc.credentials, tmp_path / "fleet")
    finally:
        stop_broker(tmp_path / "broker")


def _strict_loads(text: str) -> Any:
    def no(name: str) -> Any:
        raise ValueError(f"{name} in --json output")

    return json.loads(text, parse_constant=no)


def test_hostile_signed_reports_are_rejected_rows_escaped_and_strict_json_and_exit_0(
        fleet: Fleet, swtpm: SwtpmHandle) -> None:
    tpm = Tpm(swtpm.tcti, auth=os.urandom(32))
    try:
        tpm.provision()  # evil-tty's own TPM identity key
        add_device(fleet.fleet_dir, TTY, tpm.identity_public_pem())
        tty_report = hostile_strings_report(TTY, now=time.time())
        fleet.publish_as(TTY, sign_report(tty_report, tpm))
    finally:
        tpm.close()
    keys = {d: _SoftKey() for d in DEVICES if d != TTY}
    for d, k in keys.items():
        add_device(fleet.fleet_dir, d, k.identity_public_pem())
    honest = {d: good_report(d, now=time.time()) for d in HONEST}
    for d, r in honest.items():
        fleet.publish_as(d, sign_report(r, keys[d]))
    for d, changes in SHAPES.items():
        fleet.publish_as(d, sign_report(good_report(d, now=time.time(), **changes), keys[d]))
    for d, wire in WIRES.items():
        fleet.publish_as(d, wire(keys[d], d))
    registry = tree_digest(fleet.fleet_dir / "devices")

    table = fleet.status()
    assert table.returncode == 0, table.stderr
    assert "Traceback" not in table.stderr
    lines = table.stdout.rstrip("\n").split("\n")
    assert len(lines) == len(DEVICES) + 1, table.stdout  # no forged row
    assert [line.split(" ")[0] for line in lines[1:]] == DEVICES
    out = table.stdout
    for raw in ("\x1b", "\x07", "\u202e", "\u200b", "\r", "\x9b", "\x00"):
        assert raw not in out, ascii(raw)
    assert all(c == "\n" or c.isprintable() for c in out)
    rows = {line.split(" ")[0]: line for line in lines[1:]}
    tty = rows[TTY]
    for d in HONEST:
        # (issue 17: the fleet state first; FetchError is their last error: failed)
        assert rows[d].split()[1:6] == ["failed", "ok", "ok", "classifier", "1.0.0"], rows[d]
        assert "FetchError" in rows[d] and "REJECTED" not in rows[d], rows[d]
    assert tty.split()[2:4] == ["ok", "ok"]  # right shape, strings escaped
    for d in [*SHAPES, *WIRES]:
        assert f"{d}  " in rows[d] and "REJECTED: " in rows[d], rows[d]
    assert "REJECTED: signed, but report field active.name is missing" in rows["evil-noname"]
    assert "last_error is a string, not an object" in rows["evil-errstr"]
    assert "nested deeper than 4" in rows["evil-deep"]
    assert "NaN is not JSON" in rows["evil-nan"]
    assert "report field state has a lone surrogate (U+D800" in rows["evil-surrogate"]
    assert "\\x1b]0;pwned\\x07active" in tty and "\\x1b[8mclassifier" in tty
    assert "1.0.0\\u202e0.9" in tty and "E\\ndev-9 \\x20ok \\x20ok \\x20classifier 6.6.6" in tty

    js = fleet.status("--json")
    assert js.returncode == 0, js.stderr
    assert all(" " <= c <= "~" for c in js.stdout.rstrip("\n"))  # ASCII, no raw controls
    doc = {row["device"]: row for row in _strict_loads(js.stdout)}
    assert sorted(doc) == DEVICES
    for d, r in honest.items():
        assert (doc[d]["status"], doc[d]["verified"], doc[d]["report"]) == ("ok", True, r)
    assert doc[TTY]["report"] == tty_report  # kept exact, escaped only by JSON
    assert doc[TTY]["report"]["state"] == OSC_RETITLE + "active"
    assert HIDE in doc[TTY]["report"]["active"]["name"]
    assert FORGED_ROW in doc[TTY]["report"]["last_error"]["type"]
    for d in [*SHAPES, *WIRES]:
        assert (doc[d]["status"], doc[d]["verified"], doc[d]["report"]) == \
            ("REJECTED", False, {})
        assert len(doc[d]["problem"]) <= 210

    # the operator's fleet state: enrolled keys unchanged, newest seq only for believed rows
    assert tree_digest(fleet.fleet_dir / "devices") == registry
    assert sorted(p.stem for p in (fleet.fleet_dir / "seen").glob("*.json")) == \
        sorted([*HONEST, TTY])
