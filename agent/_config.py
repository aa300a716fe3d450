"""Agent configuration: one TOML file, read only at the entry point (its schema and checks:
``_config_schema.py``)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

from modelward.agent._config_rules import check_rules, resolve
from modelward.agent._config_schema import (
    ACTIVATION_TIMEOUT,
    DEFAULT_CONFIG,
    TOP,
    Resolved,
    read_document,
    validate,
)
from modelward.agent.errors import ConfigError
from modelward.updater._config import HealthConfig, HttpsConfig, MqttConfig, UpdaterConfig
from modelward.updater._defaults import ANNOUNCE_SPREAD as DEFAULT_ANNOUNCE_SPREAD


@dataclass(frozen=True)
class ActivationConfig:
    """``[activation]``: how to tell the inference application about a new model.

    Attributes:
        command: run after each switch, with MODELWARD_MODEL_DIR, MODELWARD_MODEL,
            MODELWARD_VERSION and MODELWARD_FINGERPRINT in its environment.
        timeout: seconds each may take.

    (``reload_unit`` and ``restart`` were removed: ``modelward-activate@UNIT.path``, run by
    systemd, reloads the unit when ``_observe.ACTIVATED_FILE`` changes; the config loader
    ignores them with a notice, ``agent._config_schema.REMOVED``.)
    """

    command: tuple[str, ...] = ()
    timeout: float = ACTIVATION_TIMEOUT


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
        announce_spread: the most seconds an announcement's refresh waits (a random
            share of it), so a fleet does not refresh at one instant.
        tpm_wait: seconds boot-check waits for a TPM that does not answer (yet) before it
            gives up; the model is never served unverified meanwhile.
    """

    path: Path
    device_id: str
    fleet: str
    tcti: str
    updater: UpdaterConfig
    poll_interval: float = 3600.0
    announce_spread: float = DEFAULT_ANNOUNCE_SPREAD
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


def load_config(path: Path | None = None, *, test_kill_at: str | None = None,
                need_transport: bool = True) -> AgentConfig:
    """Read and validate an agent configuration file (default ``/etc/modelward/agent.toml``).

    Every key is checked when it loads (``_config_schema.SCHEMA``): an unknown key or
    section, a wrong type, a number out of bounds, a URL that is not https://, a file that
    cannot be read is a :class:`ConfigError` naming the key.

    ``test_kill_at`` is the test hook of the journal (the CLI passes
    ``MODELWARD_TEST_KILL_AT``): SIGKILL the agent right after journaling that step.
    ``need_transport=False``: no ``[https]``/``[mqtt]`` is needed (``--from DIR``).

    Raises:
        ConfigError: unreadable file, bad TOML, unknown, missing or invalid setting.
    """
    return build_config(resolve(path), test_kill_at=test_kill_at,
                        need_transport=need_transport)


def build_config(r: Resolved, *, test_kill_at: str | None = None,
                 need_transport: bool = True) -> AgentConfig:
    """The configuration from validated values (every key read through ``r.get``).

    Raises:
        ConfigError: a rule across keys (no transport section, a transport that is not
            configured, both ``password`` and ``password_file``; ``_config_places``).
    """
    order, password = check_rules(r, need_transport=need_transport)
    path = r.path
    device_id: str = r.get(TOP, "device_id")
    fleet: str = r.get(TOP, "fleet")
    https_cfg = mqtt_cfg = None
    if "https" in r.present:
        ca = r.get("https", "ca_file")
        https_cfg = HttpsConfig(
            metadata_url=r.get("https", "metadata_url"),
            targets_url=r.get("https", "targets_url"),
            ca_file=str(ca) if ca is not None else None,
            min_speed=r.get("https", "min_speed"),
            min_speed_window=r.get("https", "min_speed_window"),
            header_timeout=r.get("https", "header_timeout"),
            metadata_timeout=r.get("https", "metadata_timeout"),
        )
    if "mqtt" in r.present:
        cert, key = r.get("mqtt", "cert_file"), r.get("mqtt", "key_file")
        mq_ca = r.get("mqtt", "ca_file")
        mqtt_cfg = MqttConfig(
            host=r.get("mqtt", "host"),
            port=r.get("mqtt", "port"),
            fleet=fleet,
            client_name=r.get("mqtt", "username") or device_id,
            ca_file=str(mq_ca) if mq_ca is not None else None,
            cert_file=str(cert) if cert is not None else None,
            key_file=str(key) if key is not None else None,
            password=password,
            connect_timeout=r.get("mqtt", "connect_timeout"),
            block_timeout=r.get("mqtt", "block_timeout"),
            max_retries=r.get("mqtt", "max_retries"),
        )
    health = HealthConfig(
        timeout=r.get("health", "timeout"),
        max_memory=r.get("health", "max_memory"),
        max_cpu_seconds=r.get("health", "max_cpu_seconds"),
        nice=r.get("health", "nice"),
        unsafe_no_sandbox=r.get("health", "unsafe_no_sandbox"),
    )
    updater = UpdaterConfig(
        state_dir=r.get(TOP, "state_dir"),
        model=r.get(TOP, "model"),
        device_id=device_id,
        channel=r.get(TOP, "channel"),
        https=https_cfg,
        mqtt=mqtt_cfg,
        transports=order,
        health=health,
    )
    idle = IdleConfig(
        busy_file=r.get("idle", "busy_file"),
        max_queue_depth=r.get("idle", "max_queue_depth"),
        busy_stale_after=r.get("idle", "busy_stale_after"),
        min_cpu_idle=r.get("idle", "min_cpu_idle"),
        cpu_window=r.get("idle", "cpu_window"),
        max_load=r.get("idle", "max_load"),
        require_mains=r.get("idle", "require_mains"),
        windows=r.get("idle", "windows"),
        poll=r.get("idle", "poll"),
    )
    activation = ActivationConfig(
        command=r.get("activation", "command"),
        timeout=r.get("activation", "timeout"),
    )
    return AgentConfig(
        path=path,
        device_id=device_id,
        fleet=fleet,
        tcti=r.get(TOP, "tcti"),
        updater=updater,
        poll_interval=r.get("agent", "poll_interval"),
        announce_spread=r.get("agent", "announce_spread"),
        tpm_wait=r.get("agent", "tpm_wait"),
        idle=idle,
        activation=activation,
        metrics_textfile=r.get("metrics", "textfile"),
        test_kill_at=test_kill_at,
    )


def check_config(path: Path | None = None) -> list[str]:
    """``agent check-config``: load and validate like every command does, then the
    effective configuration, every key with its value (defaults marked, secrets
    ``<set>``).

    Raises:
        ConfigError: the first key at fault.
    """
    path = DEFAULT_CONFIG if path is None else path
    r = validate(read_document(path), path)
    cfg = build_config(r, need_transport=False)
    order = ", ".join(cfg.updater.transports) or \
        "none (updates only from media: agent update --once --from DIR)"
    return [*r.lines(), "", f"# transports in order: {order}"]
