"""Run an untrusted program (the health check's onnxruntime child) in a sandbox.

The agent holds the TPM, the trust record, the slots, ``current`` and the MQTT credentials;
a signed but malicious model runs code in onnxruntime. :func:`run` starts ``argv`` through
:mod:`updater.install._sandbox_launch`, which confines itself with resource limits, Landlock and
seccomp and proves the confinement before it ``execve``s ``argv``. Nothing here needs
privileges or namespaces, so it works for the unprivileged agent in its systemd unit
(``RestrictNamespaces=yes``) as well as for root in CI.

The decisions are pure (:func:`policy_problem`, :func:`auto_max_memory`,
:func:`scrubbed_env`); :func:`spawn` and :func:`run` are the I/O around them. If an isolation
cannot be set up, :class:`~modelward.updater.errors.SandboxError` names it; only an explicit
``isolate=False`` (``[health] unsafe_no_sandbox = true``) runs with the limits alone.
"""

from __future__ import annotations

import contextlib
import json
import os
import selectors
import signal
import subprocess
import sys
import sysconfig
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from modelward.updater.errors import SandboxError

LAUNCHER = Path(__file__).with_name("_sandbox_launch.py")
EXIT_SANDBOX = 121  # the launcher's exit status when it refused to run the program
# The real uid a root agent's child moves to (RLIMIT_NPROC, see below): reserved for it. Not
# "nobody" (65534), which many daemons share and any of them could signal the child; a fixed
# uid above the ranges systemd and the distributions hand out (system, dynamic, homed and the
# container range 524288..1879048191), which no passwd entry names and nothing else runs as.
TASK_UID = 2_000_000_000

# Read-only, executable: the system's libraries and Python. Nothing under them is a secret.
SYSTEM_READ = ("/usr", "/lib", "/lib64", "/lib32", "/bin", "/sbin", "/etc/ld.so.cache",
               "/proc/cpuinfo", "/sys/devices/system/cpu", "/dev/urandom")
# Variables a child may see; everything else (TCTI, passphrases, tokens, ...) is dropped.
ENV_KEEP = ("LANG", "LC_ALL", "LC_CTYPE", "TZ")  # the child runs -I: no PYTHONPATH
ENV_SET = {"PATH": "/usr/bin:/bin", "HOME": "/nonexistent", "PYTHONDONTWRITEBYTECODE": "1",
           "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}


@dataclass(frozen=True)
class SandboxPolicy:
    """What a sandboxed program may see and use.

    Attributes:
        read_exec: paths it may read and execute (system, Python).
        read_only: paths it may read, not execute (the staged files).
        read_write: files it may read and write (``/dev/null``).
        must_deny: paths the launcher proves it can no longer open (the state dir, the TPM).
        max_memory: address space, bytes (``RLIMIT_AS``).
        max_cpu_seconds: CPU time (``RLIMIT_CPU``; SIGKILL 5 s later).
        max_file_size: largest file it may write, bytes (``RLIMIT_FSIZE``).
        max_open_files: ``RLIMIT_NOFILE``.
        nice: niceness added.
        env: its whole environment.
        isolate: Landlock and seccomp; False only for ``unsafe_no_sandbox``.
        max_tasks: its threads, itself included (``RLIMIT_NPROC`` above what its real uid
            runs at the start; threads the agent's user starts meanwhile count too).
        task_uid: the real uid a root agent's child moves to, since the kernel never applies
            ``RLIMIT_NPROC`` to uid 0 (an unprivileged agent's child keeps the agent's uid).
    """

    read_exec: tuple[str, ...]
    read_only: tuple[str, ...]
    max_memory: int
    max_cpu_seconds: int
    read_write: tuple[str, ...] = ("/dev/null",)
    must_deny: tuple[str, ...] = ()
    max_file_size: int = 0
    max_open_files: int = 256
    nice: int = 0
    env: Mapping[str, str] = field(default_factory=dict)
    isolate: bool = True
    max_tasks: int = 16
    task_uid: int = TASK_UID


@dataclass(frozen=True)
class Completed:
    """How a sandboxed program ended.

    Attributes:
        returncode: its exit status (negative: killed by that signal).
        stdout, stderr: what it wrote, at most the asked-for bytes each.
        timed_out: it ran out of wall time and was killed.
        overflow: it wrote more than allowed and was killed.
    """

    returncode: int
    stdout: bytes
    stderr: bytes
    timed_out: bool
    overflow: str = ""


def _package_roots() -> list[str]:
    """Where ``modelward`` and its subpackages live: in a source tree the subpackages are
    symlinks to the top-level folders, so both the links' and their targets' places."""
    import modelward

    top = Path(modelward.__file__).parent
    return [str(top.parent), *(str(p.resolve()) for p in top.iterdir() if p.is_symlink())]


def python_read_paths() -> tuple[str, ...]:
    """The system paths plus what this Python needs: prefixes, stdlib, site-packages, and
    the code this agent runs from (the ``modelward`` package's root). ``PYTHONPATH`` is not
    among them: the child runs ``python -I``, which ignores it."""
    paths = [p for p in SYSTEM_READ if Path(p).exists()]
    py = [sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix,
          os.path.dirname(os.path.realpath(sys.executable)),
          *_package_roots()]
    py += [v for k, v in sysconfig.get_paths().items() if k in
           ("stdlib", "platstdlib", "purelib", "platlib")]
    for p in py:
        real = os.path.realpath(p)
        if Path(real).exists() and real not in paths:
            paths.append(real)
    return tuple(paths)


def scrubbed_env(environ: Mapping[str, str]) -> dict[str, str]:
    """The child's environment: a fixed allow-list, no TCTI, passphrase or token."""
    env = {k: environ[k] for k in ENV_KEEP if k in environ}
    env.update(ENV_SET)
    return env


def auto_max_memory(meminfo: str, cgroup_max: str | None, cgroup_current: str | None,
                    cap: int, reserve: int = 0) -> int:
    """Default address-space limit: half of what is free now (less ``reserve`` bytes about
    to be taken, e.g. the sealed copies still to be made), and at most ``cap``.

    Args:
        meminfo: ``/proc/meminfo``.
        cgroup_max, cgroup_current: the agent cgroup's ``memory.max`` / ``memory.current``
            (cgroup v2; None if unknown). The unit's ``MemoryMax`` leaves less than the
            device has.
        cap: the largest default, bytes.
        reserve: bytes to count as taken already.
    """
    free = cap * 2
    for line in meminfo.splitlines():
        if line.startswith("MemAvailable:"):
            free = int(line.split()[1]) * 1024
    if cgroup_max and cgroup_current and cgroup_max.strip().isdigit() and \
            cgroup_current.strip().isdigit():
        free = min(free, max(0, int(cgroup_max) - int(cgroup_current)))
    return min(cap, max(0, free - reserve) // 2)


def policy_problem(policy: SandboxPolicy) -> str:
    """Why ``policy`` would not hide what it must hide ("" if it does).

    A readable path that contains a ``must_deny`` path (say a site-packages that holds
    the state directory) would expose the trust record and the credentials.
    """
    for d in policy.must_deny:
        for r in policy.read_exec + policy.read_only + policy.read_write:
            if d == r or d.startswith(r.rstrip("/") + "/"):
                return f"readable path {r} contains {d}, which must stay hidden"
    return ""


def _spec(policy: SandboxPolicy) -> str:
    return json.dumps({
        "parent": os.getpid(), "nice": policy.nice, "isolate": policy.isolate,
        "rlimits": {"AS": policy.max_memory, "CPU": policy.max_cpu_seconds,
                    "FSIZE": policy.max_file_size, "CORE": 0,
                    "NOFILE": policy.max_open_files},
        "read_exec": list(policy.read_exec), "read_only": list(policy.read_only),
        "read_write": list(policy.read_write), "must_deny": list(policy.must_deny),
        "max_tasks": policy.max_tasks, "task_uid": policy.task_uid,
    })


def spawn(argv: Sequence[str], policy: SandboxPolicy,
          pass_fds: Sequence[int] = ()) -> subprocess.Popen[bytes]:
    """Start ``argv`` in the sandbox; returns once the sandbox is up and ``argv`` runs.

    ``argv[0]`` is a path (no ``PATH`` search). Its stdin is ``/dev/null``, stdout and
    stderr are pipes, every other descriptor of the agent is closed but ``pass_fds``
    (sealed, read-only copies of its inputs: ``updater.install._sealed``), which keep their numbers.

    Raises:
        SandboxError: an isolation could not be set up (``missing`` names it), or the
            policy would expose a path it must hide.
    """
    problem = policy_problem(policy)
    if problem:
        raise SandboxError(f"sandbox policy refused: {problem}", missing="policy")
    status_r, status_w = os.pipe()
    try:
        proc = subprocess.Popen(
            [sys.executable, "-I", "-S", "-B", str(LAUNCHER), _spec(policy), str(status_w),
             "--", *argv],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            close_fds=True, pass_fds=(status_w, *pass_fds), env=dict(policy.env), cwd="/",
            start_new_session=True,
        )
    except OSError as e:
        os.close(status_r)
        raise SandboxError(f"cannot start the sandbox launcher: {e}", missing="launcher") from e
    finally:
        os.close(status_w)
    try:
        report = _read_status(status_r, proc)
    except BaseException:
        kill_group(proc)
        proc.communicate()
        raise
    finally:
        os.close(status_r)
    if report is not None:
        kill_group(proc)
        proc.communicate()
        what, detail = report
        raise SandboxError(f"health-check sandbox incomplete: {what}: {detail}", missing=what,
                           hint="run on a kernel with Landlock and seccomp, allow the calls "
                                "in the unit, or set [health] unsafe_no_sandbox = true "
                                "(not recommended)")
    return proc


def _read_status(fd: int, proc: subprocess.Popen[bytes]) -> tuple[str, str] | None:
    """None when the launcher reached ``execve`` (EOF, nothing written), else what failed."""
    data = b""
    deadline = time.monotonic() + 30.0
    with selectors.DefaultSelector() as sel:
        sel.register(fd, selectors.EVENT_READ)
        while time.monotonic() < deadline:
            if not sel.select(timeout=1.0):
                continue
            chunk = os.read(fd, 4096)
            if not chunk:
                break
            data += chunk
            if len(data) > 8192:
                break
        else:
            return "launcher", "no word from the sandbox launcher in 30 s"
    if not data:
        return None
    try:
        msg = json.loads(data.decode())
        return str(msg["missing"])[:100], str(msg["detail"])[:500]
    except (ValueError, KeyError, TypeError):
        return "launcher", f"unreadable report from the launcher (exit {proc.poll()})"


def run(argv: Sequence[str], policy: SandboxPolicy, *, timeout: float,
        heartbeat: Callable[[], None] = lambda: None, max_stdout: int = 64 * 1024,
        max_stderr: int = 64 * 1024, pass_fds: Sequence[int] = ()) -> Completed:
    """Run ``argv`` in the sandbox to its end, with bounded time and output.

    Args:
        argv: the program and its arguments.
        policy: see :class:`SandboxPolicy`.
        timeout: wall-clock seconds before it is killed.
        heartbeat: called about once a second while it runs (watchdog).
        max_stdout, max_stderr: bytes kept; writing more kills it (``overflow``).
        pass_fds: descriptors it inherits (see :func:`spawn`).

    Raises:
        SandboxError: see :func:`spawn`.
    """
    return supervise(spawn(argv, policy, pass_fds), timeout=timeout, heartbeat=heartbeat,
                     max_stdout=max_stdout, max_stderr=max_stderr)


def supervise(proc: subprocess.Popen[bytes], *, timeout: float,
              heartbeat: Callable[[], None] = lambda: None, max_stdout: int = 64 * 1024,
              max_stderr: int = 64 * 1024) -> Completed:
    """:func:`run` of a program :func:`spawn` started: to its end, bounded in time (from
    now) and output; it is killed and reaped whatever happens, and its pipes closed."""
    try:
        return _supervise(proc, timeout, heartbeat, max_stdout, max_stderr)
    except BaseException:  # the agent's own failure (watchdog, Ctrl-C): the child goes too
        kill_group(proc)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5.0)
        raise
    finally:
        for pipe in (proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()


def kill_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL the child's process group (its own session, see :func:`spawn`) while the
    child is not reaped yet (after that its pid, and so the group id, may be reused)."""
    if proc.returncode is None and proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except OSError:
            proc.kill()


def _supervise(proc: subprocess.Popen[bytes], timeout: float, heartbeat: Callable[[], None],
               max_stdout: int, max_stderr: int) -> Completed:
    assert proc.stdout is not None and proc.stderr is not None
    limits = {proc.stdout.fileno(): max_stdout, proc.stderr.fileno(): max_stderr}
    names = {proc.stdout.fileno(): "stdout", proc.stderr.fileno(): "stderr"}
    out: dict[int, bytearray] = {fd: bytearray() for fd in limits}
    deadline = time.monotonic() + timeout
    timed_out, overflow = False, ""
    with selectors.DefaultSelector() as sel:
        for fd in limits:
            sel.register(fd, selectors.EVENT_READ)
        while sel.get_map():
            heartbeat()
            left = deadline - time.monotonic()
            if left <= 0:
                timed_out = True
                break
            for key, _ in sel.select(timeout=min(1.0, left)):
                fd = int(key.fd)
                chunk = os.read(fd, 65536)
                if not chunk:
                    sel.unregister(fd)
                    continue
                out[fd] += chunk
                if len(out[fd]) > limits[fd]:
                    overflow = f"wrote more than {limits[fd]} bytes to {names[fd]}"
                    del out[fd][limits[fd]:]
                    break
            if overflow:
                break
    if timed_out or overflow:
        kill_group(proc)
    returncode = _reap(proc, heartbeat)
    stdout, stderr = bytes(out[proc.stdout.fileno()]), bytes(out[proc.stderr.fileno()])
    return Completed(returncode, stdout, stderr, timed_out, overflow)


def _reap(proc: subprocess.Popen[bytes], heartbeat: Callable[[], None]) -> int:
    while True:
        heartbeat()
        try:
            return proc.wait(timeout=1.0)
        except subprocess.TimeoutExpired:
            kill_group(proc)


def tpm_devices(dev: Iterable[str] = ("/dev",)) -> tuple[str, ...]:
    """The TPM device nodes present (``/dev/tpm0``, ``/dev/tpmrm0``, ...)."""
    found: list[str] = []
    for d in dev:
        try:
            found += sorted(os.path.join(d, n) for n in os.listdir(d) if n.startswith("tpm"))
        except OSError:
            continue
    return tuple(found)
