"""Agent configuration: one TOML file, read only at the entry point."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.errors import ConfigError
from updater import HealthConfig, HttpsConfig, UpdaterConfig

_EXAMPLE = """\
device_id = "dev-001"
fleet = "demo"
state_dir = "/var/lib/modelward"
tcti = "device:/dev/tpmrm0"
model = "classifier"

[https]
metadata_url = "https://updates.example/metadata/"
targets_url = "https://updates.example/targets/"
ca_file = "/etc/modelward/origin-ca.pem"
"""


@dataclass(frozen=True)
class AgentConfig:
    """A device's configuration.

    Attributes:
        path: where it was read from.
        device_id: this device's id (also its MQTT identity).
        fleet: fleet name (MQTT topic prefix).
        tcti: TPM TCTI string.
        updater: what the updater needs.
    """

    path: Path
    device_id: str
    fleet: str
    tcti: str
    updater: UpdaterConfig

    @property
    def state_dir(self) -> Path:
        """The agent's state directory."""
        return self.updater.state_dir


def _get(d: dict[str, Any], key: str, typ: type, path: Path, prefix: str = "") -> Any:
    full = f"{prefix}{key}"
    if key not in d:
        raise ConfigError(f"{path}: missing setting {full!r}", path=str(path), key=full,
                          hint=f"example configuration:\n{_EXAMPLE}")
    value = d[key]
    if typ is float and isinstance(value, int):
        value = float(value)
    if not isinstance(value, typ):
        raise ConfigError(f"{path}: {full!r} must be a {typ.__name__}", path=str(path), key=full)
    return value


def load_config(path: Path) -> AgentConfig:
    """Read and validate an agent configuration file.

    Raises:
        ConfigError: unreadable file, bad TOML, missing or mistyped setting.
    """
    try:
        doc = tomllib.loads(path.read_text())
    except OSError as e:
        raise ConfigError(f"cannot read config {path}: {e}", path=str(path)) from e
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path} is not valid TOML: {e}", path=str(path)) from e
    https = doc.get("https")
    if not isinstance(https, dict):
        raise ConfigError(f"{path}: missing [https] section", path=str(path), key="https",
                          hint=f"example configuration:\n{_EXAMPLE}")
    ca = https.get("ca_file")
    if ca is not None and not isinstance(ca, str):
        raise ConfigError(f"{path}: 'https.ca_file' must be a string", path=str(path),
                          key="https.ca_file")
    base = path.parent
    health = doc.get("health", {})
    hcfg = HealthConfig(
        timeout=float(_get(health, "timeout", float, path, "health.")) if "timeout" in health
        else HealthConfig.timeout,
    )
    state_dir = Path(_get(doc, "state_dir", str, path))
    updater = UpdaterConfig(
        state_dir=state_dir if state_dir.is_absolute() else base / state_dir,
        model=_get(doc, "model", str, path),
        https=HttpsConfig(
            metadata_url=_get(https, "metadata_url", str, path, "https."),
            targets_url=_get(https, "targets_url", str, path, "https."),
            ca_file=str(base / ca) if ca else None,
        ),
        health=hcfg,
    )
    return AgentConfig(
        path=path,
        device_id=_get(doc, "device_id", str, path),
        fleet=_get(doc, "fleet", str, path),
        tcti=_get(doc, "tcti", str, path),
        updater=updater,
    )
