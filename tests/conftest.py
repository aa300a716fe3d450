"""Shared fixtures: real swtpm, nginx HTTPS origin, TUF repository, onnx models."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

os.environ["TSS2_LOG"] = "all+NONE"  # the TSS's own stderr chatter

from modelward.agent._commands import provision as agent_provision  # noqa: E402
from modelward.agent._commands import update as agent_update  # noqa: E402
from modelward.agent._config import AgentConfig, load_config  # noqa: E402
from modelward.publisher._bundle_build import BuildOptions, build_bundle
from modelward.publisher._keyfile import ScryptParams  # noqa: E402
from modelward.publisher._repo import Repository  # noqa: E402
from modelward.simulator._demo import write_device_config
from modelward.simulator._models import make_linear_model
from modelward.simulator._origin import start_origin, stop_origin
from modelward.simulator._pki import CertPair, issue_cert, make_ca
from modelward.simulator._swtpm import SwtpmHandle, start_swtpm, stop_swtpm
from modelward.trust._store import TrustStore  # noqa: E402
from modelward.trust._tpm import Tpm
from modelward.updater.install._install import UpdateResult  # noqa: E402
from tests._stock_tuf import changed_repo, stock_refresh  # noqa: E402

PASSPHRASE = b"modelward test passphrase"  # keys are generated per test, never committed


@pytest.hookimpl(tryfirst=True)  # before -m deselects
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark ``machine`` every test of ``xdist_group("machine")`` (machine-wide state or a
    time/CPU/RSS budget), so that scripts/test can run them alone: ``-m machine``."""
    for item in items:
        g = item.get_closest_marker("xdist_group")
        if g is not None and (g.args[:1] or (g.kwargs.get("name"),))[0] == "machine":
            item.add_marker(pytest.mark.machine)


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> tuple[CertPair, CertPair]:
    """A test CA and a server certificate for 127.0.0.1."""
    d = tmp_path_factory.mktemp("pki")
    ca = make_ca(d)
    return ca, issue_cert(ca, d, "origin")


@pytest.fixture
def swtpm(tmp_path: Path) -> Iterator[SwtpmHandle]:
    """A manufactured, running swtpm; stopped by pid afterwards."""
    state = tmp_path / "tpm"
    h = start_swtpm(state)
    try:
        yield h
    finally:
        stop_swtpm(state)


def tree_digest(root: Path) -> dict[str, str]:
    """relative path -> sha256 (or link target) for everything below ``root``."""
    out: dict[str, str] = {}
    if not root.exists():
        return out
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if p.is_symlink():
            out[rel] = "-> " + os.readlink(p)
        elif p.is_file():
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


@dataclass
class DeviceState:
    """Everything trusted on a device, for before/after comparisons."""

    record: bytes
    counter: int
    anchor: bytes
    current: str | None
    slots: dict[str, str]
    metadata: dict[str, str]


@dataclass
class World:
    """A repository served by nginx and one provisioned swtpm device."""

    tmp: Path
    repo_dir: Path
    keys: Path
    repo: Repository
    builds: Path
    conf_path: Path
    tpm: SwtpmHandle
    origin_url: str
    ca: CertPair

    @property
    def cfg(self) -> AgentConfig:
        return load_config(self.conf_path)

    @property
    def state(self) -> Path:
        return self.cfg.state_dir

    def bundle(
        self,
        version: str,
        seed: int,
        *,
        name: str = "classifier",
        vectors_seed: int | None = None,
        extra: list[tuple[Path, str]] | None = None,
    ) -> Path:
        """Build a bundle of a linear model; ``vectors_seed`` takes vectors from another model."""
        model = make_linear_model(self.builds / f"{name}-{version}.onnx", seed)
        vectors = None
        if vectors_seed is not None:
            other = make_linear_model(self.builds / f"other-{vectors_seed}.onnx", vectors_seed)
            donor = self.builds / f"donor-{vectors_seed}.tar"
            build_bundle(other, "donor", "0.0.1", donor)
            vectors = self.builds / f"vectors-{vectors_seed}.npz"
            subprocess.run(["tar", "-xf", str(donor), "-C", str(self.builds),
                            "vectors.npz"], check=True)
            (self.builds / "vectors.npz").rename(vectors)
        out = self.builds / f"{name}-{version}.tar"
        build_bundle(model, name, version, out, vectors=vectors, extra=extra or [],
                     options=BuildOptions())
        return out

    def publish(self, version: str, seed: int, **kw: Any) -> Path:
        """Build and publish; returns the published file on the origin."""
        r = self.repo.publish(self.bundle(version, seed, **kw))
        stock_refresh(self.repo_dir)  # what is published, a stock TUF client accepts
        name = r.name
        return next((self.repo_dir / "targets" / name).glob(f"*.{name}-{version}.tar"))

    def update(self) -> UpdateResult:
        return agent_update(self.cfg)

    def store(self) -> TrustStore:
        return TrustStore(self.state, Tpm(self.tpm.tcti))

    def snapshot(self) -> DeviceState:
        s = self.store()
        try:
            counter, anchor = s.tpm.read_counter(), s.tpm.read_anchor()
        finally:
            s.tpm.close()
        cur = self.state / "current"
        return DeviceState(
            record=(self.state / "trust" / "record.json").read_bytes(),
            counter=counter,
            anchor=anchor,
            current=os.readlink(cur) if cur.is_symlink() else None,
            slots=tree_digest(self.state / "slots"),
            metadata=tree_digest(self.state / "metadata"),
        )

    def active_version(self) -> str | None:
        cur = self.state / "current"
        if not cur.is_symlink():
            return None
        import json

        return str(json.loads((cur / "manifest.json").read_bytes())["version"])

    def cli(
        self, *argv: str, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run the real ``modelward`` command in a child process."""
        e = dict(os.environ)
        e.update(env or {})
        r = subprocess.run([sys.executable, "-m", "modelward", *argv], capture_output=True,
                           text=True, env=e, timeout=300, check=False)
        changed = changed_repo(argv) if r.returncode == 0 else None
        if changed is not None:  # issue 14: a stock TUF client accepts every change
            stock_refresh(changed)
        return r


def _new_repo(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> tuple[Path, Path, Path, Repository, Path]:
    """A fresh repository with threshold-1 keys: (repo dir, keys, builds, repo, root)."""
    monkeypatch.setenv("MODELWARD_KEY_PASSPHRASE", PASSPHRASE.decode())
    # Test speed: these throwaway keys use a cheap scrypt (about 1 ms, not 0.1 s, per use,
    # here and in every CLI child that opens them); the real cost is tested in test_i14_keys.
    monkeypatch.setattr("modelward.publisher._keyfile.DEFAULT_SCRYPT", ScryptParams(2**10, 8, 1))
    repo_dir, keys, builds = tmp_path / "repo", tmp_path / "keys", tmp_path / "builds"
    builds.mkdir()
    repo = Repository(repo_dir, keys, PASSPHRASE)
    return repo_dir, keys, builds, repo, repo.init()


@pytest.fixture
def world(
    tmp_path: Path, swtpm: SwtpmHandle, pki: tuple[CertPair, CertPair],
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[World]:
    """Repository (threshold-1 keys) served by nginx; a provisioned swtpm device."""
    ca, server = pki
    repo_dir, keys, builds, repo, root = _new_repo(tmp_path, monkeypatch)
    work = tmp_path / "origin"
    origin = start_origin(repo_dir, work, server)
    try:
        conf = write_device_config(
            tmp_path / "agent.toml", device_id="dev-1", state=tmp_path / "state",
            tcti=swtpm.tcti, origin_url=origin.url, ca=ca.cert,
        )
        w = World(tmp_path, repo_dir, keys, repo, builds, conf, swtpm, origin.url, ca)
        agent_provision(w.cfg, root)
        yield w
    finally:
        stop_origin(work)


def copytree(src: Path, dst: Path) -> None:
    """Replace ``dst`` with a copy of ``src``."""
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(src, dst, symlinks=True)


# --- MQTT ---------------------------------------------------------------------

FLEET = "f1"


@dataclass
class MqttWorld(World):
    """A World whose repository is also served over MQTT (mosquitto + serve-mqtt)."""

    broker_work: Path = Path()
    broker_port: int = 0
    creds: dict[str, Path] | None = None
    bridge: subprocess.Popen[str] | None = None
    bridge_log: Path = Path()

    def broker_args(self, user: str) -> list[str]:
        assert self.creds is not None
        return ["--broker", f"mqtts://127.0.0.1:{self.broker_port}", "--fleet", FLEET,
                "--tls-ca", str(self.ca.cert), "--username", user,
                "--password-file", str(self.creds[user])]

    def mqtt_cfg(self, user: str) -> Any:
        from modelward.updater._config import MqttConfig

        assert self.creds is not None
        return MqttConfig(host="127.0.0.1", port=self.broker_port, fleet=FLEET,
                          client_name=user, ca_file=str(self.ca.cert),
                          password=self.creds[user].read_text().strip())

    def start_bridge(self) -> None:
        self.bridge_log = self.tmp / f"bridge-{len(list(self.tmp.glob('bridge-*')))}.log"
        log = open(self.bridge_log, "w")  # noqa: SIM115 - the child owns it
        self.bridge = subprocess.Popen(
            [sys.executable, "-m", "modelward", "-vv", "serve-mqtt", "--repo",
             str(self.repo_dir), *self.broker_args("modelward-bridge")],
            stdout=subprocess.PIPE, stderr=log, text=True,
        )
        assert self.bridge.stdout is not None
        line = self.bridge.stdout.readline()
        assert line.startswith("serving"), (line, self.bridge_log.read_text())

    def stop_bridge(self) -> None:
        if self.bridge is not None:
            self.bridge.terminate()
            self.bridge.wait(10)
            self.bridge = None

    def served_bytes(self, needle: str) -> int:
        import re

        total = 0
        for line in self.bridge_log.read_text().splitlines():
            if needle in line:
                m = re.search(r"bytes=(\d+)", line)
                total += int(m.group(1)) if m else 0
        return total


@pytest.fixture
def mqtt_world(
    tmp_path: Path, swtpm: SwtpmHandle, pki: tuple[CertPair, CertPair],
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[MqttWorld]:
    """Repository served only over MQTT (no HTTPS origin); device ``dev-1`` provisioned."""
    from modelward.publisher._broker_config import write_broker_config
    from modelward.simulator._broker import start_broker, stop_broker

    ca, server = pki
    repo_dir, keys, builds, repo, root = _new_repo(tmp_path, monkeypatch)
    bc = write_broker_config(FLEET, ["dev-1", "dev-2"], tmp_path / "broker-config")
    broker = start_broker(tmp_path / "broker", server, ca.cert, bc.conf)
    w: MqttWorld | None = None
    try:
        conf = write_device_config(
            tmp_path / "agent.toml", device_id="dev-1", fleet=FLEET, state=tmp_path / "state",
            tcti=swtpm.tcti, poll_interval=3600,
            mqtt={"host": "127.0.0.1", "port": broker.port, "ca_file": str(ca.cert),
                  "password_file": str(bc.credentials["dev-1"])},
        )
        w = MqttWorld(tmp_path, repo_dir, keys, repo, builds, conf, swtpm, "", ca,
                      broker_work=tmp_path / "broker", broker_port=broker.port,
                      creds=bc.credentials)
        w.start_bridge()
        agent_provision(w.cfg, root)
        yield w
    finally:
        if w is not None:
            w.stop_bridge()
        stop_broker(tmp_path / "broker")
