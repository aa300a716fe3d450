"""Health check: onnxruntime in a sandboxed child process (updater/install/_sandbox.py).

The child runs a signed but possibly malicious model. It gets sealed in-memory copies of
the staged files it needs (``updater.install._sealed``: the very bytes whose fingerprint was
checked; it never opens a path of the stage, which it cannot even see), a read-only view of
the system's libraries, bounded memory, CPU time and output, no network, no TPM, no
credentials and nothing it can write; its one-line report is untrusted input, parsed
strictly.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import mmap
import os
import signal
import stat
import subprocess
import sys
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path

from modelward.trust._bounded import loads_bounded
from modelward.updater._config import HealthConfig
from modelward.updater.bundle._bundle import MANIFEST, parse_manifest
from modelward.updater.errors import (
    BundleFormatError,
    HealthCheckError,
    SandboxError,
    StagingError,
)
from modelward.updater.install._sandbox import (
    Completed,
    SandboxPolicy,
    auto_max_memory,
    kill_group,
    python_read_paths,
    run,
    scrubbed_env,
    spawn,
    supervise,
    tpm_devices,
)
from modelward.updater.install._sealed import SealedFiles, is_sealed, new_memfd, seal_slot

logger = logging.getLogger(__name__)

MAX_REPORT = 4096        # bytes of stdout the child may write (one JSON line)
MAX_STDERR = 64 * 1024   # bytes of its diagnostics kept
MAX_DETAIL = 500         # characters of its detail shown in messages


def health_policy(slot: Path, cfg: HealthConfig, environ: Mapping[str, str],
                  max_memory: int) -> SandboxPolicy:
    """The sandbox of a health check of ``slot`` (pure, given the environment)."""
    slot = Path(os.path.realpath(slot))
    hidden = [str(p) for p in slot.parents if p != Path("/")]  # state dir, staging, ...
    return SandboxPolicy(
        read_exec=python_read_paths(),
        read_only=(str(slot),),
        must_deny=(*hidden, *tpm_devices()),
        max_memory=max_memory,
        max_cpu_seconds=math.ceil(cfg.max_cpu_seconds or cfg.timeout),
        nice=cfg.nice,
        env=scrubbed_env(environ),
        isolate=not cfg.unsafe_no_sandbox,
    )


def child_policy(slot: Path, cfg: HealthConfig, environ: Mapping[str, str],
                 max_memory: int) -> SandboxPolicy:
    """The sandbox the health child runs in: :func:`health_policy`, with the stage itself
    hidden too (the child loads only the sealed copies it is handed)."""
    policy = health_policy(slot, cfg, environ, max_memory)
    return replace(policy, read_only=(), must_deny=(*policy.read_only, *policy.must_deny))


def memory_limit(cfg: HealthConfig, reserve: int = 0) -> int:
    """``cfg.max_memory``, or the default from what the device has free now, less
    ``reserve`` bytes about to be taken (the sealed copies a child started ahead waits for)."""
    if cfg.max_memory is not None:
        return cfg.max_memory
    return auto_max_memory(_read("/proc/meminfo") or "", *_cgroup_memory(),
                           cap=HealthConfig.DEFAULT_MEMORY_CAP, reserve=reserve)


def _sizes(slot: Path, names: tuple[str, ...]) -> int:
    """The bytes of ``names`` in ``slot`` (an estimate: the memfds they are copied into;
    nothing is followed, a missing or odd file counts 0)."""
    total = 0
    try:
        d = os.open(slot, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return 0
    try:
        for name in names:
            try:
                st = os.stat(name, dir_fd=d, follow_symlinks=False)
            except (OSError, ValueError):
                continue
            if stat.S_ISREG(st.st_mode):  # (a memfd takes whole pages)
                total += -(-st.st_size // mmap.PAGESIZE) * mmap.PAGESIZE
    finally:
        os.close(d)
    return total


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read(1 << 16)
    except OSError:
        return None


def _cgroup_memory() -> tuple[str | None, str | None]:
    rel = next((line[3:] for line in (_read("/proc/self/cgroup") or "").splitlines()
                if line.startswith("0::")), None)
    if rel is None:
        return None, None
    base = "/sys/fs/cgroup" + rel.strip()
    return _read(base + "/memory.max"), _read(base + "/memory.current")


def parse_report(done: Completed) -> tuple[bool, str]:
    """Judge the child's untrusted output: ``(ok, detail)``.

    Passes only if it exited 0 and wrote exactly one line ``{"ok": true, "detail": str}``.
    """
    if done.timed_out:
        return False, "timeout"
    if done.overflow:
        return False, f"the health check process {done.overflow}"
    ok, detail = False, ""
    try:
        text = done.stdout.decode("utf-8")
        if not text.endswith("\n") or text.count("\n") != 1:
            raise ValueError("not one line")
        report = loads_bounded(text, max_bytes=64 * 1024, max_depth=2,
                               what="the health check's report")
        if not isinstance(report, dict) or set(report) != {"ok", "detail"} or \
                not isinstance(report["ok"], bool) or not isinstance(report["detail"], str):
            raise ValueError("not a report")
        ok, detail = report["ok"], _printable(report["detail"])
    except ValueError:
        ok, detail = False, ""
    if done.returncode != 0 or not detail:
        ok = False
        detail = detail or f"health check process {_ended(done.returncode)}: {_tail(done)}"
    return ok, detail


def _ended(returncode: int) -> str:
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exited {returncode}"


def _tail(done: Completed) -> str:
    lines = done.stderr.decode(errors="replace").strip().splitlines()
    return _printable(lines[-1]) if lines else "no output"


def _printable(text: str) -> str:
    clean = "".join(c if c.isprintable() else "?" for c in text)
    return clean[:MAX_DETAIL] + ("..." if len(clean) > MAX_DETAIL else "")


def health_inputs(manifest_model_path: str, manifest_vectors: str,
                  *signed: str) -> tuple[str, ...]:
    """The files of a bundle the health child reads (handed over sealed), and ``signed``:
    files the agent itself checks from the same sealed copies (the model signature)."""
    return tuple(dict.fromkeys((MANIFEST, manifest_model_path, manifest_vectors,
                                *filter(None, signed))))


# what the child imports to run the model: the device extra's (modelward[device])
HEALTH_PACKAGES = ("onnxruntime", "numpy")


def missing_health_package(names: tuple[str, ...] = HEALTH_PACKAGES) -> str | None:
    """The first of ``names`` this Python cannot import (found, not imported), or None."""
    for name in names:
        try:
            if importlib.util.find_spec(name) is None:
                return name
        except (ImportError, ValueError):
            return name
    return None


def go_message(max_memory: int) -> bytes:
    """What the agent writes on the go pipe: ``1`` and the address-space limit the child
    sets before reading anything (8 bytes, little-endian; 0: keep its own)."""
    return b"1" + max_memory.to_bytes(8, "little")


def _child_argv(fds: Mapping[str, int], *go: int) -> list[str]:
    return [sys.executable, "-I", "-m", "modelward.updater.install._healthchild",
            json.dumps(dict(fds)), *map(str, go)]


class PendingCheck:
    """A health child started before its inputs are sealed, so that its sandbox, Python
    and ``import onnxruntime`` (0.4 s on the benchmark machine) overlap the seal.

    The child holds empty memfds (:attr:`fds`, which :func:`updater.install._sealed.seal_verified`
    fills and seals via ``into``) and reads nothing until :meth:`go`: ``1`` and the memory
    limit of now (:func:`go_message`) on a pipe that only this agent can write, sent only
    when every memfd carries all the seals; the
    child checks the seals again itself (``F_GET_SEALS``) before it reads a byte. Until
    then it runs only the agent's own code (imports), not the model: no model byte exists
    in its memfds yet. :meth:`close` kills and reaps it if it was not handed over.
    """

    def __init__(self, slot: Path, cfg: HealthConfig, names: tuple[str, ...]) -> None:
        self.cfg = cfg
        # (what will be free once its copies are made; :meth:`go` lowers it to what is free
        # then: the limit it runs the model under)
        self.policy = child_policy(slot, cfg, os.environ,
                                   memory_limit(cfg, _sizes(slot, names)))
        self.fds: dict[str, int] = {}
        self._go = -1
        self._proc: subprocess.Popen[bytes] | None = None
        go_r = -1
        try:
            for name in names:
                self.fds[name] = new_memfd(name)
            go_r, self._go = os.pipe2(os.O_CLOEXEC)
            self._proc = spawn(_child_argv(self.fds, go_r), self.policy,
                               pass_fds=(*self.fds.values(), go_r))
        except BaseException:
            self.close()
            raise
        finally:
            if go_r >= 0:
                os.close(go_r)

    def go(self, sealed: SealedFiles, heartbeat: Callable[[], None], max_stdout: int,
           max_stderr: int) -> Completed | None:
        """Let the child check ``sealed``, and wait for it (``cfg.timeout`` from now).

        Returns:
            How it ended; None (and the child is gone) if ``sealed`` is not exactly this
            check's memfds, all sealed: the caller runs a fresh check.
        """
        proc, self._proc = self._proc, None
        if proc is None or set(sealed.fds) != set(self.fds) or not all(
                is_sealed(self.fds[n]) and _same_file(self.fds[n], fd)
                for n, fd in sealed.fds.items()) or (limit := self._bound(proc)) is None:
            self._proc = proc
            self.close()
            return None
        try:
            os.write(self._go, go_message(limit))
        except OSError:  # (it died before reading go: it ran nothing, no verdict)
            self._proc = proc
            self.close()
            return None
        finally:
            if self._go >= 0:
                os.close(self._go)
                self._go = -1
        return supervise(proc, timeout=self.cfg.timeout, heartbeat=heartbeat,
                         max_stdout=max_stdout, max_stderr=max_stderr)

    def _bound(self, proc: subprocess.Popen[bytes]) -> int | None:
        """The address-space limit ``proc``, waiting for go, runs the check under: the one
        of now (:func:`memory_limit`, its copies made), kept in :attr:`policy`; 0: the one
        it has. The child sets it (soft and hard: it cannot raise it back) before it reads
        a byte. None (a fresh child runs the check) if it ended or was stopped before go
        (by a signal from outside: it never stops itself), or if much more is free now
        than when it started."""
        if proc.poll() is not None or _state(proc.pid) not in ("R", "S", "D"):
            return None
        now, early = memory_limit(self.cfg), self.policy.max_memory
        if now > early + early // 8:
            return None  # (started short of memory: a fresh child gets what is free now)
        if now >= early:
            return 0
        self.policy = replace(self.policy, max_memory=now)
        return now

    def close(self) -> None:
        """Kill the child if it was not handed over; close the memfds and the pipe
        (idempotent)."""
        if self._go >= 0:
            os.close(self._go)  # (end of file: the child ends without reading anything)
            self._go = -1
        proc, self._proc = self._proc, None
        if proc is not None:
            kill_group(proc)
            proc.communicate()
        while self.fds:
            os.close(self.fds.popitem()[1])


def _state(pid: int) -> str:
    """The state letter of ``pid`` in ``/proc/<pid>/stat`` ("" if unknown)."""
    text = _read(f"/proc/{pid}/stat") or ""
    fields = text.rsplit(")", 1)[-1].split()
    return fields[0] if fields and ")" in text else ""


def _same_file(a: int, b: int) -> bool:
    try:
        sa, sb = os.fstat(a), os.fstat(b)
    except OSError:
        return False
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


def start_check(slot: Path, cfg: HealthConfig, names: tuple[str, ...]) -> PendingCheck | None:
    """A :class:`PendingCheck` of ``slot``'s ``names``, or None where it cannot start (a
    package missing, no sandbox, no memory): :func:`run_health_check` then starts the child
    itself as before and reports why, so nothing is lost by trying."""
    if missing_health_package() is not None:
        return None
    try:
        return PendingCheck(slot, cfg, names)
    except (SandboxError, StagingError, OSError) as e:
        logger.debug("health check not started ahead: %s", e)
        return None


def run_health_check(
    slot: Path, model: str, version: str, cfg: HealthConfig,
    heartbeat: Callable[[], None] = lambda: None, *, sealed: SealedFiles | None = None,
    pending: PendingCheck | None = None,
) -> str:
    """Check that the model in ``slot`` loads and reproduces its test vectors.

    Args:
        slot: the extracted bundle; hidden from the child, which loads from ``sealed``.
        model, version: for messages.
        cfg: bounds.
        heartbeat: called about once a second while the child runs (watchdog).
        sealed: sealed copies of the health inputs whose fingerprint the caller verified
            (``updater.install._sealed.seal_verified``); None: copied from ``slot`` here, unverified
            (benchmarks and tests).
        pending: the child started ahead for ``sealed`` (:func:`start_check`); it runs
            the check if ``sealed`` are its memfds, sealed; else it is killed and a child
            is started here as without it. Closed either way.

    Returns:
        The child's one-line report.

    Raises:
        HealthCheckError: the model failed, the child crashed, ran out of memory or time.
        SandboxError: the sandbox could not be set up, or a package the check needs is not
            installed (``missing`` names it); the model was not run, so it is no rejection.
    """
    try:
        return _run_health_check(slot, model, version, cfg, heartbeat, sealed, pending)
    finally:
        if pending is not None:
            pending.close()


def _run_health_check(
    slot: Path, model: str, version: str, cfg: HealthConfig, heartbeat: Callable[[], None],
    sealed: SealedFiles | None, pending: PendingCheck | None,
) -> str:
    absent = missing_health_package()
    if absent is not None:  # the device's fault, never the release's: not remembered
        raise SandboxError(
            f"health check of {model} {version} cannot run: the Python package {absent} is "
            "not installed on this device", missing=absent,
            hint="pip install 'modelward[device]' (the health check runs the model with "
                 "onnxruntime)")
    if cfg.unsafe_no_sandbox:
        logger.warning(
            "health check of %s %s runs WITHOUT its sandbox ([health] unsafe_no_sandbox): "
            "the model's code can reach the network, the TPM and the agent's files",
            model, version, extra={"model": model, "version": version})
    own = sealed is None
    if sealed is None:
        try:
            m = parse_manifest((slot / MANIFEST).read_bytes(), str(slot))
            names = health_inputs(m.model_path, m.vectors)
        except (OSError, BundleFormatError):
            names = (MANIFEST,)  # (the child reports what is missing)
        sealed = seal_slot(slot, names)
    try:
        done = None
        if pending is not None and not own:
            done = pending.go(sealed, heartbeat, MAX_REPORT, MAX_STDERR)
            policy = pending.policy  # (the limits it ran under, set at go)
        if done is None:
            # (the limits of now: its copies are made, in memory)
            policy = child_policy(slot, cfg, os.environ, memory_limit(cfg))
            fds = dict(sealed.fds)
            done = run(_child_argv(fds), policy, timeout=cfg.timeout, heartbeat=heartbeat,
                       max_stdout=MAX_REPORT, max_stderr=MAX_STDERR,
                       pass_fds=tuple(fds.values()))
    finally:
        if own:
            sealed.close()
    ok, detail = parse_report(done)
    if not ok:
        what = (f"took longer than {cfg.timeout:.0f}s" if done.timed_out
                else f"failed: {detail}")
        raise HealthCheckError(
            f"health check of {model} {version} {what} (limits: {policy.max_memory} bytes "
            f"of memory, {policy.max_cpu_seconds} s of CPU)",
            model=model,
            version=version,
            detail=detail,
        )
    return detail
