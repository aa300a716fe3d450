"""Many tiny pieces through the delta pipeline (a hostile origin trickling TLS records, or
a transport handing on every few hundred bytes): the peak RSS of the install stays bounded
(measured in a fresh process, VmHWM), whatever the piece size."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

_BUILD = r'''
import hashlib, random, sys
from pathlib import Path
from modelward.publisher._bundle_build import BuildOptions, build_bundle
from modelward.publisher._chunking import build_index
from tests.integration._i16_delta import big_model
tmp = Path(sys.argv[1])
blob = tmp / "blob.bin"
with open(blob, "wb") as fh:
    r = random.Random(3)
    for _ in range(int(sys.argv[2])):
        fh.write(r.randbytes(1 << 20))
out = tmp / "c.tar"
build_bundle(big_model(tmp / "m.onnx"), "classifier", "1.0.0", out,
             extra=[(blob, "data/blob.bin")], options=BuildOptions())
blob.unlink()
sha = hashlib.sha256(out.read_bytes()).hexdigest()
(tmp / "sha").write_text(sha)
(tmp / "ix").write_bytes(build_index(out, sha).to_bytes())
'''

_RUN = r'''
import shutil, sys
from pathlib import Path
from tuf.api.metadata import TargetFile
from modelward.updater.bundle._chunkindex import parse_index
from modelward.updater.idle import Gate
from modelward.updater.install import _delta
tmp, step = Path(sys.argv[1]), int(sys.argv[2])
out = tmp / "c.tar"
size, sha = out.stat().st_size, (tmp / "sha").read_text()
ix = parse_index((tmp / "ix").read_bytes(), "ix", max_bytes=1 << 30, bundle_length=size)
tf = TargetFile(size, {"sha256": sha}, "classifier/c.tar")
fd = open(out, "rb")
class T:
    stable_pieces = True
    def fetch_from(self, u, o): raise AssertionError
    def fetch_ranges(self, url, ranges):
        for off, n in ranges:
            for i in range(off, off + n, step):
                fd.seek(i)
                yield i, memoryview(bytearray(fd.read(min(step, off + n - i))))
def st(k):
    return int(next(x for x in open("/proc/self/status") if x.startswith(k)).split()[1])
base = st("VmRSS")
staging = tmp / "state" / "staging"
shutil.rmtree(tmp / "state", ignore_errors=True)
staging.parent.mkdir()
_delta.assemble(ix, tf, "https://o/x", T(), staging, staging / "incoming", [], Gate())
print(base, st("VmHWM"))
'''


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("mem")
    subprocess.run([sys.executable, "-c", _BUILD, str(tmp), "64"], check=True,
                   cwd=Path(__file__).parents[2], timeout=120)
    return tmp


@pytest.mark.parametrize("step", [700, 4096, 1_000_003])
def test_a17_tiny_pieces_keep_the_install_peak_rss_bounded(built: Path, step: int) -> None:
    out = subprocess.run([sys.executable, "-c", _RUN, str(built), str(step)], check=True,
                         capture_output=True, text=True, cwd=Path(__file__).parents[2],
                         timeout=120).stdout.split()
    base, peak = int(out[0]) // 1024, int(out[1]) // 1024
    assert peak < 100, (base, peak)  # MiB, the whole process (the goal: ~100 MiB)
    assert peak - base < 48, (base, peak)  # (FETCH_INFLIGHT and the pool's chunks, plus)
