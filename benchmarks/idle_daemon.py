"""Idle daemon footprint: CPU share and RSS of `modelward agent run` over a quiet period.

    .venv/bin/python benchmarks/idle_daemon.py [--seconds 60]

(``benchmarks/run.py`` runs the same measurement as its ``idle`` section.)

Starts swtpm, nginx, mosquitto and the bridge on loopback, provisions a device, installs
v1, then leaves the daemon alone (poll interval 1 h, listening for announcements) and
samples /proc/<pid>. Goals (issues #4 and #7): RSS <= 50 MiB, CPU <= 0.2 %.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TSS2_LOG", "all+NONE")

from modelward.agent._commands import provision, update  # noqa: E402
from modelward.agent._config import load_config
from modelward.publisher._broker_config import write_broker_config  # noqa: E402
from modelward.publisher._bundle_build import build_bundle
from modelward.publisher._repo import Repository
from modelward.simulator._broker import start_broker, stop_broker
from modelward.simulator._demo import write_device_config
from modelward.simulator._models import make_linear_model
from modelward.simulator._origin import start_origin, stop_origin
from modelward.simulator._pki import issue_cert, make_ca
from modelward.simulator._swtpm import start_swtpm, stop_swtpm


def _proc(pid: int) -> tuple[float, int]:
    """(cpu seconds, RSS KiB) of a process."""
    stat = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    cpu = (int(stat[11]) + int(stat[12])) / os.sysconf("SC_CLK_TCK")
    rss = next(int(line.split()[1]) for line in Path(f"/proc/{pid}/status").read_text()
               .splitlines() if line.startswith("VmRSS:"))
    return cpu, rss


def measure_idle(seconds: float) -> tuple[float, int, int]:
    """Run a provisioned daemon for ``seconds`` after it settled.

    Returns:
        (CPU share, RSS KiB at the end, peak RSS KiB) of the daemon process.
    """
    work = Path(tempfile.mkdtemp(prefix="modelward-idle-"))
    procs: list[subprocess.Popen[bytes]] = []
    try:
        pki = work / "pki"
        pki.mkdir()
        ca = make_ca(pki)
        server = issue_cert(ca, pki, "server")
        repo = Repository(work / "repo", work / "keys", b"idle-daemon bench passphrase")
        root = repo.init()
        model = make_linear_model(work / "m.onnx", 1)
        build_bundle(model, "classifier", "1.0.0", work / "b.tar")
        repo.publish(work / "b.tar")
        origin = start_origin(work / "repo", work / "origin", server)
        bc = write_broker_config("bench", ["idle-dev"], work / "bc")
        broker = start_broker(work / "broker", server, ca.cert, bc.conf)
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "modelward", "serve-mqtt", "--repo", str(work / "repo"),
             "--broker", broker.url, "--fleet", "bench", "--tls-ca", str(ca.cert),
             "--password-file", str(bc.credentials["modelward-bridge"])],
            cwd=ROOT, stdout=subprocess.DEVNULL))
        tpm = start_swtpm(work / "tpm")
        conf = write_device_config(
            work / "agent.toml", device_id="idle-dev", fleet="bench", state=work / "state",
            tcti=tpm.tcti, origin_url=origin.url, ca=ca.cert, poll_interval=3600,
            mqtt={"host": "127.0.0.1", "port": broker.port, "ca_file": str(ca.cert),
                  "password_file": str(bc.credentials["idle-dev"])})
        cfg = load_config(conf)
        provision(cfg, root)
        update(cfg)
        daemon = subprocess.Popen([sys.executable, "-m", "modelward", "agent", "run",
                                   "--config", str(conf)], cwd=ROOT,
                                  stderr=subprocess.DEVNULL)
        procs.append(daemon)
        time.sleep(10)  # start-up refresh, status report, then quiet
        cpu0, _ = _proc(daemon.pid)
        t0 = time.monotonic()
        peak = 0
        while time.monotonic() - t0 < seconds:
            time.sleep(1)
            _, rss = _proc(daemon.pid)
            peak = max(peak, rss)
        cpu1, rss = _proc(daemon.pid)
        return (cpu1 - cpu0) / (time.monotonic() - t0), rss, peak
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
            p.wait(20)
        stop_swtpm(work / "tpm")
        stop_broker(work / "broker")
        stop_origin(work / "origin")
        shutil.rmtree(work, ignore_errors=True)


def judge_idle(share: float, peak_kib: int) -> str:
    """The issue #7 goals for an idle daemon: met, or missed by how much."""
    rss = peak_kib / 1024
    return ("RSS <= 50 MiB: " + ("met" if rss <= 50 else f"MISSED by {rss / 50 - 1:.0%}")
            + "; CPU <= 0.2 %: " + ("met" if share <= 0.002 else
                                    f"MISSED by {share / 0.002 - 1:.0%}"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=60.0)
    args = ap.parse_args()
    share, rss, peak = measure_idle(args.seconds)
    print(f"idle daemon over {args.seconds:.0f} s: CPU {share * 100:.3f} %, "
          f"RSS {rss / 1024:.1f} MiB (peak {peak / 1024:.1f} MiB)")
    print(f"goals: {judge_idle(share, peak)}")
    return 0

if __name__ == "__main__":
    sys.exit(main())
