"""Issue 14 (operator-side trust): the dynamic-security file `fleet broker-config` writes.

mosquitto 2.0's ``password_file``/``acl_file`` checked no SUBSCRIBE and bound no client id;
the dynamic-security plugin does both, from the JSON this writes.
"""

from __future__ import annotations

import base64
import grp
import hashlib
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from modelward.publisher._broker_config import (
    BRIDGE_USER,
    DYNSEC_FILE,
    OLD_FILES,
    OPERATOR_USER,
    find_dynsec_plugin,
    write_broker_config,
)
from modelward.publisher.errors import OperatorInputError
from modelward.updater._config import fetch_client_id, fetch_username, listen_client_id


def _doc(tmp_path: Path, devices: list[str]) -> dict[str, Any]:
    write_broker_config("f", devices, tmp_path)
    return dict(json.loads((tmp_path / DYNSEC_FILE).read_text()))


def _verifies(entry: dict[str, Any], password: str) -> bool:
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(),
                                 base64.b64decode(entry["salt"]), entry["iterations"])
    return base64.b64decode(entry["password"]) == digest


@pytest.mark.skipif(shutil.which("mosquitto_ctrl") is None, reason="no mosquitto_ctrl")
def test_password_entries_hash_as_mosquitto_ctrl_does(tmp_path: Path) -> None:
    # mosquitto's own tool writes the reference entry; ours must verify the same way
    subprocess.run(["mosquitto_ctrl", "dynsec", "init", str(tmp_path / "ref.json"), "admin",
                    "pw-of-admin"], check=True, capture_output=True)
    ref = json.loads((tmp_path / "ref.json").read_text())["clients"][0]
    assert _verifies(ref, "pw-of-admin") and not _verifies(ref, "pw-of-admin ")
    doc = _doc(tmp_path / "out", ["dev-1"])
    creds = tmp_path / "out" / "credentials"
    for c in doc["clients"]:
        assert set(ref) - {"textName"} <= set(c)  # same fields as mosquitto's
        assert len(base64.b64decode(c["salt"])) == 12
        assert len(base64.b64decode(c["password"])) == 64
        assert c["iterations"] == ref["iterations"]
        user = c["username"].removesuffix(":fetch")
        assert _verifies(c, (creds / user).read_text().strip())
    salts = [c["salt"] for c in doc["clients"]]
    assert len(set(salts)) == len(salts)


def test_each_device_has_two_identities_bound_to_one_client_id_each(tmp_path: Path) -> None:
    doc = _doc(tmp_path, ["dev-1", "dev-2"])
    by_user = {c["username"]: c for c in doc["clients"]}
    assert set(by_user) == {BRIDGE_USER, OPERATOR_USER, "dev-1", "dev-2",
                            fetch_username("dev-1"), fetch_username("dev-2")}
    assert by_user["dev-1"]["clientid"] == listen_client_id("dev-1")
    assert by_user[fetch_username("dev-1")]["clientid"] == fetch_client_id("dev-1")
    assert "clientid" not in by_user[BRIDGE_USER]  # several bridges share the group
    assert "clientid" not in by_user[OPERATOR_USER]
    ids = [c["clientid"] for c in doc["clients"] if "clientid" in c]
    assert len(set(ids)) == len(ids) == 4
    # no device id can be a fetcher's username (':' is not allowed in ids)
    with pytest.raises(OperatorInputError):
        write_broker_config("f", [fetch_username("dev-1")], tmp_path / "x")


def test_default_access_is_denied_and_devices_get_only_their_topics(tmp_path: Path) -> None:
    doc = _doc(tmp_path, ["dev-1", "dev-2"])
    assert set(doc["defaultACLAccess"].values()) == {False}
    roles = {r["rolename"]: r["acls"] for r in doc["roles"]}
    for c in doc["clients"]:
        if c["username"] in (BRIDGE_USER, OPERATOR_USER):
            continue
        (role,) = c["roles"]
        topics = {a["topic"] for a in roles[role["rolename"]]}
        assert all(a["allow"] for a in roles[role["rolename"]])
        assert not any(t.startswith(("$", "#")) or "+" in t or "#" in t for t in topics)
        dev = c["username"].removesuffix(":fetch")
        other = "dev-2" if dev == "dev-1" else "dev-1"
        assert not any(other in t for t in topics)
    listen = {(a["acltype"], a["topic"]) for a in roles["device-listen:dev-1"]}
    fetch = {(a["acltype"], a["topic"]) for a in roles["device-fetch:dev-1"]}
    assert ("publishClientSend", "modelward/f/devices/dev-1/status") in listen
    assert ("subscribeLiteral", "modelward/f/announce") in listen
    assert not any("repo" in t for _, t in listen)  # the listener cannot read responses
    assert ("publishClientSend", "modelward/f/repo/req/dev-1") in fetch
    assert ("subscribeLiteral", "modelward/f/devices/dev-1/repo/resp") in fetch
    assert not any("status" in t or "announce" in t for _, t in fetch)
    bridge = {(a["acltype"], a["topic"]) for a in roles[BRIDGE_USER]}
    assert ("subscribePattern", "$share/+/modelward/f/repo/req/+") in bridge


def test_files_are_private_and_the_old_ones_are_gone(tmp_path: Path) -> None:
    for name in OLD_FILES:  # what broker-config wrote before dynsec
        (tmp_path / name).write_text("stale\n")
    write_broker_config("f", ["dev-1"], tmp_path)
    # 0600, or 0640 for the broker's group (who may give it to mosquitto: docs/brokers.md)
    st = (tmp_path / DYNSEC_FILE).stat()
    assert st.st_mode & 0o777 == 0o600 or (
        st.st_mode & 0o777 == 0o640 and st.st_gid == grp.getgrnam("mosquitto").gr_gid)
    assert not [n for n in OLD_FILES if (tmp_path / n).exists()]
    conf = (tmp_path / "modelward.conf").read_text()
    assert "password_file" not in conf and "acl_file" not in conf
    assert f"plugin {find_dynsec_plugin()}\n" in conf
    assert f"plugin_opt_config_file {(tmp_path / DYNSEC_FILE).resolve()}\n" in conf


def test_a_missing_plugin_is_one_clear_error(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(OperatorInputError, match="--dynsec-plugin .*no such file"):
        write_broker_config("f", ["dev-1"], tmp_path / "a", plugin=tmp_path / "none.so")
    monkeypatch.setattr("modelward.publisher._broker_config._PLUGIN_GLOBS",
                        (str(tmp_path / "nowhere" / "*.so"),))
    with pytest.raises(OperatorInputError, match="dynamic-security plugin .* not installed"):
        write_broker_config("f", ["dev-1"], tmp_path / "b")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    given = tmp_path / "plugin.so"
    given.write_bytes(b"")
    write_broker_config("f", ["dev-1"], tmp_path / "c", plugin=given)
    assert f"plugin {given}\n" in (tmp_path / "c" / "modelward.conf").read_text()
