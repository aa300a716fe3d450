"""modelward benchmarks: ratios against the physical limit measured in the same run.

    .venv/bin/python benchmarks/run.py [--size-mib 256] [--rounds 3]

Each figure runs ours and its references interleaved in random order over several
rounds, after touching and freeing ~1 GiB (these machines hand freed memory back to
the host, so first touches are slow); it prints medians with min-max and the ratio.
Not a test: nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("TSS2_LOG", "all+NONE")

from publisher import Repository, build_bundle, write_broker_config  # noqa: E402
from simulator import (  # noqa: E402
    free_port,
    issue_cert,
    make_ca,
    make_linear_model,
    start_broker,
    start_origin,
    stop_broker,
    stop_origin,
)
from trust import file_merkle_root  # noqa: E402
from updater import (  # noqa: E402
    HttpsConfig,
    MqttConfig,
    MqttFetcher,
    RequestsFetcher,
    download_to_staging,
)
from updater._mqtt import MQTT_METADATA_URL, MQTT_TARGETS_URL  # noqa: E402
from updater._tuf import TufSession  # noqa: E402

PASS = b"benchmark passphrase"


def touch_memory(mib: int = 1024) -> None:
    buf = bytearray(mib << 20)
    for i in range(0, len(buf), 4096):
        buf[i] = 1
    del buf


def timed(fn: Callable[[], object]) -> float:
    touch_memory()
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def rounds(cases: dict[str, Callable[[], object]], n: int) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {k: [] for k in cases}
    for _ in range(n):
        order = list(cases)
        random.shuffle(order)
        for k in order:
            out[k].append(timed(cases[k]))
    return out


def fmt(xs: list[float]) -> str:
    return f"{statistics.median(xs):7.3f}s ({min(xs):.3f}-{max(xs):.3f})"


def report(title: str, res: dict[str, list[float]], ours: str, size: int) -> None:
    print(f"\n{title}")
    base = statistics.median(res[ours])
    for k, xs in res.items():
        mibs = size / (1 << 20) / statistics.median(xs)
        ratio = "" if k == ours else f"   time ours/this = {base / statistics.median(xs):.2f}"
        print(f"  {k:34} {fmt(xs)}  {mibs:8.1f} MiB/s{ratio}")


def vmhwm_kib_of(code: str, *args: str) -> int:
    r = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                       check=True, cwd=Path(__file__).resolve().parents[1])
    m = re.search(r"HWM (\d+)", r.stdout)
    assert m, r.stdout + r.stderr
    return int(m.group(1))


_RSS_CHILD = """
import os, re, sys
os.environ.setdefault("TSS2_LOG", "all+NONE")
from pathlib import Path
from updater import HttpsConfig, RequestsFetcher, download_to_staging, extract_bundle
from updater._tuf import TufSession
md, url, ca, root, stage, out, path = sys.argv[1:]
f = RequestsFetcher(HttpsConfig(url + "/metadata/", url + "/targets/", ca))
s = TufSession(Path(md), url + "/metadata/", url + "/targets/", f, Path(root).read_bytes())
s.refresh()
t = s._trusted().targets.targets[path]
staged = download_to_staging(s, f, t, Path(stage), 1 << 40)
Path(out).mkdir()
with open(staged, "rb") as fh:
    extract_bundle(fh, Path(out), path)
print("HWM", re.search(r"VmHWM:\\s+(\\d+)", open("/proc/self/status").read()).group(1))
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-mib", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    size = args.size_mib << 20
    work = Path(tempfile.mkdtemp(prefix="modelward-bench-"))
    print(f"modelward benchmarks: {os.cpu_count()} cores, {args.size_mib} MiB, "
          f"{args.rounds} rounds, {time.strftime('%Y-%m-%d')}")
    try:
        # 1. Fingerprint (the boot check's hashing) vs sha256sum and openssl.
        blob = work / "model.bin"
        block = os.urandom(1 << 20)
        with open(blob, "wb") as f:
            for i in range(args.size_mib):
                f.write(block[i % 97:] + block[: i % 97])
        res = rounds({
            "ours: merkle fingerprint": lambda: file_merkle_root(blob),
            "sha256sum": lambda: subprocess.run(["sha256sum", str(blob)], check=True,
                                                capture_output=True),
            "openssl dgst -sha256": lambda: subprocess.run(
                ["openssl", "dgst", "-sha256", str(blob)], check=True, capture_output=True),
        }, args.rounds)
        report("Fingerprint of one file (boot check hashing)", res, "ours: merkle fingerprint",
               size)

        # 2. HTTPS download + verify + stage vs curl and plain python-tuf.
        pki = work / "pki"
        pki.mkdir()
        ca = make_ca(pki)
        repo_dir = work / "repo"
        repo = Repository(repo_dir, work / "keys", PASS)
        root = repo.init()
        model = make_linear_model(work / "m.onnx", 1)
        bundle = work / "b.tar"
        build_bundle(model, "bench", "1.0.0", bundle, extra=[(blob, "data/blob.bin")])
        pub = repo.publish(bundle)
        http_port = free_port()
        server_cert = issue_cert(ca, pki, "origin")
        origin = start_origin(repo_dir, work / "origin", server_cert,
                              unsafe_plain_http_port=http_port)
        bc = write_broker_config("bench", ["bench-dev"], work / "bc")
        broker = start_broker(work / "broker", server_cert, ca.cert, bc.passwords, bc.acl)
        bridge = subprocess.Popen(
            [sys.executable, "-m", "modelward", "serve-mqtt", "--repo", str(repo_dir),
             "--broker", broker.url, "--fleet", "bench", "--tls-ca", str(ca.cert),
             "--password-file", str(bc.credentials["modelward-bridge"])],
            stdout=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parents[1])
        assert bridge.stdout is not None and bridge.stdout.readline().startswith("serving")
        try:
            url = origin.url
            served = next((repo_dir / "targets" / "bench").glob("*.tar"))
            target_url = f"{url}/targets/bench/{served.name}"
            https = HttpsConfig(f"{url}/metadata/", f"{url}/targets/", str(ca.cert),
                                chunk_size=1 << 20)

            def fetch_once(f: RequestsFetcher | MqttFetcher, md_url: str, tg_url: str) -> None:
                """What the agent does: TUF refresh, then stream + verify into staging."""
                d = Path(tempfile.mkdtemp(dir=work))
                s = TufSession(d / "md", md_url, tg_url, f, root.read_bytes())
                s.refresh()
                t = s._trusted().targets.targets[pub.target_path]  # noqa: SLF001
                download_to_staging(s, f, t, d / "staging", 1 << 40)
                f.close()
                shutil.rmtree(d)

            def ours() -> None:
                fetch_once(RequestsFetcher(https), https.metadata_url, https.targets_url)

            def curl() -> None:
                out = work / "curl.out"
                subprocess.run(["curl", "-sS", "--cacert", str(ca.cert), "-o", str(out),
                                target_url], check=True)
                out.unlink()

            def plain_tuf() -> None:
                from tuf.ngclient import Updater

                d = Path(tempfile.mkdtemp(dir=work))
                os.environ["SSL_CERT_FILE"] = str(ca.cert)
                u = Updater(str(d), f"{url}/metadata/", target_dir=str(d),
                            target_base_url=f"{url}/targets/", bootstrap=root.read_bytes())
                u.refresh()
                info = u.get_targetinfo(pub.target_path)
                assert info is not None
                u.download_target(info, str(d / "b.tar"))
                shutil.rmtree(d)

            res = rounds({"ours: refresh+download+verify+stage": ours,
                          "curl -o (HTTPS, same nginx)": curl,
                          "plain python-tuf download_target": plain_tuf}, args.rounds)
            report("HTTPS download + verify + stage (nginx on loopback)", res,
                   "ours: refresh+download+verify+stage", pub.length)

            mq = MqttConfig(host="127.0.0.1", port=broker.port, fleet="bench",
                            client_name="bench-dev", ca_file=str(ca.cert),
                            password=bc.credentials["bench-dev"].read_text().strip())

            def ours_mqtt() -> None:
                fetch_once(MqttFetcher(mq), MQTT_METADATA_URL, MQTT_TARGETS_URL)

            def curl_http() -> None:
                out = work / "curl.out"
                subprocess.run(["curl", "-sS", "-o", str(out),
                                f"http://127.0.0.1:{http_port}/targets/bench/{served.name}"],
                               check=True)
                out.unlink()

            res = rounds({"ours: MQTT refresh+fetch+verify+stage": ours_mqtt,
                          "ours: HTTPS refresh+fetch+verify+stage": ours,
                          "curl -o over plain HTTP": curl_http}, args.rounds)
            report("MQTT fetch + verify + stage (mosquitto TLS + serve-mqtt bridge)", res,
                   "ours: MQTT refresh+fetch+verify+stage", pub.length)

            # 3. Peak RSS of download + extraction, small vs large bundle.
            small_pad = work / "small.bin"
            small_pad.write_bytes(os.urandom(16 << 20))
            small_b = work / "small.tar"
            build_bundle(model, "bench", "0.1.0", small_b, extra=[(small_pad, "data/b.bin")])
            small_pub = repo.publish(small_b)
            hwm = {}
            for label, p in (("16 MiB bundle", small_pub), (f"{args.size_mib} MiB bundle", pub)):
                d = Path(tempfile.mkdtemp(dir=work))
                hwm[label] = vmhwm_kib_of(_RSS_CHILD, str(d / "md"), url, str(ca.cert),
                                          str(root), str(d / "st"), str(d / "out"),
                                          p.target_path)
            print("\nPeak RSS of download + verify + extract (VmHWM of the process)")
            for label, kib in hwm.items():
                print(f"  {label:34} {kib / 1024:7.1f} MiB")
            a, b = hwm.values()
            print(f"  ratio large/small                  {b / a:7.3f}")
        finally:
            bridge.terminate()
            bridge.wait(10)
            stop_broker(work / "broker")
            stop_origin(work / "origin")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
