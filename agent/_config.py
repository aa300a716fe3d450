"""Agent configuration: one TOML file, read only at the entry point."""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from modelward.agent._observe import ActivationConfig
from modelward.agent.errors import ConfigError
from modelward.updater._config import HealthConfig, HttpsConfig, MqttConfig, UpdaterConfig

_EXAMPLE = """\
device_id = "dev-001"
fleet = "demo"
state_dir = "/var/lib/modelward"
tcti = "device:/dev/tpmrm0"
model = "classifier"

transport = "auto"            # "https", "mqtt", or "auto": both, in file order

[https]
metadata_url = "https://updates.example/metadata/"
targets_url = "https://updates.example/targets/"
ca_file = "/etc/modelward/origin-ca.pem"
# min_speed = 1024            # bytes/s averaged over min_speed_window; slower is aborted
# min_speed_window = 60.0     # (slow-retrieval defence)
# header_timeout = 30.0       # seconds from a request to its last response header
# metadata_timeout = 120.0    # seconds one metadata file may take in all

[mqtt]
host = "broker.example"
port = 8883
ca_file = "/etc/modelward/broker-ca.pem"
password_file = "/etc/modelward/mqtt-password"   # username defaults to device_id
"""


@dataclass(frozen=True)
class IdleConfig:
    """``[idle]``: which signals must say "idle" before heavy work (all optional).

    Attributes:
        busy_file: file where the inference app writes its queue depth.
        max_queue_depth: depth above which the app counts as busy.
        busy_stale_after: seconds after which an unchanged busy file is ignored.
        min_cpu_idle: least idle CPU share (0-1) over ``cpu_window`` seconds.
        max_load: highest 1-minute load average.
        require_mains: pause while on battery.
        windows: local-time maintenance windows ``HH:MM-HH:MM``.
        poll: seconds between checks while paused.
    """

    busy_file: Path | None = None
    max_queue_depth: int = 0
    busy_stale_after: float = 300.0
    min_cpu_idle: float | None = None
    cpu_window: float = 5.0
    max_load: float | None = None
    require_mains: bool = False
    windows: tuple[str, ...] = ()
    poll: float = 1.0


@dataclass(frozen=True)
class AgentConfig:
    """A device's configuration.

    Attributes:
        path: where it was read from.
        device_id: this device's id (also its MQTT identity).
        fleet: fleet name (MQTT topic prefix).
        tcti: TPM TCTI string.
        updater: what the updater needs.
        poll_interval: seconds between two refreshes without announcements.
        tpm_wait: seconds boot-check waits for a TPM that does not answer (yet) before it
            gives up; the model is never served unverified meanwhile.
    """

    path: Path
    device_id: str
    fleet: str
    tcti: str
    updater: UpdaterConfig
    poll_interval: float = 3600.0
    tpm_wait: float = 120.0
    idle: IdleConfig = field(default_factory=lambda: IdleConfig())
    activation: ActivationConfig = field(default_factory=lambda: ActivationConfig())
    metrics_textfile: Path | None = None
    test_kill_at: str | None = None

    def with_transport(self, name: str) -> AgentConfig:
        """This configuration restricted to one configured transport.

        Raises:
            ConfigError: that transport has no section in the file.
        """
        if getattr(self.updater, name, None) is None:
            raise ConfigError(f"{self.path}: transport {name!r} is not configured",
                              path=str(self.path), key=name)
        return replace(self, updater=replace(self.updater, transports=(name,)))

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


def _num(section: dict[str, Any], key: str, default: float, path: Path) -> float:
    """An optional positive number of ``[mqtt]``."""
    if key not in section:
        return default
    value = section[key]
    if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
        raise ConfigError(f"{path}: 'mqtt.{key}' must be a positive number", path=str(path),
                          key=f"mqtt.{key}")
    return float(value)


def load_config(path: Path, *, test_kill_at: str | None = None) -> AgentConfig:
    """Read and validate an agent configuration file.

    ``test_kill_at`` is the test hook of the journal (the CLI passes
    ``MODELWARD_TEST_KILL_AT``): SIGKILL the agent right after journaling that step.

    Raises:
        ConfigError: unreadable file, bad TOML, missing or mistyped setting.
    """
    try:
        doc = tomllib.loads(path.read_text())
    except OSError as e:
        raise ConfigError(f"cannot read config {path}: {e}", path=str(path)) from e
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path} is not UTF-8 text (byte {e.start}): {e.reason}",
                          path=str(path)) from e
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path} is not valid TOML: {e}", path=str(path)) from e
    base = path.parent

    def rel(p: str | None) -> str | None:
        return None if p is None else str(base / p)

    https_cfg = mqtt_cfg = None
    if "https" in doc:
        https = _section(doc, "https", path)
        https_cfg = HttpsConfig(
            metadata_url=_get(https, "metadata_url", str, path, "https."),
            targets_url=_get(https, "targets_url", str, path, "https."),
            ca_file=rel(_opt(https, "ca_file", path, "https.")),
            min_speed=int(_get(https, "min_speed", int, path, "https."))
            if "min_speed" in https else HttpsConfig.min_speed,
            min_speed_window=float(_get(https, "min_speed_window", float, path, "https."))
            if "min_speed_window" in https else HttpsConfig.min_speed_window,
            header_timeout=float(_get(https, "header_timeout", float, path, "https."))
            if "header_timeout" in https else HttpsConfig.header_timeout,
            metadata_timeout=float(_get(https, "metadata_timeout", float, path, "https."))
            if "metadata_timeout" in https else HttpsConfig.metadata_timeout,
        )
    device_id = _get(doc, "device_id", str, path)
    fleet = _get(doc, "fleet", str, path)
    if "mqtt" in doc:
        mq = _section(doc, "mqtt", path)
        password = _opt(mq, "password", path, "mqtt.")
        pw_file = _opt(mq, "password_file", path, "mqtt.")
        if pw_file is not None:
            try:
                password = (base / pw_file).read_text().strip()
            except OSError as e:
                raise ConfigError(f"{path}: cannot read mqtt.password_file: {e}",
                                  path=str(path), key="mqtt.password_file") from e
        mqtt_cfg = MqttConfig(
            host=_get(mq, "host", str, path, "mqtt."),
            port=_get(mq, "port", int, path, "mqtt."),
            fleet=fleet,
            client_name=_opt(mq, "username", path, "mqtt.") or device_id,
            ca_file=rel(_opt(mq, "ca_file", path, "mqtt.")),
            cert_file=rel(_opt(mq, "cert_file", path, "mqtt.")),
            key_file=rel(_opt(mq, "key_file", path, "mqtt.")),
            password=password,
            connect_timeout=_num(mq, "connect_timeout", MqttConfig.connect_timeout, path),
            block_timeout=_num(mq, "block_timeout", MqttConfig.block_timeout, path),
            max_retries=int(_num(mq, "max_retries", MqttConfig.max_retries, path)),
        )
    configured = [k for k in doc if k in ("https", "mqtt")]
    if not configured:
        raise ConfigError(f"{path}: configure [https], [mqtt] or both", path=str(path),
                          key="https", hint=f"example configuration:\n{_EXAMPLE}")
    transport = doc.get("transport", "auto")
    if transport == "auto":
        order = tuple(configured)
    elif transport in configured:
        order = (transport,)
    else:
        raise ConfigError(
            f"{path}: transport {transport!r} must be \"auto\" or a configured section "
            f"({', '.join(configured)})", path=str(path), key="transport")
    hcfg = _health(doc.get("health", {}), path)
    agent = doc.get("agent", {})
    idle = _idle(doc.get("idle", {}), path, base)
    state_dir = Path(_get(doc, "state_dir", str, path))
    channel = doc.get("channel", "stable")
    if not isinstance(channel, str) or not channel:
        raise ConfigError(f"{path}: 'channel' must be a non-empty string", path=str(path),
                          key="channel")
    updater = UpdaterConfig(
        state_dir=state_dir if state_dir.is_absolute() else base / state_dir,
        model=_get(doc, "model", str, path),
        device_id=device_id,
        channel=channel,
        https=https_cfg,
        mqtt=mqtt_cfg,
        transports=order,
        health=hcfg,
    )
    return AgentConfig(
        path=path,
        device_id=device_id,
        fleet=fleet,
        tcti=_get(doc, "tcti", str, path),
        updater=updater,
        poll_interval=float(_get(agent, "poll_interval", float, path, "agent."))
        if "poll_interval" in agent else 3600.0,
        tpm_wait=float(_get(agent, "tpm_wait", float, path, "agent."))
        if "tpm_wait" in agent else AgentConfig.tpm_wait,
        idle=idle,
        activation=_activation(doc.get("activation", {}), path),
        metrics_textfile=base / mt if (mt := _opt(doc.get("metrics", {}), "textfile", path,
                                                  "metrics.")) else None,
        test_kill_at=test_kill_at,
    )


_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([kmg]?)(?:i?b)?", re.IGNORECASE)
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
_HEALTH_KEYS = {"timeout", "max_memory", "max_cpu_seconds", "nice", "unsafe_no_sandbox"}


def _health(d: Any, path: Path) -> HealthConfig:
    """``[health]``: the bounds of the sandboxed health check."""
    if not isinstance(d, dict):
        raise ConfigError(f"{path}: [health] must be a table", path=str(path), key="health")
    unknown = sorted(set(d) - _HEALTH_KEYS)
    if unknown:  # a typo in a safety setting must not silently mean the default
        raise ConfigError(f"{path}: unknown setting 'health.{unknown[0]}' (known: "
                          f"{', '.join(sorted(_HEALTH_KEYS))})", path=str(path),
                          key=f"health.{unknown[0]}")

    def positive(key: str) -> float | None:
        v = d.get(key)
        if v is None:
            return None
        if isinstance(v, bool) or not isinstance(v, int | float) or not 0 < v <= 1e6:
            raise ConfigError(f"{path}: 'health.{key}' must be a number of seconds from 0 "
                              "to 1e6", path=str(path), key=f"health.{key}")
        return float(v)

    unsafe = d.get("unsafe_no_sandbox", False)
    nice = d.get("nice", HealthConfig.nice)
    if not isinstance(unsafe, bool):
        raise ConfigError(f"{path}: 'health.unsafe_no_sandbox' must be true or false",
                          path=str(path), key="health.unsafe_no_sandbox")
    if isinstance(nice, bool) or not isinstance(nice, int) or not 0 <= nice <= 19:
        raise ConfigError(f"{path}: 'health.nice' must be an integer from 0 to 19",
                          path=str(path), key="health.nice")
    return HealthConfig(
        timeout=positive("timeout") or HealthConfig.timeout,
        max_memory=_bytes(d.get("max_memory"), path, "health.max_memory"),
        max_cpu_seconds=positive("max_cpu_seconds"),
        nice=nice,
        unsafe_no_sandbox=unsafe,
    )


def _bytes(v: Any, path: Path, key: str) -> int | None:
    """A size: bytes as an integer, or a string such as ``"512M"`` / ``"2GiB"``."""
    if v is None:
        return None
    n: float | None = None
    if isinstance(v, int) and not isinstance(v, bool):
        n = v
    elif isinstance(v, str) and (m := _SIZE.fullmatch(v.strip())):
        n = float(m.group(1)) * _UNITS[m.group(2).upper()]
    if n is None or not (64 << 20) <= n <= (1 << 50):
        raise ConfigError(f"{path}: {key!r} must be a size of at least 64M (bytes, or a "
                          f"string like \"512M\" or \"2G\"), not {v!r}", path=str(path),
                          key=key)
    return int(n)


def _activation(d: dict[str, Any], path: Path) -> ActivationConfig:
    cmd = d.get("command", [])
    if isinstance(cmd, str) or not isinstance(cmd, list) or not all(
            isinstance(c, str) for c in cmd):
        raise ConfigError(f"{path}: 'activation.command' must be a list of strings "
                          '(e.g. ["/usr/bin/app-reload", "--quick"])', path=str(path),
                          key="activation.command")
    return ActivationConfig(
        command=tuple(cmd),
        reload_unit=_opt(d, "reload_unit", path, "activation."),
        restart=bool(d.get("restart", False)),
        timeout=float(d.get("timeout", 30.0)),
    )


def _idle(d: dict[str, Any], path: Path, base: Path) -> IdleConfig:
    from modelward.updater._idle import TimeRange

    def num(key: str, default: float | None) -> float | None:
        return float(_get(d, key, float, path, "idle.")) if key in d else default

    windows = d.get("windows", [])
    if not isinstance(windows, list) or not all(isinstance(w, str) for w in windows):
        raise ConfigError(f"{path}: 'idle.windows' must be a list of \"HH:MM-HH:MM\"",
                          path=str(path), key="idle.windows")
    for w in windows:
        try:
            TimeRange.parse(w)
        except ValueError as e:
            raise ConfigError(f"{path}: idle.windows: {e}", path=str(path),
                              key="idle.windows") from e
    busy = _opt(d, "busy_file", path, "idle.")
    return IdleConfig(
        busy_file=base / busy if busy else None,
        max_queue_depth=int(_get(d, "max_queue_depth", int, path, "idle."))
        if "max_queue_depth" in d else 0,
        busy_stale_after=num("busy_stale_after", 300.0) or 300.0,
        min_cpu_idle=num("min_cpu_idle", None),
        cpu_window=num("cpu_window", 5.0) or 5.0,
        max_load=num("max_load", None),
        require_mains=bool(d.get("require_mains", False)),
        windows=tuple(windows),
        poll=num("poll", 1.0) or 1.0,
    )


def _section(doc: dict[str, Any], name: str, path: Path) -> dict[str, Any]:
    sec = doc[name]
    if not isinstance(sec, dict):
        raise ConfigError(f"{path}: [{name}] must be a table", path=str(path), key=name)
    return sec


def _opt(d: dict[str, Any], key: str, path: Path, prefix: str) -> str | None:
    v = d.get(key)
    if v is not None and not isinstance(v, str):
        raise ConfigError(f"{path}: '{prefix}{key}' must be a string", path=str(path),
                          key=f"{prefix}{key}")
    return v
