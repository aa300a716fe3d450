"""The sandbox launcher: ``python -I -S -B _sandbox_launch.py SPEC_JSON -- ARGV...``.

Applies the sandbox to itself, checks that it holds, then ``execve``s ARGV, which inherits
all of it. Standard library only, run isolated (``-I -S``): nothing from the environment, the
working directory or site-packages is imported before the sandbox is up.

What it sets up (all of it, or the program never runs):

* ``PR_SET_NO_NEW_PRIVS``, ``PR_SET_PDEATHSIG`` (dies with the agent), ``oom_score_adj`` 1000
  (the kernel kills it before the inference app), niceness;
* resource limits: address space, CPU seconds, file size (0: also no memfd or shm growth),
  core size, open files; then every capability dropped (root in CI cannot raise them back;
  see below for the one a root agent's child keeps);
* a bound on its tasks (threads): ``RLIMIT_NPROC``, set to what its real uid runs now plus
  ``max_tasks``. The kernel never applies it to real uid 0, so a root agent's child moves
  to ``task_uid`` (a uid of its own, not nobody's) for good, keeping only
  ``CAP_DAC_READ_SEARCH`` to read the paths Landlock allows (as root without capabilities
  could); an unprivileged agent's child keeps the agent's uid, and threads the agent
  starts meanwhile come out of its budget (a health check then fails: closed). A pids
  cgroup would need systemd delegation;
* Landlock: the file system is read-only, and only the listed paths are visible at all (no
  state dir, no trust record, no credentials, no ``/dev/tpm*``); TCP bind/connect denied
  (ABI >= 4); abstract UNIX sockets and signals to processes outside the sandbox denied
  (ABI >= 6);
* seccomp: no ``socket(2)`` of any family and no ``socketpair(2)`` (nor ``connect``,
  ``bind``, ``sendmsg``, or ``sendto`` with an address: Landlock does not cover UNIX socket
  paths, nor abstract sockets before ABI 6), no ``io_uring``, no new processes (threads
  only), no ``ptrace``/``process_vm_*``/pidfd, no signals to other processes (also not
  through the kernel: no ``F_SETOWN``/``F_SETOWN_EX``/``F_SETSIG``/``O_ASYNC``, ``FIOSETOWN``,
  ``SIOCSPGRP``, ``FIOASYNC``; Landlock's signal scope needs ABI 6), no ``O_TRUNC``,
  ``O_CREAT`` or ``O_TMPFILE`` in ``open``/``openat`` (Landlock's truncate right needs ABI 3;
  ``openat2`` is ENOSYS), no System V IPC or POSIX message queues (memory outside
  ``RLIMIT_AS`` that outlives the child), no clearing of the parent-death signal, no uid or
  gid changes, no keyrings, ``bpf``, ``perf_event_open``, ``userfaultfd``, namespaces,
  mounts, modules, reboot.

Then it proves the result: each ``must_deny`` path must fail to open, ``socket(2)`` of
``AF_INET``, ``AF_INET6``, ``AF_UNIX`` and ``AF_NETLINK`` must fail, and so must
``socketpair``, ``F_SETOWN``, clearing ``PDEATHSIG``, ``shmget`` and ``O_TRUNC``. On any
failure it writes one JSON line ``{"missing": WHAT, "detail": TEXT}`` to the status fd and
exits 121. On success the status fd closes at ``execve`` (it is close-on-exec) with nothing
written.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import platform
import resource
import socket
import stat
import struct
import sys
from typing import Any

EXIT_SANDBOX = 121

PR_SET_PDEATHSIG = 1
PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38
_LINUX_CAPABILITY_VERSION_3 = 0x20080522
SECCOMP_SET_MODE_FILTER = 1

# Landlock (include/uapi/linux/landlock.h)
LANDLOCK_CREATE_RULESET_VERSION = 1
LANDLOCK_RULE_PATH_BENEATH = 1
FS_EXECUTE, FS_WRITE_FILE, FS_READ_FILE, FS_READ_DIR = 1 << 0, 1 << 1, 1 << 2, 1 << 3
FS_ALL_V1 = (1 << 13) - 1          # EXECUTE .. MAKE_SYM
FS_REFER, FS_TRUNCATE, FS_IOCTL_DEV = 1 << 13, 1 << 14, 1 << 15
NET_BIND_TCP, NET_CONNECT_TCP = 1, 2
SCOPE_ABSTRACT_UNIX_SOCKET, SCOPE_SIGNAL = 1, 2
FILE_RIGHTS = FS_EXECUTE | FS_WRITE_FILE | FS_READ_FILE | FS_TRUNCATE | FS_IOCTL_DEV

# seccomp BPF
BPF_LD_W_ABS, BPF_JEQ_K, BPF_JGE_K, BPF_JSET_K, BPF_RET_K = 0x20, 0x15, 0x35, 0x45, 0x06
RET_ALLOW, RET_KILL_PROCESS, RET_ERRNO = 0x7FFF0000, 0x80000000, 0x00050000
CLONE_THREAD = 0x00010000

# Per architecture: AUDIT_ARCH, syscall numbers of the landlock calls, and the denied calls.
_COMMON_DENY = (
    "io_uring_setup", "io_uring_enter", "io_uring_register", "clone3", "ptrace",
    "process_vm_readv", "process_vm_writev", "pidfd_open", "pidfd_getfd", "pidfd_send_signal",
    "tkill", "keyctl", "add_key", "request_key", "bpf", "perf_event_open", "userfaultfd",
    "unshare", "setns", "mount", "umount2", "pivot_root", "chroot", "kexec_load",
    "kexec_file_load", "init_module", "finit_module", "delete_module", "reboot", "swapon",
    "swapoff", "acct", "quotactl", "open_by_handle_at", "name_to_handle_at", "move_mount",
    "fsopen", "fsmount", "fspick", "open_tree", "mount_setattr",
    # Landlock does not cover these: truncate(2) before ABI 3, and metadata of any path
    # (mode, owner, times, xattrs: a chmod 000 of the trust record is a denial of service)
    "truncate", "chmod", "fchmod", "fchmodat", "fchmodat2", "chown", "fchown", "lchown",
    "fchownat", "utime", "utimes", "futimesat", "utimensat", "setxattr", "lsetxattr",
    "fsetxattr", "removexattr", "lremovexattr", "fremovexattr", "setxattrat", "removexattrat",
    "inotify_init", "inotify_init1", "inotify_add_watch", "fanotify_init", "fanotify_mark",
    # priority of other processes (PRIO_USER would slow the agent and the app)
    "setpriority", "ioprio_set", "kcmp", "process_madvise", "process_mrelease",
)
# Calls that name a process in args[0]: only 0 (itself) or its own pid. Landlock's ptrace
# rule does not cover these (prlimit64 on the agent could set its RLIMIT_NOFILE to 0).
_SELF_ONLY = ("prlimit64", "sched_setaffinity", "sched_setscheduler", "sched_setparam",
              "sched_setattr", "migrate_pages", "move_pages")
# Same syscall numbers on every architecture (the unified table since Linux 5.x).
_UNIFIED = {"fchmodat2": 452, "setxattrat": 463, "removexattrat": 466,
            "process_madvise": 440, "process_mrelease": 448}
_SYSCALLS: dict[str, tuple[int, dict[str, int]]] = {
    "x86_64": (0xC000003E, {
        "socket": 41, "clone": 56, "fork": 57, "vfork": 58, "kill": 62, "tgkill": 234,
        "rt_sigqueueinfo": 129, "rt_tgsigqueueinfo": 297, "seccomp": 317, "capset": 126,
        "landlock_create_ruleset": 444, "landlock_add_rule": 445, "landlock_restrict_self": 446,
        "io_uring_setup": 425, "io_uring_enter": 426, "io_uring_register": 427, "clone3": 435,
        "ptrace": 101, "process_vm_readv": 310, "process_vm_writev": 311, "pidfd_open": 434,
        "pidfd_getfd": 438, "pidfd_send_signal": 424, "tkill": 200, "keyctl": 250,
        "add_key": 248, "request_key": 249, "bpf": 321, "perf_event_open": 298,
        "userfaultfd": 323, "unshare": 272, "setns": 308, "mount": 165, "umount2": 166,
        "pivot_root": 155, "chroot": 161, "kexec_load": 246, "kexec_file_load": 320,
        "init_module": 175, "finit_module": 313, "delete_module": 176, "reboot": 169,
        "swapon": 167, "swapoff": 168, "acct": 163, "quotactl": 179, "open_by_handle_at": 304,
        "name_to_handle_at": 303, "move_mount": 429, "fsopen": 430, "fsmount": 432,
        "fspick": 433, "open_tree": 428, "mount_setattr": 442, "ioperm": 173, "iopl": 172,
        "truncate": 76, "chmod": 90, "fchmod": 91, "fchmodat": 268, "chown": 92,
        "fchown": 93, "lchown": 94, "fchownat": 260, "utime": 132, "utimes": 235,
        "futimesat": 261, "utimensat": 280, "setxattr": 188, "lsetxattr": 189,
        "fsetxattr": 190, "removexattr": 197, "lremovexattr": 198, "fremovexattr": 199,
        "inotify_init": 253, "inotify_init1": 294, "inotify_add_watch": 254,
        "fanotify_init": 300, "fanotify_mark": 301, "setpriority": 141, "ioprio_set": 251,
        "kcmp": 312, "prlimit64": 302, "sched_setaffinity": 203, "sched_setscheduler": 144,
        "sched_setparam": 142, "sched_setattr": 314, "migrate_pages": 256, "move_pages": 279,
        "socketpair": 53, "connect": 42, "accept": 43, "sendto": 44, "sendmsg": 46, "bind": 49,
        "listen": 50, "accept4": 288, "sendmmsg": 307, "fcntl": 72, "ioctl": 16, "prctl": 157,
        "open": 2, "openat": 257, "creat": 85, "openat2": 437,
        "shmget": 29, "shmat": 30, "shmctl": 31, "shmdt": 67, "semget": 64, "semop": 65,
        "semctl": 66, "semtimedop": 220, "msgget": 68, "msgsnd": 69, "msgrcv": 70,
        "msgctl": 71, "mq_open": 240, "mq_unlink": 241, "mq_timedsend": 242,
        "mq_timedreceive": 243, "mq_notify": 244, "mq_getsetattr": 245,
        "setuid": 105, "setgid": 106, "setreuid": 113, "setregid": 114, "setgroups": 116,
        "setresuid": 117, "setresgid": 119, "setfsuid": 122, "setfsgid": 123,
        **_UNIFIED,
    }),
    "aarch64": (0xC00000B7, {
        "socket": 198, "clone": 220, "kill": 129, "tgkill": 131, "rt_sigqueueinfo": 138,
        "rt_tgsigqueueinfo": 240, "seccomp": 277, "capset": 91,
        "landlock_create_ruleset": 444, "landlock_add_rule": 445, "landlock_restrict_self": 446,
        "io_uring_setup": 425, "io_uring_enter": 426, "io_uring_register": 427, "clone3": 435,
        "ptrace": 117, "process_vm_readv": 270, "process_vm_writev": 271, "pidfd_open": 434,
        "pidfd_getfd": 438, "pidfd_send_signal": 424, "tkill": 130, "keyctl": 219,
        "add_key": 217, "request_key": 218, "bpf": 280, "perf_event_open": 241,
        "userfaultfd": 282, "unshare": 97, "setns": 268, "mount": 40, "umount2": 39,
        "pivot_root": 41, "chroot": 51, "kexec_load": 104, "kexec_file_load": 294,
        "init_module": 105, "finit_module": 273, "delete_module": 106, "reboot": 142,
        "swapon": 224, "swapoff": 225, "acct": 89, "quotactl": 60, "open_by_handle_at": 265,
        "name_to_handle_at": 264, "move_mount": 429, "fsopen": 430, "fsmount": 432,
        "fspick": 433, "open_tree": 428, "mount_setattr": 442,
        "truncate": 45, "fchmod": 52, "fchmodat": 53, "fchown": 55, "fchownat": 54,
        "utimensat": 88, "setxattr": 5, "lsetxattr": 6, "fsetxattr": 7, "removexattr": 14,
        "lremovexattr": 15, "fremovexattr": 16, "inotify_init1": 26, "inotify_add_watch": 27,
        "fanotify_init": 262, "fanotify_mark": 263, "setpriority": 140, "ioprio_set": 30,
        "kcmp": 272, "prlimit64": 261, "sched_setaffinity": 122, "sched_setscheduler": 119,
        "sched_setparam": 118, "sched_setattr": 274, "migrate_pages": 238, "move_pages": 239,
        "socketpair": 199, "bind": 200, "listen": 201, "accept": 202, "connect": 203,
        "sendto": 206, "sendmsg": 211, "accept4": 242, "sendmmsg": 269, "fcntl": 25,
        "ioctl": 29, "prctl": 167, "openat": 56, "openat2": 437,
        "mq_open": 180, "mq_unlink": 181, "mq_timedsend": 182, "mq_timedreceive": 183,
        "mq_notify": 184, "mq_getsetattr": 185, "msgget": 186, "msgctl": 187, "msgrcv": 188,
        "msgsnd": 189, "semget": 190, "semctl": 191, "semtimedop": 192, "semop": 193,
        "shmget": 194, "shmctl": 195, "shmat": 196, "shmdt": 197,
        "setregid": 143, "setgid": 144, "setreuid": 145, "setuid": 146, "setresuid": 147,
        "setresgid": 149, "setfsuid": 151, "setfsgid": 152, "setgroups": 159,
        **_UNIFIED,
    }),
}

_RLIMITS = {"AS": resource.RLIMIT_AS, "CPU": resource.RLIMIT_CPU,
            "FSIZE": resource.RLIMIT_FSIZE, "CORE": resource.RLIMIT_CORE,
            "NOFILE": resource.RLIMIT_NOFILE}


class Missing(Exception):
    """An isolation that could not be set up: ``what`` names it."""

    def __init__(self, what: str, detail: str) -> None:
        super().__init__(f"{what}: {detail}")
        self.what, self.detail = what, detail


_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_libc.prctl.restype = ctypes.c_int


def _err(what: str, call: str) -> Missing:
    e = ctypes.get_errno()
    return Missing(what, f"{call} failed: {os.strerror(e)} (errno {e})")


def _arch() -> tuple[int, dict[str, int]]:
    machine = platform.machine()
    if machine not in _SYSCALLS:
        raise Missing("seccomp", f"no syscall table for architecture {machine}")
    return _SYSCALLS[machine]


def _prctl(what: str, option: int, arg: int) -> None:
    if _libc.prctl(option, ctypes.c_ulong(arg), 0, 0, 0) != 0:
        raise _err(what, f"prctl({option})")


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32)]


def _cap_eff() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("CapEff:"):
                return int(line.split()[1], 16)
    raise Missing("capabilities", "no CapEff in /proc/self/status")


def _drop_bounding_set() -> None:
    for cap in range(64):
        if _libc.prctl(PR_CAPBSET_DROP, ctypes.c_ulong(cap), 0, 0, 0) != 0 and \
                ctypes.get_errno() != errno.EINVAL:  # EINVAL: past the kernel's last cap
            raise _err("capabilities", f"prctl(PR_CAPBSET_DROP, {cap})")


def _drop_capabilities() -> None:
    """Root (CI) drops every capability, so it cannot raise its limits again or bypass
    anything; the unprivileged agent has none to drop."""
    if _cap_eff() == 0:
        return
    _drop_bounding_set()
    hdr, data = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0), (_CapData * 2)()
    if _libc.syscall(_arch()[1]["capset"], ctypes.byref(hdr), ctypes.byref(data)) != 0:
        raise _err("capabilities", "capset(0)")
    if _cap_eff() != 0:
        raise Missing("capabilities", "capabilities are still effective after capset")


PR_SET_KEEPCAPS, PR_CAP_AMBIENT, PR_CAP_AMBIENT_RAISE = 8, 47, 2
CAP_DAC_READ_SEARCH = 2


def _capset(caps: int) -> None:
    hdr, data = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0), (_CapData * 2)()
    data[0].effective = data[0].permitted = data[0].inheritable = caps
    if _libc.syscall(_arch()[1]["capset"], ctypes.byref(hdr), ctypes.byref(data)) != 0:
        raise _err("capabilities", f"capset({caps:#x})")


def task_limit(statuses: list[str], uid: int, max_tasks: int) -> int:
    """``RLIMIT_NPROC`` that leaves this process ``max_tasks`` tasks (itself included).

    The kernel counts every task whose real uid is ``uid`` against it, so the limit is what
    the others have now plus ``max_tasks``. Args: ``statuses``, the ``/proc/PID/status`` of
    the processes (this one included: the caller is single-threaded).
    """
    tasks = 0
    for text in statuses:
        fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
        try:
            if int(fields["Uid"].split()[0]) == uid:
                tasks += int(fields["Threads"])
        except (KeyError, ValueError, IndexError):
            continue
    return max(tasks - 1, 0) + max_tasks


def _statuses() -> list[str]:
    out = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/status") as f:
                    out.append(f.read())
            except OSError:
                continue  # gone, or hidden (ProtectProc=invisible hides other users only)
    return out


def _bound_tasks(max_tasks: int, task_uid: int) -> None:
    """Bound its tasks (threads) with ``RLIMIT_NPROC``; it counts by real uid and never for
    real uid 0, so root moves to ``task_uid`` for good (no uid calls after the seccomp
    filter). Root keeps only ``CAP_DAC_READ_SEARCH`` (ambient, it survives ``execve``): it reads
    the paths Landlock lets it read, as root without capabilities did; every other capability
    and the whole bounding set are gone. An unprivileged agent keeps its uid."""
    if os.getuid() == 0:
        try:
            _capset((1 << CAP_DAC_READ_SEARCH) | _cap_eff())  # inheritable, while we may
            _drop_bounding_set()
            _prctl("capabilities", PR_SET_KEEPCAPS, 1)
            os.setgroups([])
            os.setresgid(task_uid, task_uid, task_uid)
            os.setresuid(task_uid, task_uid, task_uid)
        except OSError as e:
            raise Missing("RLIMIT_NPROC", f"root cannot move to uid {task_uid} (RLIMIT_NPROC "
                          f"does not count for uid 0): {e}") from e
        _capset(1 << CAP_DAC_READ_SEARCH)
        if _libc.prctl(PR_CAP_AMBIENT, ctypes.c_ulong(PR_CAP_AMBIENT_RAISE),
                       ctypes.c_ulong(CAP_DAC_READ_SEARCH), 0, 0) != 0:
            raise _err("capabilities", "prctl(PR_CAP_AMBIENT_RAISE, CAP_DAC_READ_SEARCH)")
        if _cap_eff() != 1 << CAP_DAC_READ_SEARCH:
            raise Missing("capabilities", "more than CAP_DAC_READ_SEARCH after capset")
    else:
        _drop_capabilities()
    limit = task_limit(_statuses(), os.getuid(), max_tasks)
    try:
        resource.setrlimit(resource.RLIMIT_NPROC, (limit, limit))
    except (OSError, ValueError) as e:
        raise Missing("RLIMIT_NPROC", f"setrlimit({limit}) failed: {e}") from e
    if os.getuid() == 0 or resource.getrlimit(resource.RLIMIT_NPROC)[1] != limit:
        raise Missing("RLIMIT_NPROC", "the task bound does not hold")


def _rlimits(limits: dict[str, int]) -> None:
    for name, value in limits.items():
        if value < 0:  # setrlimit would read -1 as "unlimited"
            raise Missing(f"RLIMIT_{name}", f"refusing the negative limit {value}")
        soft = hard = value
        if name == "CPU":
            hard = value + 5  # SIGXCPU at the soft limit, SIGKILL 5 s later
        try:
            resource.setrlimit(_RLIMITS[name], (soft, hard))
        except (OSError, ValueError, OverflowError, KeyError) as e:
            raise Missing(f"RLIMIT_{name}", f"setrlimit({soft}, {hard}) failed: {e}") from e


class _RulesetAttr(ctypes.Structure):
    _fields_ = [("fs", ctypes.c_uint64), ("net", ctypes.c_uint64), ("scoped", ctypes.c_uint64)]


class _PathBeneath(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


def landlock_abi() -> int:
    """The kernel's Landlock ABI version, or 0 when Landlock is missing or disabled."""
    _, nr = _arch()
    abi = int(_libc.syscall(nr["landlock_create_ruleset"], None, ctypes.c_size_t(0),
                            ctypes.c_uint32(LANDLOCK_CREATE_RULESET_VERSION)))
    return max(abi, 0)


def _landlock(read_exec: list[str], read_only: list[str], read_write: list[str]) -> int:
    _, nr = _arch()
    abi = landlock_abi()
    if abi < 1:
        raise _err("landlock", "landlock_create_ruleset(VERSION)")
    fs = FS_ALL_V1 | (FS_REFER if abi >= 2 else 0) | (FS_TRUNCATE if abi >= 3 else 0) | (
        FS_IOCTL_DEV if abi >= 5 else 0)
    attr = _RulesetAttr(fs, NET_BIND_TCP | NET_CONNECT_TCP if abi >= 4 else 0,
                        SCOPE_ABSTRACT_UNIX_SOCKET | SCOPE_SIGNAL if abi >= 6 else 0)
    size = 8 if abi < 4 else 16 if abi < 6 else 24
    rfd = int(_libc.syscall(nr["landlock_create_ruleset"], ctypes.byref(attr),
                            ctypes.c_size_t(size), ctypes.c_uint32(0)))
    if rfd < 0:
        raise _err("landlock", "landlock_create_ruleset")
    try:
        for paths, rights in ((read_exec, FS_EXECUTE | FS_READ_FILE | FS_READ_DIR),
                              (read_only, FS_READ_FILE | FS_READ_DIR),
                              (read_write, FS_READ_FILE | FS_WRITE_FILE)):
            for path in paths:
                try:
                    fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
                except OSError as e:
                    raise Missing("landlock", f"cannot open {path} for a rule: {e}") from e
                try:
                    allowed = rights & fs
                    if not stat.S_ISDIR(os.fstat(fd).st_mode):
                        allowed &= FILE_RIGHTS
                    rule = _PathBeneath(allowed, fd)
                    if _libc.syscall(nr["landlock_add_rule"], ctypes.c_int(rfd),
                                     ctypes.c_int(LANDLOCK_RULE_PATH_BENEATH),
                                     ctypes.byref(rule), ctypes.c_uint32(0)) != 0:
                        raise _err("landlock", f"landlock_add_rule({path})")
                finally:
                    os.close(fd)
        if _libc.syscall(nr["landlock_restrict_self"], ctypes.c_int(rfd), ctypes.c_uint32(0)):
            raise _err("landlock", "landlock_restrict_self")
    finally:
        os.close(rfd)
    return abi


def _bpf(code: int, k: int, jt: int = 0, jf: int = 0) -> bytes:
    return struct.pack("HBBI", code, jt, jf, k & 0xFFFFFFFF)


class _Asm:
    """A classic BPF program with forward jumps to named labels (None: the next one)."""

    def __init__(self) -> None:
        self.ops: list[tuple[int, int, str | None, str | None]] = []
        self.at: dict[str, int] = {}

    def op(self, code: int, k: int, jt: str | None = None, jf: str | None = None) -> None:
        self.ops.append((code, k, jt, jf))

    def label(self, name: str) -> None:
        self.at[name] = len(self.ops)

    def code(self) -> bytes:
        out = []
        for i, (code, k, jt, jf) in enumerate(self.ops):
            offs = [0 if t is None else self.at[t] - i - 1 for t in (jt, jf)]
            if not all(0 <= o <= 255 for o in offs):
                raise Missing("seccomp", f"filter jump out of range at {i}")
            out.append(_bpf(code, k, offs[0], offs[1]))
        return b"".join(out)


# fcntl commands a health check may use; the others can make the kernel signal another
# process (F_SETOWN, F_SETOWN_EX, F_SETSIG: SIGIO/SIGURG to any pid, Landlock covers this only
# from ABI 6), or watch/lease files (F_NOTIFY, F_SETLEASE). F_SETFL must not set O_ASYNC.
F_SETFL, O_ASYNC = 4, 0o20000
# (F_SETPIPE_SZ is not: 1 MiB of kernel memory per pipe, outside RLIMIT_AS)
FCNTL_ALLOWED = (0, 1, 2, 3, 5, 6, 7, 9, 11, 16, 36, 37, 38, 1025, 1030, 1032, 1033, 1034)
# DUPFD GETFD SETFD GETFL GETLK SETLK(W) GETOWN GETSIG GETOWN_EX OFD_*LK GETLEASE
# DUPFD_CLOEXEC GETPIPE_SZ ADD/GET_SEALS
# ioctl: FIOSETOWN, SIOCSPGRP, FIOASYNC (the same SIGIO route), TIOCSPGRP, TIOCSTI
IOCTL_DENIED = (0x8901, 0x8902, 0x5452, 0x5410, 0x5412)
# open flags that would change a file Landlock lets it read: O_TRUNC needs only READ_FILE
# before ABI 3; O_CREAT and O_TMPFILE make files (Landlock refuses them too)
O_TRUNC, O_CREAT, O_TMPFILE_BIT = 0o1000, 0o100, 0o20000000
OPEN_DENIED_FLAGS = O_TRUNC | O_CREAT | O_TMPFILE_BIT
# No sockets at all: socket(2) and socketpair(2) refused, and whatever would address one
_SOCKET_DENY = ("socketpair", "connect", "bind", "listen", "accept", "accept4", "sendmsg",
                "sendmmsg")
# System V IPC and POSIX message queues: memory outside RLIMIT_AS that outlives the child
_IPC_DENY = ("shmget", "shmat", "shmctl", "shmdt", "semget", "semop", "semctl", "semtimedop",
             "msgget", "msgsnd", "msgrcv", "msgctl", "mq_open", "mq_unlink", "mq_timedsend",
             "mq_timedreceive", "mq_notify", "mq_getsetattr")
# Its identity is fixed: the thread bound (RLIMIT_NPROC) counts the tasks of its real uid
_ID_DENY = ("setuid", "setgid", "setreuid", "setregid", "setgroups", "setresuid", "setresgid",
            "setfsuid", "setfsgid")


def _arg(i: int, high: bool = False) -> int:
    return 16 + 8 * i + (4 if high else 0)  # seccomp_data.args[i], little-endian halves


def seccomp_program(arch: int, nr: dict[str, int], pid: int) -> bytes:
    """The filter: deny the calls a health check never needs, allow the rest."""
    eperm, enosys, eacces = (RET_ERRNO | errno.EPERM, RET_ERRNO | errno.ENOSYS,
                             RET_ERRNO | errno.EACCES)
    a = _Asm()
    a.op(BPF_LD_W_ABS, 4)                                # arch
    a.op(BPF_JEQ_K, arch, "arch_ok", None)
    a.op(BPF_RET_K, RET_KILL_PROCESS)
    a.label("arch_ok")
    a.op(BPF_LD_W_ABS, 0)                                # syscall number
    if arch == _SYSCALLS["x86_64"][0]:                   # the x32 ABI: not ours
        a.op(BPF_JGE_K, 0x40000000, "x32", "native")
        a.label("x32")
        a.op(BPF_RET_K, enosys)
        a.label("native")
    n = 0

    def block(name: str) -> tuple[str, str] | None:
        # "if syscall == name:" ... the caller ends the block with returns only
        nonlocal n
        if name not in nr:
            return None
        n += 1
        nxt, body = f"next{n}", f"body{n}"
        a.op(BPF_JEQ_K, nr[name], body, nxt)
        a.label(body)
        return nxt, f"b{n}"

    def end(nxt: str) -> None:
        a.label(nxt)
        a.op(BPF_LD_W_ABS, 0)                            # the syscall number again

    def deny(name: str, ret: int) -> None:
        b = block(name)
        if b:
            a.op(BPF_RET_K, ret)
            end(b[0])

    def arg_in(name: str, i: int, values: tuple[int, ...], *, allow: bool, ret: int = eperm,
               mask: int = 0, whole: bool = True) -> None:
        # name(...): args[i] in values is allowed (allow=True) or denied; with mask, a
        # value with any of its bits is denied. whole: the high 32 bits must be 0 (ids);
        # else only the low 32 bits count (int/unsigned int arguments: the kernel drops the
        # high half)
        b = block(name)
        if not b:
            return
        nxt, p = b
        yes, no = (f"{p}allow", f"{p}deny") if allow else (f"{p}deny", f"{p}allow")
        if whole:
            a.op(BPF_LD_W_ABS, _arg(i, high=True))
            a.op(BPF_JEQ_K, 0, None, f"{p}deny")
        a.op(BPF_LD_W_ABS, _arg(i))
        for v in values:
            a.op(BPF_JEQ_K, v, yes, None)
        if mask:
            a.op(BPF_JSET_K, mask, yes, None)
        a.op(BPF_RET_K, RET_ALLOW if not allow else ret)
        a.label(yes)
        a.op(BPF_RET_K, RET_ALLOW if allow else ret)
        if f"{p}deny" not in a.at:
            a.label(f"{p}deny")
            a.op(BPF_RET_K, ret)
        end(nxt)

    deny("socket", eacces)
    for name in _SOCKET_DENY:
        deny(name, eacces)
    b = block("sendto")                                  # send(2) yes, to an address no
    if b:
        a.op(BPF_LD_W_ABS, _arg(4))
        a.op(BPF_JEQ_K, 0, None, f"{b[1]}deny")
        a.op(BPF_LD_W_ABS, _arg(4, high=True))
        a.op(BPF_JEQ_K, 0, None, f"{b[1]}deny")
        a.op(BPF_RET_K, RET_ALLOW)
        a.label(f"{b[1]}deny")
        a.op(BPF_RET_K, eacces)
        end(b[0])
    b = block("fcntl")                                   # see FCNTL_ALLOWED
    if b:
        p = b[1]
        a.op(BPF_LD_W_ABS, _arg(1))
        a.op(BPF_JEQ_K, F_SETFL, f"{p}setfl", None)
        for v in FCNTL_ALLOWED:
            a.op(BPF_JEQ_K, v, f"{p}allow", None)
        a.op(BPF_RET_K, eperm)
        a.label(f"{p}setfl")
        a.op(BPF_LD_W_ABS, _arg(2))
        a.op(BPF_JSET_K, O_ASYNC, f"{p}deny", f"{p}allow")
        a.label(f"{p}deny")
        a.op(BPF_RET_K, eperm)
        a.label(f"{p}allow")
        a.op(BPF_RET_K, RET_ALLOW)
        end(b[0])
    arg_in("ioctl", 1, IOCTL_DENIED, allow=False, whole=False)
    arg_in("open", 1, (), allow=False, mask=OPEN_DENIED_FLAGS, whole=False)
    arg_in("openat", 2, (), allow=False, mask=OPEN_DENIED_FLAGS, whole=False)
    deny("creat", eperm)
    deny("openat2", enosys)                              # glibc and Python fall back to openat
    arg_in("prctl", 0, (PR_SET_PDEATHSIG,), allow=False, whole=False)  # dies with the agent
    for name in ("io_uring_setup", "io_uring_enter", "io_uring_register", "clone3"):
        deny(name, enosys)  # clone3: ENOSYS makes glibc fall back to clone(2)
    for name in _COMMON_DENY + _IPC_DENY + _ID_DENY + ("fork", "vfork", "ioperm", "iopl"):
        if name not in ("io_uring_setup", "io_uring_enter", "io_uring_register", "clone3"):
            deny(name, eperm)
    arg_in("clone", 0, (), allow=True, mask=CLONE_THREAD)  # threads yes, processes no
    for name in ("kill", "tgkill", "rt_sigqueueinfo", "rt_tgsigqueueinfo"):
        arg_in(name, 0, (pid,), allow=True)              # signals to itself only
    for name in _SELF_ONLY:
        arg_in(name, 0, (0, pid), allow=True)
    a.op(BPF_RET_K, RET_ALLOW)
    return a.code()


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def _seccomp() -> None:
    arch, nr = _arch()
    prog = seccomp_program(arch, nr, os.getpid())
    buf = ctypes.create_string_buffer(prog, len(prog))
    fprog = _SockFprog(len(prog) // 8, ctypes.cast(buf, ctypes.c_void_p))
    if _libc.syscall(nr["seccomp"], ctypes.c_uint(SECCOMP_SET_MODE_FILTER), ctypes.c_uint(0),
                     ctypes.byref(fprog)) != 0:
        raise _err("seccomp", "seccomp(SET_MODE_FILTER)")


def _prove(must_deny: list[str]) -> None:
    for path in must_deny:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError:
            continue
        os.close(fd)
        raise Missing("landlock", f"{path} is still readable inside the sandbox")
    for family in (socket.AF_INET, socket.AF_INET6, socket.AF_UNIX, socket.AF_NETLINK):
        try:
            s = socket.socket(family, socket.SOCK_DGRAM if family == socket.AF_NETLINK
                              else socket.SOCK_STREAM)
        except OSError:
            continue
        s.close()
        raise Missing("seccomp", f"socket({family.name}) still works inside the sandbox")
    _, nr = _arch()
    pair = (ctypes.c_int * 2)()
    refused: dict[str, tuple[str, tuple[Any, ...]]] = {  # each call must fail
        "socketpair(AF_UNIX)": ("socketpair", (socket.AF_UNIX, socket.SOCK_DGRAM, 0,
                                               ctypes.byref(pair))),
        "fcntl(F_SETOWN)": ("fcntl", (0, 8, os.getpid())),
        "prctl(PR_SET_PDEATHSIG, 0)": ("prctl", (PR_SET_PDEATHSIG, 0, 0, 0, 0)),
        "shmget": ("shmget", (0, 4096, 0o1600)),
        "open(O_TRUNC)": ("openat", (-100, b"/dev/null", os.O_RDONLY | os.O_TRUNC, 0)),
    }
    for what, (name, args) in refused.items():
        if _libc.syscall(nr[name], *args) >= 0:
            raise Missing("seccomp", f"{what} still works inside the sandbox")


def apply(spec: dict[str, Any]) -> None:
    """Set up everything ``spec`` asks for on this process, or raise :class:`Missing`."""
    _prctl("no_new_privs", PR_SET_NO_NEW_PRIVS, 1)
    _prctl("pdeathsig", PR_SET_PDEATHSIG, 9)
    if os.getppid() != spec["parent"]:
        raise Missing("pdeathsig", "the agent exited before the sandbox was up")
    try:
        with open("/proc/self/oom_score_adj", "w") as f:
            f.write("1000")
    except OSError as e:
        raise Missing("oom_score_adj", f"cannot raise /proc/self/oom_score_adj: {e}") from e
    if spec.get("nice"):
        os.nice(int(spec["nice"]))
    _rlimits({str(k): int(v) for k, v in spec["rlimits"].items()})
    if not spec["isolate"]:  # [health] unsafe_no_sandbox: the limits only
        _drop_capabilities()
        return
    _bound_tasks(int(spec["max_tasks"]), int(spec["task_uid"]))
    _prctl("pdeathsig", PR_SET_PDEATHSIG, 9)  # a new euid cleared it
    if os.getppid() != spec["parent"]:
        raise Missing("pdeathsig", "the agent exited before the sandbox was up")
    _landlock(list(spec["read_exec"]), list(spec["read_only"]), list(spec["read_write"]))
    _seccomp()
    _prove(list(spec["must_deny"]))


def main(argv: list[str]) -> int:
    """``_sandbox_launch.py SPEC_JSON STATUS_FD -- ARGV...``"""
    spec = json.loads(argv[1])
    status = int(argv[2])
    target = argv[4:]
    os.set_inheritable(status, False)  # closes at execve: EOF tells the agent all is up
    try:
        apply(spec)
        os.chdir(spec.get("cwd", "/"))
        os.execve(target[0], target, os.environ)  # noqa: S606 - argv from the agent, no shell
    except Missing as e:
        os.write(status, json.dumps({"missing": e.what, "detail": e.detail}).encode() + b"\n")
    except OSError as e:
        os.write(status, json.dumps({"missing": "exec",
                                     "detail": f"cannot run {target[0]}: {e}"}).encode() + b"\n")
    except Exception as e:  # noqa: BLE001 - any surprise is reported: never an unconfined run
        os.write(status, json.dumps({"missing": "launcher", "detail": f"{type(e).__name__}: "
                                     f"{e}"}).encode() + b"\n")
    return EXIT_SANDBOX


if __name__ == "__main__":
    sys.exit(main(sys.argv))
