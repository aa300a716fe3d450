"""Issue 15, "Extras by role" (the import side of must show 2): every device command works
with the operator's and tester's packages absent, on swtpm + nginx + mosquitto; an operator
command that needs a package of its extra ends in one line naming it and the extra.

"Absent" is a meta-path hook in a throwaway venv on top of the dev venv
(tests/_i15_blockvenv.py): ``onnx``, ``rich`` (with pygments), ``pkcs11``, and
``modelward.simulator`` / ``modelward.publisher`` (but the two stdlib-only tables the CLI
parser lists: scenario names and the bridge's limit options) cannot be imported, in the
agent and in every child it starts (``-I`` still runs ``site``), the sandboxed health check
included. An attempt by modelward's own code also leaves a marker, so a swallowed
``ImportError`` fails the test too.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from modelward.simulator._origin import start_origin, stop_origin
from modelward.simulator._pki import CertPair
from modelward.updater.bundle._chunkindex import ChunkIndex, parse_index
from tests._i15_blockvenv import block_venv
from tests.conftest import MqttWorld, World, _new_repo
from tests.integration.test_i16_delta import _expected

DEVICE_ABSENT = ("onnx", "rich", "pygments", "pkcs11", "modelward.simulator",
                 "modelward.publisher")
PARSER_TABLES = ("modelward.simulator", "modelward.publisher", "modelward.simulator._catalogue",
                 "modelward.publisher._fairness")


def _served_index(w: MqttWorld, version: str) -> ChunkIndex:
    """The signed chunk index of ``classifier version`` as the origin serves it."""
    (path,) = (w.repo_dir / "targets" / "classifier").glob(
        f"*.classifier-{version}.tar.chunks.json")
    return parse_index(path.read_bytes(), str(path))


def _wait(pred: Callable[[], bool], timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(0.1)


@pytest.fixture
def device_python(tmp_path: Path) -> Path:
    return block_venv(tmp_path / "device-venv", DEVICE_ABSENT, PARSER_TABLES)


def _run(py: Path, markers: Path, *argv: str, cwd: Path,
         env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    e = {**os.environ, "MW_BLOCK_MARKERS": str(markers), **(env or {})}
    return subprocess.run([str(py), "-I", "-m", "modelward", *argv], capture_output=True,
                          text=True, env=e, cwd=cwd, timeout=120, check=False)


def test_device_commands_without_operator_and_tester_packages(
        mqtt_world: MqttWorld, pki: tuple[CertPair, CertPair], device_python: Path) -> None:
    w, py = mqtt_world, device_python
    markers = w.tmp / "markers"
    markers.mkdir()
    origin = start_origin(w.repo_dir, w.tmp / "origin", pki[1])
    try:
        w.conf_path.write_text(w.conf_path.read_text() + (
            f'\n[https]\nmetadata_url = "{origin.url}/metadata/"\n'
            f'targets_url = "{origin.url}/targets/"\nca_file = "{w.ca.cert}"\n'))
        conf = str(w.conf_path)
        # the hook holds: the device python cannot import what a [device] install lacks
        probe = subprocess.run([str(py), "-I", "-c", "import onnx"], capture_output=True,
                               text=True, check=False)
        assert "No module named 'onnx' (blocked)" in probe.stderr

        r = _run(py, markers, "agent", "--help", cwd=w.tmp)
        assert r.returncode == 0 and "boot-check" in r.stdout, r.stderr
        r = _run(py, markers, "--help", cwd=w.tmp)
        assert r.returncode == 0 and "agent" in r.stdout, r.stderr
        r = _run(py, markers, "agent", "provision", "--config", conf, "--root",
                 str(w.repo_dir / "metadata" / "1.root.json"), cwd=w.tmp)
        assert r.returncode == 0, r.stderr
        w.publish("1.0.0", seed=1)
        r = _run(py, markers, "agent", "update", "--once", "--transport", "https",
                 "--config", conf, cwd=w.tmp)
        assert r.returncode == 0, r.stderr  # downloaded, health-checked (onnxruntime), active
        assert w.active_version() == "1.0.0"
        for argv in (("agent", "status", "--config", conf), ("agent", "boot-check", "--config",
                                                            conf)):
            r = _run(py, markers, *argv, cwd=w.tmp)
            assert r.returncode == 0, (argv, r.stderr)
            assert "Traceback" not in r.stderr
        assert "1.0.0" in _run(py, markers, "agent", "status", "--config", conf,
                               cwd=w.tmp).stdout

        # the daemon: its first attempt (a child, then the sandboxed health check) over MQTT
        v2 = w.publish("2.0.0", seed=2)
        log = w.tmp / "daemon.log"
        with log.open("w") as err:
            proc = subprocess.Popen(
                [str(py), "-I", "-m", "modelward", "agent", "run", "--config", conf],
                stdout=subprocess.DEVNULL, stderr=err, cwd=w.tmp,
                env={**os.environ, "MW_BLOCK_MARKERS": str(markers)})
            try:
                _wait(lambda: w.active_version() == "2.0.0", 60, "the daemon to install 2.0.0")
            finally:
                proc.send_signal(signal.SIGTERM)
                assert proc.wait(20) == 0, log.read_text()
        assert "Traceback" not in log.read_text()
        # (fetched over MQTT, as a delta from 1.0.0: exactly v2's chunks the device lacks,
        # plus the gaps between coalesced ranges)
        chunk_bytes, gap_bytes, _ = _expected(_served_index(w, "1.0.0"),
                                              _served_index(w, "2.0.0"))
        assert chunk_bytes < v2.stat().st_size
        assert w.served_bytes(v2.name) == chunk_bytes + gap_bytes
        assert sorted(p.name for p in markers.iterdir()) == []  # modelward never asked
    finally:
        stop_origin(w.tmp / "origin")


@pytest.mark.parametrize(("absent", "argv", "package"), [
    ("onnx", ("bundle", "build", "{model}", "--name", "c", "--version", "1.0.0", "-o",
              "{tmp}/b.tar"), "onnx"),
    ("pkcs11", ("repo", "add-key", "root", "--hsm-keyid", "1", "--repo", "{tmp}/repo",
                "--keys", "{tmp}/keys"), "python-pkcs11"),
])
def test_operator_command_without_its_extra_is_one_line(
        tmp_path: Path, absent: str, argv: tuple[str, ...], package: str) -> None:
    from modelward.simulator._models import make_linear_model

    model = make_linear_model(tmp_path / "m.onnx", 1)
    py = block_venv(tmp_path / "venv", (absent,))
    env = {"MODELWARD_KEY_PASSPHRASE": "modelward test passphrase", "MODELWARD_HSM_PIN": "1"}
    if argv[0] == "repo":  # repo init needs none of onnx, rich, pkcs11 (the online host's)
        r = _run(py, tmp_path, "repo", "init", "--repo", str(tmp_path / "repo"), "--keys",
                 str(tmp_path / "keys"), cwd=tmp_path,
                 env={**env, "MW_BLOCK": "onnx,rich,pygments,pkcs11"})
        assert r.returncode == 0, r.stderr
    r = _run(py, tmp_path, *(a.format(model=model, tmp=tmp_path) for a in argv), cwd=tmp_path,
             env=env)
    assert r.returncode == 1
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert package in lines[0] and "pip install 'modelward[operator]'" in lines[0], lines
    assert f"`modelward {argv[0]} {argv[1]}`" in lines[0]


def test_publish_on_a_terminal_without_rich_has_no_bar_and_works(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The online host installs the core alone: `publish` on its terminal draws no bar."""
    from modelward.publisher._bundle_build import build_bundle
    from modelward.simulator._models import make_linear_model

    bundle = tmp_path / "c.tar"
    build_bundle(make_linear_model(tmp_path / "m.onnx", 1), "c", "1.0.0", bundle)
    py = block_venv(tmp_path / "venv", ("onnx", "rich", "pygments", "pkcs11"))
    repo_dir, keys, *_ = _new_repo(tmp_path, monkeypatch)  # (cheap test keys, in-process)
    repo = ("--repo", str(repo_dir), "--keys", str(keys))
    env = {"MODELWARD_KEY_PASSPHRASE": os.environ["MODELWARD_KEY_PASSPHRASE"]}
    leader, follower = os.openpty()  # stderr a terminal: where the bar would be drawn
    err: list[bytes] = []

    def drain() -> None:  # (a full terminal buffer would block the child)
        while True:
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # EIO: the child's side is closed
                return
            if not chunk:
                return
            err.append(chunk)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    try:
        r = subprocess.run([str(py), "-I", "-m", "modelward", "publish", *repo, str(bundle)],
                           stdout=subprocess.PIPE, stderr=follower, text=True, timeout=120,
                           env={**os.environ, **env, "MW_BLOCK_MARKERS": str(tmp_path)},
                           cwd=tmp_path, check=False)
    finally:
        os.close(follower)
        reader.join(10)
        os.close(leader)
    assert r.returncode == 0, b"".join(err).decode(errors="replace")
    assert "published c 1.0.0" in r.stdout


def test_a_device_without_onnxruntime_rejects_no_release(world: World) -> None:
    """A careless install (`pip install modelward`, no [device]): the health check cannot run.
    That is the device's fault, so it is a typed local error naming the package, nothing
    trusted moves and the signed release is not remembered as rejected: once onnxruntime
    is installed, the next attempt installs it."""
    w = world
    py = block_venv(w.tmp / "venv", ("onnxruntime",))
    w.publish("1.0.0", seed=1)
    before = w.snapshot()
    r = _run(py, w.tmp, "agent", "update", "--once", "--config", str(w.conf_path), cwd=w.tmp)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "modelward: error: health check of classifier 1.0.0 cannot run: the Python " \
        "package onnxruntime is not installed on this device" in r.stderr, r.stderr
    assert "hint: pip install 'modelward[device]'" in r.stderr
    assert "HealthCheckError" not in r.stderr and "rejection" not in r.stderr
    after = w.snapshot()
    assert (after.record, after.counter, after.anchor, after.current, after.slots) == (
        before.record, before.counter, before.anchor, before.current, before.slots)
    st = w.cli("agent", "status", "--config", str(w.conf_path), "--json")
    assert st.returncode == 0, st.stderr
    doc = json.loads(st.stdout)
    assert doc["rejected"] == [] and doc["last_error"]["type"] == "SandboxError"
    w.update()  # onnxruntime back (this process): the same release installs
    assert w.active_version() == "1.0.0"
