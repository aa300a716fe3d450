"""Example inference app: serves the model modelward activated, on loopback HTTP.

  MODEL_DIR=/var/lib/modelward/current BUSY_FILE=/run/inference/busy python3 inference_app.py
  curl -d '{"input": [[0, 1, 2, 3, 4, 5, 6, 7]]}' http://127.0.0.1:8470/

POST {"input": [[...]]} -> {"output": [[...]], "model", "version", "sha256"}; GET -> the same
without output. It reloads when ``current`` or the trust record changes (polled each second,
or on SIGHUP). It serves only the model the agent activated: the slot ``current`` names must
be the trust record's (``state/trust/record.json``) active slot, the manifest its name and
version, and the bytes it loaded must hash (modelward's fingerprint) to the record's
fingerprint of that slot; anything else (a planted slot, swapped slots, a symlink anywhere
in a path) is refused. A refused reload keeps the old model only while the record still
names it (active, or previous during an activation); with ``current`` gone (nothing
trusted) it answers 503. It writes its queue depth to BUSY_FILE, which the agent reads as
``[idle] busy_file``: a request counts once its body has arrived, for at most a bounded time.

What this does NOT protect against: the app cannot check the record's TPM MAC, so a writer
of the state dir as the agent's user can rewrite the record too (the boot check, before this
app starts, and the agent's own checks catch that); it guards against a disk attacker who
changes slots or ``current`` but not the record, and against a slow or flooding local client.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import signal
import socket
import stat
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from modelward.trust._fingerprint import MerkleHasher, directory_entries, slot_fingerprint

MODEL_DIR = os.environ.get("MODEL_DIR", "/var/lib/modelward/current")
BUSY_FILE = os.environ.get("BUSY_FILE", "")
MAX_BODY, MAX_OUTPUT_VALUES, MAX_REPLY = 1 << 20, 1 << 15, 1 << 20  # bytes, floats, bytes
MAX_CONNECTIONS, READ_SECONDS, ANSWER_SECONDS = 16, 5.0, 30.0
NOFOLLOW_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW
log = logging.getLogger("inference")


def _read(dir_fd: int, path: str, size: int) -> bytes:
    """The ``size`` bytes of the regular file ``path`` below ``dir_fd``: every component
    opened with O_NOFOLLOW from the one before (no symlink anywhere, nothing outside)."""
    parts = path.split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"manifest names {path!r}, not a file in the slot")
    fd = os.dup(dir_fd)
    try:
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            nxt = os.open(part, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK if last
                          else NOFOLLOW_DIR, dir_fd=fd)
            os.close(fd)
            fd = nxt
        if not stat.S_ISREG(os.fstat(fd).st_mode):  # a FIFO or device would hang or never end
            raise ValueError(f"{path} is not a regular file")
        with os.fdopen(os.dup(fd), "rb") as f:
            data = f.read(size + 1)
    finally:
        os.close(fd)
    if len(data) != size:
        raise ValueError(f"{path} has changed size since it was fingerprinted")
    return data


def trusted(model_dir: str) -> dict[str, Any]:
    """The trust record next to ``model_dir``: {"active": ref or None, "previous": ...}."""
    path = os.path.join(os.path.dirname(model_dir), "trust", "record.json")
    with os.fdopen(os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK), "rb") as f:
        record = json.loads(f.read(64 * 1024))["record"]
    return {k: record[k] and {f: str(record[k][f]) for f in ("name", "version", "slot",
                                                             "fingerprint")}
            for k in ("active", "previous")}


def load(model_dir: str) -> dict[str, Any]:
    """The model of the slot the trust record names active, if ``current`` names it and its
    files (as read) are what the record's fingerprint says."""
    ref = trusted(model_dir)["active"]
    link = os.readlink(model_dir)  # `current` is exactly slots/a or slots/b, nothing else
    if ref is None or link != f"slots/{ref['slot']}":
        raise ValueError(f"{model_dir} -> {link!r}, the trust record names {ref} active")
    slot = Path(os.path.dirname(model_dir), link)
    entries = {e.path: e for e in directory_entries(slot)}
    if slot_fingerprint(entries.values()) != ref["fingerprint"]:
        raise ValueError(f"{slot} does not have the fingerprint the trust record names")
    slots = os.open(slot.parent, NOFOLLOW_DIR)
    try:
        dir_fd = os.open(slot.name, NOFOLLOW_DIR, dir_fd=slots)
    finally:
        os.close(slots)

    def read(path: str) -> bytes:  # the bytes, as fingerprinted (they could change meanwhile)
        e, h = entries.get(path), MerkleHasher()
        if e is None or e.size < 0:
            raise ValueError(f"{path} is not a plain file of the fingerprinted slot")
        h.update(data := _read(dir_fd, path, e.size))
        if h.hexdigest() != e.merkle_root:
            raise ValueError(f"{path} changed since it was fingerprinted")
        return data

    try:
        manifest = json.loads(read("manifest.json"))
        if (manifest["name"], manifest["version"]) != (ref["name"], ref["version"]):
            raise ValueError(f"the slot holds {manifest['name']} {manifest['version']}, "
                             f"the trust record names {ref['name']} {ref['version']}")
        path = manifest["model"]["path"]
        data = read(path)
    finally:
        os.close(dir_fd)
    sha = hashlib.sha256(data).hexdigest()
    listed = {f["path"]: f["sha256"] for f in manifest["files"]}
    if listed.get(path) != sha:
        raise ValueError(f"{path} has sha256 {sha}, its manifest says {listed.get(path)}")
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])  # from memory
    return {"model": manifest["name"], "version": manifest["version"], "sha256": sha,
            "session": session, "input": session.get_inputs()[0].name, "ref": ref}


class App:
    def __init__(self) -> None:
        self.active: dict[str, Any] | None = None
        self.key: object = None
        self.depth, self.lock, self.reload = 0, threading.Lock(), threading.Event()

    def _key(self) -> object:  # which slot `current` names, its manifest, the record
        def ident(path: str) -> object:
            try:
                st = os.lstat(path)
                return st.st_ino, st.st_mtime_ns, st.st_size
            except OSError:
                return None
        try:
            link: str | None = os.readlink(MODEL_DIR)
        except OSError:  # (gone, or not a link: the watch thread must not die of it)
            link = None
        return (link, ident(os.path.join(MODEL_DIR, "manifest.json")),
                ident(os.path.join(os.path.dirname(MODEL_DIR), "trust", "record.json")))

    def poll(self) -> None:
        key = self._key()
        if key == self.key and not self.reload.is_set():
            return
        self.key = key
        self.reload.clear()
        try:
            new = load(MODEL_DIR)
        except Exception as e:  # noqa: BLE001 - any failure: keep only what is still trusted
            old = self.active
            try:
                keep = old is not None and os.path.lexists(MODEL_DIR) \
                    and old["ref"] in trusted(MODEL_DIR).values()
            except Exception:  # noqa: BLE001 - no readable record: nothing is trusted
                keep = False
            self.active = old if keep else None
            log.error("cannot load %s (%s); %s", MODEL_DIR, e,
                      f"still serving {old['model']} {old['version']}" if keep and old
                      else "serving nothing")
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


class Server(ThreadingHTTPServer):
    """At most MAX_CONNECTIONS connections (a new one cuts the oldest still sending its
    request), each cut READ_SECONDS after it was accepted unless its request has arrived,
    then ANSWER_SECONDS later (a slow or flooding client holds neither fds nor the queue)."""

    daemon_threads = True

    def __init__(self, addr: tuple[str, int], handler: type[BaseHTTPRequestHandler]) -> None:
        super().__init__(addr, handler)
        self.guard, self.conns = threading.Lock(), dict[socket.socket, list[Any]]()
        threading.Thread(target=self._reap, daemon=True).start()

    def _cut(self, s: socket.socket) -> None:  # (under guard) its handler reads EOF and ends
        del self.conns[s]
        with contextlib.suppress(OSError):
            s.shutdown(socket.SHUT_RDWR)

    def process_request(self, request: Any, client_address: Any) -> None:
        with self.guard:
            reading = [s for s, (_, answering) in self.conns.items() if not answering]
            if len(self.conns) >= MAX_CONNECTIONS:
                if not reading:  # all answering: no room for this one
                    self.shutdown_request(request)
                    return
                self._cut(reading[0])
            self.conns[request] = [time.monotonic() + READ_SECONDS, False]
        super().process_request(request, client_address)

    def answering(self, request: socket.socket) -> None:
        with self.guard:
            if request in self.conns:
                self.conns[request] = [time.monotonic() + ANSWER_SECONDS, True]

    def shutdown_request(self, request: Any) -> None:
        with self.guard:  # (before it is closed: its fd number is never cut by mistake)
            self.conns.pop(request, None)
        super().shutdown_request(request)

    def _reap(self) -> None:
        while True:
            time.sleep(0.2)
            with self.guard:
                for s in [s for s, (end, _) in self.conns.items() if end < time.monotonic()]:
                    self._cut(s)


class Handler(BaseHTTPRequestHandler):
    app: App
    server: Server
    timeout = READ_SECONDS  # (per read; the Server bounds the whole request)

    def _reply(self, code: int, doc: dict[str, Any]) -> None:
        try:
            body = json.dumps(doc, allow_nan=False).encode()
            if len(body) > MAX_REPLY:
                raise ValueError(f"an answer of {len(body)} bytes, more than {MAX_REPLY}")
        except (TypeError, ValueError) as e:  # NaN or Infinity: not JSON (RFC 8259)
            code, body = 500, json.dumps({"error": f"the model's output: {e}"}).encode()
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
        try:
            size = int(self.headers.get("Content-Length", ""))
        except ValueError:
            return self._reply(400, {"error": "no Content-Length"})
        if not 0 < size <= MAX_BODY:
            return self._reply(413, {"error": f"a body of 1 to {MAX_BODY} bytes"})
        try:
            body = self.rfile.read(size)
        except OSError:
            body = b""
        if len(body) != size:  # (cut or closed before it all arrived: no answer)
            return None
        self.server.answering(self.request)
        self.app.busy(+1)  # in the queue from now on, for ANSWER_SECONDS at most
        try:
            m = self.app.active  # this request uses one model, even if a reload swaps it
            if m is None:
                return self._reply(503, {"error": "no verified model loaded"})
            try:
                x = np.asarray(json.loads(body)["input"], dtype=np.float32)
                y = m["session"].run(None, {m["input"]: x})[0]
            except Exception as e:  # noqa: BLE001 - bad JSON, or input the model refuses
                return self._reply(400, {"error": str(e)})
            if y.size > MAX_OUTPUT_VALUES:
                return self._reply(500, {"error": f"the model's output has {y.size} values, "
                                         f"more than {MAX_OUTPUT_VALUES}"})
            return self._reply(200, {"output": y.tolist(),
                                     **{k: m[k] for k in ("model", "version", "sha256")}})
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
    server = Server(("127.0.0.1", int(os.environ.get("PORT", "8470"))), Handler)
    signal.signal(signal.SIGHUP, lambda *_: app.reload.set())  # ExecReload=kill -HUP
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown).start())
    threading.Thread(target=app.watch, daemon=True).start()
    print(f"serving on http://127.0.0.1:{server.server_port}", flush=True)
    server.serve_forever()
    if BUSY_FILE:
        os.unlink(BUSY_FILE)  # stopped: no queue


if __name__ == "__main__":
    main()
