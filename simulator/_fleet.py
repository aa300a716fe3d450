"""A simulated fleet on loopback, and the attack and fault scenarios run against it.

``sim fleet up`` starts one mosquitto (TLS + ACL), one nginx HTTPS origin, one serve-mqtt
bridge and N agents (``agent run``), each with its own swtpm and state directory. Even
devices fetch over MQTT, odd ones over HTTPS; all listen for announcements. Everything is
described in ``DIR/fleet.json`` and stopped by pid (``sim fleet down``).

A scenario applies one attack or fault, triggers an update (publish + announce), waits
until every device has made an attempt, and reads what each device did from its
``status.json`` and its ``current`` model. Faults are then cleared and the scenario waits
until every device got the release by itself (poll timer and backoff, no operator step).
Finally each device's trust record is checked against its ``current`` slot: that is the
"data lost" column (a model or journal that no longer verifies).
"""

from __future__ import annotations

import json
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from modelward.simulator._attacks import RepoAttacker
from modelward.simulator._broker import start_broker, stop_broker
from modelward.simulator._demo import write_device_config
from modelward.simulator._models import make_linear_model
from modelward.simulator._origin import start_origin, stop_origin
from modelward.simulator._pki import CertPair, issue_cert, make_ca
from modelward.simulator._proc import read_pid, stop_pid
from modelward.simulator._swtpm import start_swtpm, stop_swtpm
from modelward.simulator.errors import ServiceError
from modelward.trust._atomic import write_atomic
from modelward.trust._bounded import loads_bounded, read_json_file

FLEET = "sim"
MODEL = "classifier"


@dataclass
class Device:
    """One simulated device."""

    id: str
    dir: Path
    transport: str
    tpm_port: int = 0

    @property
    def conf(self) -> Path:
        return self.dir / "agent.toml"

    @property
    def state(self) -> Path:
        return self.dir / "state"

    @property
    def tpm(self) -> Path:
        return self.dir / "tpm"

    def status(self) -> dict[str, Any]:
        """The device's status.json (empty when unreadable)."""
        from modelward.agent._status import read_status

        return read_status(self.state / "status.json")

    def attempts(self) -> int:
        c = self.status().get("counters") or {}
        return int(c.get("attempts", 0))

    def active(self) -> str | None:
        try:
            return str(read_json_file(self.state / "current" / "manifest.json", 1 << 20)[
                "version"])
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def last_error(self) -> str | None:
        err = self.status().get("last_error")
        return str(err.get("type")) if isinstance(err, dict) else None


def enroll_device(operator_dir: Path, conf: Path, challenge: Path) -> str:
    """Enroll the device of config ``conf`` in ``operator_dir`` by credential activation
    (``agent enroll``, ``fleet add-device --enrollment``, ``agent activate-credential``,
    ``fleet add-device --response``, as library calls); its id.

    Raises:
        ModelwardError: a step of the enrollment failed.
    """
    from modelward.agent._commands import activate_credential, enrollment
    from modelward.agent._config import load_config
    from modelward.publisher._enroll import begin_enrollment, finish_enrollment

    cfg = load_config(conf)
    begin_enrollment(operator_dir, cfg.device_id, json.dumps(enrollment(cfg)).encode(), None,
                     challenge)
    finish_enrollment(operator_dir, cfg.device_id, activate_credential(cfg, challenge.read_bytes()))
    return cfg.device_id


@dataclass
class Fleet:
    """A running simulated fleet, as described by ``DIR/fleet.json``."""

    dir: Path
    devices: list[Device]
    origin_port: int
    broker_port: int
    passphrase: str
    next_major: int = 1
    published: list[str] = field(default_factory=list)

    # -- paths -------------------------------------------------------------------
    @property
    def repo(self) -> Path:
        return self.dir / "repo"

    @property
    def keys(self) -> Path:
        return self.dir / "keys"

    @property
    def pki(self) -> Path:
        return self.dir / "pki"

    @property
    def creds(self) -> Path:
        return self.dir / "broker-config" / "credentials"

    def server_cert(self) -> CertPair:
        return CertPair(self.pki / "server.pem", self.pki / "server.key")

    def ca(self) -> Path:
        return self.pki / "ca.pem"

    # -- persistence -----------------------------------------------------------------
    def save(self) -> None:
        doc = {
            "devices": [{"id": d.id, "dir": str(d.dir), "transport": d.transport,
                         "tpm_port": d.tpm_port} for d in self.devices],
            "origin_port": self.origin_port, "broker_port": self.broker_port,
            "next_major": self.next_major, "published": self.published,
        }
        (self.dir / "fleet.json").write_text(json.dumps(doc, indent=1))

    @classmethod
    def load(cls, directory: Path) -> Fleet:
        """Read ``DIR/fleet.json``.

        Raises:
            ServiceError: no fleet was started in ``directory``.
        """
        directory = directory.resolve()
        try:
            doc = read_json_file(directory / "fleet.json", 1 << 20)
            if not isinstance(doc, dict):
                raise ValueError("fleet.json is missing or not an object")
            passphrase = (directory / "passphrase").read_text().strip()
        except (OSError, ValueError) as e:
            raise ServiceError(f"no simulated fleet in {directory}: {e}", service="fleet",
                               hint="start one with `modelward sim fleet up --dir DIR`") from e
        devices = [Device(d["id"], Path(d["dir"]), d["transport"], d["tpm_port"])
                   for d in doc["devices"]]
        return cls(directory, devices, doc["origin_port"], doc["broker_port"], passphrase,
                   doc.get("next_major", 1), doc.get("published", []))

    # -- operator ---------------------------------------------------------------------
    def repository(self) -> Any:
        from modelward.publisher._repo import Repository

        return Repository(self.repo, self.keys, self.passphrase.encode())

    def mqtt(self, user: str) -> Any:
        from modelward.updater._config import MqttConfig

        return MqttConfig(host="127.0.0.1", port=self.broker_port, fleet=FLEET,
                          client_name=user, ca_file=str(self.ca()),
                          password=(self.creds / user).read_text().strip())

    @property
    def operator_dir(self) -> Path:
        """The operator's fleet registry (``fleet add-device``), made by :meth:`enroll`."""
        return self.dir / "operator"

    def operator_args(self) -> list[str]:
        """The broker options of the operator's fleet commands (``fleet attest`` ...)."""
        return ["--broker", f"mqtts://127.0.0.1:{self.broker_port}", "--fleet", FLEET,
                "--tls-ca", str(self.ca()), "--username", "modelward-operator",
                "--password-file", str(self.creds / "modelward-operator")]

    def enroll(self, devices: list[Device] | None = None) -> Path:
        """Enroll ``devices`` (default: all) in :attr:`operator_dir` by credential
        activation (docs/attestation.md), as an operator does with ``agent enroll``,
        ``fleet add-device --enrollment``, ``agent activate-credential`` and ``fleet
        add-device --response``; the registry's path.

        Raises:
            ModelwardError: a step of the enrollment failed.
        """
        self.operator_dir.mkdir(exist_ok=True)
        for d in devices or self.devices:
            enroll_device(self.operator_dir, d.conf, d.dir / "challenge.json")
        return self.operator_dir

    def build(self, version: str, seed: int, *, vectors_from: int | None = None) -> Path:
        """A bundle of a fresh linear model (optionally with another model's vectors)."""
        from modelward.publisher._bundle_build import build_bundle

        builds = self.dir / "builds"
        builds.mkdir(exist_ok=True)
        model = make_linear_model(builds / f"{MODEL}-{version}.onnx", seed)
        vectors = None
        if vectors_from is not None:
            donor_model = make_linear_model(builds / f"donor-{vectors_from}.onnx", vectors_from)
            donor = builds / f"donor-{vectors_from}.tar"
            build_bundle(donor_model, "donor", "0.0.1", donor)
            import tarfile

            with tarfile.open(donor) as t:
                member = t.extractfile("vectors.npz")
                assert member is not None
                vectors = builds / f"vectors-{vectors_from}.npz"
                vectors.write_bytes(member.read())
        out = builds / f"{MODEL}-{version}.tar"
        build_bundle(model, MODEL, version, out, vectors=vectors)
        return out

    def next_version(self) -> str:
        v = f"{self.next_major}.0.0"
        self.next_major += 1
        self.save()
        return v

    def publish(self, version: str | None = None, *, seed: int | None = None,
                announce: bool = True) -> str:
        """Build, sign and publish a good release; announce it over MQTT."""
        version = version or self.next_version()
        bundle = self.build(version, seed if seed is not None else self.next_major * 7)
        self.repository().publish(bundle)
        history = self.dir / "history"
        history.mkdir(exist_ok=True)
        ts = self.repo / "metadata" / "timestamp.json"
        version_ts = loads_bounded(ts.read_bytes(), max_bytes=1 << 20, what=str(ts))[
            "signed"]["version"]
        shutil.copyfile(ts, history / f"timestamp-{version_ts}.json")
        self.published.append(version)
        self.save()
        if announce:
            self.announce()
        return version

    def announce(self) -> bool:
        """Announce the current timestamp; False when the broker is unreachable."""
        from modelward.publisher._bridge import announce
        from modelward.trust.errors import TransportError

        try:
            announce(self.repo, self.mqtt("modelward-operator"))
        except TransportError:
            return False
        return True

    def attacker(self) -> RepoAttacker:
        return RepoAttacker(self.repo, self.keys, self.passphrase.encode())

    # -- services -----------------------------------------------------------------------
    def start_origin(self) -> None:
        start_origin(self.repo, self.dir / "origin", self.server_cert(), port=self.origin_port)

    def stop_origin(self) -> None:
        stop_origin(self.dir / "origin")

    def start_broker(self) -> None:
        bc = self.dir / "broker-config"
        start_broker(self.dir / "broker", self.server_cert(), self.ca(), bc / "modelward.conf",
                     port=self.broker_port)

    def stop_broker(self) -> None:
        stop_broker(self.dir / "broker")

    def start_bridge(self) -> None:
        # Output goes to files, not pipes: the bridge outlives the `sim` command.
        out_file = self.dir / "bridge.out"
        with open(self.dir / "bridge.log", "a") as log, open(out_file, "w") as out:
            proc = subprocess.Popen(
                [sys.executable, "-I", "-m", "modelward", "-v", "serve-mqtt", "--repo",
                 str(self.repo), "--broker", f"mqtts://127.0.0.1:{self.broker_port}",
                 "--fleet", FLEET, "--tls-ca", str(self.ca()), "--username",
                 "modelward-bridge", "--password-file", str(self.creds / "modelward-bridge")],
                stdout=out, stderr=log, start_new_session=True)
        (self.dir / "bridge.pid").write_text(str(proc.pid))
        if not wait_for(lambda: out_file.read_text().startswith("serving")
                        or proc.poll() is not None, 30, 0.1) or proc.poll() is not None:
            raise ServiceError("the bridge did not start", service="serve-mqtt",
                               log=str(self.dir / "bridge.log"))

    def stop_bridge(self) -> None:
        stop_pid(self.dir / "bridge.pid")

    def start_tpm(self, d: Device) -> None:
        start_swtpm(d.tpm, port=d.tpm_port)

    def stop_tpm(self, d: Device) -> None:
        stop_swtpm(d.tpm)

    def start_agent(self, d: Device) -> None:
        with open(d.dir / "agent.log", "a") as log:
            proc = subprocess.Popen(
                [sys.executable, "-I", "-m", "modelward", "-v", "agent", "run", "--config",
                 str(d.conf)], stdout=subprocess.DEVNULL, stderr=log, start_new_session=True)
        (d.dir / "agent.pid").write_text(str(proc.pid))

    def stop_agent(self, d: Device) -> None:
        stop_pid(d.dir / "agent.pid")


def fleet_up(directory: Path, devices: int, *, poll_interval: float = 10.0,
             announce_spread: float = 0.0, say: Callable[[str], None] = lambda s: None) -> Fleet:
    """Create and start a fleet of ``devices`` in ``directory`` (which must not hold one).

    Raises:
        ServiceError: a service did not start, or a fleet runs there already.
    """
    from modelward.agent._commands import provision as agent_provision
    from modelward.agent._config import load_config
    from modelward.publisher._broker_config import write_broker_config
    from modelward.publisher._repo import Repository

    directory = directory.resolve()
    if (directory / "fleet.json").exists():
        raise ServiceError(f"a fleet is already set up in {directory}", service="fleet",
                           hint="`modelward sim fleet down --dir DIR` first")
    directory.mkdir(parents=True, exist_ok=True)
    passphrase = secrets.token_hex(16)
    write_atomic(directory / "passphrase", (passphrase + "\n").encode(), mode=0o600)
    ids = [f"dev-{i:03d}" for i in range(1, devices + 1)]
    fleet = Fleet(directory, [Device(i, directory / "devices" / i,
                                     "mqtt" if n % 2 == 0 else "https")
                              for n, i in enumerate(ids)], 0, 0, passphrase)
    say(f"repository and keys in {directory}")
    repo = Repository(fleet.repo, fleet.keys, passphrase.encode())
    root = repo.init()
    fleet.pki.mkdir(parents=True, exist_ok=True)
    ca = make_ca(fleet.pki)
    server = issue_cert(ca, fleet.pki, "server")
    assert server == fleet.server_cert(), server
    write_broker_config(FLEET, ids, directory / "broker-config")
    try:
        origin = start_origin(fleet.repo, directory / "origin", fleet.server_cert())
        fleet.origin_port = origin.port
        say(f"nginx origin {origin.url} (pid {origin.pid})")
        bc = directory / "broker-config"
        broker = start_broker(directory / "broker", fleet.server_cert(), ca.cert,
                              bc / "modelward.conf")
        fleet.broker_port = broker.port
        say(f"mosquitto {broker.url} (pid {broker.pid})")
        fleet.save()
        fleet.start_bridge()
        say(f"serve-mqtt bridge (pid {(directory / 'bridge.pid').read_text()})")
        for d in fleet.devices:
            d.dir.mkdir(parents=True, exist_ok=True)
            tpm = start_swtpm(d.tpm)
            d.tpm_port = tpm.port
            write_device_config(
                d.conf, device_id=d.id, fleet=FLEET, state=d.state, tcti=tpm.tcti,
                origin_url=origin.url, ca=ca.cert, transport=d.transport,
                poll_interval=poll_interval, announce_spread=announce_spread,
                mqtt={"host": "127.0.0.1", "port": broker.port, "ca_file": str(ca.cert),
                      "password_file": str(fleet.creds / d.id)},
            )
            agent_provision(load_config(d.conf), root)
            fleet.save()
            fleet.start_agent(d)
            say(f"{d.id}: swtpm {tpm.tcti}, agent over {d.transport}")
    except BaseException:
        fleet_down(directory)
        raise
    return fleet


def fleet_down(directory: Path) -> list[str]:
    """Stop everything of the fleet in ``directory`` by pid; returns what was stopped."""
    directory = directory.resolve()
    stopped = []
    for pid_file in sorted(directory.glob("devices/*/agent.pid")):
        if stop_pid(pid_file):
            stopped.append(f"agent {pid_file.parent.name}")
    if stop_pid(directory / "bridge.pid"):
        stopped.append("bridge")
    if stop_broker(directory / "broker"):
        stopped.append("mosquitto")
    if stop_origin(directory / "origin"):
        stopped.append("nginx")
    for tpm in sorted(directory.glob("devices/*/tpm")):
        if stop_swtpm(tpm):
            stopped.append(f"swtpm {tpm.parent.name}")
    (directory / "fleet.json").unlink(missing_ok=True)
    return stopped


def pids_alive(directory: Path) -> list[int]:
    """Pids from the fleet's pid files that still run (for checks after ``down``)."""
    alive = []
    for f in [*directory.glob("devices/*/agent.pid"), directory / "bridge.pid",
              *directory.glob("devices/*/tpm/swtpm.pid"), directory / "broker" / "mosquitto.pid",
              directory / "origin" / "nginx.pid"]:
        pid = read_pid(f)
        if pid is not None:
            alive.append(pid)
    return alive


def wait_for(pred: Callable[[], bool], timeout: float, poll: float = 0.5) -> bool:
    """Poll ``pred`` until true or ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(poll)
    return pred()
