"""Attack 15 (careless operator, local unprivileged user): secrets in world-readable files.

The package ships /etc/modelward/agent.toml 0644 (a conffile, world-readable). The
operator who writes the MQTT password inline there, or who leaves the password file or the
client key at the umask's 0644, gives every local user the device's broker identity: the
agent loads all of these without a word.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from modelward.agent._config import load_config
from modelward.agent.errors import ConfigError
from modelward.simulator._demo import write_device_config


def _config(tmp_path: Path, mqtt: dict[str, object], mode: int = 0o644) -> Path:
    cfg = write_device_config(
        tmp_path / "agent.toml", device_id="dev-1", state=tmp_path / "state",
        tcti="swtpm:port=1", transport="mqtt",
        mqtt={"host": "127.0.0.1", "port": 8883, **mqtt})
    os.chmod(cfg, mode)
    return cfg


def test_private_config_with_inline_password_loads(tmp_path: Path) -> None:
    cfg = _config(tmp_path, {"password": "s3cret"}, mode=0o640)
    assert load_config(cfg) is not None


def test_inline_password_in_world_readable_config_refused(tmp_path: Path) -> None:
    cfg = _config(tmp_path, {"password": "s3cret"})
    with pytest.raises(ConfigError):
        load_config(cfg)


def test_world_readable_password_file_refused(tmp_path: Path) -> None:
    pw = tmp_path / "mqtt-password"
    pw.write_text("s3cret\n")
    os.chmod(pw, 0o644)
    cfg = _config(tmp_path, {"password_file": str(pw)}, mode=0o640)
    with pytest.raises(ConfigError):
        load_config(cfg)


def test_world_readable_client_key_refused(tmp_path: Path) -> None:
    key = tmp_path / "client.key"
    key.write_text("-----BEGIN PRIVATE KEY-----\nMAA=\n-----END PRIVATE KEY-----\n")
    os.chmod(key, 0o644)
    crt = tmp_path / "client.crt"
    crt.write_text("x\n")
    cfg = _config(tmp_path, {"cert_file": str(crt), "key_file": str(key)}, mode=0o640)
    with pytest.raises(ConfigError):
        load_config(cfg)


def test_group_readable_password_file_refused(tmp_path: Path) -> None:
    pw = tmp_path / "mqtt-password"
    pw.write_text("s3cret\n")
    os.chmod(pw, 0o640)
    cfg = _config(tmp_path, {"password_file": str(pw)}, mode=0o640)
    with pytest.raises(ConfigError):
        load_config(cfg)
