"""Issue 13, outside review of the health-check sandbox (updater/install/_sandbox.py,
updater/install/_sandbox_launch.py, updater/install/_health.py): attacks by a signed but
malicious model.

Two kinds of attacker, both inside the threat model's "whatever onnxruntime lets a model do":

* data only: the ONNX file, the test vectors and the manifest, run by the real health child
  (real onnxruntime, real sandbox);
* code execution in the child (an onnxruntime memory-safety bug, which is why there is a
  sandbox at all): a small Python program run through the very launcher and policy the
  health check uses (``health_policy`` + ``run``).

A test marked ``xfail(strict=True)`` demonstrates an attack that works today; the assertion
is the behaviour the sandbox should have, so the marker must go when it is fixed.

"Older kernel": the launcher adapts to the Landlock ABI it finds. ``_abi_launcher`` runs the
real launcher with ``landlock_abi()`` capped at 5 (Linux 6.10/6.11; the LTS kernels most edge
devices run, 5.15 / 6.1 / 6.6, have ABI 1 to 4, which behave the same for these attacks).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from modelward.updater._config import HealthConfig
from modelward.updater.errors import HealthCheckError
from modelward.updater.install._health import health_policy, parse_report, run_health_check
from modelward.updater.install._sandbox import Completed, SandboxPolicy, run, spawn
from modelward.updater.install._sandbox_launch import landlock_abi

# children as nobody and their thread bound (RLIMIT_NPROC counts every task of nobody):
# one worker, alone (scripts/test)
pytestmark = pytest.mark.xdist_group("machine")

ROOT = Path(__file__).resolve().parents[2]
LIMIT = 256 << 20  # the child's RLIMIT_AS in these tests

_ABI_WRAPPER = """
import sys
sys.path.insert(0, {root!r})
import modelward.updater.install._sandbox_launch as L
_real = L.landlock_abi
L.landlock_abi = lambda: min(_real(), {abi})
sys.exit(L.main(sys.argv))
"""


@pytest.fixture
def state() -> Iterator[Path]:
    """A short state dir under /tmp (UNIX socket paths are limited to 108 bytes)."""
    d = Path(tempfile.mkdtemp(prefix="a2-", dir="/tmp")).resolve()
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def _slot(state: Path) -> Path:
    slot = state / "staging" / "incoming"
    slot.mkdir(parents=True, exist_ok=True)
    (slot / "model.onnx").write_bytes(b"staged")
    (state / "trust").mkdir(exist_ok=True)
    (state / "trust" / "record.json").write_bytes(b'{"secret": "trust record"}')
    return slot


def _policy(state: Path) -> SandboxPolicy:
    return health_policy(_slot(state), HealthConfig(), os.environ, LIMIT)


def _writable_by_the_child(slot: Path) -> None:
    """A root agent's child runs as nobody (the thread bound), so file modes alone would
    stop it; an unprivileged agent's child has the agent's uid and owns the staged files.
    Make them writable to everyone so that only the sandbox stands in the way."""
    slot.chmod(0o777)
    for f in slot.iterdir():
        f.chmod(0o666)


def _py(code: str, policy: SandboxPolicy, *args: str, timeout: float = 60) -> Completed:
    return run([sys.executable, "-c", code, *args], policy, timeout=timeout)


def _abi_launcher(tmp: Path, abi: int) -> Path:
    wrapper = tmp / f"launch_abi{abi}.py"
    wrapper.write_text(_ABI_WRAPPER.format(root=str(ROOT), abi=abi))
    return wrapper


# --- code execution in the child: signals to the agent -----------------------------------

# F_SETOWN + F_SETSIG + O_ASYNC: the kernel itself sends the chosen signal to the owner when
# the pipe becomes readable. No kill(2), so the seccomp filter's "signals to itself only"
# does not see it; only Landlock's signal scope (ABI >= 6) covers file_send_sigiotask.
_SIGIO_KILL = r"""
import ctypes, fcntl, os, signal, struct
ppid, out = os.getppid(), []   # the agent's update-attempt process
def attempt(name, *steps):
    r, w = os.pipe()
    try:
        for step in steps:
            step(r)
        os.write(w, b"x")
        out.append(name + ":sent")
    except OSError as e:
        out.append(f"{name}:{e.errno}")
own = lambda r: fcntl.fcntl(r, fcntl.F_SETOWN, ppid)
own_ex = lambda r: fcntl.fcntl(r, 15, struct.pack("ii", 1, ppid))   # F_SETOWN_EX, F_OWNER_PID
sig = lambda r: fcntl.fcntl(r, 10, signal.SIGKILL)                  # F_SETSIG
setfl = lambda r: fcntl.fcntl(r, fcntl.F_SETFL, os.O_ASYNC)
ioc_own = lambda r: fcntl.ioctl(r, 0x8901, struct.pack("i", ppid))  # FIOSETOWN
ioc_pgrp = lambda r: fcntl.ioctl(r, 0x8902, struct.pack("i", ppid))  # SIOCSPGRP
ioc_async = lambda r: fcntl.ioctl(r, 0x5452, struct.pack("i", 1))   # FIOASYNC
attempt("fcntl", own, sig, setfl)
attempt("fcntl_ex", own_ex, sig, setfl)
attempt("ioctl", ioc_own, ioc_async)               # SIGIO's default action kills too
attempt("ioctl_pgrp", ioc_pgrp, ioc_async)
attempt("sig_async_only", sig, setfl)
print(" ".join(out))
"""

# The "agent": a process that runs the sandboxed child and then says it survived. (The test
# process must not be the target of a SIGKILL, so the agent is a child of the test.)
_AGENT = r"""
import os, sys
from pathlib import Path
import modelward.updater.install._sandbox as sb
from modelward.updater._config import HealthConfig
from modelward.updater.install._health import health_policy
slot, launcher, code, extra = Path(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4:]
if launcher:
    sb.LAUNCHER = Path(launcher)
policy = health_policy(slot, HealthConfig(), os.environ, 256 << 20)
done = sb.run([sys.executable, "-c", code, *extra], policy, timeout=30)
print("agent survived", done.returncode, done.stdout.decode().strip(), flush=True)
"""


def _agent_runs(slot: Path, launcher: Path | None, code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", _AGENT, str(slot), str(launcher or ""), code],
                          capture_output=True, text=True, timeout=120, check=False,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})


_SIGIO_REFUSED = "fcntl:1 fcntl_ex:1 ioctl:1 ioctl_pgrp:1 sig_async_only:1"  # EPERM each


def test_sigio_signal_to_the_agent_refused_with_landlock_signal_scope(state: Path) -> None:
    if landlock_abi() < 6:
        pytest.skip("this kernel has no Landlock signal scope (see the ABI 5 test)")
    agent = _agent_runs(_slot(state), None, _SIGIO_KILL)
    assert agent.returncode == 0 and f"agent survived 0 {_SIGIO_REFUSED}" in agent.stdout, agent


def test_sigio_signal_to_the_agent_on_landlock_abi5(state: Path) -> None:
    """Landlock's signal scope (ABI 6) is missing: the seccomp filter refuses every way to
    make a file's owner another process (F_SETOWN, F_SETOWN_EX, FIOSETOWN, SIOCSPGRP) and to
    arm SIGIO (F_SETSIG, O_ASYNC, FIOASYNC)."""
    agent = _agent_runs(_slot(state), _abi_launcher(state, 5), _SIGIO_KILL)
    assert agent.returncode == 0 and f"agent survived 0 {_SIGIO_REFUSED}" in agent.stdout, agent


# The child clears the parent-death signal the launcher set (prctl is not filtered): when its
# agent dies (SIGKILL, OOM, Ctrl-C on `agent update --once`, a crash), it lives on, holding
# its memory, with no wall-clock limit (RLIMIT_CPU does not tick while it sleeps).
_ORPHAN = r"""
import ctypes, sys, time
if sys.argv[1] == "clear":
    ctypes.CDLL(None).prctl(1, 0, 0, 0, 0)   # PR_SET_PDEATHSIG, 0
time.sleep(60)
"""


def _with_marker(marker: str) -> list[int]:
    pids = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            with contextlib.suppress(OSError):
                if marker.encode() in (p / "cmdline").read_bytes():
                    pids.append(int(p.name))
    return pids


@pytest.mark.parametrize("how", [
    "keep",
    "clear",  # prctl(PR_SET_PDEATHSIG, 0) is refused
])
def test_child_dies_with_its_agent(state: Path, how: str) -> None:
    marker = f"a2-orphan-{os.getpid()}-{how}"
    agent = subprocess.Popen([sys.executable, "-c", _AGENT, str(_slot(state)), "",
                              _ORPHAN, how, marker], env={**os.environ, "PYTHONPATH": str(ROOT)},
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    survivors: list[int] = []
    try:
        for _ in range(100):  # the sandboxed child is up (its argv carries the marker)
            if [p for p in _with_marker(marker) if p != agent.pid]:
                break
            time.sleep(0.1)
        time.sleep(1.0)  # past its prctl
        agent.kill()
        agent.wait()
        time.sleep(1.0)
        survivors = [p for p in _with_marker(marker) if p != agent.pid]
    finally:
        for pid in survivors:
            with contextlib.suppress(OSError):
                os.kill(pid, 9)
    assert survivors == [], f"sandboxed child {survivors} outlived its agent"


# --- code execution in the child: local UNIX sockets ----------------------------------------

# socket(2) is denied, socketpair(2) is not; a SOCK_DGRAM pair may sendto() any address.
_DGRAM_SEND = r"""
import socket, sys
try:
    a, _ = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    addr = sys.argv[1]
    a.sendto(b"from the sandbox", "\0" + addr[1:] if addr.startswith("@") else addr)
    print("sent")
except OSError as e:
    print(type(e).__name__)
"""


def _listen(addr: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(addr)
    s.setblocking(False)
    if not addr.startswith("\0"):
        os.chmod(addr, 0o777)  # noqa: S103 - as if the child had the agent's uid
    return s


def _received(s: socket.socket) -> bytes:
    try:
        return s.recv(100)
    except BlockingIOError:
        return b""


def test_child_cannot_reach_a_named_unix_socket_in_the_state_dir(state: Path) -> None:
    policy = _policy(state)
    sock = _listen(str(state / "ctl.sock"))
    try:
        assert str(state) in policy.must_deny
        done = _py(_DGRAM_SEND, policy, str(state / "ctl.sock"))
        got = _received(sock)
    finally:
        sock.close()
    assert done.returncode == 0, done
    assert got == b"" and done.stdout != b"sent\n", (done, got)


def test_child_cannot_reach_an_abstract_unix_socket(state: Path) -> None:
    if landlock_abi() < 6:
        pytest.skip("this kernel has no Landlock abstract-socket scope (see the ABI 5 test)")
    name = f"\0modelward-a2-{os.getpid()}"
    sock = _listen(name)
    try:
        done = _py(_DGRAM_SEND, _policy(state), "@" + name[1:])
        got = _received(sock)
    finally:
        sock.close()
    assert got == b"" and done.stdout == b"PermissionError\n", (done, got)


def test_child_cannot_reach_an_abstract_unix_socket_on_landlock_abi5(
        state: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("modelward.updater.install._sandbox.LAUNCHER", _abi_launcher(state, 5))
    name = f"\0modelward-a2-{os.getpid()}"
    sock = _listen(name)
    try:
        done = _py(_DGRAM_SEND, _policy(state), "@" + name[1:])
        got = _received(sock)
    finally:
        sock.close()
    assert got == b"" and done.stdout != b"sent\n", (done, got)


# --- code execution in the child: truncating what it may only read -------------------------

# open(O_RDONLY | O_TRUNC) needs only Landlock's READ_FILE before ABI 3 (Linux < 6.2: Ubuntu
# 22.04's 5.15, Debian 12's 6.1); the launcher denies truncate(2) for that case, not O_TRUNC.
_OTRUNC = r"""
import os, sys
try:
    os.close(os.open(sys.argv[1], os.O_RDONLY | os.O_TRUNC))
    print("opened")
except OSError as e:
    print(type(e).__name__)
"""


def test_child_cannot_truncate_a_staged_file(state: Path) -> None:
    if landlock_abi() < 3:
        pytest.skip("this kernel has no Landlock truncate right (see the ABI 2 test)")
    policy = _policy(state)
    staged = Path(policy.read_only[0]) / "model.onnx"
    _writable_by_the_child(staged.parent)
    done = _py(_OTRUNC, policy, str(staged))
    assert done.stdout == b"PermissionError\n" and staged.read_bytes() == b"staged", done


def test_child_cannot_truncate_a_staged_file_on_landlock_abi2(
        state: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("modelward.updater.install._sandbox.LAUNCHER", _abi_launcher(state, 2))
    policy = _policy(state)
    staged = Path(policy.read_only[0]) / "model.onnx"
    _writable_by_the_child(staged.parent)
    done = _py(_OTRUNC, policy, str(staged))
    assert staged.read_bytes() == b"staged", done  # today: b"", and "opened"


_TCP = r"""
import socket, sys
try:
    socket.create_connection(("127.0.0.1", int(sys.argv[1])), 2).close()
    print("connected")
except OSError as e:
    print(type(e).__name__)
"""


@pytest.mark.parametrize("abi", [1, 3, 0])
def test_tcp_stays_denied_on_older_landlock(state: Path, monkeypatch: pytest.MonkeyPatch,
                                            abi: int) -> None:
    """Below ABI 4 Landlock has no TCP rules; the seccomp filter on socket(2) holds alone."""
    if abi:
        monkeypatch.setattr("modelward.updater.install._sandbox.LAUNCHER",
                            _abi_launcher(state, abi))
    listener = socket.create_server(("127.0.0.1", 0))
    try:
        done = _py(_TCP, _policy(state), str(listener.getsockname()[1]))
    finally:
        listener.close()
    assert done.stdout == b"PermissionError\n", done


# --- code execution in the child: memory that outlives it -----------------------------------

_SHM_LEAK = r"""
import ctypes, json, sys
libc = ctypes.CDLL(None, use_errno=True)
libc.shmat.restype = ctypes.c_void_p
libc.shmat.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int]
libc.shmdt.argtypes = [ctypes.c_void_p]
seg, n = int(sys.argv[1]), int(sys.argv[2])
ids = []
for _ in range(n):
    sid = libc.shmget(0, ctypes.c_size_t(seg), 0o1600)   # IPC_PRIVATE, IPC_CREAT | 0600
    if sid < 0:
        break
    ids.append(sid)
    addr = libc.shmat(sid, None, 0)
    if not addr or addr == ctypes.c_void_p(-1).value:
        break
    ctypes.memset(addr, 1, seg)                          # resident, within RLIMIT_AS
    libc.shmdt(addr)                                     # ... and no longer counted in it
print(json.dumps(ids))
"""


def _shm_rss(ids: list[int]) -> int:
    """Resident bytes of these System V segments (/proc/sysvipc/shm, read outside)."""
    lines = Path("/proc/sysvipc/shm").read_text().splitlines()
    head = lines[0].split()
    total = 0
    for line in lines[1:]:
        row = dict(zip(head, line.split(), strict=False))
        if int(row["shmid"]) in ids:
            total += int(row["rss"])
    return total


def test_child_memory_does_not_outlive_it_or_exceed_max_memory(state: Path) -> None:
    seg = 64 << 20
    done = _py(_SHM_LEAK, _policy(state), str(seg), str(3 * LIMIT // seg))
    ids: list[int] = []
    try:
        ids = json.loads(done.stdout or b"[]")
        leaked = _shm_rss(ids)
    finally:
        libc = ctypes.CDLL(None, use_errno=True)
        for sid in ids:
            libc.shmctl(sid, 0, None)  # IPC_RMID: clean up what the attack left
    assert leaked == 0, f"{len(ids)} segments, {leaked >> 20} MiB resident after the child " \
        f"exited (its RLIMIT_AS was {LIMIT >> 20} MiB)"


# --- code execution in the child: threads ---------------------------------------------------

_THREADS = r"""
import sys, threading
threading.stack_size(64 << 10)
stop, n = threading.Event(), 0
try:
    for _ in range(int(sys.argv[1])):
        threading.Thread(target=stop.wait, daemon=True).start()
        n += 1
except (RuntimeError, MemoryError):
    pass
print(n)
stop.set()
"""


def test_child_thread_count_is_bounded(state: Path) -> None:
    done = _py(_THREADS, _policy(state), "300")
    assert done.returncode == 0, done
    assert int(done.stdout) < 300, done  # a health check runs with 1 intra/inter-op thread


# --- code execution in the child: the result pipe -------------------------------------------

_NESTED = 'import sys; sys.stdout.write("[" * 4000 + "\\n")'


def test_nested_report_is_a_failed_health_check_not_a_traceback(
        state: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import modelward.updater.install._health as health

    def compromised(argv: list[str], policy: SandboxPolicy, **kw: object) -> Completed:
        # the real sandbox and policy, the child's stdout is the attacker's (code execution)
        return run([sys.executable, "-c", _NESTED], policy, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(health, "run", compromised)
    with pytest.raises(HealthCheckError):
        run_health_check(_slot(state), "classifier", "2.0.0", HealthConfig(timeout=60))


def test_parse_report_of_nested_json() -> None:
    ok, detail = parse_report(Completed(0, b'{"ok": true, "detail": ' + b"[" * 4000 + b"\n",
                                        b"", False))
    assert not ok and detail


# --- code execution in the child: what stays refused ----------------------------------------

_REFUSED = r"""
import ctypes, fcntl, json, os, platform, signal, sys
from modelward.updater.install._sandbox_launch import _SYSCALLS
nr = _SYSCALLS[platform.machine()][1]
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
ppid, out = os.getppid(), {}
def attempt(name, fn):
    try:
        fn(); out[name] = "ok"
    except OSError as e:
        out[name] = e.errno
def raw(name, *args):
    if libc.syscall(nr[name], *args) < 0:
        raise OSError(ctypes.get_errno(), name)
attempt("ptrace_attach_agent", lambda: raw("ptrace", 16, ppid, None, None))
attempt("pidfd_open_agent", lambda: raw("pidfd_open", ppid, 0))
buf = ctypes.create_string_buffer(8)
iov = (ctypes.c_void_p * 2)(ctypes.cast(buf, ctypes.c_void_p), 8)
attempt("vm_readv_agent", lambda: raw("process_vm_readv", ppid, iov, 1, iov, 1, 0))
attempt("agent_mem", lambda: open(f"/proc/{ppid}/mem", "rb").read(1))
attempt("agent_environ", lambda: open(f"/proc/{ppid}/environ", "rb").read(1))
attempt("self_environ", lambda: open("/proc/self/environ", "rb").read(1))
attempt("io_uring", lambda: raw("io_uring_setup", 4, ctypes.create_string_buffer(120)))
attempt("vfork_clone", lambda: raw("clone", 0x4100 | 17, None, None, None, None))
attempt("thread_clone_newnet", lambda: raw("clone", 0x40010f00, None, None, None, None))
attempt("setuid_other", lambda: os.setuid(12345))
attempt("symlink_in_slot_to_record", lambda: open(sys.argv[1], "rb").read(1))
out["open_fds"] = []
for fd in range(3, 64):
    try:
        os.fstat(fd)
        out["open_fds"].append(fd)
    except OSError:
        pass
print(json.dumps(out))
"""


def test_child_cannot_trace_read_or_exec_its_way_out(state: Path) -> None:
    policy = _policy(state)
    link = Path(policy.read_only[0]) / "record.link"
    link.symlink_to(state / "trust" / "record.json")  # a disk attacker helping the model
    done = _py(_REFUSED, policy, str(link))
    assert done.returncode == 0, done.stderr.decode()
    got = json.loads(done.stdout)
    fds = got.pop("open_fds")
    assert all(v != "ok" for v in got.values()), got
    assert got["symlink_in_slot_to_record"] == got["agent_environ"] == 13, got  # EACCES
    assert len(fds) <= 4, fds  # Python's own; nothing of the agent


# --- data only: the real health child and onnxruntime ---------------------------------------


def _bundle_slot(state: Path, model: Path, vectors: Path, extra: list[tuple[Path, str]]
                 ) -> Path:
    from modelward.publisher._bundle_build import BuildOptions, build_bundle
    from modelward.updater.bundle._bundle import extract_bundle

    slot = _slot(state)
    (slot / "model.onnx").unlink()
    bundle = state / "b.tar"
    build_bundle(model, "classifier", "2.0.0", bundle, vectors=vectors, extra=extra,
                 options=BuildOptions())
    with open(bundle, "rb") as f:
        extract_bundle(f, slot, "b")
    return slot


def _ext_model(path: Path, location: str, length: int) -> Path:
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.zeros((length,), np.uint8), "W")
    w.ClearField("raw_data")
    w.data_location = TensorProto.EXTERNAL
    for k, v in (("location", location), ("offset", "0"), ("length", str(length))):
        e = w.external_data.add()
        e.key, e.value = k, v
    g = helper.make_graph([helper.make_node("Add", ["W", "x"], ["y"])], "ext",
                          [helper.make_tensor_value_info("x", TensorProto.UINT8, [length])],
                          [helper.make_tensor_value_info("y", TensorProto.UINT8, [length])],
                          initializer=[w])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    path.write_bytes(m.SerializeToString())
    return path


def _vectors(path: Path, **arrays: object) -> Path:
    import numpy as np

    np.savez(path, **arrays)  # type: ignore[arg-type]
    return path


@pytest.mark.parametrize("location", ["../../trust/record.json", "/etc/passwd",
                                      "record.link"])
def test_external_data_outside_the_slot_is_refused(state: Path, location: str) -> None:
    import numpy as np

    z = np.zeros(26, np.uint8)
    slot = _bundle_slot(state, _ext_model(state / "m.onnx", location, 26),
                        _vectors(state / "v.npz", **{"input:x": z, "output:y": z}), [])
    (slot / "record.link").symlink_to(state / "trust" / "record.json")
    with pytest.raises(HealthCheckError) as e:
        run_health_check(slot, "classifier", "2.0.0", HealthConfig(timeout=60,
                                                                   max_memory=1 << 30))
    assert "external data" in e.value.detail.lower(), e.value.detail


def test_pickled_vectors_are_refused(state: Path) -> None:
    import numpy as np

    from modelward.simulator._models import make_linear_model

    evil = np.array([{"__reduce__": "os.system"}], dtype=object)
    slot = _bundle_slot(state, make_linear_model(state / "m.onnx", 1),
                        _vectors(state / "v.npz", **{"input:x": evil, "output:y": evil}), [])
    with pytest.raises(HealthCheckError) as e:
        run_health_check(slot, "classifier", "2.0.0", HealthConfig(timeout=60))
    assert re.search(r"pickle|object", e.value.detail, re.I), e.value.detail


def test_zip_bomb_vectors_are_bounded_by_max_memory(state: Path) -> None:
    """An .npz member that inflates to 4x the child's memory limit (it compresses ~1000:1)."""
    import numpy as np
    from numpy.lib import format as npformat

    from modelward.simulator._models import make_linear_model

    n = (4 * LIMIT) // (8 * 4)
    vec = state / "v.npz"
    with zipfile.ZipFile(vec, "w", zipfile.ZIP_DEFLATED) as zf:
        with zf.open("input:x.npy", "w", force_zip64=True) as f:
            npformat.write_array_header_1_0(f, {"descr": "<f4", "fortran_order": False,
                                                "shape": (n, 8)})
            chunk = bytes(1 << 22)
            for _ in range((n * 32) // len(chunk)):
                f.write(chunk)
        with zf.open("output:y.npy", "w") as f:
            np.save(f, np.zeros((1, 4), np.float32))
    assert vec.stat().st_size < LIMIT // 50
    slot = _bundle_slot(state, make_linear_model(state / "m.onnx", 1), vec, [])
    with pytest.raises(HealthCheckError) as e:
        run_health_check(slot, "classifier", "2.0.0",
                         HealthConfig(timeout=60, max_memory=LIMIT))
    assert re.search(r"memory|alloc", e.value.detail, re.I), e.value.detail


def _spin_model(path: Path) -> Path:
    """y = x + Loop(10**12 times: acc + 1) * 0: reproduces y = x only after forever."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"]),
         helper.make_node("Add", ["acc_in", "one"], ["acc_out"])], "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("acc_in", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("acc_out", TensorProto.FLOAT, [1])],
        initializer=[numpy_helper.from_array(np.ones(1, np.float32), "one")])
    g = helper.make_graph(
        [helper.make_node("Loop", ["trips", "cond", "acc0"], ["acc"], body=body),
         helper.make_node("Mul", ["acc", "zero"], ["z"]),
         helper.make_node("Add", ["x", "z"], ["y"])], "spin",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
        initializer=[numpy_helper.from_array(np.array(10**12, np.int64), "trips"),
                     numpy_helper.from_array(np.array(True), "cond"),
                     numpy_helper.from_array(np.zeros(1, np.float32), "acc0"),
                     numpy_helper.from_array(np.zeros(1, np.float32), "zero")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    path.write_bytes(m.SerializeToString())
    return path


def test_endless_loop_model_is_stopped_by_the_timeout(state: Path) -> None:
    import numpy as np

    one = np.ones(1, np.float32)
    slot = _bundle_slot(state, _spin_model(state / "m.onnx"),
                        _vectors(state / "v.npz", **{"input:x": one, "output:y": one}), [])
    beats: list[int] = []
    with pytest.raises(HealthCheckError) as e:
        run_health_check(slot, "classifier", "2.0.0", HealthConfig(timeout=3),
                         heartbeat=lambda: beats.append(1))
    # the wall clock or RLIMIT_CPU (also 3 s here) stops it, whichever comes first
    assert re.search(r"longer than 3s|SIGXCPU|SIGKILL", str(e.value)), e.value
    assert len(beats) >= 2


def _nested_if_model(path: Path, depth: int) -> None:
    from onnx import TensorProto, helper

    def leaf(d: int) -> object:
        return helper.make_graph([helper.make_node("Identity", ["x"], [f"o{d}"])], f"leaf{d}",
                                 [], [helper.make_tensor_value_info(f"o{d}", TensorProto.FLOAT,
                                                                    [1])])

    top = leaf(0)
    for d in range(1, depth + 1):  # each level nests the previous one: linear size
        top = helper.make_graph(
            [helper.make_node("If", ["c"], [f"o{d}"], then_branch=top, else_branch=leaf(d))],
            f"l{d}", [], [helper.make_tensor_value_info(f"o{d}", TensorProto.FLOAT, [1])])
    g = helper.make_graph(list(top.node), "deep",  # type: ignore[attr-defined]
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1]),
                           helper.make_tensor_value_info("c", TensorProto.BOOL, [])],
                          [helper.make_tensor_value_info(f"o{depth}", TensorProto.FLOAT, [1])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    path.write_bytes(m.SerializeToString())


def test_deeply_nested_graph_is_a_typed_outcome(state: Path) -> None:
    """30 nested If levels (protobuf's depth limit of 100 stops deeper ones from being built
    or parsed at all): the check passes or fails with a typed error, never a traceback."""
    import numpy as np

    model = state / "m.onnx"
    _nested_if_model(model, 30)
    x = np.ones(1, np.float32)
    slot = _bundle_slot(state, model, _vectors(state / "v.npz", **{
        "input:x": x, "input:c": np.array(True), "output:o30": x}), [])
    try:
        assert "match" in run_health_check(slot, "classifier", "2.0.0", HealthConfig(timeout=60))
    except HealthCheckError as e:
        assert e.detail


# --- data only: the manifest, parsed by the agent (and the publisher) -----------------------


def _nested_manifest_bundle(state: Path) -> Path:
    """A bundle whose manifest (first member, < 1 MiB) nests 5000 JSON arrays."""
    import io
    import tarfile

    from modelward.publisher._bundle_build import BuildOptions, build_bundle
    from modelward.simulator._models import make_linear_model

    good, evil = state / "good.tar", state / "evil.tar"
    build_bundle(make_linear_model(state / "m.onnx", 1), "classifier", "2.0.0", good,
                 options=BuildOptions())
    with tarfile.open(good) as src, tarfile.open(evil, "w", format=tarfile.PAX_FORMAT) as dst:
        for info in src.getmembers():
            data = src.extractfile(info).read()  # type: ignore[union-attr]
            if info.name == "manifest.json":
                doc = data.decode()
                data = doc.replace('"provenance": {}', '"provenance": {"x": ' + "[" * 5000 +
                                   "]" * 5000 + "}").encode()
                assert data != doc.encode() and len(data) < 1 << 20
                info.size = len(data)
            dst.addfile(info, io.BytesIO(data))
    return evil


@pytest.mark.parametrize("where", ["device", "publisher"])
def test_nested_manifest_is_a_bundle_format_error(state: Path, where: str) -> None:
    from modelward.updater.bundle._bundle import extract_bundle
    from modelward.updater.errors import BundleFormatError

    bundle = _nested_manifest_bundle(state)
    dest = None
    if where == "device":
        dest = state / "staging" / "incoming"
        dest.mkdir(parents=True)
    with open(bundle, "rb") as f, pytest.raises(BundleFormatError):
        extract_bundle(f, dest, "classifier-2.0.0.tar")


# --- fixes of the review: more of each class ------------------------------------------------

_OPEN_VARIANTS = r"""
import ctypes, json, os, platform, sys
from modelward.updater.install._sandbox_launch import _SYSCALLS
nr = _SYSCALLS[platform.machine()][1]
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
slot, out = sys.argv[1], {}
def attempt(name, fn):
    try:
        fn(); out[name] = "ok"
    except OSError as e:
        out[name] = e.errno
def raw(name, *args):
    if libc.syscall(nr[name], *args) < 0:
        raise OSError(ctypes.get_errno(), name)
model = (slot + "/model.onnx").encode()
how = (ctypes.c_uint64 * 3)(os.O_RDONLY | os.O_TRUNC, 0, 0)       # struct open_how
attempt("rdonly_trunc", lambda: os.close(os.open(slot + "/model.onnx", os.O_RDONLY | os.O_TRUNC)))
attempt("wronly_trunc_devnull", lambda: os.close(os.open("/dev/null", os.O_WRONLY | os.O_TRUNC)))
attempt("creat_in_slot", lambda: os.close(os.open(slot + "/new", os.O_RDONLY | os.O_CREAT)))
attempt("tmpfile_in_slot", lambda: os.close(os.open(slot, os.O_TMPFILE | os.O_RDWR)))
attempt("openat2_trunc", lambda: raw("openat2", -100, model, how, 24))
if "creat" in nr:
    attempt("creat_call", lambda: raw("creat", model, 0o600))
attempt("rdonly", lambda: os.close(os.open(slot + "/model.onnx", os.O_RDONLY)))
attempt("wronly_devnull", lambda: os.close(os.open("/dev/null", os.O_WRONLY)))
print(json.dumps(out))
"""


@pytest.mark.parametrize("abi", [2, 0])
def test_no_open_flag_changes_a_staged_file(state: Path, monkeypatch: pytest.MonkeyPatch,
                                             abi: int) -> None:
    """Every open that could empty or create a file is refused by seccomp, whatever the
    Landlock ABI (2: Debian 12's 6.1 has no truncate right); plain reads still work."""
    if abi:
        monkeypatch.setattr("modelward.updater.install._sandbox.LAUNCHER",
                            _abi_launcher(state, abi))
    policy = _policy(state)
    staged = Path(policy.read_only[0]) / "model.onnx"
    _writable_by_the_child(staged.parent)
    done = _py(_OPEN_VARIANTS, policy, str(staged.parent))
    assert done.returncode == 0, done
    got = json.loads(done.stdout)
    assert (got.pop("rdonly"), got.pop("wronly_devnull")) == ("ok", "ok"), got
    assert got.pop("openat2_trunc") == 38, got  # ENOSYS: callers fall back to openat
    assert got and all(v == 1 for v in got.values()), got  # EPERM
    assert staged.read_bytes() == b"staged" and sorted(os.listdir(staged.parent)) == [
        "model.onnx"]


_IDENTITY = r"""
import json, os, resource
out = {"uid": os.getresuid(), "gid": os.getresgid(), "groups": os.getgroups()}
def attempt(name, fn):
    try:
        fn(); out[name] = "ok"
    except (OSError, ValueError) as e:
        out[name] = type(e).__name__
attempt("setuid_0", lambda: os.setuid(0))
attempt("setresuid_0", lambda: os.setresuid(0, 0, 0))
attempt("raise_nproc", lambda: resource.setrlimit(resource.RLIMIT_NPROC, (1 << 20, 1 << 20)))
out["nproc"] = resource.getrlimit(resource.RLIMIT_NPROC)
print(json.dumps(out))
"""


def _cap_eff(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("CapEff:"):
            return int(line.split()[1], 16)
    raise AssertionError("no CapEff")


def test_thread_bound_holds_and_cannot_be_undone(state: Path) -> None:
    """RLIMIT_NPROC needs a real uid other than 0: a root agent's child runs as nobody for
    good (it cannot get uid 0 back or raise the limit), with CAP_DAC_READ_SEARCH only."""
    policy = _policy(state)
    done = _py(_IDENTITY, policy)
    assert done.returncode == 0, done
    got = json.loads(done.stdout)
    assert got["setuid_0"] == got["setresuid_0"] == "PermissionError", got
    assert got["raise_nproc"] in ("ValueError", "PermissionError"), got
    if os.getuid() == 0:
        assert got["uid"] == got["gid"] == [policy.task_uid] * 3 and got["groups"] == [], got
    else:
        assert got["uid"] == [os.getuid()] * 3, got
    soft, hard = got["nproc"]
    assert soft == hard and soft < 10_000, got


def test_only_dac_read_search_survives_into_the_child(state: Path) -> None:
    policy = _policy(state)
    marker = f"a2-caps-{os.getpid()}"
    proc = spawn(
        [sys.executable, "-c", "import time; time.sleep(30)", marker], policy)
    try:
        caps = _cap_eff(proc.pid)
    finally:
        proc.kill()
        proc.communicate()
    assert caps == (1 << 2 if os.getuid() == 0 else 0), hex(caps)


@pytest.mark.parametrize("statuses, uid, want", [
    ([], 1000, 16),
    (["Name:\tpython\nUid:\t1000\t1000\t1000\t1000\nThreads:\t1\n"], 1000, 16),  # itself
    (["Uid:\t1000\t1000\t1000\t1000\nThreads:\t1\n",
      "Uid:\t1000\t0\t0\t0\nThreads:\t7\n",                 # the agent: counted by real uid
      "Uid:\t1001\t1000\t1000\t1000\nThreads:\t50\n",       # another real uid: not counted
      "Uid:\tjunk\nThreads:\t3\n", "garbage"], 1000, 23),
])
def test_task_limit_counts_what_its_real_uid_runs(statuses: list[str], uid: int,
                                                   want: int) -> None:
    from modelward.updater.install._sandbox_launch import task_limit

    assert task_limit(statuses, uid, 16) == want


def test_child_is_killed_on_every_exit_path_of_the_agent(state: Path) -> None:
    """The agent's own failure while the child runs (here its watchdog heartbeat raising):
    the child's process group is killed before the error propagates."""
    marker = f"a2-exitpath-{os.getpid()}"
    beats: list[int] = []

    def heartbeat() -> None:
        beats.append(1)
        if len(beats) == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run([sys.executable, "-c", "import time; time.sleep(60)", marker], _policy(state),
            timeout=60, heartbeat=heartbeat)
    assert _with_marker(marker) == []
