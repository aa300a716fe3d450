"""Configuration of the updater's parts (house style 3): plain dataclasses, safe defaults,
no I/O, cheap to import (the idle daemon loads only these and the MQTT connection)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from modelward.updater import _defaults as d


@dataclass(frozen=True)
class HttpsConfig:
    """How the device reaches the HTTPS origin.

    Attributes:
        metadata_url: base URL of ``metadata/``.
        targets_url: base URL of ``targets/``.
        ca_file: PEM bundle of the CA(s) the origin must chain to (pinned); None for
            the system store.
        connect_timeout: seconds to establish a connection.
        read_timeout: seconds without a byte before giving up.
        chunk_size: largest read (1 MiB); reads start at 64 KiB and grow while the
            link keeps them full.
        min_speed: bytes per second a transfer must average over ``min_speed_window``
            seconds; slower is a slow-retrieval attack (or a dead link) and is aborted.
            A byte now and then defeats ``read_timeout`` alone.
        min_speed_window: seconds over which ``min_speed`` is measured.
        header_timeout: seconds from a request to the end of its response headers (a
            header trickled a byte at a time defeats ``read_timeout``).
        metadata_timeout: seconds one metadata file may take in all (they are small; a
            bundle is bounded by ``min_speed``).
    """

    metadata_url: str
    targets_url: str
    ca_file: str | None = None
    connect_timeout: float = 10.0
    read_timeout: float = 30.0
    chunk_size: int = 1024 * 1024
    min_speed: int = d.HTTPS_MIN_SPEED
    min_speed_window: float = d.HTTPS_MIN_SPEED_WINDOW
    header_timeout: float = d.HTTPS_HEADER_TIMEOUT
    metadata_timeout: float = d.HTTPS_METADATA_TIMEOUT


@dataclass(frozen=True)
class HealthConfig:
    """Bounds of the health check, whose child runs in a sandbox (updater/install/_sandbox.py).

    Attributes:
        timeout: seconds the child may run (wall clock).
        max_memory: address-space limit of the child in bytes (``RLIMIT_AS``); None: half
            of the memory available when the check starts, at most ``DEFAULT_MEMORY_CAP``.
        max_cpu_seconds: CPU-time limit of the child (``RLIMIT_CPU``); None: ``timeout``.
        nice: niceness added to the child (heavy work runs at low priority).
        unsafe_no_sandbox: run the child with the limits only, without Landlock and
            seccomp (a kernel without them); logs a warning at every check.
    """

    DEFAULT_MEMORY_CAP: ClassVar[int] = 2 << 30  # bytes

    timeout: float = d.HEALTH_TIMEOUT
    max_memory: int | None = None
    max_cpu_seconds: float | None = None
    nice: int = d.HEALTH_NICE
    unsafe_no_sandbox: bool = d.HEALTH_UNSAFE_NO_SANDBOX


@dataclass(frozen=True)
class TufConfig:
    """Bounds of the TUF metadata the device downloads before it can verify it (python-tuf
    ngclient parses a file whole before its signatures are checked: junk JSON costs ~20x
    its size in Python objects).

    The repository signs the length and hashes of snapshot (in timestamp) and of targets
    (in snapshot), so those downloads are bounded by the signed length and hash-checked
    before they are parsed; these bounds apply to what has no signed length: root,
    timestamp, and a repository from before lengths were signed.

    Attributes:
        root_max_length: bytes of one root.json (ngclient's default: 512000).
        timestamp_max_length: bytes of timestamp.json (ngclient's default: 16384).
        snapshot_max_length: bytes of snapshot.json without a signed length (ngclient's
            default: 2000000).
        targets_max_length: bytes of a targets (or delegated role's) file without a
            signed length (ngclient's default: 5000000).
        max_delegations: roles one delegation search may visit.
    """

    root_max_length: int = 128 * 1024  # bytes
    timestamp_max_length: int = 16 * 1024  # bytes
    snapshot_max_length: int = 512 * 1024  # bytes
    targets_max_length: int = 2 * 1024 * 1024  # bytes
    max_delegations: int = 32


# What a block response carries besides its bytes: fixed header, topic, properties
# (correlation data, a format 1 bridge's user properties) and the format 2 block header.
PACKET_OVERHEAD = 16 * 1024


# A device's two broker identities (``fleet broker-config`` binds each to its client id):
# the daemon's announcement listener logs in as the device id, the update child's fetcher
# as ``<id>:fetch`` (no device id contains ':', so no device can be another's fetcher).
FETCH_USER_SUFFIX = ":fetch"


def listen_client_id(device: str) -> str:
    """The one client id a device's listener identity may connect with."""
    return f"{device}-listen"


def fetch_username(device: str) -> str:
    """The username of a device's fetcher identity (same password as the device)."""
    return device + FETCH_USER_SUFFIX


def fetch_client_id(device: str) -> str:
    """The one client id a device's fetcher identity may connect with."""
    return f"{device}-fetch"


@dataclass(frozen=True)
class MqttConfig:
    """How to reach the broker, and the fetcher's bounds.

    Attributes:
        host, port: the broker (TLS).
        fleet: topic prefix ``modelward/<fleet>/``.
        client_name: MQTT username for a device (= device id), or a service user.
        ca_file: CA the broker's certificate must chain to (pinned).
        cert_file, key_file: client certificate, if the broker uses them.
        password: the password, read from a file at the entry point (never logged).
        keepalive: seconds.
        connect_timeout: seconds to wait for CONNACK/SUBACK.
        block_size: bytes asked for per request (1 MiB, the bridge's limit).
        window: requests in flight at once.
        block_timeout: seconds before a block is asked for again.
        max_retries: how often one block is asked for again before giving up.
        queue_limit: incoming messages buffered at most (more are dropped).
        max_packet_size: the Maximum Packet Size sent on CONNECT, which the broker must
            not exceed (0: one block plus :data:`PACKET_OVERHEAD`, see
            :meth:`packet_limit`); a larger packet ends the connection.
        queue_bytes: payload bytes buffered at most between the network thread and the
            fetch (0: ``window`` packets); junk beyond it is dropped, counted and logged.
        range_requests_per_s: block requests a range fetch sends per second at most, in
            bursts of 0.5 s' worth (the bridge drops what is over its per-device rate, 50/s
            by default, and a dropped block waits out ``block_timeout``); 0: unpaced.
        span_blocks: blocks one range request asks for at most (format 3, a span the
            bridge answers block by block; at most ``window`` and the bridge's 16); 1:
            one request a block (format 2), as to a bridge from before spans.
    """

    host: str
    port: int
    fleet: str
    client_name: str
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    password: str | None = None
    keepalive: int = 30
    connect_timeout: float = d.MQTT_CONNECT_TIMEOUT
    block_size: int = 1024 * 1024
    window: int = 16
    block_timeout: float = d.MQTT_BLOCK_TIMEOUT
    max_retries: int = d.MQTT_MAX_RETRIES
    queue_limit: int = 256
    max_packet_size: int = 0
    queue_bytes: int = 0
    range_requests_per_s: float = 40.0
    span_blocks: int = 8

    def packet_limit(self) -> int:
        """The Maximum Packet Size this client asks for: a block, its header and topic."""
        return self.max_packet_size or self.block_size + PACKET_OVERHEAD

    def queue_byte_limit(self) -> int:
        """The bound of the receive queue in bytes (room for a full window of blocks)."""
        return self.queue_bytes or self.window * self.packet_limit()

    def topic(self, suffix: str) -> str:
        """``modelward/<fleet>/<suffix>``."""
        return f"modelward/{self.fleet}/{suffix}"

    def __repr__(self) -> str:  # never print the password
        return f"MqttConfig(host={self.host!r}, port={self.port}, fleet={self.fleet!r}, " \
               f"client_name={self.client_name!r})"


@dataclass(frozen=True)
class UpdaterConfig:
    """Everything one device needs to update.

    Attributes:
        state_dir: the agent's state directory (metadata, staging, slots, trust).
        model: name of the model this device runs.
        device_id: this device (its rollout position).
        channel: release channel it follows.
        https: the HTTPS origin, if configured.
        mqtt: the MQTT broker, if configured.
        transports: which of them to use, in order of preference ("https", "mqtt");
            later ones are tried when an earlier one fails to deliver.
        health: health-check bounds.
        tuf: bounds of the TUF metadata downloads.
        max_bundle_bytes: largest bundle the device accepts (8 GiB), on top of TUF's length.
    """

    state_dir: Path
    model: str
    device_id: str = ""
    channel: str = "stable"
    https: HttpsConfig | None = None
    mqtt: MqttConfig | None = None
    transports: tuple[str, ...] = ("https",)
    health: HealthConfig = field(default_factory=HealthConfig)
    tuf: TufConfig = field(default_factory=TufConfig)
    max_bundle_bytes: int = 8 << 30


