"""Attacks (a15app) on the example inference app (examples/inference_app.py): a signed but
malicious model, a disk attacker on the slot it reads, a local client of its HTTP port.

The app runs as a subprocess (modelward.simulator._app) on a hand-made state dir."""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from modelward.simulator._app import AppHandle, start_app, stop_app
from modelward.simulator._models import make_linear_model
from modelward.trust._fingerprint import directory_entries, slot_fingerprint

X = np.linspace(-1.0, 1.0, 16, dtype=np.float32).reshape(2, 8).tolist()


def make_tile_model(path: Path, repeats: int) -> Path:
    """A model whose output is its input tiled ``repeats`` times along axis 1 (a valid model
    that answers a 2x8 request with 2 x 8*repeats floats)."""
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        [helper.make_node("Tile", ["x", "r"], ["y"])],
        "tile",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", None])],
        initializer=[numpy_helper.from_array(np.array([1, repeats], dtype=np.int64), "r")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path.write_bytes(model.SerializeToString())
    return path


def write_slot(slot: Path, model_bytes: bytes, version: str, model_path: str = "model.onnx",
               place: Path | None = None) -> None:
    slot.mkdir(parents=True, exist_ok=True)
    target = place if place is not None else slot / model_path
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(model_bytes)
    sha = hashlib.sha256(model_bytes).hexdigest()
    (slot / "manifest.json").write_text(json.dumps({
        "name": "classifier", "version": version, "model": {"path": model_path},
        "files": [{"path": model_path, "sha256": sha}],
    }))


def write_record(state: Path, slot: str, version: str) -> None:
    """The trust record as the agent leaves it naming ``slot`` active (the app cannot check
    the TPM MAC: a dummy)."""
    fp = slot_fingerprint(directory_entries(state / "slots" / slot))
    active = {"name": "classifier", "version": version, "slot": slot, "fingerprint": fp}
    (state / "trust").mkdir(exist_ok=True)
    tmp = state / "trust" / "record.json.tmp"
    tmp.write_text(json.dumps({"mac": "00", "record": {
        "counter": 1, "root_version": 1, "targets_version": 1, "active": active,
        "previous": None}}))
    tmp.replace(state / "trust" / "record.json")


def state_with(tmp: Path, model_bytes: bytes, version: str = "1.0.0", **kw: object) -> Path:
    state = tmp / "state"
    write_slot(state / "slots" / "a", model_bytes, version, **kw)  # type: ignore[arg-type]
    os.symlink("slots/a", state / "current")
    write_record(state, "a", version)
    return state


def linear_bytes(tmp: Path, seed: int = 1) -> bytes:
    return make_linear_model(tmp / f"lin-{seed}.onnx", seed).read_bytes()


@pytest.fixture
def run_app(tmp_path: Path) -> Iterator[object]:
    started: list[AppHandle] = []

    def start(state: Path) -> AppHandle:
        h = start_app(state / "current", tmp_path / "busy", tmp_path / f"app{len(started)}.log")
        started.append(h)
        return h

    yield start
    for h in started:
        stop_app(h.pid, h.proc)


def _hostport(app: AppHandle) -> tuple[str, int]:
    host, port = app.url.removeprefix("http://").rstrip("/").split(":")
    return host, int(port)


def _busy(tmp: Path) -> str:
    try:
        return (tmp / "busy").read_text()
    except FileNotFoundError:
        return ""


# --- a signed but malicious model -------------------------------------------------------


def test_a15_app_huge_output_is_refused_not_sent(tmp_path: Path, run_app) -> None:  # type: ignore[no-untyped-def]
    state = state_with(tmp_path, make_tile_model(tmp_path / "tile.onnx", 200_000).read_bytes())
    app = run_app(state)
    conn = http.client.HTTPConnection(*_hostport(app), timeout=30)
    conn.request("POST", "/", body=json.dumps({"input": X}))
    r = conn.getresponse()
    body = r.read(4 << 20)  # (the first 4 MiB)
    conn.close()
    # An answer of the example app is a few hundred bytes (simulator._app.MAX_ANSWER: 1 MiB);
    # an output far beyond that is an error, not a 30 MB JSON document.
    assert len(body) <= 1 << 20 and r.status != 200, (r.status, len(body))


# --- a disk attacker on the slot ---------------------------------------------------------


def test_a15_app_never_reads_a_model_through_a_symlinked_directory(
    tmp_path: Path, run_app,  # type: ignore[no-untyped-def]
) -> None:
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    state = state_with(tmp_path, linear_bytes(tmp_path, 7), "6.6.6", model_path="lnk/model.onnx",
                       place=outside / "model.onnx")
    os.symlink(str(outside), state / "slots" / "a" / "lnk")
    app = run_app(state)
    assert app.info().get("status") == 503, app.info()


@pytest.mark.parametrize("name", ["/etc/hostname", "../b/model.onnx", "a/../../x", "", "."])
def test_a15_app_refuses_manifest_paths_outside_the_slot(
    tmp_path: Path, run_app, name: str,  # type: ignore[no-untyped-def]
) -> None:
    state = state_with(tmp_path, linear_bytes(tmp_path), "1.0.0")
    m = json.loads((state / "slots/a/manifest.json").read_text())
    m["model"]["path"] = name
    m["files"].append({"path": name, "sha256": "0" * 64})
    (state / "slots/a/manifest.json").write_text(json.dumps(m))
    app = run_app(state)
    assert app.info().get("status") == 503


def test_a15_app_fifo_model_does_not_hang_the_app(tmp_path: Path, run_app) -> None:  # type: ignore[no-untyped-def]
    state = state_with(tmp_path, linear_bytes(tmp_path), "1.0.0")
    (state / "slots/a/model.onnx").unlink()
    os.mkfifo(state / "slots/a/model.onnx")
    app = run_app(state)  # (started: it printed "serving on", so poll() returned)
    assert app.info().get("status") == 503


# --- a local client of the app ------------------------------------------------------------


def test_a15_app_slow_body_does_not_hold_the_busy_signal(tmp_path: Path, run_app) -> None:  # type: ignore[no-untyped-def]
    app = run_app(state_with(tmp_path, linear_bytes(tmp_path)))
    s = socket.create_connection(_hostport(app))
    try:
        s.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n")
        t0 = time.monotonic()
        held_at = None
        while time.monotonic() - t0 < 7.0:
            with contextlib.suppress(OSError):  # (fixapp: the app may cut it: right too)
                s.sendall(b" ")
            time.sleep(0.8)
            if _busy(tmp_path) == "1\n":
                held_at = time.monotonic() - t0
        # Past the handler's own 5 s bound, a request that still has not arrived is no
        # longer "in the queue".
        assert _busy(tmp_path) == "0\n" and (held_at is None or held_at < 6.0), held_at
    finally:
        s.close()


@pytest.mark.parametrize("length", ["-5", "abc", "0", str(1 << 21), "1e3"])
def test_a15_app_bad_content_length_leaves_no_depth(
    tmp_path: Path, run_app, length: str,  # type: ignore[no-untyped-def]
) -> None:
    app = run_app(state_with(tmp_path, linear_bytes(tmp_path)))
    s = socket.create_connection(_hostport(app))
    try:
        s.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: " + length.encode()
                  + b"\r\n\r\n")
        s.settimeout(5)
        reply = s.recv(4096)
    finally:
        s.close()
    assert reply.split(b" ")[1] in (b"400", b"413")
    deadline = time.monotonic() + 3
    while _busy(tmp_path) != "0\n":
        assert time.monotonic() < deadline, _busy(tmp_path)
        time.sleep(0.05)


def test_a15_app_oversized_headers_are_refused(tmp_path: Path, run_app) -> None:  # type: ignore[no-untyped-def]
    app = run_app(state_with(tmp_path, linear_bytes(tmp_path)))
    s = socket.create_connection(_hostport(app))
    try:
        s.sendall(b"GET / HTTP/1.1\r\nX: " + b"a" * 70000 + b"\r\n\r\n")
        s.settimeout(5)
        reply = s.recv(4096)
    finally:
        s.close()
    assert reply.startswith(b"HTTP/1.0 431") or b" 400 " in reply.split(b"\r\n")[0] + b" "
    assert app.info()["version"] == "1.0.0"  # (still serving)


def make_log_model(path: Path) -> Path:
    """y = log(x): a valid model whose output for a negative input is NaN."""
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Log", ["x"], ["y"])], "log",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path.write_bytes(model.SerializeToString())
    return path


def test_a15_app_answers_only_valid_json(tmp_path: Path, run_app) -> None:  # type: ignore[no-untyped-def]
    app = run_app(state_with(tmp_path, make_log_model(tmp_path / "log.onnx").read_bytes()))
    conn = http.client.HTTPConnection(*_hostport(app), timeout=10)
    conn.request("POST", "/", body=json.dumps({"input": X}))
    body = conn.getresponse().read()
    conn.close()

    def strict(token: str) -> object:
        raise ValueError(f"{token} is not JSON")

    json.loads(body, parse_constant=strict)


def test_a15_app_many_idle_connections_do_not_starve_clients(
    tmp_path: Path, run_app,  # type: ignore[no-untyped-def]
) -> None:
    import resource

    state = state_with(tmp_path, linear_bytes(tmp_path))
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (64, hard))  # (the app inherits it)
    try:
        app = run_app(state)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    socks: list[socket.socket] = []
    stop = threading.Event()

    def dribble() -> None:  # one byte a second renews every handler's 5 s recv timeout
        while not stop.wait(1.0):
            for s in list(socks):
                with contextlib.suppress(OSError):
                    s.send(b"a")

    t = threading.Thread(target=dribble)
    t.start()
    try:
        for _ in range(90):
            s = socket.socket()
            s.settimeout(0.1)
            try:
                s.connect(_hostport(app))
                s.sendall(b"GET / HTTP/1.1\r\nX: ")  # (a header that never ends)
            except OSError:
                s.close()
                continue
            socks.append(s)
        time.sleep(0.5)
        conn = http.client.HTTPConnection(*_hostport(app), timeout=3)
        try:
            conn.request("GET", "/")
            status: object = conn.getresponse().status
        except OSError as e:
            status = repr(e)
        finally:
            conn.close()
        assert status == 200, (status, len(socks))
    finally:
        stop.set()
        if t.is_alive():
            t.join()
        for s in socks:
            s.close()


def test_a15_app_stops_serving_when_current_is_removed(tmp_path: Path, run_app) -> None:  # type: ignore[no-untyped-def]
    state = state_with(tmp_path, linear_bytes(tmp_path, 1), "1.0.0")
    app = run_app(state)
    assert app.info()["version"] == "1.0.0"
    evil = tmp_path / "evil"
    write_slot(evil, linear_bytes(tmp_path, 666), "6.6.6")
    os.chmod(evil, 0o750)  # noqa: S103 - as a slot
    os.rename(state / "slots" / "a", tmp_path / "old-a")
    os.rename(evil, state / "slots" / "a")  # (a new manifest inode: the app reloads)
    # (fixapp: the attacker's slot is not the one the trust record names: never served; the
    # test first asked for 6.6.6 to be served, to show the app kept it after `current` went)
    assert app.wait_for("6.6.6", timeout=2.0)["version"] == "1.0.0"
    (state / "current").unlink()  # what SlotStore.deactivate does when nothing is trusted
    time.sleep(1.5)  # (more than one poll)
    assert app.info().get("status") == 503, app.info()
