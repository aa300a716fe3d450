"""a10-dynsec, a careless operator: the generated files with mosquitto as Debian runs it
(started as root, it drops to user ``mosquitto`` before it loads the plugin's file).

Worked (fixed): ``broker-config`` writes ``dynamic-security.json`` 0600, owned by
whoever ran it (``publisher/_broker_config.py``, ``write_atomic(dynsec, ..., mode=0o600)``),
and nothing says the broker's user must own it. mosquitto 2.0.11 then logs "Error loading
Dynamic security plugin config: File is not readable", starts anyway ("running"), and
refuses every client (CONNACK 5): the whole fleet loses MQTT while systemd shows the broker
healthy. The files it replaced failed loudly: an unreadable 0600 ``password_file`` made
mosquitto exit at start (code 13, "Unable to open pwfile"). The correct outcome is one of
the two: the broker's own user can read what broker-config wrote (so dev-1 logs in), or
the broker does not come up.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import struct
import subprocess
import tempfile
from pathlib import Path

import pytest

from modelward.publisher._broker_config import write_broker_config
from modelward.simulator._proc import free_port, wait_for_port
from tests._helpers import mqtt_str


def _has_mosquitto_user() -> bool:
    try:
        pwd.getpwnam("mosquitto")
    except KeyError:
        return False
    return True


@pytest.mark.skipif(os.geteuid() != 0 or not _has_mosquitto_user()
                    or shutil.which("mosquitto") is None,
                    reason="needs root (mosquitto drops to user mosquitto) and mosquitto")
def test_a10_generated_config_works_with_a_broker_that_drops_privileges() -> None:
    # a directory the broker's user may traverse, as /etc/mosquitto (pytest's are 0700):
    # only the file's own mode stands between mosquitto and it
    d = Path(tempfile.mkdtemp(prefix="a10dynsec-", dir="/tmp"))
    d.chmod(0o755)
    try:
        _run(d)
    finally:
        shutil.rmtree(d)


def _run(d: Path) -> None:
    bc = write_broker_config("f1", ["dev-1"], d / "bc")
    assert (d / "bc").stat().st_mode & 0o005 == 0o005
    port = free_port()
    conf = d / "mosquitto.conf"  # no `user` line: as root, mosquitto drops to `mosquitto`
    conf.write_text(f"persistence false\nlog_dest stderr\n{bc.conf.read_text()}\n"
                    f"listener {port} 127.0.0.1\n")
    proc = subprocess.Popen(["mosquitto", "-c", str(conf)], stderr=subprocess.PIPE,
                            text=True)
    try:
        if not wait_for_port(port, 5):
            assert proc.poll() is not None  # did not come up: a loud failure, fine
            return
        pw = bc.credentials["dev-1"].read_text().strip().encode()
        body = (mqtt_str(b"MQTT") + bytes([4, 0xC2]) + struct.pack(">H", 60)
                + mqtt_str(b"dev-1-listen") + mqtt_str(b"dev-1") + mqtt_str(pw))
        with socket.create_connection(("127.0.0.1", port), 5) as s:
            s.sendall(b"\x10" + bytes([len(body)]) + body)
            ack = s.recv(4)
        assert ack == b"\x20\x02\x00\x00", ack.hex()  # dev-1 logged in
    finally:
        proc.terminate()
        proc.communicate(timeout=10)
