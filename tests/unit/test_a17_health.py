"""Attack 17 on issue 16's health child started ahead of the seal
(updater/install/_health.PendingCheck, _sealed.seal_verified(into=...), _healthchild):
the disk rewriting or growing a staged file while it is copied into the child's memfds,
another holder of those memfds writing or sealing them, a process of another uid reaching
the early child's descriptors, a signed model naming a sealed descriptor as external data,
the agent dying with the child waiting, and the child's memory bound. Real sandbox and
onnxruntime throughout."""

from __future__ import annotations

import mmap
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from modelward.updater._config import HealthConfig
from modelward.updater.errors import HealthCheckError, StagedFilesChangedError, StagingError
from modelward.updater.install import _health
from modelward.updater.install._sealed import seal_verified
from tests.unit.test_i16_fixedcost import NAMES, _real_slot, _signed

pytestmark = pytest.mark.xdist_group("machine")

CFG = HealthConfig(timeout=60)


def _dead(pid: int) -> bool:
    """Gone or a zombie (no reaper in a container's init): it runs nothing any more."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except (FileNotFoundError, ProcessLookupError):
        return True


def _wait_dead(pid: int, seconds: float = 10.0) -> bool:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if _dead(pid):
            return True
        time.sleep(0.05)
    return _dead(pid)


def _pending(slot: Path, cfg: HealthConfig = CFG) -> tuple[_health.PendingCheck, int]:
    pending = _health.start_check(slot, cfg, NAMES)
    assert pending is not None and pending._proc is not None
    return pending, pending._proc.pid


def _ino(path: Path) -> int:
    return path.stat().st_ino


# --- the disk, during the copy into the early child's memfds ---------------------------------


def test_a17_disk_rewriting_the_model_mid_copy_is_refused_and_the_child_reaped(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The copy into the child's memfd is split: after its first half the disk rewrites the
    model in place (same size, same inode). The sealed copy mixes both and its fingerprint
    is not the signed one: refused, the early child killed and reaped, its memfds closed."""
    slot = _real_slot(tmp_path)
    want, sizes = _signed(slot)
    model = slot / "model.onnx"
    ino, real = _ino(model), os.sendfile
    done: list[int] = []

    def split(out: int, src: int, offset: int, count: int) -> int:
        if os.fstat(src).st_ino == ino and not done:
            done.append(1)
            n = real(out, src, offset, max(1, count // 2))
            with open(model, "r+b") as f:
                f.seek(n)
                f.write(bytes(b ^ 0xFF for b in model.read_bytes()[n:]))
            return n
        return real(out, src, offset, count)

    monkeypatch.setattr(os, "sendfile", split)
    pending, pid = _pending(slot)
    try:
        with pytest.raises(StagedFilesChangedError):
            seal_verified(slot, NAMES, sizes, want, "m 1.0.0", "now", pending.fds)
    finally:
        pending.close()
    assert done and _wait_dead(pid) and not pending.fds


def test_a17_disk_growing_the_model_while_copied_seals_only_the_signed_bytes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The disk appends to the model while it is copied: the copy stops at the signed size,
    the seal holds exactly the signed bytes, the early child checks them and passes."""
    slot = _real_slot(tmp_path)
    want, sizes = _signed(slot)
    model = slot / "model.onnx"
    signed = model.read_bytes()
    ino, real = _ino(model), os.sendfile

    def grow(out: int, src: int, offset: int, count: int) -> int:
        if os.fstat(src).st_ino == ino:
            with open(model, "ab") as f:
                f.write(b"\0" * (1 << 20))
        return real(out, src, offset, count)

    monkeypatch.setattr(os, "sendfile", grow)
    pending, pid = _pending(slot)
    with seal_verified(slot, NAMES, sizes, want, "m 1.0.0", "now", pending.fds) as sealed:
        fd = sealed.fds["model.onnx"]
        assert os.fstat(fd).st_size == len(signed) and os.pread(fd, len(signed) + 1, 0) == signed
        assert "match" in _health.run_health_check(slot, "m", "1.0.0", CFG, sealed=sealed,
                                                   pending=pending)
    assert _wait_dead(pid)


# --- another holder of the memfds (the early child's or the agent's) -------------------------


def test_a17_a_write_through_another_open_of_the_memfd_before_the_seal_is_refused(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Whoever got the empty memfd (a new open of /proc/<pid>/fd/N, its own file offset)
    writes other bytes over the copy just before it is sealed: the fingerprint is taken
    from the sealed copy, so it is refused; the child never gets go."""
    slot = _real_slot(tmp_path)
    want, sizes = _signed(slot)
    ino, real = _ino(slot / "model.onnx"), os.sendfile

    def overwrite(out: int, src: int, offset: int, count: int) -> int:
        n = real(out, src, offset, count)
        if os.fstat(src).st_ino == ino:
            other = os.open(f"/proc/self/fd/{out}", os.O_RDWR)  # (another open file)
            try:
                os.pwrite(other, b"X" * n, 0)
            finally:
                os.close(other)
        return n

    monkeypatch.setattr(os, "sendfile", overwrite)
    pending, pid = _pending(slot)
    try:
        with pytest.raises(StagedFilesChangedError):
            seal_verified(slot, NAMES, sizes, want, "m 1.0.0", "now", pending.fds)
    finally:
        pending.close()
    assert _wait_dead(pid)


def test_a17_a_writable_shared_mapping_of_the_memfd_makes_the_seal_fail_not_pass(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Another holder maps the memfd shared and writable before the seal (to write after
    it): F_SEAL_WRITE is refused (EBUSY), nothing is handed over, the child is reaped."""
    slot = _real_slot(tmp_path)
    want, sizes = _signed(slot)
    ino, real = _ino(slot / "model.onnx"), os.sendfile
    maps: list[mmap.mmap] = []

    def mapped(out: int, src: int, offset: int, count: int) -> int:
        n = real(out, src, offset, count)
        if os.fstat(src).st_ino == ino and not maps:
            maps.append(mmap.mmap(out, n, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE))
        return n

    monkeypatch.setattr(os, "sendfile", mapped)
    pending, pid = _pending(slot)
    try:
        with pytest.raises((OSError, StagingError)):
            seal_verified(slot, NAMES, sizes, want, "m 1.0.0", "now", pending.fds)
        assert maps
        maps[0][:1] = b"X"  # (the write lands in an unsealed copy nobody checks)
    finally:
        for m in maps:
            m.close()
        pending.close()
    assert _wait_dead(pid)


def test_a17_memfd_sealed_empty_or_seeked_by_another_holder_is_refused(
        tmp_path: Path) -> None:
    """The other holders of the early child's memfds share or reach them: one seals an
    empty copy ahead (it would pin an empty model), one moves the shared file offset so the
    copy lands after a hole. Neither passes the seal."""
    import fcntl

    slot = _real_slot(tmp_path)
    want, sizes = _signed(slot)
    for spoil in ("seal", "seek"):
        pending, pid = _pending(slot)
        fd = pending.fds["model.onnx"]
        if spoil == "seal":
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_WRITE | fcntl.F_SEAL_GROW)
        else:
            os.lseek(fd, 4096, os.SEEK_SET)  # (the child holds the same open file)
        try:
            with pytest.raises((StagingError, StagedFilesChangedError)):
                seal_verified(slot, NAMES, sizes, want, "m 1.0.0", "now", pending.fds)
        finally:
            pending.close()
        assert _wait_dead(pid), spoil


# --- a process of another uid: the early child's descriptors ----------------------------------


@pytest.mark.skipif(os.geteuid() != 0, reason="a root agent's child runs as nobody")
def test_a17_nobody_cannot_reach_the_early_childs_memfds_or_go_pipe(tmp_path: Path) -> None:
    """A root agent's child runs as uid 65534, which many daemons share. Another process of
    that uid tries to open the waiting child's empty memfd for writing and its go pipe for
    writing (to say go before the seal): refused (the child keeps CAP_DAC_READ_SEARCH, so
    ptrace-read access to it needs as much); the check then passes on the signed bytes."""
    slot = _real_slot(tmp_path)
    want, sizes = _signed(slot)
    pending, pid = _pending(slot)
    try:
        fds = sorted(int(n) for n in os.listdir(f"/proc/{pid}/fd"))
        targets = [f"/proc/{pid}/fd/{n}" for n in fds if n > 2]
        assert len(targets) >= len(NAMES) + 1  # (the memfds and the go pipe)
        code = ("import os, sys\nos.setgroups([]); os.setresgid(65534, 65534, 65534)\n"
                "os.setresuid(65534, 65534, 65534)\nbad = []\n"
                "for p in sys.argv[1:]:\n"
                "    for flags in (os.O_WRONLY, os.O_RDWR):\n"
                "        try:\n"
                "            fd = os.open(p, flags | os.O_NONBLOCK)\n"
                "        except OSError:\n"
                "            continue\n"
                "        bad.append(p); os.write(fd, b'1'); os.close(fd)\n"
                "print(bad)\n")
        got = subprocess.run([sys.executable, "-I", "-c", code, *targets],
                             capture_output=True, text=True, timeout=30)
        assert got.returncode == 0 and got.stdout.strip() == "[]", (got.stdout, got.stderr)
        with seal_verified(slot, NAMES, sizes, want, "m 1.0.0", "now", pending.fds) as sealed:
            assert "match" in _health.run_health_check(slot, "m", "1.0.0", CFG,
                                                       sealed=sealed, pending=pending)
    finally:
        pending.close()
    assert _wait_dead(pid)


# --- the signed model inside the child ---------------------------------------------------------


def test_a17_external_data_naming_a_sealed_descriptor_is_refused(tmp_path: Path) -> None:
    """The model is loaded as /proc/self/fd/N, so a relative external-data location "M"
    would resolve to the child's descriptor M (the sealed vectors, its stdout pipe): a
    model whose weights come from another sealed copy (and, on the device, from a bundle
    file named "M"). onnxruntime refuses to canonicalize the path: a failed check."""
    from tests.unit.test_i13_sandbox_attacks import _bundle_slot, _ext_model, _vectors

    state = tmp_path / "state"
    (state / "trust").mkdir(parents=True)
    z = np.zeros(26, np.uint8)
    slot0 = _real_slot(tmp_path)
    pending, pid = _pending(slot0)  # (the numbers its memfds carry in the child)
    vec_fd = pending.fds["vectors.npz"]
    pending.close()
    for location in (str(vec_fd), "1", f"../fd/{vec_fd}"):
        model = _ext_model(tmp_path / "ext.onnx", location, 26)
        slot = _bundle_slot(state, model, _vectors(tmp_path / "v.npz", **{
            "input:x": z, "output:y": z}), [])
        want, sizes = _signed(slot)
        pending, pid = _pending(slot)
        with seal_verified(slot, NAMES, sizes, want, "m 1.0.0", "now", pending.fds) as sealed, \
                pytest.raises(HealthCheckError) as e:
            _health.run_health_check(slot, "m", "1.0.0", CFG, sealed=sealed, pending=pending)
        assert "external data" in e.value.detail.lower(), (location, e.value.detail)
        assert _wait_dead(pid)
        import shutil

        shutil.rmtree(slot.parent)


def _as_limit(pid: int) -> int:
    with open(f"/proc/{pid}/limits") as f:
        for line in f:
            if line.startswith("Max address space"):
                return int(line.split()[3])
    raise AssertionError("no address-space limit")


def test_a17_early_child_memory_bound_is_half_of_what_is_free_when_it_runs(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """MemAvailable as the kernel would show it: 1 GiB minus the bytes sealed into the
    child's memfds (a signed bundle carrying 96 MiB of vectors padding). The limit the
    child actually runs under (/proc/<pid>/limits) must be at most what a child started
    after the seal gets: half of what is free then."""
    slot = _real_slot(tmp_path)
    vec = slot / "vectors.npz"
    with np.load(vec) as v:
        arrays = {k: v[k] for k in v.files}
    np.savez(vec, **arrays, pad=np.zeros(96 << 20, np.uint8))
    want, sizes = _signed(slot)
    base = 1 << 30
    held: list[dict[str, int]] = []
    real_read = _health._read

    def meminfo(path: str) -> str | None:
        if path != "/proc/meminfo":
            return real_read(path)
        used = sum(os.fstat(fd).st_size for fds in held for fd in fds.values())
        return f"MemAvailable: {(base - used) >> 10} kB\n"

    monkeypatch.setattr(_health, "_read", meminfo)
    monkeypatch.setattr(_health, "_cgroup_memory", lambda: (None, None))
    pending, pid = _pending(slot)
    held.append(pending.fds)
    try:
        with seal_verified(slot, NAMES, sizes, want, "m 1.0.0", "now", pending.fds) as sealed:
            fresh = _health.memory_limit(CFG)
            assert fresh <= (base - (96 << 20)) // 2
            ran_under = _as_limit(pid)
            try:
                _health.run_health_check(slot, "m", "1.0.0", CFG, sealed=sealed,
                                         pending=pending)
            except HealthCheckError as e:
                assert str(ran_under) in str(e)
            assert ran_under <= fresh, (ran_under, fresh)
    finally:
        pending.close()
    assert _wait_dead(pid)


# --- the agent dying while the child waits for go ---------------------------------------------


AGENT = """
import os, sys, time
sys.path.insert(0, {root!r})
from pathlib import Path
from modelward.updater._config import HealthConfig
from modelward.updater.install import _health
from tests.unit.test_i16_fixedcost import NAMES, _real_slot
p = _health.start_check(_real_slot(Path(sys.argv[1])), HealthConfig(timeout=60), NAMES)
print(p._proc.pid, flush=True)
time.sleep(120)
"""


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_a17_agent_killed_while_the_child_waits_leaves_no_sandbox_child(
        tmp_path: Path, sig: signal.Signals) -> None:
    """The agent process dies (SIGTERM without a handler, SIGKILL) between starting the
    child and the go byte: the child does not stay behind (PDEATHSIG, end of file on go)."""
    root = str(Path(__file__).resolve().parents[2])
    agent = subprocess.Popen([sys.executable, "-c", AGENT.format(root=root), str(tmp_path)],
                             stdout=subprocess.PIPE, text=True, cwd=root)
    try:
        assert agent.stdout is not None
        line = agent.stdout.readline()
        child = int(line)
        assert not _dead(child)
        agent.send_signal(sig)
        agent.wait(timeout=30)
        assert _wait_dead(child), f"sandbox child {child} outlived the agent"
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.wait()


def test_a17_a_failure_of_the_early_child_names_the_limit_it_ran_under(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """96 MiB available when the child starts (48 MiB for it: too little to import
    onnxruntime), 2 GiB when the check runs. Either the check runs under the limit of now
    (and passes), or its failure names the limit the child really had."""
    slot = _real_slot(tmp_path)
    want, sizes = _signed(slot)
    avail = [96 << 20]
    real_read = _health._read
    monkeypatch.setattr(_health, "_read", lambda p: f"MemAvailable: {avail[0] >> 10} kB\n"
                        if p == "/proc/meminfo" else real_read(p))
    monkeypatch.setattr(_health, "_cgroup_memory", lambda: (None, None))
    pending, pid = _pending(slot)
    ran_under = _as_limit(pid)
    assert ran_under <= 48 << 20  # (less the copies it waits for: see PendingCheck)
    avail[0] = 2 << 30
    try:
        with seal_verified(slot, NAMES, sizes, want, "m 1.0.0", "now", pending.fds) as sealed:
            try:
                _health.run_health_check(slot, "m", "1.0.0", CFG, sealed=sealed,
                                         pending=pending)
            except HealthCheckError as e:
                assert f"limits: {ran_under} bytes" in str(e), str(e)
    finally:
        pending.close()
    assert _wait_dead(pid)


def test_a17_a_manifest_whose_model_is_its_vectors_fails_the_check(tmp_path: Path) -> None:
    """A careless operator's manifest names one file as the model and as the vectors: the
    health inputs are that file and the manifest (one memfd each), and the check fails as
    the release's own fault (HealthCheckError), never a file looked for elsewhere."""
    import json

    slot = _real_slot(tmp_path)
    raw = json.loads((slot / "manifest.json").read_bytes())
    raw["checks"]["vectors"] = raw["model"]["path"]
    raw["files"] = [f for f in raw["files"] if f["path"] != "vectors.npz"]
    (slot / "manifest.json").write_text(json.dumps(raw))
    (slot / "vectors.npz").unlink()
    names = _health.health_inputs("model.onnx", "model.onnx")
    assert names == ("manifest.json", "model.onnx")
    want, sizes = _signed(slot)
    pending = _health.start_check(slot, CFG, names)
    assert pending is not None and pending._proc is not None
    pid = pending._proc.pid
    with seal_verified(slot, names, sizes, want, "m 1.0.0", "now", pending.fds) as sealed, \
            pytest.raises(HealthCheckError) as e:
        _health.run_health_check(slot, "m", "1.0.0", CFG, sealed=sealed, pending=pending)
    assert "not handed over" not in e.value.detail, e.value.detail
    assert _wait_dead(pid)


AS_NOBODY = ("import os, signal, sys, threading, time\n"  # (nobody cannot read the venv)
             "os.setgroups([]); os.setresgid(65534, 65534, 65534)\n"
             "os.setresuid(65534, 65534, 65534)\n")


@pytest.mark.skipif(os.geteuid() != 0, reason="a root agent's child runs as nobody")
def test_a17_a_nobody_process_stopping_the_early_child_is_no_verdict_on_the_release(
        tmp_path: Path) -> None:
    slot = _real_slot(tmp_path)
    want, sizes = _signed(slot)
    cfg = HealthConfig(timeout=3)
    pending, pid = _pending(slot, cfg)
    try:
        got = subprocess.run([sys.executable, "-I", "-c", AS_NOBODY +
                              "try:\n    os.kill(int(sys.argv[1]), signal.SIGSTOP)\n"
                              "except PermissionError:\n    print('refused')\n", str(pid)],
                             check=True, timeout=30, capture_output=True, text=True)
        assert got.stdout.strip() == "refused"  # (the child's uid is its own, not nobody's)
        with seal_verified(slot, NAMES, sizes, want, "m 1.0.0", "now", pending.fds) as sealed:
            try:
                _health.run_health_check(slot, "m", "1.0.0", cfg, sealed=sealed,
                                         pending=pending)
            except HealthCheckError as e:
                pytest.fail(f"judged the release: {e}")
            except Exception:  # noqa: BLE001,S110 - no verdict (retried) is what is wanted
                pass
    finally:
        pending.close()
    assert _wait_dead(pid)


@pytest.mark.skipif(os.geteuid() != 0, reason="a root agent's child runs as nobody")
def test_a17_nobody_filling_the_task_count_while_the_child_waits_does_not_fail_it(
        tmp_path: Path) -> None:
    """RLIMIT_NPROC counts every task of uid 65534: a nobody process starts 200 threads
    after the child started ahead took its bound, while it waits for go. The check needs
    no new task and passes."""
    slot = _real_slot(tmp_path)
    want, sizes = _signed(slot)
    pending, pid = _pending(slot)
    hog = subprocess.Popen([sys.executable, "-I", "-c", AS_NOBODY + (
        "for _ in range(200):\n"
        "    threading.Thread(target=time.sleep, args=(60,), daemon=True).start()\n"
        "print('up', flush=True)\ntime.sleep(60)\n")], stdout=subprocess.PIPE, text=True)
    try:
        assert hog.stdout is not None and hog.stdout.readline().strip() == "up"
        with seal_verified(slot, NAMES, sizes, want, "m 1.0.0", "now", pending.fds) as sealed:
            assert "match" in _health.run_health_check(slot, "m", "1.0.0", CFG, sealed=sealed,
                                                       pending=pending)
    finally:
        hog.kill()
        hog.wait()
        pending.close()
    assert _wait_dead(pid)
