"""The device end of the operator's request channel (attest, audit; protocol in
:mod:`modelward.updater.transport._rpc`).

The daemon's listener connection subscribes ``devices/<id>/rpc/req``. paho's network
thread only admits a request (:meth:`RpcServer.on_message`: this device's topic, not
retained, at most ``MAX_REQUEST`` bytes, correlation data of 1..64 bytes, the rate limit,
a free queue slot); one worker thread parses and answers them in turn, so a flood of
requests costs at most :attr:`RpcConfig.rate` answers a second and never delays the
network thread (announcements, status reports) or an update attempt. What the limit or
the full queue refuses is dropped and counted (:attr:`RpcServer.dropped`), and logged at
most once a minute.

Answers are made by handlers, one per kind. The default ones run
``python -I -m modelward.agent._rpcchild CONFIG`` per request: the TPM and audit code
stay out of the idle daemon, as for update attempts. They take no device lock (an
answer only reads); the TPM is shared with a running attempt: on ``/dev/tpmrm0`` the
kernel's resource manager keeps their contexts apart, swtpm takes both connections
(tested), and the TPM wrapper retries the TPM's retry codes.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from modelward.trust._bounded import loads_bounded
from modelward.trust.errors import ModelwardError
from modelward.updater.transport._rpc import (
    CHUNK_BYTES,
    MAX_CORRELATION,
    MAX_PARTS,
    MAX_REQUEST,
    Request,
    RpcFormatError,
    answer_chunks,
    parse_request,
)

logger = logging.getLogger("modelward.agent")

#: A handler: the request in, the answer document out (a ModelwardError: an error answer).
Handler = Callable[[Request], dict[str, Any]]
#: Sends one answer chunk: (payload, correlation data).
Sender = Callable[[bytes, bytes], None]


@dataclass(frozen=True)
class RpcConfig:
    """Bounds of the device's request channel.

    Attributes:
        rate: requests admitted per second at most (a token bucket of ``burst``).
        burst: requests admitted at once.
        queue: admitted requests waiting for the worker at most.
        child_timeout: seconds a handler child may take.
    """

    rate: float = 4.0
    burst: int = 4
    queue: int = 8
    child_timeout: float = 30.0


class RpcServer:
    """Admits requests from paho's thread, answers them in a worker thread.

    Args:
        topic: this device's request topic (anything else is dropped).
        send: publishes one answer chunk on this device's response topic.
        handlers: kind -> handler.
        config: the bounds.
        clock: monotonic seconds (injected by tests).
    """

    def __init__(self, topic: str, send: Sender, handlers: Mapping[str, Handler],
                 config: RpcConfig | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.topic = topic
        self.cfg = config or RpcConfig()
        self._send = send
        self._handlers = dict(handlers)
        self._clock = clock
        self._tokens = float(self.cfg.burst)
        self._last = clock()
        self._queue: queue.Queue[tuple[bytes, bytes] | None] = queue.Queue(self.cfg.queue)
        self._told = -1e9
        self.dropped = 0  # refused by the bounds (size, rate, queue, retained, topic)
        self.answered = 0
        self.failed = 0  # answered with an error
        self.last_answer_s: float | None = None  # seconds the last handler took
        self._worker = threading.Thread(target=self._run, name="rpc", daemon=True)
        self._worker.start()

    # -- paho's thread: admit or drop, nothing more ------------------------------

    def on_message(self, topic: str, payload: bytes, retain: bool,
                   correlation: bytes | None) -> None:
        """Admit one PUBLISH (paho's thread; never blocks, never raises for its input)."""
        why = None
        if topic != self.topic:
            why = "another topic"
        elif retain:
            why = "retained"  # (a stored request answers no operator waiting now)
        elif len(payload) > MAX_REQUEST:
            why = f"{len(payload)} bytes"
        elif not correlation or len(correlation) > MAX_CORRELATION:
            why = "no correlation data of 1..64 bytes"
        elif not self._take_token():
            why = "rate limit"
        if why is None:
            try:
                self._queue.put_nowait((bytes(payload), bytes(correlation or b"")))
                return
            except queue.Full:
                why = "queue full"
        self._drop(why)

    def _take_token(self) -> bool:
        now = self._clock()
        self._tokens = min(float(self.cfg.burst),
                           self._tokens + max(0.0, now - self._last) * self.cfg.rate)
        self._last = now
        if self._tokens < 1.0:
            return False
        self._tokens -= 1.0
        return True

    def _drop(self, why: str) -> None:
        self.dropped += 1
        now = self._clock()
        if now - self._told >= 60.0:
            self._told = now
            logger.warning("operator request dropped (%s); %d dropped so far", why,
                           self.dropped)

    # -- the worker ---------------------------------------------------------------

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            try:
                self._answer(*item)
            except Exception:  # noqa: BLE001 - the worker outlives any handler bug
                logger.exception("operator request failed")

    def _answer(self, payload: bytes, correlation: bytes) -> None:
        try:
            req = parse_request(payload, f"the request on {self.topic}")
        except RpcFormatError as e:
            self.failed += 1
            logger.warning("ignoring a malformed operator request: %s", e)
            return  # (no nonce to answer under)
        handler = self._handlers.get(req.kind)
        t0 = time.monotonic()
        doc: dict[str, Any] | None = None
        error: str | None = None
        if handler is None:
            error = f"{req.kind} is not supported by this device"
        else:
            try:
                doc = handler(req)
            except ModelwardError as e:
                error = f"{type(e).__name__}: {e}"
        self.last_answer_s = time.monotonic() - t0
        try:
            chunks = answer_chunks(req, doc, error)
        except RpcFormatError as e:
            doc, error = None, str(e)
            chunks = answer_chunks(req, None, error)
        for c in chunks:
            self._send(c, correlation)
        if error is None:
            self.answered += 1
            logger.info("answered an operator %s request in %.0f ms (%d chunk%s)", req.kind,
                        self.last_answer_s * 1000, len(chunks), "" if len(chunks) == 1 else "s")
        else:
            self.failed += 1
            logger.warning("operator %s request failed: %s", req.kind, error)

    def close(self) -> None:
        """Stop the worker after the request it is answering (queued ones are dropped)."""
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        with contextlib.suppress(queue.Full):  # (just emptied)
            self._queue.put_nowait(None)
        self._worker.join(5)


class RpcHandlerError(ModelwardError):
    """The device could not make an answer (its handler child failed).

    Attributes:
        kind: the request's kind.
    """

    def __init__(self, message: str, *, kind: str) -> None:
        super().__init__(message)
        self.kind = kind


def child_handler(config_path: Path, env: Mapping[str, str], timeout: float = 30.0
                  ) -> Handler:
    """The default handler: ``modelward.agent._rpcchild`` in a child process, the request
    on its stdin, the answer document (bounded) on its stdout."""
    limit = MAX_PARTS * CHUNK_BYTES

    def handle(req: Request) -> dict[str, Any]:
        try:
            r = subprocess.run(
                [sys.executable, "-I", "-m", "modelward.agent._rpcchild", str(config_path)],
                input=req.to_bytes(), capture_output=True, timeout=timeout, env=dict(env),
                check=False)
        except subprocess.TimeoutExpired as e:
            raise RpcHandlerError(f"the {req.kind} answer took more than {timeout:.0f}s",
                                  kind=req.kind) from e
        if r.returncode != 0:
            last = (r.stderr.decode(errors="replace").strip().splitlines() or ["?"])[-1]
            raise RpcHandlerError(last[:200], kind=req.kind)
        try:
            doc = loads_bounded(r.stdout, max_bytes=limit, max_depth=16,
                                what=f"the {req.kind} answer")
        except ValueError as e:
            raise RpcHandlerError(str(e)[:200], kind=req.kind) from e
        if not isinstance(doc, dict):
            raise RpcHandlerError("the answer is not a JSON object", kind=req.kind)
        return doc

    return handle
