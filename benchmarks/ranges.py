"""Byte ranges over HTTPS (issue 16): ``RequestsFetcher.fetch_ranges`` against ``curl -o``
through the same nginx, in the same run.

* one range over the whole of a 256 MiB file, against ``curl -o /dev/null`` of the file;
* 1,000 scattered 64 KiB ranges (16 multi-range requests): milliseconds, and bytes on the
  wire (nginx's ``$body_bytes_sent``) against the bytes asked for.

    .venv/bin/python benchmarks/ranges.py [--mib 256] [--rounds 3]

Prints medians; nothing is asserted (benchmarks are not tests).
"""

from __future__ import annotations

import argparse
import os
import random
import re
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from modelward.simulator._origin import start_origin, stop_origin
from modelward.simulator._pki import issue_cert, make_ca
from modelward.updater._config import HttpsConfig
from modelward.updater.transport._fetcher import RequestsFetcher

_LOG = re.compile(r'"GET (\S+) HTTP/1\.1" (\d{3}) (\d+) ')


def _sent(log: Path) -> int:
    return sum(int(m[3]) for line in log.read_text().splitlines()
               if (m := _LOG.search(line)))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mib", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="mw-ranges-") as tmp:
        work = Path(tmp)
        root = work / "root"
        root.mkdir()
        size = args.mib << 20
        with open(root / "f.bin", "wb") as fh:
            for _ in range(args.mib):
                fh.write(os.urandom(1 << 20))
        ca = make_ca(work)
        origin = start_origin(root, work / "origin", issue_cert(ca, work, "origin"))
        log = work / "origin" / "access.log"
        url = f"{origin.url}/f.bin"
        cfg = HttpsConfig(metadata_url=origin.url + "/", targets_url=origin.url + "/",
                          ca_file=str(ca.cert))
        rnd = random.Random(16)
        slots = sorted(rnd.sample(range(size // (64 << 10)), 1000))
        scattered = [(s * (64 << 10), 64 << 10) for s in slots]
        try:
            def whole() -> None:
                f = RequestsFetcher(cfg)
                n = sum(len(p) for _, p in f.fetch_ranges(url, [(0, size)]))
                assert n == size
                f.close()

            def curl() -> None:
                subprocess.run(["curl", "-sS", "--cacert", str(ca.cert), "-o", "/dev/null",
                                url], check=True)

            def ranges() -> None:
                f = RequestsFetcher(cfg)
                n = sum(len(p) for _, p in f.fetch_ranges(url, scattered))
                assert n == 1000 * (64 << 10)
                f.close()

            runs: dict[str, list[float]] = {"whole": [], "curl": [], "ranges": []}
            wire: dict[str, int] = {}
            fns: dict[str, Callable[[], None]] = {"whole": whole, "curl": curl,
                                                  "ranges": ranges}
            for _ in range(args.rounds):
                for name, fn in fns.items():
                    before = _sent(log)
                    t = time.perf_counter()
                    fn()
                    runs[name].append(time.perf_counter() - t)
                    time.sleep(0.2)  # nginx logs after the last byte
                    wire[name] = _sent(log) - before
            med = {k: statistics.median(v) for k, v in runs.items()}
            mib = size / (1 << 20)
            print(f"file {mib:.0f} MiB, {args.rounds} rounds, medians; cores: "
                  f"{os.cpu_count()}")
            print(f"curl -o /dev/null      {med['curl'] * 1000:8.0f} ms  "
                  f"{mib / med['curl']:7.0f} MiB/s  wire {wire['curl']}")
            print(f"fetch_ranges (whole)   {med['whole'] * 1000:8.0f} ms  "
                  f"{mib / med['whole']:7.0f} MiB/s  wire {wire['whole']}  "
                  f"= {med['curl'] / med['whole']:.2f} x curl's throughput")
            asked = sum(n for _, n in scattered)
            print(f"1000 x 64 KiB ranges   {med['ranges'] * 1000:8.0f} ms  "
                  f"{asked / (1 << 20) / med['ranges']:7.0f} MiB/s  wire {wire['ranges']} "
                  f"for {asked} asked (+{wire['ranges'] - asked} framing, "
                  f"{(wire['ranges'] - asked) / asked:.3%})")
        finally:
            stop_origin(work / "origin")


if __name__ == "__main__":
    main()
