"""a10-dynsec, a careless operator: re-running `fleet broker-config` with another device
list, then restarting mosquitto (what docs/brokers.md "Changes" says to do), real
mosquitto with the generated dynamic-security configuration.

Worked (fixed): adding one device strands every device already installed.
``write_broker_config`` draws a new random password for every identity on each run
(``publisher/_broker_config.py``, ``passwords[user] = secrets.token_urlsafe(24)``), so
after the restart dev-1, whose credential file was installed from the first run, is
refused (CONNACK 5) on both identities: each device of the fleet loses its announcements
and its MQTT transport until someone installs a new credential on it by hand, for the
most routine change there is (one device more).

Resisted (passing test): a device dropped from the list loses access at the restart (its
client no longer exists) and no credential of the old run logs in. Its old credential
file was left behind in ``credentials/`` (a dead password); the fix deletes it, and the
test now asserts that (it asserted the file stayed, the behaviour the brief changed).
"""

from __future__ import annotations

import socket
import ssl
import struct
from pathlib import Path

from modelward.publisher._broker_config import write_broker_config
from modelward.simulator._broker import start_broker, stop_broker
from modelward.simulator._pki import CertPair
from modelward.updater._config import fetch_client_id, fetch_username, listen_client_id
from tests._helpers import mqtt_str as _s
from tests._helpers import mqtt_varint as _varint
from tests.integration.test_a14_device_props import _recv_packet

FLEET = "f10"


def _code(port: int, ca: Path, login: str, password: str, cid: str) -> int:
    """Raw MQTT 3.1.1 CONNECT; the CONNACK return code (-1: connection ended)."""
    ctx = ssl.create_default_context(cafile=str(ca))
    sock = ctx.wrap_socket(socket.create_connection(("127.0.0.1", port), 10),
                           server_hostname="127.0.0.1")
    body = (_s(b"MQTT") + bytes([4, 0xC2]) + struct.pack(">H", 60) + _s(cid.encode())
            + _s(login.encode()) + _s(password.encode()))
    try:
        sock.sendall(b"\x10" + _varint(len(body)) + body)
        ack = _recv_packet(sock)
    except (OSError, IndexError):
        return -1
    finally:
        sock.close()
    return ack[2]


def _codes(tmp: Path, pki: tuple[CertPair, CertPair], devices: list[str],
           installed: dict[str, str]) -> dict[str, tuple[int, int]]:
    """Run broker-config again with ``devices`` and (re)start mosquitto with it; the
    CONNACK codes of each ``installed`` device credential, (listener, fetcher)."""
    ca, server = pki
    bc = write_broker_config(FLEET, devices, tmp / "bc")
    work = tmp / f"broker-{len(list(tmp.glob('broker-*')))}"
    h = start_broker(work, server, ca.cert, bc.conf)
    try:
        return {d: (_code(h.port, ca.cert, d, pw, listen_client_id(d)),
                    _code(h.port, ca.cert, fetch_username(d), pw, fetch_client_id(d)))
                for d, pw in installed.items()}
    finally:
        stop_broker(work)


def _first_run(tmp: Path, devices: list[str]) -> dict[str, str]:
    """broker-config's first run; the credential each device had installed from it."""
    bc = write_broker_config(FLEET, devices, tmp / "bc")
    return {d: bc.credentials[d].read_text().strip() for d in devices}


def test_a10_adding_a_device_keeps_the_installed_devices_credentials(
        tmp_path: Path, pki: tuple[CertPair, CertPair]) -> None:
    installed = _first_run(tmp_path, ["dev-1", "dev-2"])
    codes = _codes(tmp_path, pki, ["dev-1", "dev-2", "dev-3"], installed)
    assert codes == {"dev-1": (0, 0), "dev-2": (0, 0)}, codes


def test_a10_a_dropped_device_loses_access_at_the_restart(
        tmp_path: Path, pki: tuple[CertPair, CertPair]) -> None:
    installed = _first_run(tmp_path, ["dev-1", "dev-2"])
    codes = _codes(tmp_path, pki, ["dev-1"], installed)
    assert codes["dev-2"] == (5, 5), codes
    # the dropped device's old file is deleted (it was a dead password, no access)
    assert not (tmp_path / "bc" / "credentials" / "dev-2").exists()
