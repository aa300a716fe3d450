"""Issue 13, finding 9: the health-check sandbox's pieces (updater/install/_sandbox.py,
updater/install/_sandbox_launch.py, updater/install/_health.py, the [health] config, the
agent unit).

Pure decisions are tested directly; the launcher is run for real (Landlock and seccomp on
this kernel) with small probe programs, no TPM or network service needed.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import sys
from pathlib import Path

import pytest

from modelward.agent._config import load_config
from modelward.agent.errors import ConfigError
from modelward.updater._config import HealthConfig
from modelward.updater.errors import HealthCheckError, SandboxError
from modelward.updater.install._health import health_policy, parse_report, run_health_check
from modelward.updater.install._sandbox import (
    Completed,
    SandboxPolicy,
    auto_max_memory,
    policy_problem,
    python_read_paths,
    run,
    scrubbed_env,
)

UNIT = Path(__file__).resolve().parents[2] / "systemd" / "modelward-agent.service"


def _policy(tmp_path: Path, **kw: object) -> SandboxPolicy:
    slot = tmp_path / "state" / "staging" / "incoming"
    slot.mkdir(parents=True, exist_ok=True)
    (slot / "model.onnx").write_bytes(b"staged")
    base = health_policy(slot, HealthConfig(), os.environ, 512 << 20)
    return dataclasses.replace(base, **kw)  # type: ignore[arg-type]


def _py(code: str, policy: SandboxPolicy, timeout: float = 60) -> Completed:
    return run([sys.executable, "-c", code], policy, timeout=timeout)


# --- the child's report is untrusted: strict parse --------------------------------------


def _done(stdout: bytes, rc: int = 0, stderr: bytes = b"", **kw: object) -> Completed:
    return Completed(rc, stdout, stderr, bool(kw.get("timed_out", False)),
                     str(kw.get("overflow", "")))


@pytest.mark.parametrize("stdout, rc", [
    (b'{"ok": true, "detail": "fine"}\n', 1),               # exit status says no
    (b'{"ok": 1, "detail": "fine"}\n', 0),                  # not a bool
    (b'{"ok": "true", "detail": "fine"}\n', 0),
    (b'{"ok": true, "detail": "fine", "x": 1}\n', 0),       # unknown key
    (b'{"ok": true}\n', 0),
    (b'["ok", true]\n', 0),
    (b'noise\n{"ok": true, "detail": "fine"}\n', 0),        # more than one line
    (b'{"ok": true, "detail": "fine"}', 0),                 # no newline: cut off
    (b'{"ok": true, "detail": ""}\n', 0),                   # says nothing
    (b'\xff\xfe\n', 0),
    (b"", 0),
])
def test_report_must_be_exactly_one_good_line(stdout: bytes, rc: int) -> None:
    ok, detail = parse_report(_done(stdout, rc, b"last words\n"))
    assert not ok and detail


def test_report_passes_and_control_characters_are_neutralised() -> None:
    assert parse_report(_done(b'{"ok": true, "detail": "1 output(s) match"}\n')) == (
        True, "1 output(s) match")
    ok, detail = parse_report(_done(b'{"ok": false, "detail": "a\\u001b[2Jb\\nc"}\n', 1))
    assert not ok and detail == "a?[2Jb?c"
    ok, detail = parse_report(_done(b"", -9, b"x" * 10))
    assert not ok and "killed by SIGKILL" in detail
    assert parse_report(_done(b"", -9, timed_out=True)) == (False, "timeout")
    assert parse_report(_done(b"", -9, overflow="wrote more than 4 bytes to stdout"))[0] is False


# --- pure policy decisions -----------------------------------------------------------------


def test_auto_max_memory_is_half_the_free_memory_capped() -> None:
    meminfo = "MemTotal: 4000000 kB\nMemAvailable:    1000000 kB\n"
    assert auto_max_memory(meminfo, None, None, cap=2 << 30) == 1000000 * 1024 // 2
    assert auto_max_memory("MemAvailable: 99999999 kB\n", None, None, cap=2 << 30) == 2 << 30
    # the unit's MemoryMax leaves less than the device has free
    assert auto_max_memory(meminfo, str(600 << 20), str(200 << 20), cap=2 << 30) == 200 << 20
    assert auto_max_memory(meminfo, "max", "123", cap=2 << 30) == 1000000 * 1024 // 2


def test_default_memory_limit_is_below_what_is_free_and_below_3gib() -> None:
    from modelward.updater.install._health import memory_limit

    free = int(re.search(r"MemAvailable:\s+(\d+)", Path("/proc/meminfo").read_text())
               .group(1)) * 1024  # type: ignore[union-attr]
    limit = memory_limit(HealthConfig())
    assert 0 < limit <= min(free // 2 + (64 << 20), 2 << 30)  # 3 GiB cannot fit
    assert memory_limit(HealthConfig(max_memory=5 << 30)) == 5 << 30


def test_policy_hides_the_state_dir_and_secrets(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    p = _policy(tmp_path)
    state = str((tmp_path / "state").resolve())
    assert state in p.must_deny and str(tmp_path.resolve()) in p.must_deny
    assert p.read_only == (str((tmp_path / "state/staging/incoming").resolve()),)
    assert policy_problem(p) == ""
    # a readable root that holds the state dir (say a PYTHONPATH entry) is refused
    bad = dataclasses.replace(p, read_exec=(*p.read_exec, str(tmp_path)))
    assert str(tmp_path) in policy_problem(bad)
    with pytest.raises(SandboxError) as e:
        _py("print(1)", bad)
    assert e.value.missing == "policy"
    env = scrubbed_env({"TPM2TOOLS_TCTI": "swtpm:port=1", "MODELWARD_KEY_PASSPHRASE": "x",
                        "PYTHONPATH": "/p", "LANG": "C", "AWS_SECRET": "y"})
    assert set(env) == {"LANG", "PATH", "HOME", "PYTHONDONTWRITEBYTECODE",
                        "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS"}
    assert all(not r.startswith(state) for r in python_read_paths())
    # the child runs -I: a PYTHONPATH pointing anywhere (the state dir) grants nothing
    monkeypatch.setenv("PYTHONPATH", state)
    assert state not in python_read_paths()


# --- the launcher, for real ----------------------------------------------------------------


def test_launcher_proves_its_confinement_and_fails_closed(tmp_path: Path) -> None:
    # a must-deny path that is in fact readable (a link into /usr) stops the launch
    link = tmp_path / "sneaky"
    link.symlink_to("/usr/bin")
    marker = tmp_path / "ran"
    with pytest.raises(SandboxError) as e:
        run(["/usr/bin/touch", str(marker)],
            dataclasses.replace(_policy(tmp_path), must_deny=(str(link),)), timeout=30)
    assert e.value.missing == "landlock" and "still readable" in str(e.value)
    assert not marker.exists()  # the program never ran
    # a limit that cannot be set: a typed error naming it, the program never ran
    with pytest.raises(SandboxError) as e:
        run(["/usr/bin/touch", str(marker)],
            dataclasses.replace(_policy(tmp_path), max_memory=-5, isolate=False), timeout=30)
    assert e.value.missing == "RLIMIT_AS"
    assert not marker.exists()
    # a rule for a path that is not there: refused, not skipped
    with pytest.raises(SandboxError) as e:
        run(["/usr/bin/true"], dataclasses.replace(
            _policy(tmp_path), read_only=(str(tmp_path / "gone"),)), timeout=30)
    assert e.value.missing == "landlock"


_PROBE = r"""
import json, os, resource, socket, sys
out = {}
def attempt(name, fn):
    try:
        fn(); out[name] = "ok"
    except (OSError, MemoryError, ValueError) as e:
        out[name] = type(e).__name__
def fork():
    if os.fork() == 0:
        os._exit(0)
attempt("fork", fork)
attempt("exec_child", lambda: __import__("subprocess").run(["/usr/bin/true"]))
attempt("kill_parent", lambda: os.kill(os.getppid(), 0))
attempt("kill_self", lambda: os.kill(os.getpid(), 0))
attempt("netlink", lambda: socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM))
attempt("socketpair", lambda: socket.socketpair())
attempt("write_tmp", lambda: open("/tmp/modelward-sandbox-probe", "wb").close())
attempt("read_etc_shadow", lambda: open("/etc/shadow", "rb").close())
attempt("read_proc_parent_environ",
        lambda: open("/proc/%d/environ" % os.getppid(), "rb").read())
attempt("alloc_1g", lambda: bytearray(1 << 30))
attempt("inherited_fd", lambda: os.fstat(int(sys.argv[1])))
attempt("raise_as", lambda: resource.setrlimit(resource.RLIMIT_AS, (-1, -1)))
def memfd():
    fd = os.memfd_create("hog")
    os.ftruncate(fd, 1 << 30)
attempt("memfd_grow", memfd)
ppid = os.getppid()
attempt("prlimit_agent", lambda: resource.prlimit(ppid, resource.RLIMIT_NOFILE, (0, 0)))
attempt("prlimit_self", lambda: resource.prlimit(0, resource.RLIMIT_CORE, (0, 0)))
attempt("affinity_agent", lambda: os.sched_setaffinity(ppid, {0}))
attempt("affinity_self", lambda: os.sched_setaffinity(0, os.sched_getaffinity(0)))
attempt("renice_user", lambda: os.setpriority(os.PRIO_USER, os.getuid(), 19))
attempt("chmod_staged", lambda: os.chmod(sys.argv[2], 0))
attempt("truncate_staged", lambda: os.truncate(sys.argv[2], 0))
attempt("utime_staged", lambda: os.utime(sys.argv[2], (0, 0)))
import ctypes, platform
from modelward.updater.install._sandbox_launch import _SYSCALLS
libc = ctypes.CDLL(None, use_errno=True)
def raw(name, *args):
    if libc.syscall(_SYSCALLS[platform.machine()][1][name], *args) != 0:
        raise OSError(ctypes.get_errno(), name)
attempt("move_pages_agent", lambda: raw("move_pages", ppid, 0, None, None, None, 0))
attempt("kill_minus_1", lambda: os.kill(-1, 0))
out["as"] = resource.getrlimit(resource.RLIMIT_AS)[0]
out["fsize"] = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
out["cpu"] = resource.getrlimit(resource.RLIMIT_CPU)[0]
print(json.dumps(out))
"""


@pytest.mark.xdist_group("machine")
def test_probe_cannot_fork_signal_write_or_allocate_past_the_limit(tmp_path: Path) -> None:
    leak = os.open(tmp_path / "secret", os.O_CREAT | os.O_RDWR)
    os.set_inheritable(leak, True)  # even an inheritable fd of the agent is closed
    try:
        policy = _policy(tmp_path)
        staged = str(Path(policy.read_only[0]) / "model.onnx")
        done = run([sys.executable, "-c", _PROBE, str(leak), staged], policy, timeout=60)
    finally:
        os.close(leak)
    assert done.returncode == 0, done.stderr.decode()
    got = json.loads(done.stdout)
    assert got["fork"] == got["exec_child"] == got["kill_parent"] == "PermissionError", got
    assert got["kill_self"] == "ok" and got["socketpair"] == "PermissionError", got
    assert got["netlink"] == got["write_tmp"] == got["read_etc_shadow"] == "PermissionError"
    assert got["read_proc_parent_environ"] == "PermissionError", got
    assert got["alloc_1g"] == "MemoryError", got
    assert got["inherited_fd"] == "OSError", got
    assert got["raise_as"] == "ValueError" or got["raise_as"] == "PermissionError", got
    assert got["memfd_grow"] == "OSError", got  # RLIMIT_FSIZE 0: EFBIG
    assert (got["as"], got["fsize"]) == (512 << 20, 0) and got["cpu"] == 120, got
    assert not Path("/tmp/modelward-sandbox-probe").exists()
    for name in ("prlimit_agent", "affinity_agent", "renice_user", "chmod_staged",
                 "truncate_staged", "utime_staged", "move_pages_agent", "kill_minus_1"):
        assert got[name] == "PermissionError", (name, got)
    assert got["prlimit_self"] == got["affinity_self"] == "ok", got
    assert Path(staged).read_bytes() == b"staged" and Path(staged).stat().st_mode & 0o777


@pytest.mark.xdist_group("machine")
def test_output_time_and_cpu_are_bounded(tmp_path: Path) -> None:
    p = _policy(tmp_path)
    flood = run([sys.executable, "-c", "import sys\nwhile True: sys.stdout.write('x' * 65536)"],
                p, timeout=30, max_stdout=4096)
    assert flood.overflow == "wrote more than 4096 bytes to stdout" and len(flood.stdout) == 4096
    beats: list[int] = []
    slow = run([sys.executable, "-c", "import time; time.sleep(30)"], p, timeout=1.5,
               heartbeat=lambda: beats.append(1))
    assert slow.timed_out and slow.returncode < 0 and len(beats) >= 2
    spin = run([sys.executable, "-c", "while True: pass"],
               dataclasses.replace(p, max_cpu_seconds=1), timeout=30)
    assert not spin.timed_out and spin.returncode in (-24, -9), spin  # SIGXCPU / SIGKILL


def test_unsafe_no_sandbox_is_explicit_and_warns(tmp_path: Path,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    p = _policy(tmp_path)
    code = "import socket; socket.socket(); print('net')"
    assert _py(code, dataclasses.replace(p, isolate=False)).stdout == b"net\n"
    assert _py(code, p).returncode != 0
    with caplog.at_level(logging.WARNING), pytest.raises(HealthCheckError):
        run_health_check(Path(p.read_only[0]), "m", "1.0.0",
                         HealthConfig(unsafe_no_sandbox=True, timeout=60))
    assert "WITHOUT its sandbox" in caplog.text


# --- configuration and unit ----------------------------------------------------------------


def _conf(tmp_path: Path, health: str) -> Path:
    path = tmp_path / "agent.toml"
    path.write_text(
        'device_id = "d"\nfleet = "f"\nstate_dir = "s"\ntcti = "swtpm:port=1"\n'
        'model = "m"\n[https]\nmetadata_url = "https://o/m/"\ntargets_url = "https://o/t/"\n'
        f"[health]\n{health}\n")
    return path


@pytest.mark.parametrize("text, want", [
    ("", HealthConfig()),
    ('max_memory = "512M"', HealthConfig(max_memory=512 << 20)),
    ("max_memory = 1073741824\nmax_cpu_seconds = 30\ntimeout = 40",
     HealthConfig(max_memory=1 << 30, max_cpu_seconds=30.0, timeout=40.0)),
    ('max_memory = "2GiB"\nunsafe_no_sandbox = true',
     HealthConfig(max_memory=2 << 30, unsafe_no_sandbox=True)),
])
def test_health_config(tmp_path: Path, text: str, want: HealthConfig) -> None:
    assert load_config(_conf(tmp_path, text)).updater.health == want


@pytest.mark.parametrize("text, key", [
    ("max_memory = 0", "health.max_memory"),
    ('max_memory = "12"', "health.max_memory"),
    ('max_memory = "lots"', "health.max_memory"),
    ("max_memory = true", "health.max_memory"),
    ("max_cpu_seconds = -1", "health.max_cpu_seconds"),
    ('unsafe_no_sandbox = "yes"', "health.unsafe_no_sandbox"),
    ("unsafe_nosandbox = true", "health.unsafe_nosandbox"),  # a typo is not ignored
    ("nice = 40", "health.nice"),
])
def test_bad_health_config_names_the_key(tmp_path: Path, text: str, key: str) -> None:
    with pytest.raises(ConfigError) as e:
        load_config(_conf(tmp_path, text))
    assert e.value.key == key


def test_unit_bounds_memory_and_allows_the_sandbox_calls() -> None:
    text = UNIT.read_text()
    assert re.search(r"^MemoryMax=\d+%$", text, re.M)
    assert "OOMPolicy=continue" in text  # a child killed for memory does not stop the agent
    allowed = set(re.findall(r"^SystemCallFilter=([a-z_ 0-9]+)$", text, re.M)[0].split())
    launcher = (Path(__file__).resolve().parents[2] / "updater" / "install" / "_sandbox_launch.py")
    used = set(re.findall(r'nr\["(\w+)"\]', launcher.read_text()))
    assert used and used <= allowed, used - allowed


# --- a kernel without Landlock or seccomp: fail closed, or run unsafe only when named --------

_WRAPPER = """
import sys
sys.path.insert(0, {root!r})
import modelward.updater.install._sandbox_launch as L
{patch}
sys.exit(L.main(sys.argv))
"""


@pytest.mark.parametrize("patch, missing", [
    ("L.landlock_abi = lambda: 0", "landlock"),
    ("L.SECCOMP_SET_MODE_FILTER = 99", "seccomp"),
    ("L.PR_SET_NO_NEW_PRIVS = 9999", "no_new_privs"),
])
def test_health_check_fails_closed_when_an_isolation_is_missing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
        patch: str, missing: str) -> None:
    from modelward.publisher._bundle_build import BuildOptions, build_bundle
    from modelward.simulator._models import make_linear_model
    from modelward.updater.bundle._bundle import extract_bundle

    wrapper = tmp_path / "launch.py"
    wrapper.write_text(_WRAPPER.format(root=str(Path(__file__).resolve().parents[2]),
                                       patch=patch))
    monkeypatch.setattr("modelward.updater.install._sandbox.LAUNCHER", wrapper)
    bundle = tmp_path / "m.tar"
    build_bundle(make_linear_model(tmp_path / "m.onnx", 1), "m", "1.0.0", bundle,
                 options=BuildOptions())
    slot = tmp_path / "state" / "staging" / "incoming"
    slot.mkdir(parents=True)
    with open(bundle, "rb") as f:
        extract_bundle(f, slot, "m")
    with pytest.raises(SandboxError) as e:
        run_health_check(slot, "m", "1.0.0", HealthConfig(timeout=60))
    assert e.value.missing == missing and missing in str(e.value), e.value
    assert "unsafe_no_sandbox" in e.value.hint
    if missing != "no_new_privs":  # the limits still apply: only Landlock/seccomp are skipped
        with caplog.at_level(logging.WARNING):
            assert "match" in run_health_check(
                slot, "m", "1.0.0", HealthConfig(timeout=60, unsafe_no_sandbox=True))
        assert "WITHOUT its sandbox" in caplog.text
