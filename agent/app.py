"""What an inference application needs to serve only the model modelward activated
(``examples/inference_app.py`` shows it in use): the security-relevant parts, so that the
application itself is only its model runtime and its protocol.

- :func:`load_verified`: the bytes of the active model, read from the slot ``current``
  names only if that slot is the trust record's active slot, its manifest names the
  record's model and version, and what was read hashes (modelward's fingerprint) to the
  record's fingerprint of the slot; no symlink is followed anywhere below the state dir.
- :class:`ModelWatcher`: reloads when ``current``, the manifest or the record change
  (polled, or on :meth:`ModelWatcher.request_reload`, e.g. from SIGHUP); a refused reload
  keeps the old model only while the record still names it (active, or previous during an
  activation), else serves nothing.
- :class:`BusySignal`: the queue depth the agent's idle gate reads (``[idle] busy_file``),
  written whole by rename, refreshed as a heartbeat.
- :class:`BoundedHTTPServer` and :class:`JsonHandler`: a loopback JSON server whose slow
  or flooding clients hold neither fds nor the queue.

What this does NOT protect against: the application cannot check the record's TPM MAC, so
a writer of the state dir as the agent's user can rewrite the record too (the boot check,
before the application starts, and the agent's own checks catch that); it guards against a
disk attacker who changes slots or ``current`` but not the record, and against a slow or
flooding local client.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import socket
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Generic, TypeVar

from modelward.agent._onnxrefs import ExternalDataError, external_data_locations
from modelward.trust._bounded import loads_bounded
from modelward.trust._fingerprint import MerkleHasher, directory_entries, slot_fingerprint

log = logging.getLogger(__name__)
T = TypeVar("T")
NOFOLLOW_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW
MAX_RECORD = 64 * 1024  # bytes of trust/record.json read
MAX_MANIFEST = 1 << 20  # bytes of a slot's manifest.json parsed


def read_in_slot(dir_fd: int, path: str, size: int) -> bytes:
    """The ``size`` bytes of the regular file ``path`` below ``dir_fd``: every component
    opened with O_NOFOLLOW from the one before (no symlink anywhere, nothing outside).

    Raises:
        ValueError: ``path`` leaves the slot, is no regular file, or has another size.
        OSError: it cannot be opened or read.
    """
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


def trusted_refs(model_dir: str) -> dict[str, dict[str, str] | None]:
    """The trust record next to ``model_dir``: {"active": ref or None, "previous": ...},
    each ref {"name", "version", "slot", "fingerprint"} (read without following a link).

    Raises:
        OSError, ValueError, KeyError, TypeError: no readable record.
    """
    path = os.path.join(os.path.dirname(model_dir), "trust", "record.json")
    with os.fdopen(os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK), "rb") as f:
        record = loads_bounded(f.read(MAX_RECORD + 1), max_bytes=MAX_RECORD, what=path)["record"]
    return {k: record[k] and {f: str(record[k][f]) for f in ("name", "version", "slot",
                                                             "fingerprint")}
            for k in ("active", "previous")}


@dataclass(frozen=True)
class VerifiedModel:
    """The active model's bytes, as verified by :func:`load_verified`."""

    name: str
    version: str
    sha256: str
    data: bytes
    ref: dict[str, str]


def load_verified(model_dir: str) -> VerifiedModel:
    """The model of the slot the trust record names active, if ``current`` names it and its
    files (as read) are what the record's fingerprint says, and the model holds all of its
    data in its own (verified) bytes.

    Raises:
        ExternalDataError: the model keeps tensors in external data (names the files).
        ModelFormatError: the model is no ONNX protobuf.
        ValueError, OSError, KeyError, TypeError: anything else (named in the message).
    """
    ref = trusted_refs(model_dir)["active"]
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
        h.update(data := read_in_slot(dir_fd, path, e.size))
        if h.hexdigest() != e.merkle_root:
            raise ValueError(f"{path} changed since it was fingerprinted")
        return data

    try:
        manifest = loads_bounded(read("manifest.json"), max_bytes=MAX_MANIFEST,
                                 what=f"{slot}/manifest.json")
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
    if locations := external_data_locations(data):  # (ModelFormatError: not ONNX)
        # onnxruntime would read them relative to the working directory, not the slot:
        # bytes nobody verified. Only the model's own (verified) bytes are served.
        raise ExternalDataError(
            f"{slot}/{path} keeps tensors outside its bytes (external data in "
            f"{sorted(set(locations))[:4]}), which would be loaded unverified: refused",
            locations)
    return VerifiedModel(str(manifest["name"]), str(manifest["version"]), sha, data, ref)


@dataclass(frozen=True)
class Served(Generic[T]):
    """The model being served: what was verified, and what the application made of it."""

    model: VerifiedModel
    runtime: T

    def describe(self) -> dict[str, str]:
        """{"model", "version", "sha256"}: what an answer says it came from."""
        return {"model": self.model.name, "version": self.model.version,
                "sha256": self.model.sha256}


class ModelWatcher(Generic[T]):
    """Keeps :attr:`active` the verified active model, opened with ``open_model`` (for
    instance an onnxruntime session made from the bytes, never from the path)."""

    def __init__(self, model_dir: str, open_model: Callable[[VerifiedModel], T],
                 busy: BusySignal | None = None) -> None:
        self.model_dir, self.open_model, self.busy = model_dir, open_model, busy
        self.active: Served[T] | None = None
        self._key: object = None
        self._reload = threading.Event()

    def request_reload(self) -> None:
        """Reload at the next poll even if nothing seems changed (SIGHUP: ExecReload)."""
        self._reload.set()

    def _state(self) -> object:  # which slot `current` names, its manifest, the record
        def ident(path: str) -> object:
            try:
                st = os.lstat(path)
                return st.st_ino, st.st_mtime_ns, st.st_size
            except OSError:
                return None
        try:
            link: str | None = os.readlink(self.model_dir)
        except OSError:  # (gone, or not a link: the watch thread must not die of it)
            link = None
        return (link, ident(os.path.join(self.model_dir, "manifest.json")),
                ident(os.path.join(os.path.dirname(self.model_dir), "trust", "record.json")))

    def poll(self) -> None:
        """Reload if anything changed; keep only what is still trusted if that fails."""
        key = self._state()
        if key == self._key and not self._reload.is_set():
            return
        self._key = key
        self._reload.clear()
        try:
            verified = load_verified(self.model_dir)
            new = Served(verified, self.open_model(verified))
        except Exception as e:  # noqa: BLE001 - any failure: keep only what is still trusted
            old = self.active
            try:
                keep = old is not None and os.path.lexists(self.model_dir) \
                    and old.model.ref in trusted_refs(self.model_dir).values()
            except Exception:  # noqa: BLE001 - no readable record: nothing is trusted
                keep = False
            self.active = old if keep else None
            log.error("cannot load %s (%s); %s", self.model_dir, e,
                      f"still serving {old.model.name} {old.model.version}" if keep and old
                      else "serving nothing")
            return
        self.active = new
        log.info("serving %s %s (sha256 %s)", new.model.name, new.model.version,
                 new.model.sha256)

    def watch(self, every: float = 1.0) -> None:
        """Poll forever (a thread's target); refresh the busy signal as a heartbeat."""
        while True:
            self._reload.wait(every)
            self.poll()
            if self.busy is not None:
                self.busy.add(0)  # a fresh mtime, so the agent believes the depth


class BusySignal:
    """The application's queue depth in ``path`` (``[idle] busy_file``; "" for none)."""

    def __init__(self, path: str) -> None:
        self.path, self.depth, self._lock = path, 0, threading.Lock()

    def add(self, delta: int) -> None:
        """Change the depth by ``delta`` and write it (never raises: serving matters more)."""
        with self._lock:
            self.depth += delta
            if not self.path:
                return
            try:  # a regular file, replaced whole: the agent never sees half of it
                with open(self.path + ".tmp", "w") as f:
                    f.write(f"{self.depth}\n")
                os.replace(self.path + ".tmp", self.path)
            except OSError as e:
                log.warning("cannot write %s: %s", self.path, e)

    def remove(self) -> None:
        """Stopped: no queue."""
        if self.path:
            with contextlib.suppress(OSError):
                os.unlink(self.path)


class BoundedHTTPServer(ThreadingHTTPServer):
    """At most ``max_connections`` connections (a new one cuts the oldest still sending its
    request), each cut ``read_seconds`` after it was accepted unless its request has
    arrived, then ``answer_seconds`` later (a slow or flooding client holds neither fds nor
    the queue)."""

    daemon_threads = True
    max_connections, read_seconds, answer_seconds = 16, 5.0, 30.0

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
            if len(self.conns) >= self.max_connections:
                if not reading:  # all answering: no room for this one
                    self.shutdown_request(request)
                    return
                self._cut(reading[0])
            self.conns[request] = [time.monotonic() + self.read_seconds, False]
        super().process_request(request, client_address)

    def answering(self, request: socket.socket) -> None:
        """The request has arrived: ``answer_seconds`` from now on."""
        with self.guard:
            if request in self.conns:
                self.conns[request] = [time.monotonic() + self.answer_seconds, True]

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


class JsonHandler(BaseHTTPRequestHandler):
    """JSON answers of bounded size and a request body of bounded size, for
    :class:`BoundedHTTPServer`."""

    server: BoundedHTTPServer
    timeout = BoundedHTTPServer.read_seconds  # (per read; the server bounds the request)
    max_body, max_reply = 1 << 20, 1 << 20

    def reply(self, code: int, doc: dict[str, Any]) -> None:
        """Send ``doc`` as JSON (a 500 instead if it is not JSON or too large)."""
        try:
            body = json.dumps(doc, allow_nan=False).encode()
            if len(body) > self.max_reply:
                raise ValueError(f"an answer of {len(body)} bytes, more than {self.max_reply}")
        except (TypeError, ValueError) as e:  # NaN or Infinity: not JSON (RFC 8259)
            code, body = 500, json.dumps({"error": f"the model's output: {e}"}).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def body(self) -> bytes | None:
        """The request body, all of it, or None (answered already, or cut)."""
        try:
            size = int(self.headers.get("Content-Length", ""))
        except ValueError:
            self.reply(400, {"error": "no Content-Length"})
            return None
        if not 0 < size <= self.max_body:
            self.reply(413, {"error": f"a body of 1 to {self.max_body} bytes"})
            return None
        try:
            data = self.rfile.read(size)
        except OSError:
            data = b""
        if len(data) != size:  # (cut or closed before it all arrived: no answer)
            return None
        self.server.answering(self.request)
        return data

    def log_message(self, fmt: str, *args: Any) -> None:
        pass  # one line per model change, not per request
