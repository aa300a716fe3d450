"""Issue 15: the example inference app's loading rules and busy signal, without a TPM
(the real-stack path is tests/integration/test_i15_example_app.py). Each case is what the
disk attacker or a careless writer of the state dir would try next."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from modelward.agent.app import BusySignal, ModelWatcher, VerifiedModel, load_verified
from modelward.simulator._app import APP
from modelward.simulator._models import make_linear_model
from modelward.trust._fingerprint import directory_entries, slot_fingerprint
from modelward.updater.idle import BusyFileSignal


@pytest.fixture(scope="module")
def ia() -> ModuleType:
    spec = importlib.util.spec_from_file_location("inference_app", APP)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def slot(state: Path, name: str, version: str, seed: int) -> Path:
    """A slot as the agent lays it out, with a manifest naming the model and its sha256."""
    d = state / "slots" / name
    d.mkdir(parents=True)
    model = make_linear_model(d / "model.onnx", seed)
    sha = hashlib.sha256(model.read_bytes()).hexdigest()
    (d / "manifest.json").write_text(json.dumps({
        "name": "classifier", "version": version, "model": {"path": "model.onnx"},
        "files": [{"path": "model.onnx", "sha256": sha}]}))
    return d


def record(state: Path, name: str) -> None:
    """What the agent commits before it flips `current` (fixapp): the trust record naming
    slot ``name`` active with its fingerprint, the active one before as previous."""
    rec = state / "trust" / "record.json"
    old = json.loads(rec.read_text())["record"]["active"] if rec.exists() else None
    version = json.loads((state / "slots" / name / "manifest.json").read_text())["version"]
    active = {"name": "classifier", "version": version, "slot": name,
              "fingerprint": slot_fingerprint(directory_entries(state / "slots" / name))}
    rec.parent.mkdir(exist_ok=True)
    rec.write_text(json.dumps({"mac": "00", "record": {"active": active, "previous": old}}))


def activate(state: Path, name: str) -> None:
    record(state, name)
    tmp = state / "current.tmp"
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(f"slots/{name}")
    tmp.replace(state / "current")


@pytest.fixture
def state(tmp_path: Path) -> Path:
    s = tmp_path / "state"
    slot(s, "a", "1.0.0", 1)
    slot(s, "b", "2.0.0", 2)
    activate(s, "a")
    return s


def test_loads_the_active_slot_through_its_manifest(ia: ModuleType, state: Path) -> None:
    m = load_verified(str(state / "current"))
    assert (m.name, m.version) == ("classifier", "1.0.0")
    assert m.sha256 == hashlib.sha256((state / "slots/a/model.onnx").read_bytes()).hexdigest()
    assert m.data == (state / "slots/a/model.onnx").read_bytes()


def _manifest(state: Path, **model: Any) -> None:
    p = state / "slots/a/manifest.json"
    doc = json.loads(p.read_text())
    doc["model"].update(model)
    p.write_text(json.dumps(doc))


@pytest.mark.parametrize("attack", [
    "flip", "path-dotdot", "path-absolute", "model-symlink", "manifest-symlink",
    "current-absolute", "current-elsewhere", "slots-symlink", "slot-symlink", "unlisted",
    "model-dev-zero", "model-fifo", "model-symlink-same-bytes",
])
def test_refuses_what_the_disk_attacker_plants(state: Path, tmp_path: Path, attack: str,
                                               ) -> None:
    """Refused: each load raises; nothing from the planted bytes is loaded."""
    a = state / "slots" / "a"
    evil = tmp_path / "evil"
    shutil.copytree(state / "slots" / "b", evil)
    if attack == "flip":
        data = bytearray((a / "model.onnx").read_bytes())
        data[len(data) // 2] ^= 0xFF
        (a / "model.onnx").write_bytes(bytes(data))
    elif attack == "path-dotdot":
        _manifest(state, path="../b/model.onnx")
    elif attack == "path-absolute":
        _manifest(state, path=str(evil / "model.onnx"))
    elif attack == "model-symlink":
        (a / "model.onnx").unlink()
        (a / "model.onnx").symlink_to(evil / "model.onnx")
    elif attack == "manifest-symlink":
        (a / "manifest.json").unlink()
        (a / "manifest.json").symlink_to(evil / "manifest.json")
    elif attack == "current-absolute":
        (state / "current").unlink()
        (state / "current").symlink_to(state / "slots" / "b")
    elif attack == "current-elsewhere":
        (state / "current").unlink()
        (state / "current").symlink_to(evil)
    elif attack == "slots-symlink":
        shutil.move(state / "slots", tmp_path / "real-slots")
        (state / "slots").symlink_to(tmp_path / "real-slots")
    elif attack == "slot-symlink":
        shutil.rmtree(a)
        a.symlink_to(evil)
    elif attack == "unlisted":
        _manifest(state, path="other.onnx")
        shutil.copy(evil / "model.onnx", a / "other.onnx")
    elif attack == "model-dev-zero":  # an endless read
        (a / "model.onnx").unlink()
        (a / "model.onnx").symlink_to("/dev/zero")
    elif attack == "model-fifo":  # a read that never returns
        (a / "model.onnx").unlink()
        os.mkfifo(a / "model.onnx")
    elif attack == "model-symlink-same-bytes":  # bytes outside the slot, changeable later
        shutil.copy(a / "model.onnx", tmp_path / "outside.onnx")
        (a / "model.onnx").unlink()
        (a / "model.onnx").symlink_to(tmp_path / "outside.onnx")
    out: list[BaseException | VerifiedModel] = []

    def load() -> None:
        try:
            out.append(load_verified(str(state / "current")))
        except (ValueError, OSError) as e:
            out.append(e)

    t = threading.Thread(target=load, daemon=True)
    t.start()
    t.join(10)
    assert out and isinstance(out[0], ValueError | OSError), out or "load hung"


def test_a_failed_reload_keeps_serving_the_old_model_and_a_good_one_swaps(
    ia: ModuleType, state: Path, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="modelward.agent.app")
    app = ModelWatcher(str(state / "current"), ia.MODEL.open_model)
    app.poll()
    assert app.active is not None and app.active.model.version == "1.0.0"
    activate(state, "b")
    (state / "slots/b/model.onnx").write_bytes(b"not onnx")  # b no longer matches
    (state / "slots/b/manifest.json").touch()
    app.poll()  # (a, the record's previous: kept during the activation)
    assert app.active is not None and app.active.model.version == "1.0.0"
    assert "still serving classifier 1.0.0" in caplog.text
    shutil.rmtree(state / "slots/b")
    slot(state, "b", "3.0.0", 3)  # a new directory: the manifest's inode changes
    record(state, "b")
    app.poll()
    assert app.active is not None and app.active.model.version == "3.0.0"
    app.poll()  # unchanged: no reload
    assert caplog.text.count("serving classifier 3.0.0") == 1


def test_busy_file_is_what_the_agents_idle_gate_reads(tmp_path: Path) -> None:
    busy = tmp_path / "queue-depth"
    app, gate = BusySignal(str(busy)), BusyFileSignal(busy, max_depth=0)
    app.add(0)
    assert gate.busy() is None
    app.add(+1)
    assert gate.busy() == "application queue depth 1 > 0"
    app.add(+1)
    app.add(-1)
    assert busy.read_text() == "1\n" and not Path(str(busy) + ".tmp").exists()
    app.add(-1)
    assert gate.busy() is None
    app.remove()
    assert not busy.exists()
    gone = BusySignal(str(tmp_path / "gone" / "queue-depth"))
    gone.add(+1)  # an unwritable signal is logged; serving and reloading go on
    gone.add(-1)
    assert gone.depth == 0


def test_http_answers_bad_requests_with_a_json_error(
    ia: ModuleType, state: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    busy = BusySignal("")
    app = ModelWatcher(str(state / "current"), ia.MODEL.open_model, busy)
    monkeypatch.setattr(ia, "MODEL", app)
    monkeypatch.setattr(ia, "BUSY", busy)
    server = ia.BoundedHTTPServer(("127.0.0.1", 0), ia.Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_port}/"

    def ask(body: bytes | None) -> tuple[int, dict[str, Any]]:
        try:
            with urllib.request.urlopen(urllib.request.Request(url, data=body)) as r:  # noqa: S310
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    try:
        assert ask(None)[0] == 503  # nothing loaded yet: no answer from no model
        assert ask(b'{"input": [[0,0,0,0,0,0,0,0]]}')[0] == 503
        app.poll()
        code, doc = ask(b'{"input": [[0,0,0,0,0,0,0,0]]}')
        assert code == 200 and doc["version"] == "1.0.0" and len(doc["output"][0]) == 4
        for bad in (b"not json", b'{"input": [[1, 2]]}', b'{"x": 1}', b'{"input": "a"}',
                    b"[1]"):
            code, doc = ask(bad)
            assert code == 400 and "error" in doc, (bad, doc)
        with socket.create_connection(("127.0.0.1", server.server_port)) as c:  # no body read
            c.sendall(b"POST / HTTP/1.1\r\nContent-Length: %d\r\n\r\n{}" % (1 << 30))
            assert c.recv(100).startswith(b"HTTP/1.0 413 "), "not refused by its size"
        # every request left the queue (the handler thread leaves it just after it
        # answered: give it a moment rather than race it)
        deadline = time.monotonic() + 5
        while busy.depth and time.monotonic() < deadline:
            time.sleep(0.01)
        assert busy.depth == 0
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.xdist_group("machine")
def test_example_unit_verifies_and_exposure_is_low(tmp_path: Path) -> None:
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze missing")
    unit = Path(__file__).resolve().parents[2] / "systemd" / "examples" / "inference.service"
    text = unit.read_text().replace("/opt/modelward/bin/python3", sys.executable) \
        .replace("/usr/local/lib/inference/inference_app.py", str(APP))
    (tmp_path / "inference.service").write_text(text)
    r = subprocess.run(["systemd-analyze", "verify", str(tmp_path / "inference.service")],
                       capture_output=True, text=True, check=False)
    assert r.returncode == 0 and r.stderr.strip() == "", r.stderr
    r = subprocess.run(["systemd-analyze", "security", "--offline=yes", str(unit)],
                       capture_output=True, text=True, check=False)
    assert "Overall exposure level for inference.service: 2." in r.stdout or \
        "exposure level for inference.service: 1." in r.stdout, r.stdout
    assert os.access(APP, os.R_OK)
