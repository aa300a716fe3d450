"""Bridge load test (issue 17): N lightweight simulated fetchers against 2 bridges on one
shared subscription; throughput, per-device fairness and broker CPU, against the same
fetchers served by trivial responders in the same run.

    .venv/bin/python benchmarks/bridge_load.py [--devices 1000] [--spread 0] [--rounds 3]
        [--bundle-mib 2] [--bridges 2] [--block-timeout 5]

Starts mosquitto with the configuration ``fleet broker-config`` writes for the N devices
(dynamic security, TLS, as the tests run it) and, in random order each round:

* **bridges**: ``--bridges`` ``modelward serve-mqtt`` processes (their defaults, one
  shared subscription: the group derived from the bridge credential);
* **reference**: as many trivial responders (``simulator/_loadgen.py respond``: the
  bridge's identity, one shared subscription, every request answered at once from the
  file in memory), the physical limit of the broker, TLS and the fetchers;

then one round of ``simulator/_loadgen.py fetch``: every device (its own fetcher
credential) connects, fetches the same ``--bundle-mib`` file in 1 MiB blocks as the
device's ``MqttFetcher`` does (window 16, busy answers waited out with its jittered
pause, lost blocks asked for again), verifies each block's SHA-256, and disconnects;
each starts at a random moment within ``--spread`` seconds (0: all at once, the herd).
The servers run only during their own phase (both in one group would split the
requests; in two groups both would answer each).

Prints per configuration medians over the rounds (min-max): throughput (MiB/s of
verified blocks, the round's start to its last device's end), completion time p50/p99
and p99/p50 over the devices, connection time, CPU seconds of the broker, the servers
and the fetchers (``/proc/PID/stat``, ``getrusage``), peak RSS (VmHWM) of each server
and of the broker, busy answers, retries and failures; ratio = bridges/reference. Not a
test: ``tests/integration/test_benchmarks.py`` runs it with 20 devices.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import re
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from modelward.publisher._broker_config import write_broker_config
from modelward.simulator._broker import BrokerHandle, start_broker, stop_broker
from modelward.simulator._flood import vm_hwm
from modelward.simulator._loadgen import device_ids
from modelward.simulator._pki import issue_cert, make_ca
from modelward.updater._defaults import MQTT_BLOCK_TIMEOUT

MIB = 1 << 20
FLEET = "load"
FILE = "targets/bundle.bin"
PREFIX = "load-"
CLK_TCK = os.sysconf("SC_CLK_TCK")
LOADGEN = [sys.executable, "-m", "modelward.simulator._loadgen"]


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of ``pid`` so far (``/proc/PID/stat`` fields 14, 15)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def pct(xs: list[float], p: float) -> float:
    """The nearest-rank ``p``-th percentile of sorted ``xs``."""
    return xs[max(0, math.ceil(p / 100 * len(xs)) - 1)]


@dataclass
class Figures:
    """One configuration's figures, a list with one value per round."""

    throughput: list[float] = field(default_factory=list)  # MiB/s
    p50: list[float] = field(default_factory=list)
    p99: list[float] = field(default_factory=list)
    fairness: list[float] = field(default_factory=list)  # p99/p50
    connect_p50: list[float] = field(default_factory=list)
    connect_p99: list[float] = field(default_factory=list)
    wall: list[float] = field(default_factory=list)
    broker_cpu: list[float] = field(default_factory=list)
    servers_cpu: list[float] = field(default_factory=list)
    loadgen_cpu: list[float] = field(default_factory=list)
    servers_hwm: list[float] = field(default_factory=list)  # MiB, the largest server
    busy: list[float] = field(default_factory=list)
    retries: list[float] = field(default_factory=list)
    broker_hwm: list[float] = field(default_factory=list)  # MiB, during the round
    log_lines: list[float] = field(default_factory=list)  # servers' log lines
    wasted: list[float] = field(default_factory=list)  # MiB sent beyond those verified
    failures: dict[str, int] = field(default_factory=dict)
    first_failure: str = ""
    delivered: float = 0.0  # MiB over all rounds


class Env:
    """mosquitto with the fleet's broker configuration, and the file served."""

    def __init__(self, work: Path, devices: int, bundle: int) -> None:
        self.work = work
        pki = work / "pki"
        pki.mkdir()
        self.ca = make_ca(pki)
        server = issue_cert(self.ca, pki, "broker")
        self.repo = work / "repo"
        (self.repo / "metadata").mkdir(parents=True)
        (self.repo / "targets").mkdir()
        (self.repo / FILE).write_bytes(os.urandom(bundle))
        self.bc = write_broker_config(FLEET, device_ids(PREFIX, devices), work / "bc")
        self.broker: BrokerHandle = start_broker(work / "broker", server, self.ca.cert,
                                                 self.bc.conf)
        self.group = "load-ref-" + secrets.token_hex(16)
        self.logs: list[Path] = []  # the servers' stderr, one file each

    def common(self) -> list[str]:
        return ["--broker", self.broker.url, "--tls-ca", str(self.ca.cert),
                "--fleet", FLEET]

    def start_servers(self, kind: str, n: int) -> list[subprocess.Popen[str]]:
        """``n`` bridges or trivial responders, each subscribed when this returns."""
        procs = []
        for _ in range(n):
            if kind == "bridges":
                cmd = [sys.executable, "-m", "modelward", "serve-mqtt", "--repo",
                       str(self.repo), *self.common(), "--password-file",
                       str(self.bc.credentials["modelward-bridge"])]
                ready = "serving"
            else:
                cmd = [*LOADGEN, "respond", *self.common(), "--path", FILE, "--repo",
                       str(self.repo), "--password-file",
                       str(self.bc.credentials["modelward-bridge"]), "--group", self.group]
                ready = "responding"
            log = open(self.work / f"{kind}-{len(self.logs)}.log", "w")  # noqa: SIM115
            self.logs.append(Path(log.name))
            p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True,
                                 cwd=ROOT)
            log.close()
            procs.append(p)
            assert p.stdout is not None
            line = p.stdout.readline()
            if not line.startswith(ready):
                stop_servers(procs)
                raise RuntimeError(f"{kind} did not start: {line!r}")
        return procs

    def close(self) -> None:
        stop_broker(self.work / "broker")


def stop_servers(procs: list[subprocess.Popen[str]]) -> int:
    """Stop them; the bytes of blocks they say they sent (their last line)."""
    for p in procs:
        p.terminate()
    sent = 0
    for p in procs:
        try:
            out, _ = p.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            p.kill()
            out, _ = p.communicate()
        m = re.search(r"stopped: \d+ (?:requests|answers), (\d+) bytes", out or "")
        sent += int(m.group(1)) if m else 0
    return sent


def reset_peak(pid: int) -> None:
    """Start ``pid``'s VmHWM again from its RSS now (``clear_refs`` 5: its owner or root)."""
    with contextlib.suppress(OSError):
        Path(f"/proc/{pid}/clear_refs").write_text("5")


def one_round(env: Env, kind: str, a: argparse.Namespace, seed: int, figs: Figures) -> str:
    """Start the servers of ``kind``, run the fetchers once, stop them; one line of
    figures."""
    servers = env.start_servers(kind, a.bridges)
    logs = env.logs[-a.bridges:]
    sent = 0
    try:
        reset_peak(env.broker.pid)
        broker0 = cpu_s(env.broker.pid)
        servers0 = sum(cpu_s(p.pid) for p in servers)
        r = subprocess.run(
            [*LOADGEN, "fetch", *env.common(), "--path", FILE, "--credentials",
             str(env.bc.credentials["modelward-bridge"].parent), "--file",
             str(env.repo / FILE), "--devices", str(a.devices), "--prefix", PREFIX,
             "--spread", str(a.spread), "--rounds", "1", "--seed", str(seed),
             "--block-timeout", str(a.block_timeout),
             *(["--push"] if kind == "reference" else [])],
            cwd=ROOT, capture_output=True, text=True, check=False)
        broker1 = cpu_s(env.broker.pid)
        servers1 = sum(cpu_s(p.pid) for p in servers)
        hwm = max(vm_hwm(p.pid) for p in servers) / MIB
        broker_hwm = vm_hwm(env.broker.pid) / MIB
    finally:
        sent = stop_servers(servers)
    log_lines = sum(len(p.read_text().splitlines()) for p in logs)
    if r.returncode != 0:
        raise RuntimeError(f"the load generator failed: {r.stderr[-2000:]}")
    out: dict[str, Any] = json.loads(r.stdout)
    rd = out["rounds"][0]
    comp, conn = rd["completion_s"], rd["connect_s"]
    figs.throughput.append(rd["bytes"] / MIB / rd["wall_s"])
    figs.delivered += rd["bytes"] / MIB
    figs.wall.append(rd["wall_s"])
    if comp:
        figs.p50.append(pct(comp, 50))
        figs.p99.append(pct(comp, 99))
        figs.fairness.append(pct(comp, 99) / pct(comp, 50))
    if conn:
        figs.connect_p50.append(pct(conn, 50))
        figs.connect_p99.append(pct(conn, 99))
    figs.broker_cpu.append(broker1 - broker0)
    figs.servers_cpu.append(servers1 - servers0)
    figs.loadgen_cpu.append(out["cpu_s"])
    figs.servers_hwm.append(hwm)
    figs.busy.append(rd["busy"])
    figs.retries.append(rd["retries"])
    figs.broker_hwm.append(broker_hwm)
    figs.log_lines.append(log_lines)
    figs.wasted.append(max(0, sent - rd["bytes"]) / MIB)
    for k, v in rd["failures"].items():
        figs.failures[k] = figs.failures.get(k, 0) + v
    figs.first_failure = figs.first_failure or rd["first_failure"]
    return (f"  {kind}: {rd['ok']}/{rd['devices']} ok, {figs.throughput[-1]:.1f} MiB/s, "
            f"p50 {figs.p50[-1] if comp else 0:.2f} s, p99 {figs.p99[-1] if comp else 0:.2f} s,"
            f" broker {figs.broker_cpu[-1]:.2f} CPU-s, servers {figs.servers_cpu[-1]:.2f}, "
            f"fetchers {out['cpu_s']:.2f}, busy {rd['busy']}, retries {rd['retries']}, "
            f"sent beyond verified {figs.wasted[-1]:.0f} MiB, log lines {log_lines}, "
            f"failures {rd['failures'] or 0}")


def fmt(xs: list[float], unit: str = "", digits: int = 2) -> str:
    if not xs:
        return "-"
    m = statistics.median(xs)
    if len(xs) == 1:
        return f"{m:.{digits}f}{unit}"
    return f"{m:.{digits}f}{unit} ({min(xs):.{digits}f}–{max(xs):.{digits}f})"


def ratio(b: list[float], r: list[float]) -> str:
    if not b or not r or statistics.median(r) == 0:
        return ""
    return f"{statistics.median(b) / statistics.median(r):.2f}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--devices", type=int, default=1000)
    ap.add_argument("--spread", type=float, default=0.0,
                    help="seconds over which the devices start (0: all at once)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--block-timeout", type=float, default=MQTT_BLOCK_TIMEOUT,
                    help="the fetchers' time-out before a block is asked for again (s; "
                    "the device's default)")
    ap.add_argument("--bundle-mib", type=float, default=2.0,
                    help="size of the file every device fetches (MiB)")
    ap.add_argument("--bridges", type=int, default=2)
    ap.add_argument("--seed", type=int, default=None)
    a = ap.parse_args()
    rng = random.Random(a.seed)
    bundle = int(a.bundle_mib * MIB)
    work = Path(tempfile.mkdtemp(prefix="modelward-bload-"))
    started = time.monotonic()
    load0 = os.getloadavg()[0]
    figs = {"bridges": Figures(), "reference": Figures()}
    try:
        env = Env(work, a.devices, bundle)
        try:
            for i in range(a.rounds):
                kinds = ["bridges", "reference"]
                rng.shuffle(kinds)
                seed = rng.randrange(1 << 30)  # the same start times for both
                for kind in kinds:
                    print(f"round {i + 1}: " + one_round(env, kind, a, seed, figs[kind]),
                          flush=True)
        finally:
            env.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    b, r = figs["bridges"], figs["reference"]
    demand = a.devices * bundle / MIB
    print(f"\n{a.devices} devices, each fetching {a.bundle_mib:g} MiB in 1 MiB blocks "
          f"({demand:.0f} MiB a round), starting within {a.spread:g} s; {a.rounds} rounds;"
          f" {a.bridges} servers on one shared subscription; the bridges' fetchers ask again "
          f"for a block after {a.block_timeout:g} s (the reference's are pushed every block "
          "and never ask again).\n")
    print(f"| figure | {a.bridges} bridges (serve-mqtt) | {a.bridges} ideal responders "
          "(reference: pushed, round-robin) | bridges/reference |")
    print("| --- | --- | --- | --- |")
    rows = [
        ("throughput, MiB/s of verified blocks", b.throughput, r.throughput, " MiB/s", 1),
        ("completion p50", b.p50, r.p50, " s", 2),
        ("completion p99", b.p99, r.p99, " s", 2),
        ("fairness p99/p50", b.fairness, r.fairness, "", 2),
        ("connection (TLS, CONNACK, SUBACK) p50", b.connect_p50, r.connect_p50, " s", 3),
        ("connection p99", b.connect_p99, r.connect_p99, " s", 3),
        ("round wall time", b.wall, r.wall, " s", 2),
        ("broker CPU a round", b.broker_cpu, r.broker_cpu, " s", 2),
        ("servers' CPU a round (all of them)", b.servers_cpu, r.servers_cpu, " s", 2),
        ("fetchers' CPU a round (one process)", b.loadgen_cpu, r.loadgen_cpu, " s", 2),
        ("servers' peak RSS (VmHWM, largest)", b.servers_hwm, r.servers_hwm, " MiB", 1),
        ("broker peak RSS (VmHWM) during the round", b.broker_hwm, r.broker_hwm, " MiB", 1),
        ("block bytes sent beyond those verified (duplicates)", b.wasted, r.wasted,
         " MiB", 0),
        ("busy answers (429/503) waited out a round", b.busy, r.busy, "", 0),
        ("blocks asked for again a round", b.retries, r.retries, "", 0),
        ("servers' log lines a round", b.log_lines, r.log_lines, "", 0),
    ]
    for name, xb, xr, unit, d in rows:
        print(f"| {name} | {fmt(xb, unit, d)} | {fmt(xr, unit, d)} | {ratio(xb, xr)} |")
    bcpu = sum(b.broker_cpu) / max(b.delivered / 1024, 1e-9)
    rcpu = sum(r.broker_cpu) / max(r.delivered / 1024, 1e-9)
    print(f"| broker CPU per GiB delivered | {bcpu:.2f} s | {rcpu:.2f} s | "
          f"{bcpu / rcpu if rcpu else 0:.2f} |")
    nb, nr = sum(b.failures.values()), sum(r.failures.values())
    print(f"| failed devices (all rounds) | {nb} {b.failures or ''} | {nr} "
          f"{r.failures or ''} | |")
    print()
    if b.first_failure or r.first_failure:
        print(f"first failure: bridges: {b.first_failure or '-'}; reference: "
              f"{r.first_failure or '-'}")
    print(f"{os.cpu_count()} cores shared by mosquitto, the servers and the fetchers "
          f"(and whatever else runs: load average {load0:.1f} at the start, "
          f"{os.getloadavg()[0]:.1f} at the end); {time.monotonic() - started:.0f} s.")
    print(f"failures: bridges {nb}, reference {nr}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
