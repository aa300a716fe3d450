"""a10-dynsec, a careless operator: the device ids `fleet broker-config` accepts.

Worked (fixed: fullmatch): ``check_id`` (``publisher/_broker_config.py`` ``_ID``) ends its
pattern with ``$``, which also matches before a trailing newline: ``"dev-1\\n"`` (and a
65-character id ending in one) passes as a device id or fleet name. ``broker-config``
then writes a dynamic-security client ``dev-1\\n`` next to ``dev-1`` (the duplicate check
compares the strings, which differ), a credential file ``credentials/dev-1\\n`` and, for
a fleet ``f1\\n``, every ACL topic under ``modelward/f1\\n/``. mosquitto refuses a control
character in a username or topic (checked with 2.0.11 and the generated config: the
CONNECT as ``dev-1\\n`` with its own password ends in a protocol error), so that device can
never connect and, with such a fleet name, no device of the fleet can subscribe its
announcement: a configuration that strands devices, written without an error.

Worked (fixed: refused as duplicates): ids that differ only in case (``Dev-1``, ``dev-1``) are two
devices for mosquitto but one credential file on a case-insensitive filesystem (macOS,
Windows, the FAT/exFAT stick a credential is carried on): the second file written
replaces the first, so the device installed from ``credentials/Dev-1`` holds ``dev-1``'s
password, and with it ``dev-1``'s identity. broker-config should refuse such a list as
duplicates, as it refuses exact ones.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from modelward.publisher._broker_config import check_id, write_broker_config
from modelward.publisher.errors import OperatorInputError


@pytest.mark.parametrize("fleet,devices", [("f1", ["dev-1", "dev-1\n"]),
                                           ("f1\n", ["dev-1"]),
                                           ("f1", ["d" * 64 + "\n"])])
def test_a10_broker_config_refuses_an_id_with_a_trailing_newline(
        tmp_path: Path, fleet: str, devices: list[str]) -> None:
    with pytest.raises(OperatorInputError):
        write_broker_config(fleet, devices, tmp_path / "bc")
    assert not (tmp_path / "bc" / "dynamic-security.json").exists()


@pytest.mark.parametrize("value", ["dev-1\n", "f1\n"])
def test_a10_check_id_refuses_a_trailing_newline(value: str) -> None:
    with pytest.raises(OperatorInputError):
        check_id("device id", value)


def test_a10_broker_config_refuses_device_ids_differing_only_in_case(tmp_path: Path) -> None:
    with pytest.raises(OperatorInputError, match="duplicate"):
        write_broker_config("f1", ["Dev-1", "dev-1"], tmp_path / "bc")


def test_a10_ids_of_other_devices_identities_are_refused(tmp_path: Path) -> None:
    """Resisted: no device id can be another identity's username (``:``), and the
    generated bound client ids of all devices are distinct even when one id is another's
    bound client id (``dev-1-listen``, ``dev-1-fetch``) or the bridge's prefix."""
    import json

    for bad in ("dev-1:fetch", "dev-1:fetch:fetch", "modelward-bridge", "modelward-operator"):
        with pytest.raises(OperatorInputError):
            write_broker_config("f1", ["dev-1", bad], tmp_path / "bad")
    devices = ["dev-1", "dev-1-listen", "dev-1-fetch", "dev-1-listen-fetch",
               "modelward-bridge-1", "modelward-operator-status-1"]
    bc = write_broker_config("f1", devices, tmp_path / "bc")
    clients = json.loads(bc.dynsec.read_text())["clients"]
    users = [c["username"] for c in clients]
    bound = [c["clientid"] for c in clients if "clientid" in c]
    assert len(set(users)) == len(users) == 2 + 2 * len(devices)
    assert len(set(bound)) == len(bound) == 2 * len(devices)
    # every bound client id ends in -listen/-fetch; the services' own ids never do
    assert all(b.endswith(("-listen", "-fetch")) for b in bound)
