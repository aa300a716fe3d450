"""Health-check child process: ``python -m modelward.updater.install._healthchild FDS_JSON [GO]``.

Runs in its own process so that a model that crashes, hangs or eats memory in
onnxruntime cannot take the agent down. Prints one JSON object
``{"ok": bool, "detail": str}`` and exits 0 when the model reproduces its vectors.

``FDS_JSON`` maps the bundle's relative paths (the manifest, the model, the vectors) to
inherited descriptors: sealed in-memory copies of the bytes the agent verified
(``updater.install._sealed``). Nothing of the stage is opened by path: the stage on disk may
have changed since, and the sandbox hides it anyway.

With ``GO`` (a pipe's read end), the child was started ahead, while the agent still fills
and seals the copies (``updater.install._health.PendingCheck``): it imports onnxruntime
meanwhile, then waits for ``1`` on ``GO`` (with the memory limit of now, which it sets
first, soft and hard). Only then, and only if every handed
descriptor carries all the seals (``F_GET_SEALS``: nobody can change its bytes any more),
does it read anything; end of file (the agent gave up) ends it without a check.

The model is handed to onnxruntime as ``/proc/self/fd/N``, the sealed memfd itself (a new
open of the same sealed inode: no other process can change its bytes, and neither can this
one): onnxruntime reads it straight from the shared memory instead of from a copy in a
Python ``bytes`` (0.25 s and 256 MiB of the child's peak for a 256 MiB model on the
benchmark machine). Only where ``/proc`` cannot open it (no procfs) is the copy used.
The session options are onnxruntime's defaults but for the threads: the check runs the
graph as an app that opens the model with defaults does (all graph optimizations, weights
prepacked), so a model that behaves differently optimized is judged optimized.
"""

from __future__ import annotations

import fcntl
import json
import os
import resource
import sys
from typing import IO, Any, NoReturn

GO_BYTES = 9  # ``1``, then the address-space limit (little-endian; 0: keep the one it has)
_SEALS = fcntl.F_SEAL_SEAL | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE


class NotSealedError(Exception):
    """A descriptor handed over does not carry every seal: its bytes could still change."""


def wait_for_go(go: int, fds: dict[str, int]) -> bool:
    """Block until the agent says the copies are sealed (``1`` and a memory limit on
    ``go``, which it sets before reading anything); False if it gave up (end of file,
    anything else).

    Raises:
        NotSealedError: the agent said go, but a copy is not sealed.
    """
    said = b""
    try:
        while len(said) < GO_BYTES:
            got = os.read(go, GO_BYTES - len(said))
            if not got:
                break
            said += got
    finally:
        os.close(go)
    if len(said) != GO_BYTES or said[:1] != b"1":
        return False
    limit = int.from_bytes(said[1:], "little")
    if limit:  # (the agent's limit of now; lowering the hard limit too: never raised back)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    for name, fd in fds.items():
        try:
            seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
        except OSError as e:
            raise NotSealedError(f"{name} is not a sealed copy: {e}") from e
        if seals & _SEALS != _SEALS:
            raise NotSealedError(f"{name} is not sealed (seals {seals:#x})")
    return True


def _open(fds: dict[str, int], name: str) -> IO[bytes]:
    if name not in fds:
        raise FileNotFoundError(f"{name} was not handed over")
    f = os.fdopen(os.dup(fds[name]), "rb")
    f.seek(0)
    return f


def _read(fds: dict[str, int], name: str) -> bytes:
    with _open(fds, name) as f:
        return f.read()


def model_source(fds: dict[str, int], name: str) -> str | bytes:
    """What onnxruntime loads ``name`` from: the path of its sealed memfd in this process
    when that opens as the same file, else a copy of its bytes."""
    if name not in fds:
        raise FileNotFoundError(f"{name} was not handed over")
    fd = fds[name]
    path = f"/proc/self/fd/{fd}"
    try:
        st, via = os.fstat(fd), os.stat(path)
    except OSError:
        return _read(fds, name)
    if (st.st_dev, st.st_ino) != (via.st_dev, via.st_ino):
        return _read(fds, name)
    return path


def check(fds: dict[str, int]) -> tuple[bool, str]:
    """Load the model in onnxruntime and reproduce its test vectors, from ``fds``."""
    import numpy as np
    import onnxruntime as ort

    from modelward.updater.bundle._bundle import MANIFEST, parse_manifest

    manifest = parse_manifest(_read(fds, MANIFEST), "the verified bundle")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    try:
        sess = ort.InferenceSession(
            model_source(fds, manifest.model_path), sess_options=opts,
            providers=["CPUExecutionProvider"],
        )
    except Exception as e:  # noqa: BLE001 - onnxruntime raises many unrelated types
        return False, f"onnxruntime cannot load {manifest.model_path}: {e}"
    got_in = [(i.name) for i in sess.get_inputs()]
    got_out = [(o.name) for o in sess.get_outputs()]
    want_in = [s.name for s in manifest.inputs]
    want_out = [s.name for s in manifest.outputs]
    if got_in != want_in or got_out != want_out:
        return False, (
            f"model signature {got_in}->{got_out} differs from the manifest {want_in}->{want_out}"
        )
    with _open(fds, manifest.vectors) as vf, np.load(vf, allow_pickle=False) as vec:
        feeds: dict[str, Any] = {n: vec[f"input:{n}"] for n in want_in}
        expected = {n: vec[f"output:{n}"] for n in want_out}
    try:
        outs = sess.run(want_out, feeds)
    except Exception as e:  # noqa: BLE001 - onnxruntime raises many unrelated types
        return False, f"inference on the test vectors failed: {e}"
    for name, got in zip(want_out, outs, strict=True):
        exp = expected[name]
        if got.shape != exp.shape:
            return False, f"output {name!r} has shape {got.shape}, vectors say {exp.shape}"
        if not np.allclose(got, exp, rtol=manifest.rtol, atol=manifest.atol):
            worst = float(np.max(np.abs(got.astype("float64") - exp.astype("float64"))))
            return False, (
                f"output {name!r} differs from the test vectors (max abs diff {worst:.3g}, "
                f"rtol={manifest.rtol}, atol={manifest.atol})"
            )
    return True, f"{len(want_out)} output(s) match the test vectors"


def _import_frozen() -> None:
    """Import what :func:`check` runs with the cyclic collector off, and freeze what the
    imports made (never walked again, nor at the exit): numpy's and onnxruntime's imports
    make only long-lived objects, and the collector walked them as they grew (issue 16)."""
    import gc

    gc.disable()
    try:
        import numpy  # noqa: F401
        import onnxruntime  # noqa: F401

        import modelward.updater.bundle._bundle  # noqa: F401
    finally:
        gc.freeze()
        gc.enable()


def end(code: int) -> NoReturn:
    """Exit with ``code`` once the verdict is flushed, without the interpreter's teardown:
    freeing the session (the model's weights) and onnxruntime's modules took 50-100 ms
    for a 256 MiB model, which the agent waited for (the verdict is read at the child's
    end). A flush that fails raises: the child ends with a traceback, a failed check."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def main() -> int:
    """Entry point of the child."""
    try:
        from modelward.trust._bounded import loads_bounded

        fds = loads_bounded(sys.argv[1], max_bytes=4096, max_depth=1, what="the descriptors")
        if not isinstance(fds, dict) or not all(
                isinstance(k, str) and type(v) is int for k, v in fds.items()):
            raise ValueError("the argument is not a map of names to descriptors")
        _import_frozen()
        # started ahead: imported while the agent seals, now wait
        if len(sys.argv) > 2 and not wait_for_go(int(sys.argv[2]), fds):
            return 3  # (the agent gave up before go: nothing was read, nothing said)
        ok, detail = check(fds)
    except Exception as e:  # noqa: BLE001 - report anything as a failed check, never crash silently
        ok, detail = False, f"{type(e).__name__}: {e}"
    print(json.dumps({"ok": ok, "detail": detail}))
    return 0 if ok else 1


if __name__ == "__main__":
    end(main())
