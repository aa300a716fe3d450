"""Delta updates (issue 16): bytes on the wire and device cost of v1 -> v2 updates.

    .venv/bin/python benchmarks/delta.py [--mib 256] [--rounds 3] [--big | --rss-mib 128,512,2048]
        [--zstd-level 3] [--touch-mib 1024] [--only a,b,c,https,mqtt,rss] [--link-mbit N]

``--only`` runs some sections: the pairs (a), (b), (c), the full install against curl
(``https``, needs (c)), the MQTT full install (``mqtt``) and the flat-RSS figure (``rss``,
with ``--rss-mib``/``--big``). ``--link-mbit N`` adds, for each pair run, the same v1 -> v2
update and full install of v2 against the origin rate-limited to N Mbit/s (nginx
``limit_rate``, per request: the device fetches over one connection at a time), as over a
metered cellular link; the loopback rows stay, and the table names each row's link.

Also a section of the one command: ``benchmarks/run.py --only delta --delta-mib 256``.

It builds realistic ONNX models with the ``onnx`` package (an MLP stack of ``D x D``
float32 MatMul weights and biases, He-initialised random normal, so activations stay finite
through every layer; each loads and runs in onnxruntime), and three v2 of the same v1:

- (a) fine-tune: the last 10 % of the initializers (the last layers' weights and biases)
  are new;
- (b) insertion: one new ``D x D`` initializer and the MatMul node using it, in the middle
  of the graph, so every later byte of the model file shifts by ``4 D^2`` plus framing;
- (c) retrain: every weight is new.

For each pair it prints "bytes that changed" (below), the full v2 bundle, the size of its
chunk index (``build_index(...).to_bytes()``), the index's own estimate of a delta fetch
(``fetch_bytes(v2, chunk_hashes(v1))`` plus the index), the ``zstd --patch-from`` and
``xdelta3`` patch sizes of the same bundle pair (and their time), and, through a real
device (swtpm, the nginx HTTPS origin, ``modelward agent update`` as a whole process):
the bytes nginx sent (``$bytes_sent``, headers included, every request of the run:
metadata, index, bundle) for the v1 -> v2 update and for a full install of v2 on a fresh
device in the same rounds, with each process tree's wall time, CPU (user + sys, health
check child included: ``wait4``) and its memory, sampled from ``/proc`` every 5 ms
(:class:`TreeSampler`): the agent process's own peak RSS (VmHWM: the goal's figure), the
health check child's apart (onnxruntime parses the model there: its peak is about twice
the model, by design), an attempt child's if any (the daemon's; ``agent update --once``
runs the attempt in the agent process), and the tree's peak as an operator counts it: the
anonymous memory of every process at once plus the sealed in-memory copies of the
health check's inputs (memfds the agent holds: in no VmRSS unless mapped, yet RAM).

``--rss-mib``/``--big``: for each model size, a full install over HTTPS and over MQTT on
a fresh device and the v1 -> v2 update (v2 a fine-tune of v1, as (a)) over each, with
``[health] max_memory`` raised to what onnxruntime needs for that model (the default, at
most 2 GiB of address space, refused the 2 GiB model: std::bad_alloc).

**Bytes that changed** of a pair, exactly: the raw data of every initializer of v2 that
v1 does not have under the same name with the same bytes; plus, when the model's
protobuf without its initializer data (nodes, names, shapes, framing) differs from v1's,
the whole of v2's (a few KiB: an upper bound on the graph bytes that differ); plus every
other bundle file whose sha256 differs (the manifest, which names the version, and the
test vectors, whose outputs change with the model), in full.

Which install path the device took is detected, not assumed: a v1 -> v2 update is a
delta when nginx logged Range requests (206) for the bundle, or the agent logged a
``delta:`` line. Until the device has a delta path, its update is a whole bundle and the
table says so. Nothing here asserts a time: ``tests/integration/test_benchmarks.py`` runs
it with a few MiB and checks that the table judges every goal.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib.util
import json
import math
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("TSS2_LOG", "all+NONE")

MIB = 1 << 20
PROTOBUF_LIMIT = (1 << 31) - 1  # one ONNX file (no external data) is at most this
MODEL = "mlp"


# --- models ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Layer:
    """One layer of the stack: ``dense`` (W, b, MatMul+Add+Relu) or ``insert`` (W, MatMul)."""

    name: str
    kind: str
    seed: tuple[int, ...]


def dims_for(mib: int) -> tuple[int, int]:
    """(D, number of dense layers) so that the model is about ``mib`` MiB (at least 10
    layers, so that "the last 10 %" is at least one layer)."""
    d = 1024 if mib >= 64 else 128
    per = 4 * d * d + 4 * d
    n = max(10, round(mib * MIB / per))
    n = min(n, (PROTOBUF_LIMIT - 16 * MIB) // per)
    return d, n


def write_mlp(path: Path, d: int, layers: list[Layer]) -> Path:
    """An ONNX MLP of ``layers`` (weights from each layer's seed), checked in onnxruntime."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    nodes, inits, x = [], [], "x"
    scale = np.float32(math.sqrt(2.0 / d))
    for i, ly in enumerate(layers):
        rng = np.random.default_rng(list(ly.seed))
        w = rng.standard_normal((d, d), dtype=np.float32)
        w *= scale if ly.kind == "dense" else np.float32(math.sqrt(1.0 / d))
        inits.append(numpy_helper.from_array(w, f"{ly.name}.W"))
        del w
        out = "y" if i == len(layers) - 1 else f"h{i}"
        if ly.kind == "dense":
            b = (rng.standard_normal(d, dtype=np.float32) * np.float32(0.01))
            inits.append(numpy_helper.from_array(b, f"{ly.name}.b"))
            nodes += [helper.make_node("MatMul", [x, f"{ly.name}.W"], [f"{ly.name}.mm"]),
                      helper.make_node("Add", [f"{ly.name}.mm", f"{ly.name}.b"],
                                       [f"{ly.name}.z"]),
                      helper.make_node("Relu", [f"{ly.name}.z"], [out])]
        else:
            nodes.append(helper.make_node("MatMul", [x, f"{ly.name}.W"], [out]))
        x = out
    graph = helper.make_graph(
        nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", d])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", d])], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    del inits
    with open(path, "wb") as f:
        f.write(model.SerializeToString())
    del model, graph
    check_loads(path, d)
    return path


def check_loads(path: Path, d: int) -> None:
    """onnxruntime loads the model and its output is finite and not all zero."""
    import numpy as np
    import onnxruntime as ort

    s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    y = s.run(None, {"x": np.ones((2, d), np.float32)})[0]
    if not (np.isfinite(y).all() and y.any()):
        raise RuntimeError(f"{path}: onnxruntime's output is not finite, or all zero")
    del s


@dataclass(frozen=True)
class Models:
    d: int
    layers: int
    v1: Path
    v2: dict[str, Path]  # "a", "b", "c"


SCENARIOS = {
    "a": "last 10 % of the initializers changed (fine-tune)",
    "b": "one tensor inserted in the middle (later bytes shift)",
    "c": "every weight changed",
}


def build_models(work: Path, mib: int, keys: str = "abc") -> Models:
    """v1 and the v2 of ``keys`` (of "abc")."""
    d, n = dims_for(mib)
    base = [Layer(f"l{i}", "dense", (1, i)) for i in range(n)]
    k = max(1, math.ceil(n * 0.1))  # the last 10 % of the layers: 10 % of the initializers
    a = base[:n - k] + [Layer(f"l{i}", "dense", (2, i)) for i in range(n - k, n)]
    b = base[:n // 2] + [Layer("inserted", "insert", (3, 0))] + base[n // 2:]
    c = [Layer(f"l{i}", "dense", (4, i)) for i in range(n)]
    out = {}
    v1 = write_mlp(work / "v1.onnx", d, base)
    for key, layers in (("a", a), ("b", b), ("c", c)):
        if key in keys:
            out[key] = write_mlp(work / f"v2{key}.onnx", d, layers)
    return Models(d, n, v1, out)


def _skeleton_and_tensors(path: Path) -> tuple[bytes, dict[str, bytes]]:
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    tensors = {t.name: bytes(t.raw_data) for t in m.graph.initializer}
    for t in m.graph.initializer:
        t.ClearField("raw_data")
    return m.SerializeToString(), tensors


def changed_model_bytes(v1: Path, v2: Path) -> tuple[int, int]:
    """(raw bytes of v2's new or changed initializers, graph bytes counted as changed)."""
    s1, t1 = _skeleton_and_tensors(v1)
    s2, t2 = _skeleton_and_tensors(v2)
    tensors = sum(len(raw) for name, raw in t2.items() if t1.get(name) != raw)
    return tensors, (0 if s1 == s2 else len(s2))


# --- bundles, indexes, patches ----------------------------------------------------------------


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(4 * MIB):
            h.update(b)
    return h.hexdigest()


@dataclass
class Pair:
    key: str
    bundle: Path
    size: int
    changed: int = 0
    changed_detail: str = ""
    index: int = 0
    estimate: int = 0  # fetch_bytes + the index
    chunks: int = 0
    patches: dict[str, tuple[int, float]] = field(default_factory=dict)  # tool -> (bytes, s)


def index_of(bundle: Path) -> Any:
    from modelward.publisher._chunking import build_index

    return build_index(bundle, sha256_file(bundle))


def manifest_files(bundle: Path) -> tuple[bytes, dict[str, str]]:
    with tarfile.open(bundle) as tar:
        m = tar.extractfile("manifest.json")
        assert m is not None
        raw = m.read()
    return raw, {f["path"]: f["sha256"] for f in json.loads(raw)["files"]}


def patch_sizes(v1: Path, v2: Path, work: Path, level: int) -> dict[str, tuple[int, float]]:
    """zstd --patch-from and xdelta3 patches of v2 against v1: (bytes, seconds)."""
    out: dict[str, tuple[int, float]] = {}
    patch = work / "patch"
    cmds = {
        f"zstd --patch-from -{level} --long=31": [
            "zstd", "-q", "-f", f"-{level}", "--long=31", f"--patch-from={v1}", str(v2),
            "-o", str(patch)],
        "xdelta3 -e -s (defaults)": ["xdelta3", "-e", "-f", "-s", str(v1), str(v2), str(patch)],
    }
    for name, argv in cmds.items():
        if shutil.which(argv[0]) is None:
            print(f"  {argv[0]} is not installed (scripts/setup installs it)")
            continue
        t = time.perf_counter()
        subprocess.run(argv, check=True, capture_output=True)
        out[name] = (patch.stat().st_size, time.perf_counter() - t)
        patch.unlink()
    return out


# --- the device -------------------------------------------------------------------------------


@dataclass
class Run:
    """One ``agent update`` process."""

    wall: float
    cpu: float  # user + sys of the process tree (the health check child included)
    hwm_kib: int  # the agent process's own peak RSS (VmHWM, sampled)
    tree_maxrss_kib: int  # the largest peak of any process of the tree (wait4)
    download: float | None  # "downloading" -> "staged" in the agent's log
    wire: int  # bytes nginx sent during the run ($bytes_sent)
    ranged: int  # of which requests answered 206 (Range)
    delta_logged: bool
    version: str | None
    phases: dict[str, float] = field(default_factory=dict)  # from the agent's step marks
    health_kib: int = 0  # the health child's own peak RSS (VmHWM, sampled)
    attempt_kib: int = 0  # an attempt child's (none under ``agent update --once``)
    tree_kib: int = 0  # the tree's peak: anonymous memory of all + sealed copies (TreeSampler)
    memfd_kib: int = 0  # the largest the sealed copies (memfds) held were


class Wire:
    """nginx's ``$bytes_sent`` per request, in a log of its own next to the origin's."""

    def __init__(self, env: Any) -> None:
        self.work: Path = env.origin.work
        self.log = self.work / "wire.log"
        conf = self.work / "nginx.conf"
        text = conf.read_text()
        if "wire.log" not in text:
            marker = f"access_log {self.work}/access.log;"
            assert marker in text, "the origin's nginx.conf changed: no access_log line"
            text = text.replace(marker, marker + (
                "\n    log_format wire '$request_method $uri $status $bytes_sent "
                "$body_bytes_sent \"$http_range\"';"
                f"\n    access_log {self.log} wire;"))
            conf.write_text(text)
            nginx = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/sbin")
            assert nginx
            subprocess.run([nginx, "-p", str(self.work), "-c", str(conf), "-s", "reload"],
                           check=True, capture_output=True)
            import requests

            deadline = time.monotonic() + 10
            while not (self.log.exists() and self.log.stat().st_size):
                assert time.monotonic() < deadline, "nginx did not take the wire log"
                requests.get(f"{env.url}/metadata/1.root.json", verify=str(env.ca.cert),
                             timeout=5)
                time.sleep(0.05)

    def mark(self) -> int:
        return self.log.stat().st_size

    def since(self, mark: int) -> list[tuple[str, int, int, str]]:
        """(uri, status, bytes_sent, range) of each request logged after ``mark``."""
        time.sleep(0.05)  # (nginx logs a request when its connection is done with it)
        with open(self.log, "rb") as f:
            f.seek(mark)
            lines = f.read().decode().splitlines()
        out = []
        for line in lines:
            m = re.match(r'(\S+) (\S+) (\d+) (\d+) (\d+) "(.*)"$', line)
            if m:
                out.append((m[2], int(m[3]), int(m[4]), m[6]))
        return out


# Phases of an install, between the agent's step marks (its log, `-v`).
PHASES = (("start", "(process start)", "checking"),  # interpreter, imports, TPM, record
          ("refresh + pick", "checking", "downloading"),
          ("download + verify + stage", "downloading", "staged"),
          ("seal + verify", "staged", "verified"),
          ("health check", "verified", "health-checked"),
          ("commit", "health-checked", "active"),
          ("exit", "active", "(process end)"))  # the hint, the exit


def phases_text(runs: list[Run]) -> str:
    """Median seconds of each phase of ``runs``."""
    names = [n for n, _, _ in PHASES if all(n in r.phases for r in runs)]
    return ", ".join(f"{n} {med([r.phases[n] for r in runs]):.2f} s" for n in names)


def _status(pid: int) -> dict[str, int]:
    """VmHWM, VmRSS, RssAnon (KiB) of ``pid`` (empty once it is gone)."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return {}
    return {k: int(v) for k, v in re.findall(r"^(VmHWM|VmRSS|RssAnon):\s+(\d+)", text, re.M)}


def _children(pid: int) -> list[int]:
    out: list[int] = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError):
                out += map(int, Path(f"/proc/{pid}/task/{tid}/children").read_text().split())
    except OSError:
        pass
    return out


def _memfds(pid: int, seen: dict[int, int]) -> None:
    """The memfds ``pid`` holds (the sealed copies of the health check's inputs): inode ->
    size, into ``seen`` (a copy held by the agent and the health child counts once)."""
    try:
        names = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return
    for n in names:
        try:
            if os.readlink(f"/proc/{pid}/fd/{n}").startswith("/memfd:"):
                st = os.stat(f"/proc/{pid}/fd/{n}")
                seen[st.st_ino] = st.st_size
        except OSError:
            continue


#: The roles of an update's process tree (``agent update --once`` runs the attempt in the
#: agent process itself: the daemon runs it in an attempt child, ``modelward.agent._child``).
ROLES = ("agent", "attempt child", "health child")


def _role(pid: int, root: int) -> str:
    if pid == root:
        return "agent"
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return "health child"
    return "attempt child" if b"modelward.agent._child" in argv else "health child"


class TreeSampler:
    """Peaks of an update's process tree, sampled from ``/proc`` every 5 ms: each role's
    own peak RSS (VmHWM, the largest of the processes in it), and the tree's peak memory
    as a device operator counts it: the anonymous memory of every process at the same
    moment plus the sealed in-memory copies (memfds: shmem, in no process's VmRSS unless
    mapped, yet RAM for as long as they are held; each counted once)."""

    def __init__(self, root: int) -> None:
        self.root = root
        self.hwm: dict[str, int] = dict.fromkeys(ROLES, 0)  # KiB
        self.roles: dict[int, str] = {}
        self.tree_kib = self.memfd_kib = 0
        self.series: list[tuple[float, int]] = []  # (s, the agent's RssAnon KiB), 4 a second
        self._t0 = time.monotonic()
        self.jumps: list[tuple[float, int]] = []  # (s, the agent's VmHWM KiB) as it rose
        self._done = threading.Event()
        self._th = threading.Thread(target=self._run, daemon=True)
        self._th.start()

    def _run(self) -> None:
        n = 0
        while not self._done.is_set():
            self.sample(memfds=n % 4 == 0)  # (the fd tables every 20 ms)
            n += 1
            self._done.wait(0.005)

    def sample(self, memfds: bool = True) -> None:
        pids, todo = [], [self.root]
        while todo:
            pid = todo.pop()
            pids.append(pid)
            todo += _children(pid)
        anon, seen = 0, dict[int, int]()
        for pid in pids:
            st = _status(pid)
            if not st:
                continue
            role = self.roles.setdefault(pid, _role(pid, self.root))
            t = time.monotonic() - self._t0
            if pid == self.root and (not self.series or t - self.series[-1][0] >= 0.25):
                self.series.append((t, st.get("RssAnon", 0)))
            if pid == self.root and st.get("VmHWM", 0) > self.hwm[role] + 256:
                self.jumps.append((time.monotonic() - self._t0, st["VmHWM"]))
            self.hwm[role] = max(self.hwm[role], st.get("VmHWM", 0))
            anon += st.get("RssAnon", 0)
            if memfds:
                _memfds(pid, seen)
        if memfds:
            shm = sum(seen.values()) // 1024
            self.memfd_kib = max(self.memfd_kib, shm)
            self.tree_kib = max(self.tree_kib, anon + shm)

    def stop(self) -> None:
        self._done.set()
        self._th.join()


class Device:
    """A device's state directory and swtpm, restored from snapshots between runs."""

    def __init__(self, env: Any, work: Path) -> None:
        self.env, self.dir = env, work / "device"
        self.golden: dict[str, Path] = {}
        self.conf = self.dir / "agent.toml"
        self.tpm_dir = self.dir / "tpm"
        #: ``[health] max_memory`` (bytes) when set; else the default (half the memory
        #: available, at most 2 GiB of address space: too little for a 2 GiB model)
        self.health_memory: int | None = None
        self.model = MODEL  #: the model the device's config names (at each start)

    def _write_conf(self, tcti: str) -> None:
        from modelward.simulator._demo import write_device_config

        env = self.env
        write_device_config(
            self.conf, device_id="bench-dev", fleet="bench", state=self.dir / "state",
            tcti=tcti, origin_url=env.url, ca=env.ca.cert, model=self.model,
            mqtt={"host": "127.0.0.1", "port": env.broker.port, "ca_file": str(env.ca.cert),
                  "password_file": str(env.bc.credentials["bench-dev"])})
        if self.health_memory is not None:
            with open(self.conf, "a") as f:
                f.write(f"\n[health]\nmax_memory = {self.health_memory}\n")

    def _start(self) -> None:
        from modelward.simulator._swtpm import start_swtpm

        for stale in ("swtpm.pid", "swtpm.port"):
            (self.tpm_dir / stale).unlink(missing_ok=True)
        self._write_conf(start_swtpm(self.tpm_dir).tcti)

    def stop(self) -> None:
        from modelward.simulator._swtpm import stop_swtpm

        if self.tpm_dir.exists():
            stop_swtpm(self.tpm_dir)

    def provision(self) -> None:
        from modelward.agent._commands import provision
        from modelward.agent._config import load_config

        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)
        self.dir.mkdir(parents=True)
        self._start()
        provision(load_config(self.conf), self.env.root)

    def save(self, name: str) -> None:
        self.stop()
        dst = self.dir.parent / f"golden-{name}"
        shutil.rmtree(dst, ignore_errors=True)
        shutil.copytree(self.dir, dst, symlinks=True)
        self.golden[name] = dst
        self._start()

    def restore(self, name: str) -> None:
        self.stop()
        shutil.rmtree(self.dir)
        shutil.copytree(self.golden[name], self.dir, symlinks=True)
        self._start()

    def version(self) -> str | None:
        try:
            doc = json.loads((self.dir / "state" / "current" / "manifest.json").read_bytes())
        except (OSError, ValueError):
            return None
        return str(doc["version"])

    def update(self, wire: Wire, transport: str = "https") -> Run:
        """``modelward agent update --once`` as its own process, measured."""
        log = self.dir / f"agent-{time.monotonic_ns()}.log"
        argv = [sys.executable, "-I", "-m", "modelward", "-v", "--log-format", "json",
                "agent", "update", "--once", "--transport", transport, "--config",
                str(self.conf)]
        mark = wire.mark()
        with open(log, "w") as err:
            t0, epoch0 = time.perf_counter(), time.time()
            p = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=err, cwd=ROOT,
                                 env={**os.environ, "TSS2_LOG": "all+NONE"})
            tree = TreeSampler(p.pid)
            _, status, ru = os.wait4(p.pid, 0)
            wall = time.perf_counter() - t0
            tree.stop()
            if VERBOSE:
                print("      agent RssAnon MiB over time: " + " ".join(
                    f"{t:.1f}s:{k / 1024:.0f}" for t, k in tree.series[::4]))
                print("      agent VmHWM rose: " + " ".join(
                    f"{t:.2f}s:{k / 1024:.1f}" for t, k in tree.jumps))
            p.returncode = os.waitstatus_to_exitcode(status)
        text = log.read_text()
        if os.environ.get("DELTA_BENCH_FILEFRAG") == "1":  # (diagnosis: the slot's layout)
            model = self.dir / "state" / "current" / "model.onnx"
            if model.exists():
                print("      filefrag:", subprocess.run(["filefrag", str(model.resolve())],
                      capture_output=True, text=True).stdout.strip())
        if p.returncode != 0:
            raise RuntimeError(f"agent update failed ({p.returncode}): {text[-3000:]}")
        marks, delta_logged = {}, False
        for line in text.splitlines():
            try:
                doc = json.loads(line)
            except ValueError:
                continue
            if "step" in doc:
                marks[doc["step"]] = doc["ts"]
            if str(doc.get("msg", "")).startswith("sealed copies") and VERBOSE:
                print("      " + str(doc["msg"]))
            if str(doc.get("msg", "")).startswith("delta:") or "delta:" in str(doc.get("msg")):
                delta_logged = True
        from datetime import datetime

        at = {k: datetime.fromisoformat(v).timestamp() for k, v in marks.items()}
        at["(process start)"], at["(process end)"] = epoch0, epoch0 + wall
        phases = {name: at[b] - at[a] for name, a, b in PHASES if a in at and b in at}
        download = phases.get("download + verify + stage")
        reqs = wire.since(mark)
        log.unlink()
        return Run(wall, ru.ru_utime + ru.ru_stime, tree.hwm["agent"], ru.ru_maxrss, download,
                   sum(r[2] for r in reqs), sum(r[2] for r in reqs if r[1] == 206),
                   delta_logged, self.version(), phases, tree.hwm["health child"],
                   tree.hwm["attempt child"], tree.tree_kib, tree.memfd_kib)


# --- measuring --------------------------------------------------------------------------------


def med(xs: list[float]) -> float:
    return statistics.median(xs)


def fmt_s(xs: list[float]) -> str:
    return f"{med(xs):.3f} s ({min(xs):.3f}-{max(xs):.3f})"


def mib(n: float) -> str:
    return f"{n / MIB:.2f} MiB"


def verdict(what: str, ok: bool, short: float, why: str = "") -> str:
    if ok:
        return f"{what}: met"
    return f"{what}: MISSED by {short:.0%}" + (f" ({why})" if why else "")


def has_delta_module() -> bool:
    try:
        return importlib.util.find_spec("modelward.updater.install._delta") is not None
    except ModuleNotFoundError:
        return False


def _touch(mib_: int) -> None:
    buf = bytearray(mib_ << 20)
    for i in range(0, len(buf), 4096):
        buf[i] = 1
    del buf


SECTIONS = ("a", "b", "c", "https", "mqtt", "rss")


def parse_only(text: str) -> frozenset[str]:
    """``--only``'s sections (all when empty)."""
    got = frozenset(x.strip() for x in text.split(",") if x.strip()) or frozenset(SECTIONS)
    bad = sorted(got - set(SECTIONS))
    if bad:
        raise SystemExit(f"--only: unknown section(s) {', '.join(bad)} "
                         f"(known: {', '.join(SECTIONS)})")
    return got


class Link:
    """The origin rate-limited to ``mbit`` Mbit/s while in use (nginx ``limit_rate``, per
    request; the device's transfers are sequential on one connection)."""

    def __init__(self, env: Any, mbit: float) -> None:
        self.conf: Path = env.origin.work / "nginx.conf"
        self.work: Path = env.origin.work
        self.rate = int(mbit * 1_000_000 / 8)

    def _reload(self, text: str) -> None:
        self.conf.write_text(text)
        nginx = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/sbin")
        assert nginx
        subprocess.run([nginx, "-p", str(self.work), "-c", str(self.conf), "-s", "reload"],
                       check=True, capture_output=True)
        time.sleep(1.0)  # (the old worker finishes; the new one has the new limit)

    def __enter__(self) -> Link:
        self.text = self.conf.read_text()
        marker = "autoindex off;"
        assert marker in self.text and "limit_rate" not in self.text, "origin conf changed"
        self._reload(self.text.replace(marker, f"{marker} limit_rate {self.rate};", 1))
        return self

    def __exit__(self, *exc: object) -> None:
        self._reload(self.text)


VERBOSE = os.environ.get("DELTA_BENCH_VERBOSE") == "1"
SYNC_AFTER_RESTORE = os.environ.get("DELTA_BENCH_NO_SYNC") != "1"


def _pair_rounds(dev: Device, wire: Wire, version: str, n: int, touch_mib: int,
                 curl: Callable[[], None] | None) -> tuple[list[Run], list[Run], list[float]]:
    """``n`` rounds, each in random order: the v1 device updates to ``version``, a fresh
    device installs it, curl fetches its bundle (unless ``curl`` is None).

    After each restore, ``sync``: a device's slots are on its disk, not dirty pages being
    written back under the install (the restore's copy of v1's 256 MiB slot otherwise was,
    and its writeback competed with the seal's reads of the stage)."""
    deltas: list[Run] = []
    fulls: list[Run] = []
    curls: list[float] = []

    def device(golden: str, out: list[Run]) -> None:
        dev.restore(golden)
        if SYNC_AFTER_RESTORE:
            os.sync()
        _touch(touch_mib)
        r = dev.update(wire)
        if r.version != version:
            raise RuntimeError(f"the device is on {r.version}, not {version}")
        out.append(r)

    def do_curl() -> None:
        assert curl is not None
        _touch(touch_mib)
        t0 = time.perf_counter()
        curl()
        curls.append(time.perf_counter() - t0)

    for _ in range(n):
        order: list[Callable[[], None]] = [lambda: device("v1", deltas),
                                           lambda: device("empty", fulls)]
        if curl is not None:
            order.append(do_curl)
        random.shuffle(order)
        for case in order:
            case()
    return deltas, fulls, curls


def bench_delta(env: Any, work: Path, size_mib: int, n: int, zstd_level: int = 3,
                rss_mib: list[int] | None = None, touch_mib: int = 1024,
                raw_paho: Callable[..., None] | None = None,
                cpu_seconds: Callable[..., float] | None = None, *,
                only: frozenset[str] = frozenset(SECTIONS),
                link_mbit: float | None = None) -> list[tuple[str, ...]]:
    """The delta section: returns the table's rows (figure, ours, reference, ratio, goal).

    The device's swtpm is stopped however the section ends (a run that failed half-way
    used to leave it running)."""
    work = Path(tempfile.mkdtemp(prefix="delta-", dir=work))
    dev = Device(env, work)
    try:
        rows = _bench_delta(env, work, dev, size_mib, n, zstd_level, rss_mib, touch_mib,
                            raw_paho, cpu_seconds, only, link_mbit)
    finally:
        dev.stop()
    shutil.rmtree(work, ignore_errors=True)
    print(f"  load average {os.getloadavg()[0]:.1f} at the end")
    return rows


def _bench_delta(env: Any, work: Path, dev: Device, size_mib: int, n: int, zstd_level: int,
                 rss_mib: list[int] | None, touch_mib: int,
                 raw_paho: Callable[..., None] | None,
                 cpu_seconds: Callable[..., float] | None, only: frozenset[str],
                 link_mbit: float | None) -> list[tuple[str, ...]]:
    from modelward.publisher._bundle_build import build_bundle
    from modelward.updater.bundle._chunkindex import chunk_hashes, fetch_bytes, index_path

    cores = os.cpu_count() or 1
    rows: list[tuple[str, ...]] = []
    print(f"\nDelta updates (issue 16), {size_mib} MiB models, {n} rounds, "
          f"load average {os.getloadavg()[0]:.1f} at the start")
    t = time.perf_counter()
    models = build_models(work, size_mib)
    print(f"  models: {models.layers} dense layers of {models.d}x{models.d} float32 "
          f"({models.v1.stat().st_size / MIB:.1f} MiB), v1 and v2 (a), (b), (c) built "
          f"and loaded in onnxruntime in {time.perf_counter() - t:.1f} s")
    wire = Wire(env)

    def make_bundle(model: Path, version: str) -> Path:
        out = work / f"{MODEL}-{version}.tar"
        build_bundle(model, MODEL, version, out)
        return out

    def publish(bundle: Path) -> Path:
        name = env.repo.publish(bundle).target_path.rsplit("/", 1)[1]
        return next((env.repo_dir / "targets" / MODEL).glob(f"*.{name}"))

    def curl(served: Path) -> None:
        out = work / "curl.out"
        subprocess.run(["curl", "-sS", "--cacert", str(env.ca.cert), "-o", str(out),
                        f"{env.url}/targets/{MODEL}/{served.name}"], check=True)
        out.unlink()

    # A provisioned device with nothing installed, and the same device on v1.
    dev.provision()
    dev.save("empty")
    v1_bundle = make_bundle(models.v1, "1.0.0")
    publish(v1_bundle)
    first = dev.update(wire)
    assert first.version == "1.0.0", first
    dev.save("v1")
    v1_ix = index_of(v1_bundle)
    v1_held = chunk_hashes(v1_ix)
    delta_mod = has_delta_module()
    print(f"  device path: modelward.updater.install._delta "
          f"{'exists' if delta_mod else 'does not exist'} in this tree")
    all_runs: list[Run] = [first]
    curl_s: dict[str, list[float]] = {}
    full_runs: dict[str, list[Run]] = {}

    for i, key in enumerate(("a", "b", "c")):
        version = f"{i + 2}.0.0"
        bundle = make_bundle(models.v2[key], version)
        if key not in only:
            if key == "c" and "mqtt" in only:  # (the MQTT section installs (c)'s v2)
                publish(bundle)
            bundle.unlink()
            continue
        p = Pair(key, bundle, bundle.stat().st_size)
        tensors, graph = changed_model_bytes(models.v1, models.v2[key])
        m1_raw, f1 = manifest_files(v1_bundle)
        m2_raw, f2 = manifest_files(bundle)
        others = [path for path in f2 if path != "model.onnx" and f1.get(path) != f2[path]]
        with tarfile.open(bundle) as tar:
            other_bytes = sum(tar.getmember(path).size for path in others)
        p.changed = tensors + graph + len(m2_raw) + other_bytes
        p.changed_detail = (f"tensors {mib(tensors)}, graph {graph / 1024:.1f} KiB, manifest "
                            f"+ {', '.join(sorted(others))} "
                            f"{(len(m2_raw) + other_bytes) / 1024:.1f} KiB")
        ix = index_of(bundle)
        p.index = len(ix.to_bytes())
        p.chunks = ix.chunk_count
        p.estimate = fetch_bytes(ix, v1_held) + p.index
        p.patches = patch_sizes(v1_bundle, bundle, work, zstd_level)
        served = publish(bundle)
        signed_index = any(served.parent.glob(f"*.{index_path(f'{MODEL}-{version}.tar')}"))
        deltas, fulls, curls = _pair_rounds(dev, wire, version, n, touch_mib,
                                            lambda served=served: curl(served))
        all_runs += deltas + fulls
        curl_s[key], full_runs[key] = curls, fulls
        is_delta = any(r.ranged for r in deltas) or any(r.delta_logged for r in deltas)
        wire_d = med([r.wire for r in deltas])
        wire_f = med([r.wire for r in fulls])
        wall_d, wall_f = [r.wall for r in deltas], [r.wall for r in fulls]
        title = f"delta ({key}) {SCENARIOS[key]}, {size_mib} MiB"
        print(f"\n  ({key}) {SCENARIOS[key]}: v2 bundle {mib(p.size)}, {p.chunks} chunks")
        signed = " (published as a signed target)" if signed_index else ""
        print(f"    bytes that changed {mib(p.changed)} ({p.changed_detail}); index "
              f"{p.index / 1024:.1f} KiB{signed}")
        print(f"    index estimate of the delta fetch {mib(p.estimate)} "
              f"({p.estimate / (p.changed + p.index):.3f}x changed + index)")
        for tool, (size, secs) in p.patches.items():
            print(f"    {tool}: patch {mib(size)} in {secs:.1f} s")
        path_note = ("delta path: Range requests / delta: log seen" if is_delta else
                     "whole bundle: no delta path in this tree" if not delta_mod else
                     "whole bundle: the device did not take its delta path")
        print(f"    device v1 -> v2 ({path_note}): wire {mib(wire_d)}, "
              f"wall {fmt_s(wall_d)}, CPU {med([r.cpu for r in deltas]):.2f} s, "
              f"RSS {med([r.hwm_kib for r in deltas]) / 1024:.1f} MiB")
        print(f"    device full install of v2: wire {mib(wire_f)}, wall {fmt_s(wall_f)}, "
              f"CPU {med([r.cpu for r in fulls]):.2f} s, RSS "
              f"{med([r.hwm_kib for r in fulls]) / 1024:.1f} MiB (health check child "
              f"{med([r.tree_maxrss_kib for r in fulls]) / 1024:.0f} MiB)")
        print(f"    phases, v1 -> v2: {phases_text(deltas)}")
        print(f"    phases, full install: {phases_text(fulls)}")
        why = ("no delta path in this tree: the device fetched the whole bundle"
               if not delta_mod and not is_delta else
               "the device fetched the whole bundle" if not is_delta else
               f"the index's own estimate is {mib(p.estimate)}: chunk granularity "
               f"(FastCDC avg 64 KiB) and the transport's framing")
        patches = "; ".join(f"{tool.split(' ')[0]} {mib(s)} ({secs:.1f} s)"
                            for tool, (s, secs) in p.patches.items())
        ref = (f"changed {mib(p.changed)} + index {p.index / 1024:.0f} KiB; full bundle "
               f"{mib(p.size)}; index estimate {mib(p.estimate)}; {patches}")
        ours = f"{mib(wire_d)}" + ("" if is_delta else " (whole bundle)")
        if key in ("a", "b"):
            bound = 1.1 if key == "a" else 1.5
            ratio = wire_d / (p.changed + p.index)
            goal = verdict(f"wire <= {bound}x (changed + index)", ratio <= bound,
                           ratio / bound - 1, why)
        else:
            ratio = wire_d / p.size
            goal = verdict("wire <= 1.02x full bundle", ratio <= 1.02, ratio / 1.02 - 1,
                           "the device fetched more than the bundle: requests and framing")
        rows.append((f"{title}: bytes on the wire", ours, ref, f"{ratio:.3f}", goal))
        rows.append(_time_row(f"{title}: device time (loopback origin)", key, deltas,
                              fulls, is_delta))
        all_runs += _link_rounds(key, title, dev, wire, version, n, touch_mib, link_mbit, env,
                                 is_delta, rows)
        bundle.unlink()

    if "c" in only and "https" in only:
        _https_row(full_runs["c"], curl_s["c"], size_mib, cores, rows)
    if "mqtt" in only:
        _mqtt_rows(env, dev, wire, n, touch_mib, size_mib, cores, raw_paho, cpu_seconds,
                   rows, all_runs)
    _rss_rows(all_runs, size_mib, rss_mib if "rss" in only else None, work, dev, wire,
              make_bundle, publish, rows)
    return rows


def _time_row(title: str, key: str, deltas: list[Run], fulls: list[Run], is_delta: bool,
              link: str = "") -> tuple[str, ...]:
    """The device-time row of a pair (judged for (a) and (c))."""
    wall_d, wall_f = [r.wall for r in deltas], [r.wall for r in fulls]
    tratio = med(wall_d) / med(wall_f)
    cpu_d, cpu_f = med([r.cpu for r in deltas]), med([r.cpu for r in fulls])
    tgoal = ""
    fixed = [r.phases["health check"] for r in fulls if "health check" in r.phases]
    twhy = (f"CPU {cpu_d:.2f} s against {cpu_f:.2f} s for the full install"
            + (f", whose health check alone took {med(fixed):.2f} s of {med(wall_f):.2f} s"
               if fixed else "")
            + (", no delta path in this tree: the update is a full install" if not is_delta
               else ""))
    if key == "a":
        tgoal = verdict(f"wall <= 0.3x full install{link}", tratio <= 0.3, tratio / 0.3 - 1,
                        twhy)
    elif key == "c":
        tgoal = verdict(f"wall <= 1.05x full install{link}", tratio <= 1.05,
                        tratio / 1.05 - 1, twhy)
    return (title, f"{fmt_s(wall_d)}, CPU {cpu_d:.2f} s, RSS "
            f"{med([r.hwm_kib for r in deltas]) / 1024:.1f} MiB",
            f"full install of v2: {fmt_s(wall_f)}, CPU {cpu_f:.2f} s, wire "
            f"{mib(med([r.wire for r in fulls]))}", f"{tratio:.2f}", tgoal)


def _link_rounds(key: str, title: str, dev: Device, wire: Wire, version: str, n: int,
                 touch_mib: int, link_mbit: float | None, env: Any, is_delta: bool,
                 rows: list[tuple[str, ...]]) -> list[Run]:
    """``--link-mbit``: the pair's update and full install again, over the slow link."""
    if not link_mbit:
        return []
    with Link(env, link_mbit):
        deltas, fulls, _ = _pair_rounds(dev, wire, version, n, touch_mib, None)
    for what, runs in (("v1 -> v2", deltas), ("full install", fulls)):
        print(f"    {link_mbit:g} Mbit/s link, {what}: wall {fmt_s([r.wall for r in runs])}, "
              f"wire {mib(med([r.wire for r in runs]))}; phases {phases_text(runs)}")
    rows.append(_time_row(f"{title}: device time over a {link_mbit:g} Mbit/s link (nginx "
                          "limit_rate)", key, deltas, fulls, is_delta,
                          f" (on the {link_mbit:g} Mbit/s link)"))
    return deltas + fulls


def _https_row(fulls: list[Run], curls: list[float], size_mib: int, cores: int,
               rows: list[tuple[str, ...]]) -> None:
    # Full install over HTTPS against curl of the same bundle, same nginx, same rounds
    # (scenario (c)): the agent's download + verify + stage ("downloading" -> "staged").
    size = fulls[0].wire  # (the bundle and the metadata, as nginx sent them)
    dl = [r.download for r in fulls if r.download is not None]
    whole = [r.wall for r in fulls]
    ours_s = dl if dl else whole
    share = med(curls) / med(ours_s)
    cpu = med([r.cpu for r in fulls])
    rows.append((
        f"delta full install over HTTPS, {size_mib} MiB (download + verify + stage)",
        f"{fmt_s(ours_s)} ({size / MIB / med(ours_s):.0f} MiB/s); whole process "
        f"{fmt_s(whole)}, CPU {cpu:.2f} s",
        f"curl -o (HTTPS, same nginx): {fmt_s(curls)}", f"{share:.2f}x throughput",
        verdict("throughput >= 0.9x curl", share >= 0.9, 1 - share / 0.9,
                f"the agent's tree used {cpu:.2f} CPU-s (each chunk hashed as it arrives, "
                f"written, then the slot re-read and Merkle-hashed by the seal) on "
                f"{cores} cores shared with nginx's TLS")))
    print(f"\n  full install over HTTPS: download + verify + stage {fmt_s(ours_s)} vs curl "
          f"{fmt_s(curls)}: {share:.2f}x curl's throughput")



def _mqtt_rows(env: Any, dev: Device, wire: Wire, n: int, touch_mib: int, size_mib: int,
               cores: int, raw_paho: Callable[..., None] | None,
               cpu_seconds: Callable[..., float] | None, rows: list[tuple[str, ...]],
               all_runs: list[Run]) -> None:
    # Over MQTT: the same install against raw paho QoS 1 through the same broker.
    if raw_paho is not None:
        served = next((env.repo_dir / "targets" / MODEL).glob("*.mlp-4.0.0.tar"))
        mq: list[Run] = []
        paho: list[float] = []
        broker_cpu: list[float] = []
        windows: list[int] = []

        def do_mqtt() -> None:
            dev.restore("empty")
            _touch(touch_mib)
            b0 = cpu_seconds(env.broker.pid) + cpu_seconds(env.bridge.pid) if cpu_seconds else 0
            r = dev.update(wire, "mqtt")
            if cpu_seconds:
                broker_cpu.append(cpu_seconds(env.broker.pid) + cpu_seconds(env.bridge.pid) - b0)
            assert r.version == "4.0.0", r
            mq.append(r)

        def do_paho() -> None:
            # Paced end to end (16 messages published and not yet received), as the device's
            # block window is: unpaced, the broker drops QoS 1 messages beyond a client's
            # queue bound (issue 14) whenever the subscriber falls behind on shared cores.
            for window in (16, 16, 8, 8, 4):
                _touch(touch_mib)
                t0 = time.perf_counter()
                try:
                    raw_paho(env, served, window=window, paced=True)
                except AssertionError as e:
                    print(f"  raw paho (window {window}) lost messages ({e}), again")
                    continue
                paho.append(time.perf_counter() - t0)
                windows.append(window)
                return
            print("  raw paho lost messages at every window: no MQTT reference this round")

        for _ in range(n):
            order = [do_mqtt, do_paho]
            random.shuffle(order)
            for case in order:
                case()
        all_runs += mq
        dl = [r.download for r in mq if r.download is not None]
        ours_s = dl if dl else [r.wall for r in mq]
        cpu = med([r.cpu for r in mq])
        bcpu = f", broker + bridge {med(broker_cpu):.2f} CPU-s" if broker_cpu else ""
        if paho:
            share = med(paho) / med(ours_s)
            ref = (f"raw paho QoS 1, 1 MiB messages, same broker (paced end to end, window "
                   f"{','.join(map(str, sorted(set(windows))))}): {fmt_s(paho)}")
            goal = verdict("throughput >= 0.8x raw paho", share >= 0.8, 1 - share / 0.8,
                           f"CPU-bound: device tree {cpu:.2f} CPU-s{bcpu} on {cores} cores")
        else:  # (not a verdict: the test's table check fails on it, as it should)
            share, paho = 0.0, [0.0]
            ref = "raw paho: lost messages at every window (the broker's queue bound)"
            goal = "throughput >= 0.8x raw paho: not measured in this run"
        rows.append((
            f"delta full install over MQTT, {size_mib} MiB (fetch + verify + stage)",
            f"{fmt_s(ours_s)}; whole process {fmt_s([r.wall for r in mq])}, CPU {cpu:.2f} s",
            ref, f"{share:.2f}x throughput", goal))
        print(f"  full install over MQTT: fetch + verify + stage {fmt_s(ours_s)} vs raw paho "
              f"{fmt_s(paho)}: {share:.2f}x")



def _peaks(r: Run) -> str:
    """A run's peaks, each process apart, and the tree's (MiB)."""
    attempt = f", attempt child {r.attempt_kib / 1024:.1f}" if r.attempt_kib else ""
    return (f"agent {r.hwm_kib / 1024:.1f}{attempt}, health child {r.health_kib / 1024:.1f}, "
            f"tree {r.tree_kib / 1024:.1f} (sealed copies {r.memfd_kib / 1024:.1f}) MiB")


def _rss_rows(all_runs: list[Run], size_mib: int, rss_mib: list[int] | None, work: Path,
              dev: Device, wire: Wire, make_bundle: Callable[[Path, str], Path],
              publish: Callable[[Path], Path], rows: list[tuple[str, ...]]) -> None:
    # Peak RSS of the agent process over every run of this section; the health child
    # (onnxruntime maps and loads the model: its peak grows with the model, by design)
    # and the tree (the sealed copies of the model included) are shown apart.
    peak = max(r.hwm_kib for r in all_runs) / 1024
    top = max(all_runs, key=lambda r: r.tree_kib)
    rows.append((f"delta peak RSS of the agent process, {size_mib} MiB models (every run)",
                 f"{peak:.1f} MiB", f"health child up to "
                 f"{max(r.health_kib for r in all_runs) / 1024:.0f} MiB, tree up to "
                 f"{top.tree_kib / 1024:.0f} MiB (sealed copies {top.memfd_kib / 1024:.0f} "
                 "MiB)", "",
                 verdict("agent <= 100 MiB", peak <= 100, peak / 100 - 1,
                         "the agent process's own VmHWM, sampled every 5 ms")))
    print(f"  peak RSS of the agent process over {len(all_runs)} runs: {peak:.1f} MiB "
          f"(largest tree: {_peaks(top)})")
    if rss_mib:
        _flat_rss(rss_mib, work, dev, wire, make_bundle, publish, rows)


#: The installs of the flat-RSS figure: (name, transport, from v1).
RSS_CASES = (("full, HTTPS", "https", False), ("full, MQTT", "mqtt", False),
             ("delta, HTTPS", "https", True), ("delta, MQTT", "mqtt", True))


def _flat_rss(rss_mib: list[int], work: Path, dev: Device, wire: Wire,
              make_bundle: Callable[[Path, str], Path], publish: Callable[[Path], Path],
              rows: list[tuple[str, ...]]) -> None:
    """For each model size: a full install (HTTPS, MQTT) of v1 on a fresh device and the
    v1 -> v2 update (HTTPS, MQTT; v2 the fine-tune (a) of v1), each process's peak."""
    got: dict[str, dict[int, Run]] = {name: {} for name, _, _ in RSS_CASES}
    print("\n  peak RSS by model size (MiB; agent = the process that installs, health "
          "child = the sandboxed onnxruntime check, tree = anonymous memory of every "
          "process at once + the sealed copies of the model)")
    for j, s in enumerate(rss_mib):
        d, nl = dims_for(s)
        k = max(1, math.ceil(nl * 0.1))
        v1l = [Layer(f"l{i}", "dense", (9, i)) for i in range(nl)]
        v2l = v1l[:nl - k] + [Layer(f"l{i}", "dense", (10, i)) for i in range(nl - k, nl)]
        model = write_mlp(work / f"rss-{s}.onnx", d, v1l)
        size = model.stat().st_size
        # (onnxruntime reads the sealed copy and parses it, ~2x the model: the default
        # limit of the check's address space, 2 GiB at most, refused the 2 GiB model)
        dev.health_memory = max(2 << 30, 4 * size + (1 << 30))
        v1, v2 = f"{10 + 2 * j}.0.0", f"{11 + 2 * j}.0.0"
        bundle = make_bundle(model, v1)
        model.unlink()
        publish(bundle)
        bundle.unlink()
        for name, transport, from_v1 in RSS_CASES:
            if from_v1:
                continue
            dev.restore("empty")
            r = dev.update(wire, transport)
            assert r.version == v1, r
            got[name][s] = r
            if transport == "https":
                dev.save(f"rss-{s}")
        model = write_mlp(work / f"rss-{s}.onnx", d, v2l)
        bundle = make_bundle(model, v2)
        model.unlink()
        publish(bundle)
        bundle.unlink()
        for name, transport, from_v1 in RSS_CASES:
            if not from_v1:
                continue
            dev.restore(f"rss-{s}")
            r = dev.update(wire, transport)
            assert r.version == v2, r
            if not (r.ranged or r.delta_logged):
                print(f"    ({name}: the device took the whole bundle)")
            got[name][s] = r
        shutil.rmtree(dev.golden.pop(f"rss-{s}"))
        dev.health_memory = None
        for name, _, _ in RSS_CASES:
            r = got[name][s]
            print(f"  {s:5} MiB model ({size / MIB:.0f} MiB), {name:12}: {_peaks(r)} "
                  f"(wall {r.wall:.1f} s)")
    a_mib, b_mib = rss_mib[0], rss_mib[-1]
    for name, _, _ in RSS_CASES:
        runs = got[name]
        a, b = runs[a_mib].hwm_kib, runs[b_mib].hwm_kib
        top = max(r.hwm_kib for r in runs.values()) / 1024
        sizes = ", ".join(f"{m} MiB: {r.hwm_kib / 1024:.1f}" for m, r in runs.items())
        health = ", ".join(f"{r.health_kib / 1024:.0f}" for r in runs.values())
        tree = ", ".join(f"{r.tree_kib / 1024:.0f}" for r in runs.values())
        rows.append((f"delta peak RSS of the agent, {a_mib} MiB vs {b_mib} MiB model, {name}",
                     f"{b / 1024:.1f} MiB ({sizes})", f"{a / 1024:.1f} MiB (health child "
                     f"{health} MiB, tree {tree} MiB)", f"{b / a:.3f}",
                     verdict("<= 100 MiB", top <= 100, top / 100 - 1) + "; "
                     + verdict("ratio <= 1.1", b / a <= 1.1, b / a / 1.1 - 1,
                               "the agent process's own VmHWM, sampled every 5 ms")))


def main() -> int:
    import run  # benchmarks/run.py: the shared environment and references

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mib", type=int, default=256, help="model size")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--zstd-level", type=int, default=3,
                    help="zstd --patch-from level (19: 160 s a 256 MiB pair, larger patches)")
    ap.add_argument("--rss-mib", default="", help="model sizes for the flat-RSS figure")
    ap.add_argument("--big", action="store_true", help="--rss-mib 128,512,2048")
    ap.add_argument("--touch-mib", type=int, default=1024)
    ap.add_argument("--only", default="", help=f"sections, of {','.join(SECTIONS)} (all)")
    ap.add_argument("--link-mbit", type=float, default=None,
                    help="also each pair over an origin limited to N Mbit/s (limit_rate)")
    args = ap.parse_args()
    only = parse_only(args.only)
    rss = "128,512,2048" if args.big else args.rss_mib
    rows = run.in_env(lambda env, work: bench_delta(
        env, work, args.mib, args.rounds, args.zstd_level,
        [int(x) for x in rss.split(",")] if rss else None, args.touch_mib,
        run.raw_paho_transfer, run.cpu_seconds, only=only, link_mbit=args.link_mbit))
    print_table(rows)
    return 0


def print_table(rows: list[tuple[str, ...]], goals: str = "issue 16") -> None:
    print(f"\n| figure | ours | reference | ratio | goal ({goals}) |\n"
          "| --- | --- | --- | --- | --- |")
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    sys.exit(main())
