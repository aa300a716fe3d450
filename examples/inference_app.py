"""Example inference app: serves the model modelward activated, on loopback HTTP.

  MODEL_DIR=/var/lib/modelward/current BUSY_FILE=/run/inference/busy python3 inference_app.py
  curl -d '{"input": [[0, 1, 2, 3, 4, 5, 6, 7]]}' http://127.0.0.1:8470/

POST {"input": [[...]]} -> {"output": [[...]], "model", "version", "sha256"}; GET -> the same
without output. It reloads when ``current`` changes (polled each second, or on SIGHUP): the
new model is read once, checked against its manifest's sha256 and loaded before the swap; if
that fails it keeps serving the old one. It writes its queue depth to BUSY_FILE, which the
agent reads as ``[idle] busy_file`` and holds heavy update work while it is above 0.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import stat
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import numpy as np
import onnxruntime as ort

MODEL_DIR = os.environ.get("MODEL_DIR", "/var/lib/modelward/current")
BUSY_FILE = os.environ.get("BUSY_FILE", "")
log = logging.getLogger("inference")


def _read(dir_fd: int, name: str) -> bytes:
    if name.startswith("/") or ".." in name.split("/"):
        raise ValueError(f"manifest names the model {name!r}, not a file in the slot")
    fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=dir_fd)
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):  # a FIFO or device would hang or never end
            raise ValueError(f"{name} is not a regular file")
        return f.read()


def load(model_dir: str) -> dict[str, Any]:
    """The slot's manifest and model, read through one directory fd (one consistent slot)."""
    link = os.readlink(model_dir)  # `current` is exactly slots/a or slots/b, nothing else
    if link not in ("slots/a", "slots/b"):
        raise ValueError(f"{model_dir} -> {link!r} is not a modelward slot")
    nofollow = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW
    slots = os.open(os.path.join(os.path.dirname(model_dir), "slots"), nofollow)
    try:
        dir_fd = os.open(link[-1], nofollow, dir_fd=slots)
    finally:
        os.close(slots)
    try:
        manifest = json.loads(_read(dir_fd, "manifest.json"))
        path = manifest["model"]["path"]
        data = _read(dir_fd, path)
    finally:
        os.close(dir_fd)
    sha = hashlib.sha256(data).hexdigest()
    listed = {f["path"]: f["sha256"] for f in manifest["files"]}
    if listed.get(path) != sha:
        raise ValueError(f"{path} has sha256 {sha}, its manifest says {listed.get(path)}")
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])  # from memory
    return {"model": manifest["name"], "version": manifest["version"], "sha256": sha,
            "session": session, "input": session.get_inputs()[0].name}


class App:
    def __init__(self) -> None:
        self.active: dict[str, Any] | None = None
        self.key: object = None
        self.depth, self.lock, self.reload = 0, threading.Lock(), threading.Event()

    def _key(self) -> object:
        try:  # which slot `current` names, and which manifest file is in it
            st = os.stat(os.path.join(MODEL_DIR, "manifest.json"))
            return os.readlink(MODEL_DIR), st.st_ino, st.st_mtime_ns
        except OSError:
            return None

    def poll(self) -> None:
        key = self._key()
        if key == self.key and not self.reload.is_set():
            return
        self.key = key
        self.reload.clear()
        try:
            new = load(MODEL_DIR)
        except Exception as e:  # noqa: BLE001 - any failure: keep serving what we have
            old = self.active and f"{self.active['model']} {self.active['version']}"
            log.error("cannot load %s (%s); still serving %s", MODEL_DIR, e, old or "nothing")
            return
        self.active = new
        log.info("serving %s %s (sha256 %s)", new["model"], new["version"], new["sha256"])

    def busy(self, delta: int) -> None:
        with self.lock:
            self.depth += delta
            if not BUSY_FILE:
                return
            try:  # a regular file, replaced whole: the agent never sees half of it
                with open(BUSY_FILE + ".tmp", "w") as f:
                    f.write(f"{self.depth}\n")
                os.replace(BUSY_FILE + ".tmp", BUSY_FILE)
            except OSError as e:  # serving (and reloading) matter more than the signal
                log.warning("cannot write %s: %s", BUSY_FILE, e)

    def watch(self) -> None:
        while True:
            self.reload.wait(1.0)
            self.poll()
            self.busy(0)  # a heartbeat: a fresh mtime, so the agent believes the depth


class Handler(BaseHTTPRequestHandler):
    app: App
    timeout = 5  # a client that stops sending does not stay "in the queue"

    def _reply(self, code: int, doc: dict[str, Any]) -> None:
        body = json.dumps(doc).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:  # noqa: N802
        m = self.app.active
        if m is None:
            return self._reply(503, {"error": "no verified model loaded"})
        return self._reply(200, {k: m[k] for k in ("model", "version", "sha256")})

    def do_POST(self) -> None:  # noqa: N802
        self.app.busy(+1)
        try:
            m = self.app.active  # this request uses one model, even if a reload swaps it
            size = int(self.headers.get("Content-Length", 0))
            if m is None or not 0 < size <= 1 << 20:
                return self._reply(503 if m is None else 413, {"error": "no model or bad size"})
            x = np.asarray(json.loads(self.rfile.read(size))["input"], dtype=np.float32)
            y = m["session"].run(None, {m["input"]: x})[0]
            return self._reply(200, {"output": y.tolist(),
                                     **{k: m[k] for k in ("model", "version", "sha256")}})
        except Exception as e:  # noqa: BLE001 - bad JSON, or input the model refuses: 400
            return self._reply(400, {"error": str(e)})
        finally:
            self.app.busy(-1)

    def log_message(self, fmt: str, *args: Any) -> None:
        pass  # one line per model change, not per request


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="inference: %(message)s")
    app = App()
    app.busy(0)
    app.poll()
    Handler.app = app
    server = ThreadingHTTPServer(("127.0.0.1", int(os.environ.get("PORT", "8470"))), Handler)
    signal.signal(signal.SIGHUP, lambda *_: app.reload.set())  # ExecReload=kill -HUP
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown).start())
    threading.Thread(target=app.watch, daemon=True).start()
    print(f"serving on http://127.0.0.1:{server.server_port}", flush=True)
    server.serve_forever()
    if BUSY_FILE:
        os.unlink(BUSY_FILE)  # stopped: no queue


if __name__ == "__main__":
    main()
