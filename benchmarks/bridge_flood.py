"""One device flooding the bridge (issue 14): another device's block latency and the
bridge's memory, against the broker's own limit measured in the same run.

    .venv/bin/python benchmarks/bridge_flood.py [--rounds 3] [--samples 30]
        [--rates 1000,3000] [--seconds 3]

Starts mosquitto (the generated broker config) and ``modelward serve-mqtt`` (its
defaults) on loopback. ``bench-evil`` floods with its own credentials on its own request
topic: full 1 MiB blocks of a 64 MiB file at ``rate`` requests a second (QoS 0). The
honest ``bench-dev`` asks for one block at a time, within its own byte budget, and
times it. In random order per round: the broker's limit (the bridge identity publishes
one 1 MiB block to the device, which receives it), the honest device alone, and the
honest device during each flood. Prints medians with min-max and judges the goals:
flooded latency <= 2x the baseline, bridge peak RSS (VmHWM) < 200 MiB. Not a test.

2026-12-01, the 2-core machine shared by 8 sessions, 2 rounds of 20: broker's limit
6.4 ms, honest device alone 8.7 ms, during a 1,000 requests/s flood 9.9 ms (1.14x),
during 3,000/s 12.8-19.5 ms (1.14-2.24x across runs); bridge VmHWM 52 MiB (idle 44 MiB);
the flooder gets its 16 MiB/s and 429s beyond. Not met: at 10,000 QoS 0 requests/s (one
Python flooder's most here) the bridge falls behind (it takes ~8,000 requests/s on this
shared machine, ~30-70 us each including the blocks it serves): the requests queue at
the broker, and the honest device's blocks take 0.4-1.7 s, then time out. Only the
broker can refuse a device's messages before they reach the bridge: mosquitto 2.0 has no
per-client publish rate limit; EMQX has (``messages_rate``, ``bytes_rate``).
"""

from __future__ import annotations

import argparse
import os
import random
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from modelward.publisher._broker_config import write_broker_config  # noqa: E402
from modelward.simulator._broker import start_broker, stop_broker  # noqa: E402
from modelward.simulator._flood import Flooder, Prober, vm_hwm, vm_rss  # noqa: E402
from modelward.simulator._pki import issue_cert, make_ca
from modelward.updater._config import MqttConfig  # noqa: E402
from modelward.updater.transport._mqttconn import (  # noqa: E402
    MqttConnection,
    device_connection,
)

MIB = 1 << 20
FILE = "targets/flood.bin"
PAUSE = 0.08  # between the honest device's requests (within its 16 MiB/s)


class Env:
    def __init__(self, work: Path) -> None:
        self.work = work
        pki = work / "pki"
        pki.mkdir()
        self.ca = make_ca(pki)
        server = issue_cert(self.ca, pki, "broker")
        repo = work / "repo"
        (repo / "metadata").mkdir(parents=True)
        (repo / "targets").mkdir()
        with open(repo / FILE, "wb") as f:
            f.write(os.urandom(64 * MIB))
        self.bc = write_broker_config("bench", ["bench-dev", "bench-evil"], work / "bc")
        self.broker = start_broker(work / "broker", server, self.ca.cert, self.bc.conf)
        self.bridge = subprocess.Popen(
            [sys.executable, "-m", "modelward", "serve-mqtt", "--repo", str(repo),
             "--broker", self.broker.url, "--fleet", "bench", "--tls-ca", str(self.ca.cert),
             "--password-file", str(self.bc.credentials["modelward-bridge"])],
            stdout=subprocess.PIPE, text=True, cwd=ROOT)
        assert self.bridge.stdout is not None
        assert self.bridge.stdout.readline().startswith("serving")

    def mqtt(self, user: str) -> MqttConfig:
        return MqttConfig(host="127.0.0.1", port=self.broker.port, fleet="bench",
                          client_name=user, ca_file=str(self.ca.cert),
                          password=self.bc.credentials[user].read_text().strip())

    def close(self) -> None:
        self.bridge.terminate()
        self.bridge.wait(10)
        stop_broker(self.work / "broker")


def raw_block_latencies(env: Env, n: int) -> list[float]:
    """The broker's limit: one 1 MiB QoS 1 message from the bridge's identity to the
    device's response topic, until the device has it (what a block costs without the
    bridge's request handling)."""
    topic = "modelward/bench/devices/bench-dev/repo/resp"
    got = threading.Event()
    sub = device_connection(env.mqtt("bench-dev"), "fetch", [topic], lambda _m: got.set())
    pub = MqttConnection(env.mqtt("modelward-bridge"), f"raw-pub-{secrets.token_hex(3)}", [])
    block = os.urandom(MIB)
    out: list[float] = []
    try:
        for _ in range(n):
            got.clear()
            t = time.perf_counter()
            pub.client.publish(topic, block, qos=1)
            if not got.wait(10):
                raise RuntimeError("the raw block did not arrive")
            out.append(time.perf_counter() - t)
            time.sleep(PAUSE)
    finally:
        sub.close()
        pub.close()
    return out


def flooded_latencies(env: Env, n: int, rate: float) -> tuple[list[float], Flooder]:
    evil = Flooder(env.mqtt("bench-evil"), FILE, 64 * MIB)
    honest = Prober(env.mqtt("bench-dev"), FILE)
    try:
        evil.start(rate=rate)
        time.sleep(1.0)
        return honest.latencies(n, pause=PAUSE), evil
    finally:
        evil.stop()
        honest.close()
        time.sleep(1.0)  # the bridge's queues drain before the next figure


def baseline_latencies(env: Env, n: int) -> list[float]:
    honest = Prober(env.mqtt("bench-dev"), FILE)
    try:
        honest.latencies(3, pause=PAUSE)
        return honest.latencies(n, pause=PAUSE)
    finally:
        honest.close()


def fmt(xs: list[float]) -> str:
    return (f"{statistics.median(xs) * 1e3:.1f} ms ({min(xs) * 1e3:.1f}–"
            f"{max(xs) * 1e3:.1f})")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--samples", type=int, default=30)
    ap.add_argument("--rates", default="1000,3000", help="flood request rates (per s)")
    a = ap.parse_args()
    rates = [float(r) for r in a.rates.split(",")]
    work = Path(tempfile.mkdtemp(prefix="mw-flood-"))
    env = Env(work)
    medians: dict[str, list[float]] = {}
    served: dict[str, list[float]] = {}
    try:
        idle_rss = vm_rss(env.bridge.pid)
        for _ in range(a.rounds):
            figures: list[str] = ["raw", "baseline", *[f"flood {r:g}/s" for r in rates]]
            random.shuffle(figures)
            for fig in figures:
                if fig == "raw":
                    xs = raw_block_latencies(env, a.samples)
                elif fig == "baseline":
                    xs = baseline_latencies(env, a.samples)
                else:
                    rate = float(fig.split()[1].rstrip("/s"))
                    xs, evil = flooded_latencies(env, a.samples, rate)
                    served.setdefault(fig, []).append(evil.received_bytes / MIB)
                medians.setdefault(fig, []).extend(xs)
                print(f"  {fig}: {fmt(xs)}", flush=True)
        hwm = vm_hwm(env.bridge.pid)
    finally:
        env.close()
        shutil.rmtree(work, ignore_errors=True)
    raw, base = statistics.median(medians["raw"]), statistics.median(medians["baseline"])
    print("\n| figure | block latency, median (min–max) | ours/raw broker | vs baseline "
          "| goal |")
    print("| --- | --- | --- | --- | --- |")
    print(f"| broker's limit: 1 MiB QoS 1, bridge identity → device | {fmt(medians['raw'])} "
          "| 1.00 | | |")
    print(f"| honest device alone (request → block) | {fmt(medians['baseline'])} | "
          f"{base / raw:.2f} | 1.00 | |")
    for r in rates:
        fig = f"flood {r:g}/s"
        m = statistics.median(medians[fig])
        got = statistics.median(served[fig])
        verdict = "met" if m <= 2 * base else f"**MISSED** by {m / (2 * base) - 1:.0%}"
        print(f"| honest device while another floods at {r:g} requests/s (1 MiB each; the "
              f"flooder got {got:.0f} MiB in ~{a.samples * (PAUSE + base) + 1:.0f} s) | "
              f"{fmt(medians[fig])} | {m / raw:.2f} | **{m / base:.2f}** | ≤ 2: {verdict} |")
    verdict = "met" if hwm < 200 * MIB else "**MISSED**"
    print(f"| bridge peak RSS (VmHWM) over all floods | {hwm / MIB:.1f} MiB | idle "
          f"{idle_rss / MIB:.1f} MiB | | < 200 MiB: {verdict} |")
    print(f"\n{os.cpu_count()} cores shared by mosquitto, the bridge, the flooder and the "
          "honest device.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
