"""Lightweight simulated fetchers for the bridge load test (issue 17), and a trivial
block responder as its physical-limit reference.

``fetch``: N devices in one asyncio process (no TPM, no TUF), each with its own fetcher
credential as ``fleet broker-config`` enrolled it (username ``<id>:fetch``, client id
``<id>-fetch``). Each fetches one file of the repository in blocks as the device's
``MqttFetcher`` does (``updater/transport/_mqtt.py``): it subscribes to its own response
topic, asks for the first block (format 2, correlation data = 8 session bytes and the
offset), then keeps ``window`` blocks in flight; an answer 429/503 is waited out with the
device's own jittered ``busy_pause`` (at most ``MAX_BUSY`` times a block), a block not
answered in ``block_timeout`` is asked for again (at most ``max_retries`` times). Each
block is checked against the SHA-256 of the file's block (computed at start from the
trusted copy, as the chunk index or the TUF target hash would say). Per device it records
the completion time: from its start (a random moment within ``--spread`` seconds of the
round's start) to its last block verified, connection included.

``respond``: subscribes to the fleet's requests in a shared group with the bridge's
identity and answers every format 2 request at once from the file in memory: no file
read, no fairness, no bounds. What the broker and the fetchers cost alone.

Run as ``python -m modelward.simulator._loadgen fetch|respond ...``; ``fetch`` prints one
JSON object (:class:`RoundResult` per round), ``respond`` a line ``responding`` once
subscribed, then answers until SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import random
import resource
import secrets
import signal
import ssl
import struct
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

from modelward.simulator._mqttraw import Publish, RawClient, RawMqttError
from modelward.trust._bounded import UntrustedJsonError, loads_bounded
from modelward.updater._config import fetch_client_id, fetch_username
from modelward.updater._defaults import MQTT_BLOCK_TIMEOUT, MQTT_MAX_RETRIES
from modelward.updater.transport._mqtt import BLOCK_HEADER, BLOCK_MAGIC, MAX_BUSY, busy_pause
from modelward.updater.transport._mqttconn import parse_broker_url

MIB = 1 << 20
PACKET_OVERHEAD = 4096  # topic, properties and header of a block answer, at most
PUSH_TIMEOUT = 600.0  # seconds without a pushed block before a reference fetcher fails


@dataclass(frozen=True)
class LoadConfig:
    """What every simulated fetcher does (the device's ``MqttConfig`` defaults).

    Args:
        host, port: the broker (TLS).
        ca_file: the broker's CA.
        fleet: topic prefix ``modelward/<fleet>/``.
        path: the file fetched, as the bridge serves it (``targets/...``).
        block_size: bytes asked for per request.
        window: requests in flight at once.
        block_timeout: seconds before a block is asked for again.
        max_retries: times one block is asked for again before the device gives up.
        connect_timeout: seconds for TLS, CONNACK and SUBACK.
        push: ask once for offset 0 and take every block as it comes (the reference's
            responder pushes the whole file), instead of a window of requests; nothing is
            asked again before ``block_timeout`` without a block.
    """

    host: str
    port: int
    ca_file: str
    fleet: str
    path: str
    block_size: int = MIB
    window: int = 16
    block_timeout: float = MQTT_BLOCK_TIMEOUT
    max_retries: int = MQTT_MAX_RETRIES
    connect_timeout: float = 10.0
    push: bool = False

    def topic(self, suffix: str) -> str:
        """``modelward/<fleet>/<suffix>``."""
        return f"modelward/{self.fleet}/{suffix}"


@dataclass(frozen=True)
class Blocks:
    """The trusted SHA-256 of each block of the fetched file, and its size."""

    size: int
    digests: tuple[bytes, ...]

    @classmethod
    def of_file(cls, path: Path, block: int) -> Blocks:
        """The blocks of ``path``."""
        data = path.read_bytes()
        return cls(len(data), tuple(hashlib.sha256(data[o:o + block]).digest()
                                    for o in range(0, max(len(data), 1), block)))


@dataclass
class DeviceResult:
    """What one device's fetch came to (times in seconds from its own start)."""

    device: str
    ok: bool = False
    reason: str = ""  # why it failed ("" when ok)
    detail: str = ""  # what happened, in words
    connect_s: float = 0.0
    completion_s: float = 0.0
    bytes: int = 0
    busy: int = 0  # 429/503 answers it waited out
    retries: int = 0  # blocks asked for again after block_timeout


@dataclass
class RoundResult:
    """One round: every device fetching the file once."""

    devices: int
    spread_s: float
    wall_s: float  # the round's start to its last device's end
    ok: int
    failures: dict[str, int]
    bytes: int  # verified block bytes delivered
    busy: int
    retries: int
    completion_s: list[float] = field(default_factory=list)  # of the devices that finished
    connect_s: list[float] = field(default_factory=list)
    first_failure: str = ""


class _Failed(Exception):  # noqa: N818 - internal signal: the device's fetch has failed
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


def _tls(ca_file: str) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=ca_file)


async def fetch_device(cfg: LoadConfig, tls: ssl.SSLContext, device: str, password: str,
                       blocks: Blocks, start_at: float) -> DeviceResult:
    """One device's fetch of ``cfg.path``, starting at loop time ``start_at``."""
    loop = asyncio.get_running_loop()
    await asyncio.sleep(max(0.0, start_at - loop.time()))
    res = DeviceResult(device)
    inbox: asyncio.Queue[Publish] = asyncio.Queue()
    client: RawClient | None = None
    try:
        try:
            client = await RawClient.open(
                cfg.host, cfg.port, tls, fetch_client_id(device), fetch_username(device),
                password, inbox.put_nowait, max_packet=cfg.block_size + PACKET_OVERHEAD,
                timeout=cfg.connect_timeout)
            await client.subscribe(cfg.topic(f"devices/{device}/repo/resp"), 1,
                                   cfg.connect_timeout)
        except RawMqttError as e:
            raise _Failed(e.reason, str(e)) from e
        res.connect_s = loop.time() - start_at
        await _blocks(cfg, client, device, blocks, inbox, res)
        res.ok = True
        res.completion_s = loop.time() - start_at
    except _Failed as e:
        res.reason, res.detail = e.reason, str(e)
        res.completion_s = loop.time() - start_at
    finally:
        if client is not None:
            await client.close()
    return res


async def _blocks(cfg: LoadConfig, client: RawClient, device: str, blocks: Blocks,
                  inbox: asyncio.Queue[Publish], res: DeviceResult) -> None:
    """The device's window of block requests until every block verified (see
    ``MqttFetcher._blocks``); with ``cfg.push``, one request for offset 0 and every
    block taken as it comes (asked again after ``block_timeout`` without one). Raises
    :class:`_Failed`."""
    loop = asyncio.get_running_loop()
    session = secrets.token_bytes(8)
    req_topic = cfg.topic(f"repo/req/{device}")
    resp_topic = cfg.topic(f"devices/{device}/repo/resp")
    pending: dict[int, tuple[float, int]] = {}  # offset -> (deadline, attempts)
    busy: dict[int, int] = {}
    paused: set[int] = set()
    done: set[int] = set()
    total: int | None = None
    next_off = 0

    def ask(off: int, attempts: int) -> None:
        pending[off] = (loop.time() + cfg.block_timeout, attempts)
        body = json.dumps({"path": cfg.path, "offset": off, "length": cfg.block_size,
                           "format": 2}).encode()
        client.publish(req_topic, body, qos=1, response_topic=resp_topic,
                       correlation=session + struct.pack(">Q", off))

    ask(next_off, 0)
    next_off += cfg.block_size
    while total is None or len(done) * cfg.block_size < total:
        if client.closed.is_set():
            raise _Failed("lost", f"connection lost: {client.error}")
        if total is not None and not cfg.push:
            while next_off < total and len(pending) < cfg.window:
                ask(next_off, 0)
                next_off += cfg.block_size
        now = loop.time()
        for off, (deadline, attempts) in list(pending.items()):
            if deadline > now:
                continue
            if off in paused:
                paused.discard(off)
                ask(off, attempts)
            elif attempts >= cfg.max_retries:
                raise _Failed("timeout", f"no answer for offset {off} after "
                              f"{attempts + 1} requests")
            else:
                res.retries += 1
                ask(off, attempts + 1)
        wait = max(0.0, min(d for d, _ in pending.values()) - loop.time()) if pending \
            else cfg.block_timeout
        try:
            msg = await asyncio.wait_for(inbox.get(), min(wait, 0.5))
        except TimeoutError:
            continue
        corr = msg.correlation
        if corr is None or len(corr) != 16 or corr[:8] != session:
            continue
        off = struct.unpack(">Q", corr[8:])[0]
        if off in done or (off not in pending and not cfg.push):
            continue  # a duplicate
        payload = msg.payload
        if len(payload) < BLOCK_HEADER.size or payload[:4] != BLOCK_MAGIC:
            raise _Failed("malformed", f"an answer at {off} without a format 2 header")
        _, status, block_off, size = BLOCK_HEADER.unpack(payload[:BLOCK_HEADER.size])
        if status in (429, 503) and off in pending:
            n = busy[off] = busy.get(off, 0) + 1
            res.busy += 1
            if n > MAX_BUSY:
                raise _Failed("busy", f"the bridge stayed busy for offset {off} ({n} "
                              "refusals)")
            pending[off] = (loop.time() + busy_pause(n), pending[off][1])
            paused.add(off)
            continue
        if status != 200:
            raise _Failed(f"status {status}", f"status {status} at offset {off}")
        data = payload[BLOCK_HEADER.size:]
        if block_off != off or size != blocks.size or off % cfg.block_size or \
                len(data) != min(cfg.block_size, size - off) or \
                hashlib.sha256(data).digest() != blocks.digests[off // cfg.block_size]:
            raise _Failed("hash", f"block at {off} ({len(data)} bytes of a file of {size})"
                          " does not match its trusted hash")
        total = size
        done.add(off)
        res.bytes += len(data)
        if cfg.push:  # progress: the time-out of the one request starts again
            pending[0] = (loop.time() + cfg.block_timeout, pending[0][1] if 0 in pending
                          else 0)
        else:
            del pending[off]
            paused.discard(off)


async def run_round(cfg: LoadConfig, creds: list[tuple[str, str]], blocks: Blocks,
                    spread: float, rng: random.Random) -> RoundResult:
    """Every device fetching once, each starting within ``spread`` seconds."""
    loop = asyncio.get_running_loop()
    tls = _tls(cfg.ca_file)
    t0 = loop.time() + 0.05
    tasks = [asyncio.create_task(fetch_device(cfg, tls, dev, pw, blocks,
                                              t0 + rng.uniform(0.0, spread)))
             for dev, pw in creds]
    results = await asyncio.gather(*tasks)
    return RoundResult(
        devices=len(results), spread_s=spread, wall_s=loop.time() - t0,
        ok=sum(r.ok for r in results),
        failures=dict(Counter(r.reason for r in results if not r.ok)),
        bytes=sum(r.bytes for r in results), busy=sum(r.busy for r in results),
        retries=sum(r.retries for r in results),
        completion_s=sorted(r.completion_s for r in results if r.ok),
        connect_s=sorted(r.connect_s for r in results if r.connect_s),
        first_failure=next((f"{r.device}: {r.detail}" for r in results if not r.ok), ""))


# --- the reference: an ideal responder ------------------------------------------------


async def respond(cfg: LoadConfig, password: str, group: str, data: bytes, client_id: str,
                  stop: asyncio.Event) -> tuple[int, int]:
    """Push the whole of ``data`` to every device that asks for its offset 0, round-robin
    over the devices (one block each in turn), until ``stop``; returns (answers, bytes)
    sent. No file read, no bounds, no request per block (the fetchers run with
    ``LoadConfig.push``): what the broker, TLS and the fetchers can do at best."""
    todo: dict[str, tuple[bytes, int]] = {}  # device -> (session, next offset): in turn
    wake = asyncio.Event()
    prefix = cfg.topic("repo/req/")

    def on_request(msg: Publish) -> None:
        device = msg.topic[len(prefix):]
        try:
            req = loads_bounded(bytes(msg.payload), max_bytes=4096, what="a request",
                                max_depth=2)
        except UntrustedJsonError:
            return
        corr = msg.correlation
        if isinstance(req, dict) and req.get("path") == cfg.path and \
                req.get("offset") == 0 and corr is not None and len(corr) == 16:
            todo.pop(device, None)
            todo[device] = (corr[:8], 0)  # (asked again: from the start, at the end)
            wake.set()

    client = await RawClient.open(cfg.host, cfg.port, _tls(cfg.ca_file), client_id,
                                  "modelward-bridge", password, on_request,
                                  max_packet=64 * 1024, timeout=cfg.connect_timeout)
    await client.subscribe(f"$share/{group}/{prefix}+", 0, cfg.connect_timeout)
    print("responding", flush=True)
    view = memoryview(data)
    sent = sent_bytes = 0
    waiter = asyncio.create_task(stop.wait())
    try:
        while not stop.is_set() and not client.closed.is_set():
            if not todo:
                wake.clear()
                woken = asyncio.create_task(wake.wait())
                await asyncio.wait({woken, waiter}, return_when=asyncio.FIRST_COMPLETED)
                woken.cancel()
                continue
            device = next(iter(todo))
            session, off = todo.pop(device)
            if off + cfg.block_size < len(data):
                todo[device] = (session, off + cfg.block_size)
            block = view[off:off + cfg.block_size]
            client.publish(cfg.topic(f"devices/{device}/repo/resp"), block, qos=0,
                           correlation=session + struct.pack(">Q", off),
                           header=BLOCK_HEADER.pack(BLOCK_MAGIC, 200, off, len(data)))
            sent += 1
            sent_bytes += len(block)
            await client.drain()
    finally:
        waiter.cancel()
        await client.close()
    return sent, sent_bytes


# --- the entry point ------------------------------------------------------------------


def _cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _config(a: argparse.Namespace) -> LoadConfig:
    host, port = parse_broker_url(a.broker)
    push = getattr(a, "push", False)
    # Pushed blocks come in the responder's turn, however long: the reference measures
    # the bytes the broker can move, not the device's time-outs (nothing is asked again).
    timeout = PUSH_TIMEOUT if push else getattr(a, "block_timeout", MQTT_BLOCK_TIMEOUT)
    return LoadConfig(host, port, str(a.tls_ca), a.fleet, a.path, window=a.window,
                      block_timeout=timeout, push=push)


def device_ids(prefix: str, n: int) -> list[str]:
    """The ids ``fetch --devices n --prefix prefix`` uses (for ``fleet broker-config``)."""
    return [f"{prefix}{i:05d}" for i in range(n)]


async def _fetch_main(a: argparse.Namespace) -> dict[str, object]:
    cfg = _config(a)
    blocks = Blocks.of_file(a.file, cfg.block_size)
    creds = [(d, (a.credentials / d).read_text().strip())
             for d in device_ids(a.prefix, a.devices)]
    rng = random.Random(a.seed)
    rounds = []
    cpu0 = _cpu_s()
    for _ in range(a.rounds):
        rounds.append(asdict(await run_round(cfg, creds, blocks, a.spread, rng)))
    return {"file_bytes": blocks.size, "block_size": cfg.block_size, "window": cfg.window,
            "rounds": rounds, "cpu_s": _cpu_s() - cpu0}


async def _respond_main(a: argparse.Namespace) -> tuple[int, int]:
    cfg = _config(a)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    data = (a.repo / a.path).read_bytes()
    password = a.password_file.read_text().strip()
    return await respond(cfg, password, a.group, data, f"load-responder-{os.getpid()}", stop)


def main(argv: list[str] | None = None) -> int:
    """``fetch`` or ``respond`` (see the module)."""
    ap = argparse.ArgumentParser(prog="python -m modelward.simulator._loadgen",
                                 description=__doc__.splitlines()[0] if __doc__ else None)
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("fetch", "respond"):
        p = sub.add_parser(name)
        p.add_argument("--broker", required=True, help="mqtts://HOST:PORT")
        p.add_argument("--tls-ca", type=Path, required=True)
        p.add_argument("--fleet", required=True)
        p.add_argument("--path", required=True, help="the file, as served (targets/...)")
        p.add_argument("--window", type=int, default=16)
    f = sub.choices["fetch"]
    f.add_argument("--credentials", type=Path, required=True,
                   help="broker-config's credentials/ directory")
    f.add_argument("--file", type=Path, required=True, help="the trusted copy of the file")
    f.add_argument("--devices", type=int, default=1000)
    f.add_argument("--prefix", default="load-", help="device ids: PREFIX00000, ...")
    f.add_argument("--spread", type=float, default=0.0,
                   help="seconds over which the devices start (0: all at once)")
    f.add_argument("--rounds", type=int, default=1)
    f.add_argument("--seed", type=int, default=None)
    f.add_argument("--block-timeout", type=float, default=MQTT_BLOCK_TIMEOUT,
                   help="seconds before a block is asked for again (the device's default)")
    f.add_argument("--push", action="store_true",
                   help="ask once and take the blocks as pushed (against `respond`)")
    r = sub.choices["respond"]
    r.add_argument("--repo", type=Path, required=True)
    r.add_argument("--password-file", type=Path, required=True)
    r.add_argument("--group", required=True, help="shared-subscription group")
    a = ap.parse_args(argv)
    if a.cmd == "fetch":
        t = time.monotonic()
        out = asyncio.run(_fetch_main(a))
        out["elapsed_s"] = time.monotonic() - t
        json.dump(out, sys.stdout)
        print()
        return 0
    with contextlib.suppress(KeyboardInterrupt):
        sent, sent_bytes = asyncio.run(_respond_main(a))
        print(f"stopped: {sent} answers, {sent_bytes} bytes", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
