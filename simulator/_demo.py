"""End-to-end demo: v1 over HTTPS (nginx), v2 announced and fetched over MQTT (mosquitto),
on a swtpm device; then a tampered model and the boot-time fallback."""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from modelward.simulator._app import AppHandle, start_app, stop_app
from modelward.simulator._broker import start_broker, stop_broker
from modelward.simulator._models import make_linear_model
from modelward.simulator._origin import start_origin, stop_origin
from modelward.simulator._pki import issue_cert, make_ca
from modelward.simulator._swtpm import start_swtpm, stop_swtpm
from modelward.trust._bounded import loads_bounded, read_json_file


def write_device_config(
    path: Path,
    *,
    device_id: str,
    state: Path,
    tcti: str,
    origin_url: str | None = None,
    ca: Path | None = None,
    model: str = "classifier",
    fleet: str = "demo",
    mqtt: dict[str, object] | None = None,
    transport: str | None = None,
    poll_interval: float | None = None,
    announce_spread: float | None = 0.0,
    https: dict[str, object] | None = None,
    idle: dict[str, object] | None = None,
) -> Path:
    """Write an agent config for a simulated device; sections appear in argument order
    (HTTPS first), which is the order ``transport = "auto"`` prefers."""
    lines = [
        f'device_id = "{device_id}"', f'fleet = "{fleet}"', f'state_dir = "{state}"',
        f'tcti = "{tcti}"', f'model = "{model}"',
    ]
    if transport:
        lines.append(f'transport = "{transport}"')
    agent = [f"{k} = {v}" for k, v in (("poll_interval", poll_interval),
                                        ("announce_spread", announce_spread))
             if v is not None]
    if agent:  # (a simulated device answers an announcement at once, unless told)
        lines += ["", "[agent]", *agent]
    if origin_url is not None:
        lines += ["", "[https]", f'metadata_url = "{origin_url}/metadata/"',
                  f'targets_url = "{origin_url}/targets/"']
        if ca is not None:
            lines.append(f'ca_file = "{ca}"')
        lines += _toml_items(https or {})
    if mqtt:
        lines += ["", "[mqtt]", *_toml_items(mqtt)]
    if idle:
        lines += ["", "[idle]", *_toml_items(idle)]
    path.write_text("\n".join(lines) + "\n")
    return path


def _toml_items(items: dict[str, object]) -> list[str]:
    return [f'{k} = "{v}"' if isinstance(v, str | Path) else f"{k} = {v}"
            for k, v in items.items()]


def _say(text: str) -> None:
    print(f"\n== {text}", flush=True)


def _run(*argv: str) -> int:
    """Run one ``modelward`` command as its own process, as a person would (isolated:
    the working directory cannot shadow a module; the simulator never imports the CLI)."""
    print("$ modelward " + shlex.join(argv), flush=True)
    code = subprocess.run([sys.executable, "-I", "-m", "modelward", *argv],
                          check=False).returncode
    print(f"  (exit {code})", flush=True)
    return code


@contextlib.contextmanager
def _services(work: Path) -> Iterator[list[subprocess.Popen[str]]]:
    children: list[subprocess.Popen[str]] = []
    try:
        yield children
    finally:
        for child in children:
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)
                child.wait(20)
        stop_broker(work / "broker")
        stop_origin(work / "origin")
        stop_swtpm(work / "device" / "tpm")


def _spawn(children: list[subprocess.Popen[str]], log: Path, *argv: str) -> subprocess.Popen[str]:
    print("$ modelward " + shlex.join(argv) + f"   (in the background, log: {log})", flush=True)
    child = subprocess.Popen([sys.executable, "-I", "-m", "modelward", *argv],
                             stdout=subprocess.PIPE, stderr=open(log, "w"),  # noqa: SIM115
                             text=True)
    children.append(child)
    return child


def _wait(pred: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.2)
    return False


def _active(state: Path) -> str | None:
    try:
        return str(read_json_file(state / "current" / "manifest.json", 1 << 20)["version"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


_X = [[(i - 3.5) / 4 for i in range(8)]]  # one input row for the example app


def _app_log(app: AppHandle) -> str:
    return app.log.read_text(errors="replace")


def _served(app: AppHandle, version: str, trusted: dict[str, str],
            expect: Callable[[bool, str], None], tampered: str = "") -> None:
    """Ask the app; check it serves ``version`` from the operator's bytes, not ``tampered``."""
    app.wait_for(version)
    got = app.infer(_X)
    sha = str(got.get("sha256", ""))
    print(f"  app answered: {got.get('model')} {got.get('version')} sha256 {sha[:16]}... "
          f"output {[round(v, 3) for v in got.get('output', [[]])[0]]}", flush=True)
    expect(got.get("version") == version and sha == trusted.get(version) and sha != tampered,
           f"the app serves {version}, the bytes the operator built")


def run_demo(work: Path) -> int:
    """Run the demo in ``work`` (recreated); returns 0 when every step behaved as expected."""
    work = work.resolve()
    if work.exists():
        stop_broker(work / "broker")
        stop_origin(work / "origin")
        stop_swtpm(work / "device" / "tpm")
        shutil.rmtree(work)
    work.mkdir(parents=True)
    os.environ.setdefault("MODELWARD_KEY_PASSPHRASE", secrets.token_hex(16))
    repo, keys, builds, device = work / "repo", work / "keys", work / "builds", work / "device"
    builds.mkdir()
    failures: list[str] = []

    def expect(ok: bool, what: str) -> None:
        print(("  ok: " if ok else "  UNEXPECTED: ") + what, flush=True)
        if not ok:
            failures.append(what)

    with _services(work) as children:
        _say("Operator: create a TUF repository (keys outside the served directory)")
        _run("repo", "init", "--repo", str(repo), "--keys", str(keys))

        _say("Operator: build two real ONNX models and bundle them with test vectors")
        for seed, version in ((1, "1.0.0"), (2, "2.0.0")):
            model = make_linear_model(builds / f"classifier-{version}.onnx", seed)
            _run("bundle", "build", str(model), "--name", "classifier", "--version", version,
                 "-o", str(builds / f"classifier-{version}.tar"))
        _run("publish", "--repo", str(repo), "--keys", str(keys),
             str(builds / "classifier-1.0.0.tar"))

        _say("Tester: serve the repository over HTTPS (nginx) and MQTT (mosquitto with TLS "
             "and per-device ACLs, plus the serve-mqtt bridge); start a swtpm device")
        pki = work / "pki"
        pki.mkdir()
        ca = make_ca(pki)
        server = issue_cert(ca, pki, "server")
        origin = start_origin(repo, work / "origin", server)
        print(f"  origin {origin.url} (pid {origin.pid}), CA pinned by the device: {ca.cert}")
        _run("fleet", "broker-config", "--fleet", "demo", "--devices", "demo-001",
             "-o", str(work / "broker-config"))
        creds = work / "broker-config" / "credentials"
        broker = start_broker(work / "broker", server, ca.cert,
                              work / "broker-config" / "modelward.conf")
        print(f"  mosquitto {broker.url} (pid {broker.pid})")
        mqtt_args = ["--broker", broker.url, "--fleet", "demo", "--tls-ca", str(ca.cert)]
        bridge = _spawn(children, work / "bridge.log", "serve-mqtt", "--repo", str(repo),
                        *mqtt_args, "--password-file", str(creds / "modelward-bridge"))
        assert bridge.stdout is not None
        print("  " + bridge.stdout.readline().strip())
        tpm = start_swtpm(device / "tpm")
        print(f"  swtpm {tpm.tcti} (pid {tpm.pid})")
        state = device / "state"
        conf = write_device_config(
            device / "agent.toml", device_id="demo-001", state=state, tcti=tpm.tcti,
            origin_url=origin.url, ca=ca.cert, transport="mqtt", poll_interval=3600,
            mqtt={"host": "127.0.0.1", "port": broker.port, "ca_file": str(ca.cert),
                  "password_file": str(creds / "demo-001")},
            idle={"busy_file": str(device / "app-busy"), "poll": 0.2},
        )
        print(f"  device config {conf}: HTTPS and MQTT; the daemon uses MQTT; its idle gate "
              f"reads the inference app's queue depth from {device / 'app-busy'}")

        _say("Device: provision the TPM trust store and anchor root.json in TPM NV")
        _run("agent", "provision", "--config", str(conf), "--root",
             str(repo / "metadata" / "1.root.json"))

        _say("Device: update over HTTPS -> v1 (TUF refresh, download, verify, health check, "
             "commit)")
        expect(_run("agent", "update", "--config", str(conf), "--once", "--transport",
                    "https") == 0, "v1 installed over HTTPS")

        _say("Device: start the example inference app (examples/inference_app.py) on "
             f"{state / 'current'}")
        # The trusted record of what may be served: the sha256 of the model files the
        # operator built. Every answer must name one of them, for the version it claims.
        trusted = {v: hashlib.sha256((builds / f"classifier-{v}.onnx").read_bytes()).hexdigest()
                   for v in ("1.0.0", "2.0.0")}
        app = start_app(state / "current", device / "app-busy", work / "app.log")
        children.append(app.proc)
        print(f"  app {app.url} (pid {app.pid}), log {work / 'app.log'}")
        _served(app, "1.0.0", trusted, expect)

        _say("Device: start the daemon; it listens for announcements on MQTT")
        daemon_log = work / "agent.log"
        daemon = _spawn(children, daemon_log, "--log-format", "json", "agent", "run",
                        "--config", str(conf))  # JSON lines: read below
        time.sleep(2)

        _say("Operator: publish v2 and announce it; the device fetches it over MQTT")
        _run("publish", "--repo", str(repo), "--keys", str(keys),
             str(builds / "classifier-2.0.0.tar"), "--announce", *mqtt_args,
             "--password-file", str(creds / "modelward-operator"))
        expect(_wait(lambda: _active(state) == "2.0.0", 60), "v2 installed over MQTT")
        for line in daemon_log.read_text().splitlines():
            with contextlib.suppress(ValueError, AttributeError, TypeError):
                msg = str(loads_bounded(line, max_bytes=1 << 16, what="a log line")
                          .get("msg", ""))
                if any(w in msg for w in ("announcement", "installed", "installing")):
                    print(f"  agent log: {msg}")
        _served(app, "2.0.0", trusted, expect)
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(20)
        print("  daemon stopped")

        _say("Device: a third run finds nothing to do")
        expect(_run("agent", "update", "--config", str(conf), "--once") == 0, "nothing to do")
        _run("agent", "status", "--config", str(conf))

        if failures:
            _say(f"FAILED before the tamper step: {failures}")
            return 1
        _say("Attacker: flip one byte of the active model on the device's disk")
        model_file = device / "state" / "current" / "model.onnx"
        data = bytearray(model_file.read_bytes())
        data[len(data) // 2] ^= 0xFF
        model_file.write_bytes(bytes(data))
        print(f"  flipped byte {len(data) // 2} of {model_file}")
        tampered = hashlib.sha256(bytes(data)).hexdigest()
        print("  the app is asked to reload (SIGHUP) while the tampered model is active:")
        app.reload()
        expect(_wait(lambda: "does not have the fingerprint" in _app_log(app), 5),
               "the app refused the tampered bytes (not the trust record's fingerprint)")
        _served(app, "2.0.0", trusted, expect, tampered)

        _say("Device reboots: boot-check finds the mismatch and falls back to v1")
        expect(_run("agent", "boot-check", "--config", str(conf)) == 0, "fell back, exit 0")
        _run("agent", "status", "--config", str(conf))
        target = os.readlink(device / "state" / "current")
        expect("1.0.0" in (device / "state" / target / "manifest.json").read_text(),
               f"current -> {target} holds v1")
        _served(app, "1.0.0", trusted, expect, tampered)

        _say("Device: the next update reinstalls v2 into the other slot")
        expect(_run("agent", "update", "--config", str(conf), "--once") == 0, "v2 reinstalled")
        _run("agent", "status", "--config", str(conf))
        _served(app, "2.0.0", trusted, expect, tampered)
        expect(f"(sha256 {tampered})" not in _app_log(app),
               "the app never served the tampered model")
        stop_app(app.pid, app.proc)
        print(f"  app (pid {app.pid}) stopped; its log:")
        for line in _app_log(app).splitlines():
            print(f"    {line}")

    _say("Services stopped. " + ("Demo finished: every step behaved as expected."
                                 if not failures else f"FAILED: {failures}"))
    return 0 if not failures else 1
