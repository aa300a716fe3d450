"""Issue 16, the install's fixed costs: the health child hands onnxruntime the sealed memfd
itself (``/proc/self/fd/N``), not a copy, and still loads exactly the sealed bytes."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from modelward.updater.install._healthchild import model_source
from modelward.updater.install._sealed import copy_sealed


def _sealed(tmp_path: Path, data: bytes) -> tuple[Path, int]:
    src = tmp_path / "model.onnx"
    src.write_bytes(data)
    fd = os.open(src, os.O_RDONLY)
    try:
        mfd = copy_sealed(fd, len(data), "model.onnx")
    finally:
        os.close(fd)
    assert mfd is not None
    return src, mfd


def test_i16_the_model_is_loaded_from_the_sealed_memfd_by_its_proc_path(tmp_path: Path) -> None:
    """The path names this process's sealed copy: a rewrite of the file it came from
    changes nothing read through it, and nobody can write through the path either.
    Mutation: returning the file's own path fails it."""
    src, mfd = _sealed(tmp_path, b"sealed model bytes")
    try:
        got = model_source({"model.onnx": mfd}, "model.onnx")
        assert got == f"/proc/self/fd/{mfd}"
        src.write_bytes(b"rewritten on disk!")
        with open(got, "rb") as f:
            assert f.read() == b"sealed model bytes"
        with pytest.raises(PermissionError), open(got, "r+b") as f:
            f.write(b"x")
    finally:
        os.close(mfd)


def test_i16_a_model_not_handed_over_is_not_looked_for_elsewhere(tmp_path: Path) -> None:
    """A manifest naming a file that was not sealed (a careless operator's bundle) is a
    failed check naming it, never a path opened. Mutation: falling back to the slot fails."""
    with pytest.raises(FileNotFoundError, match="model.onnx was not handed over"):
        model_source({}, "model.onnx")


def test_i16_a_descriptor_proc_does_not_show_as_itself_falls_back_to_a_copy(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Where ``/proc/self/fd/N`` is not the same file (no procfs, another mount there), the
    child reads the sealed copy's bytes instead: still the sealed bytes, never the path.
    Mutation: returning the path without the inode comparison fails it."""
    _, mfd = _sealed(tmp_path, b"sealed model bytes")
    other = tmp_path / "other"
    other.write_bytes(b"not the model")
    real_stat = os.stat
    monkeypatch.setattr(os, "stat", lambda p, *a, **k: real_stat(other)
                        if str(p).startswith("/proc/self/fd/") else real_stat(p, *a, **k))
    try:
        assert model_source({"model.onnx": mfd}, "model.onnx") == b"sealed model bytes"
    finally:
        os.close(mfd)


# --- the health child started ahead of the seal (updater/install/_health.PendingCheck) -------


def _real_slot(tmp_path: Path, seed: int = 1) -> Path:
    from modelward.publisher._bundle_build import BuildOptions, build_bundle
    from modelward.simulator._models import make_linear_model
    from modelward.updater.bundle._bundle import extract_bundle

    bundle = tmp_path / f"m{seed}.tar"
    build_bundle(make_linear_model(tmp_path / f"m{seed}.onnx", seed), "m", "1.0.0", bundle,
                 options=BuildOptions())
    slot = tmp_path / f"state{seed}" / "staging" / "incoming"
    slot.mkdir(parents=True)
    with open(bundle, "rb") as f:
        extract_bundle(f, slot, "m")
    return slot


def _signed(slot: Path) -> tuple[str, dict[str, int]]:
    from modelward.trust._fingerprint import directory_entries, slot_fingerprint

    entries = directory_entries(slot)
    return slot_fingerprint(entries), {e.path: e.size for e in entries}


NAMES = ("manifest.json", "model.onnx", "vectors.npz")


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_i16_the_child_started_ahead_checks_the_sealed_bytes_not_the_disk(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Through the real sandbox and onnxruntime: the child starts before the seal, the disk
    puts another model (failing these vectors) in place after the seal; the check passes on
    the sealed bytes, run by the child started ahead. Mutation: a child that loads from
    the stage, or ``go`` before the seal, fails it."""
    from modelward.updater._config import HealthConfig
    from modelward.updater.install import _health
    from modelward.updater.install._sealed import seal_verified

    slot, other = _real_slot(tmp_path), _real_slot(tmp_path, seed=2)
    want, sizes = _signed(slot)
    ran: list[object] = []
    real_go = _health.PendingCheck.go
    monkeypatch.setattr(_health.PendingCheck, "go", lambda self, *a: ran.append(
        real_go(self, *a)) or ran[-1])
    pending = _health.start_check(slot, HealthConfig(timeout=60), NAMES)
    assert pending is not None
    with seal_verified(slot, NAMES, sizes, want, "m 1.0.0", "now", pending.fds) as sealed:
        with open(slot / "model.onnx", "r+b") as f:
            f.truncate(0)
            f.write((other / "model.onnx").read_bytes())
        assert "match" in _health.run_health_check(slot, "m", "1.0.0", HealthConfig(timeout=60),
                                                   sealed=sealed, pending=pending)
    assert len(ran) == 1 and ran[0] is not None  # (the child started ahead did it)
    assert not pending.fds  # closed


def test_i16_the_child_refuses_copies_that_are_not_sealed(tmp_path: Path) -> None:
    """A child told "go" over descriptors that are not all sealed reads nothing: its bytes
    could still change under it. Mutation: skipping the F_GET_SEALS check fails it."""
    from modelward.updater.install._health import go_message
    from modelward.updater.install._healthchild import NotSealedError, wait_for_go
    from modelward.updater.install._sealed import new_memfd

    mfd = new_memfd("model.onnx")
    r, w = os.pipe()
    try:
        os.write(mfd, b"unsealed")
        os.write(w, go_message(0))
        with pytest.raises(NotSealedError, match="model.onnx is not sealed"):
            wait_for_go(r, {"model.onnx": mfd})
    finally:
        os.close(mfd)
        os.close(w)


def test_i16_an_agent_that_gives_up_ends_the_child_before_it_reads(tmp_path: Path) -> None:
    """End of file on the go pipe: no check (False), and the agent's close() leaves no
    process and no descriptor behind."""
    from modelward.updater._config import HealthConfig
    from modelward.updater.install._health import start_check
    from modelward.updater.install._healthchild import wait_for_go

    r, w = os.pipe()
    os.close(w)
    assert wait_for_go(r, {}) is False
    slot = _real_slot(tmp_path)
    pending = start_check(slot, HealthConfig(timeout=60), NAMES)
    assert pending is not None and pending._proc is not None
    pid = pending._proc.pid
    pending.close()
    pending.close()  # (idempotent)
    assert _gone(pid) and not pending.fds


def test_i16_go_with_other_copies_kills_the_child_and_checks_afresh(tmp_path: Path) -> None:
    """Sealed copies that are not the pending child's memfds (a fallback made new ones):
    the child started ahead is killed, never told go, and a fresh child checks what was
    sealed. Mutation: telling it go anyway (its memfds are empty) fails the check."""
    from modelward.updater._config import HealthConfig
    from modelward.updater.install._health import run_health_check, start_check
    from modelward.updater.install._sealed import seal_verified

    slot = _real_slot(tmp_path)
    want, sizes = _signed(slot)
    pending = start_check(slot, HealthConfig(timeout=60), NAMES)
    assert pending is not None and pending._proc is not None
    pid = pending._proc.pid
    with seal_verified(slot, NAMES, sizes, want, "m 1.0.0", "now") as sealed:
        assert "match" in run_health_check(slot, "m", "1.0.0", HealthConfig(timeout=60),
                                           sealed=sealed, pending=pending)
    assert _gone(pid)


def test_i16_a_copy_into_a_used_memfd_is_refused(tmp_path: Path) -> None:
    """``into`` must be an empty, unsealed memfd: one holding bytes already (planted by
    whoever else holds it) is refused, never sealed with them."""
    from modelward.updater.errors import StagingError
    from modelward.updater.install._sealed import copy_sealed, new_memfd

    src = tmp_path / "f"
    src.write_bytes(b"abc")
    mfd = new_memfd("f")
    fd = os.open(src, os.O_RDONLY)
    try:
        os.write(mfd, b"planted")
        with pytest.raises(StagingError, match="not empty"):
            copy_sealed(fd, 3, "f", into=mfd)
    finally:
        os.close(fd)
        os.close(mfd)


def test_i16_vectors_missing_refuses_the_seal_and_ends_the_child(tmp_path: Path) -> None:
    """A careless operator's bundle whose manifest names vectors it does not hold: the
    seal is refused (StagedFilesChangedError names the stage), and the child started ahead
    ends without reading anything."""
    from modelward.updater._config import HealthConfig
    from modelward.updater.errors import StagedFilesChangedError
    from modelward.updater.install._health import start_check
    from modelward.updater.install._sealed import seal_verified

    slot = _real_slot(tmp_path)
    (slot / "vectors.npz").unlink()
    want, sizes = _signed(slot)
    pending = start_check(slot, HealthConfig(timeout=60), NAMES)
    assert pending is not None and pending._proc is not None
    pid = pending._proc.pid
    try:
        with pytest.raises(StagedFilesChangedError, match=str(slot)):
            seal_verified(slot, NAMES, sizes, want, "m 1.0.0", "now", pending.fds)
    finally:
        pending.close()
    assert _gone(pid)


def test_i16_a_child_out_of_memory_is_a_failed_check_started_ahead_too(tmp_path: Path) -> None:
    """The child started ahead has the same bounds: with too little memory for onnxruntime
    it fails (HealthCheckError naming the limit), and nothing is left running."""
    from modelward.updater._config import HealthConfig
    from modelward.updater.errors import HealthCheckError
    from modelward.updater.install._health import run_health_check, start_check
    from modelward.updater.install._sealed import seal_verified

    slot = _real_slot(tmp_path)
    want, sizes = _signed(slot)
    cfg = HealthConfig(timeout=60, max_memory=48 << 20)
    pending = start_check(slot, cfg, NAMES)
    assert pending is not None and pending._proc is not None
    pid = pending._proc.pid
    with seal_verified(slot, NAMES, sizes, want, "m 1.0.0", "now", pending.fds) as sealed, \
            pytest.raises(HealthCheckError, match=str(48 << 20)):
        run_health_check(slot, "m", "1.0.0", cfg, sealed=sealed, pending=pending)
    assert _gone(pid)


def test_i16_a_compromised_report_of_the_child_started_ahead_fails_the_check(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The signed model's code writes its own "report" from the child started ahead: it is
    parsed as strictly as any (HealthCheckError), the child is reaped. Mutation: taking
    ``ok`` from a report that is not exactly one JSON line fails it."""
    from modelward.updater._config import HealthConfig
    from modelward.updater.errors import HealthCheckError
    from modelward.updater.install import _health
    from modelward.updater.install._sandbox import Completed
    from modelward.updater.install._sealed import seal_verified

    slot = _real_slot(tmp_path)
    want, sizes = _signed(slot)
    real = _health.supervise

    def compromised(proc: object, **kw: object) -> Completed:
        done = real(proc, **kw)  # type: ignore[arg-type]
        return Completed(0, b'{"ok": true, "detail": "fine"}\n{"ok": true}\n', done.stderr,
                         False)

    monkeypatch.setattr(_health, "supervise", compromised)
    pending = _health.start_check(slot, HealthConfig(timeout=60), NAMES)
    assert pending is not None and pending._proc is not None
    pid = pending._proc.pid
    with seal_verified(slot, NAMES, sizes, want, "m 1.0.0", "now", pending.fds) as sealed, \
            pytest.raises(HealthCheckError):
        _health.run_health_check(slot, "m", "1.0.0", HealthConfig(timeout=60), sealed=sealed,
                                 pending=pending)
    assert _gone(pid)


def test_i16_the_check_runs_the_graph_as_an_app_with_defaults_does(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A signed model that behaves differently optimized is judged optimized: the child keeps
    onnxruntime's default graph optimizations and prepacking (only its threads are set), and
    loads the sealed memfd by its /proc path. Mutation: lowering the optimization level or
    disabling prepacking for speed fails it."""
    import onnxruntime as ort

    from modelward.updater.install import _healthchild
    from modelward.updater.install._sealed import seal_slot

    slot = _real_slot(tmp_path)
    seen: list[tuple[object, object, str | None]] = []
    real = ort.InferenceSession

    def session(src: object, sess_options: ort.SessionOptions, **kw: object) -> object:
        seen.append((src, sess_options.graph_optimization_level,
                     sess_options.get_session_config_entry("session.disable_prepacking")
                     if _has_entry(sess_options, "session.disable_prepacking") else None))
        return real(src, sess_options=sess_options, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(ort, "InferenceSession", session)
    with seal_slot(slot, NAMES) as sealed:
        ok, detail = _healthchild.check(dict(sealed.fds))
        mfd = sealed.fds["model.onnx"]
    assert ok, detail
    assert seen == [(f"/proc/self/fd/{mfd}", ort.GraphOptimizationLevel.ORT_ENABLE_ALL, None)]


def _has_entry(opts: object, key: str) -> bool:
    try:
        opts.get_session_config_entry(key)  # type: ignore[attr-defined]
    except Exception:  # noqa: BLE001 - onnxruntime raises when the entry is not set
        return False
    return True


def test_i16_bench_only_names_its_sections() -> None:
    """benchmarks/delta.py --only: the known sections, all when empty, a typed exit naming
    the unknown one otherwise."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    import delta

    assert delta.parse_only("") == frozenset(delta.SECTIONS)
    assert delta.parse_only("a, c") == {"a", "c"}
    with pytest.raises(SystemExit, match="unknown section.*nope"):
        delta.parse_only("a,nope")


def test_i16_the_health_child_ends_with_its_verdict_written_and_no_teardown(
        tmp_path: Path) -> None:
    """The child's ``end``: the whole verdict (more than a pipe holds) and the code reach
    the agent, without the interpreter's teardown (atexit never runs). Mutation: ending
    with ``os._exit`` before the flush loses the verdict; ``sys.exit`` runs the teardown."""
    import subprocess
    import sys

    marker = tmp_path / "teardown"
    code = ("import atexit, sys\n"
            "from modelward.updater.install._healthchild import end\n"
            f"atexit.register(lambda: open({str(marker)!r}, 'w').write('ran'))\n"
            "sys.stdout.write('v' * 200_000)\n"
            "end(1)\n"
            "print('not reached')\n")
    r = subprocess.run([sys.executable, "-I", "-c", code], capture_output=True, text=True,
                       timeout=60, check=False,
                       env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert r.returncode == 1, r.stderr
    assert r.stdout == "v" * 200_000
    assert not marker.exists()
