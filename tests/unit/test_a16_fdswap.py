"""Attacks a16fd (a local user writing state_dir while the agent runs) on the fd-based
state directory helpers: FIFOs planted where a stage file is opened for writing (an open
O_WRONLY without O_NONBLOCK waits for a reader: the agent hangs), ``staging/incoming``
swapped for a symlink between install_incoming's check and its rename (the link itself
lands in ``slots/``), fd leaks on the helpers' error paths, ``..`` in a relative path."""

from __future__ import annotations

import contextlib
import os
import threading
from pathlib import Path

import pytest

from modelward.updater.bundle._tarstream import Member
from modelward.updater.errors import StateDirError
from modelward.updater.install import _slots
from modelward.updater.install._slots import SlotStore
from modelward.updater.install._stage import IndexEntry, StageWriter
from modelward.updater.install._statedir import (
    make_dirs_at,
    open_at,
    open_dir,
    plain_stats_at,
    read_at,
    remove_below,
    walk_at,
    write_at,
)


def _runs_briefly(fn, fifos: list[Path]) -> tuple[bool, BaseException | None]:
    """Run ``fn`` in a thread; True if it returned (or raised) within a second. A thread
    blocked in open() of a FIFO is released by opening the FIFO for reading."""
    out: list[BaseException | None] = [None]

    def run() -> None:
        try:
            fn()
        except BaseException as e:  # noqa: BLE001
            out[0] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(1.0)
    finished = not t.is_alive()
    if not finished:
        for f in fifos:
            with contextlib.suppress(OSError):
                os.close(os.open(f, os.O_RDONLY | os.O_NONBLOCK))
        t.join(2.0)
    return finished, out[0]


def _state(tmp_path: Path) -> tuple[Path, Path]:
    state = tmp_path / "state"
    (state / "staging" / "incoming").mkdir(parents=True)
    return state, state / "staging"


def test_fifo_skeleton_does_not_hang_the_writer(tmp_path: Path) -> None:
    state, staging = _state(tmp_path)
    part, index = staging / "k.part", staging / "k.index"
    os.mkfifo(part)
    finished, err = _runs_briefly(
        lambda: StageWriter(staging / "incoming", part, index, base=state).close(), [part])
    assert finished, "StageWriter blocked opening a FIFO planted at the skeleton"
    assert isinstance(err, OSError)


def test_fifo_index_does_not_hang_the_writer(tmp_path: Path) -> None:
    state, staging = _state(tmp_path)
    part, index = staging / "k.part", staging / "k.index"
    part.write_bytes(b"")
    os.mkfifo(index)
    finished, err = _runs_briefly(
        lambda: StageWriter(staging / "incoming", part, index, base=state).close(), [index])
    assert finished, "StageWriter blocked opening a FIFO planted at the index"
    assert isinstance(err, OSError)


def test_fifo_kept_member_does_not_hang_the_resume(tmp_path: Path) -> None:
    state, staging = _state(tmp_path)
    inc = staging / "incoming"
    os.mkfifo(inc / "m.bin")
    entry = IndexEntry("m.bin", 512, 100)
    w = StageWriter(inc, resume_at=562, kept={"m.bin": entry}, base=state)
    finished, err = _runs_briefly(
        lambda: w.open(Member("m.bin", 100, b"0", 512)), [inc / "m.bin"])
    w.close()
    assert finished, "the resumed member open blocked on a FIFO"
    assert isinstance(err, OSError)


def test_fifo_fresh_member_is_refused_not_waited_on(tmp_path: Path) -> None:
    """A member written whole: its entry is removed first and created O_EXCL (resists)."""
    state, staging = _state(tmp_path)
    inc = staging / "incoming"
    os.mkfifo(inc / "m.bin")
    w = StageWriter(inc, base=state)
    box: list[object] = []
    finished, err = _runs_briefly(lambda: box.append(w.open(Member("m.bin", 3, b"0", 512))),
                                  [inc / "m.bin"])
    assert finished and err is None
    box[0].close()  # type: ignore[attr-defined]
    w.close()
    assert (inc / "m.bin").is_file()


def test_install_incoming_never_moves_a_link_into_slots(tmp_path: Path, monkeypatch) -> None:
    state, staging = _state(tmp_path)
    (staging / "incoming" / "model.onnx").write_bytes(b"good")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "model.onnx").write_bytes(b"evil")
    real = _slots.remove_at
    swapped = []

    def swap_then_remove(fd: int, name: str) -> None:
        if not swapped:
            swapped.append(1)
            os.rename(staging / "incoming", tmp_path / "moved-away")
            os.symlink(elsewhere, staging / "incoming")
        real(fd, name)

    monkeypatch.setattr(_slots, "remove_at", swap_then_remove)
    store = SlotStore(state)
    with contextlib.suppress(StateDirError, OSError):
        store.install_incoming("b")
    assert swapped
    assert not os.path.islink(state / "slots" / "b"), "a symlink was installed as a slot"


def test_install_incoming_refuses_a_link_at_incoming(tmp_path: Path) -> None:
    state, staging = _state(tmp_path)
    os.rmdir(staging / "incoming")
    (tmp_path / "elsewhere").mkdir()
    os.symlink(tmp_path / "elsewhere", staging / "incoming")
    with pytest.raises(StateDirError):
        SlotStore(state).install_incoming("a")
    assert not os.path.lexists(state / "slots" / "a")


def _nfds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_no_fd_leaks_on_the_error_paths(tmp_path: Path) -> None:
    state, staging = _state(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    os.symlink(out, state / "slots")
    os.mkfifo(staging / "fifo")
    (staging / "file").write_bytes(b"x")
    os.link(staging / "file", staging / "hard")
    (staging / "dir").mkdir()
    (staging / "dir" / "full").mkdir()
    (staging / "dir" / "full" / "x").write_bytes(b"")
    many = staging / "many"
    many.mkdir()
    for i in range(20):
        (many / str(i)).mkdir()
    sfd = open_dir(state, "staging")
    try:
        def round_() -> None:
            for call in (
                lambda: open_dir(state, "slots/a"),
                lambda: open_dir(state, "staging/fifo/x", create=True),
                lambda: open_dir(state, "staging/file"),
                lambda: make_dirs_at(sfd, "file/x/y", staging),
                lambda: make_dirs_at(sfd, "fifo", staging),
                lambda: open_at(sfd, "hard", os.O_WRONLY | os.O_CREAT),
                lambda: open_at(sfd, "fifo", os.O_WRONLY | os.O_CREAT | os.O_NONBLOCK),
                lambda: open_at(sfd, "dir/nope/x", os.O_RDONLY),
                lambda: open_at(sfd, "file/x", os.O_RDONLY),
                lambda: write_at(sfd, "dir", b"data"),  # (a non-empty directory there)
                lambda: remove_below(state, "slots/a/x"),
            ):
                with contextlib.suppress(OSError, StateDirError):
                    os.close(call())  # type: ignore[func-returns-value]
            assert read_at(sfd, "fifo", 10) is None
            assert read_at(sfd, "hard", 10) is None
            assert read_at(sfd, "dir", 10) is None
            assert plain_stats_at(sfd, 2) is None  # (files over the bound: stops)
            mfd = os.open("many", os.O_RDONLY | os.O_DIRECTORY, dir_fd=sfd)
            try:  # (20 empty directories, over 1 * 4: the directory bound stops it)
                assert plain_stats_at(mfd, 1, max_depth=4) is None
            finally:
                os.close(mfd)
            for _ in walk_at(sfd):
                break  # (the generator dropped with a sub-directory fd open)
            gen = walk_at(sfd)
            next(gen)
            next(gen)
            gen.close()
        round_()
        before = _nfds()
        for _ in range(30):
            round_()
        assert _nfds() == before
        assert not [n for n in os.listdir(staging) if n.endswith(".tmp")]
    finally:
        os.close(sfd)
    assert not os.listdir(out)


@pytest.mark.parametrize("bad", ["../x", "a/../../x", "/etc/passwd", "a\x00b", "a//b",
                                 "./a", ""])
def test_paths_reaching_open_at_are_checked(bad: str) -> None:
    """open_at/open_dir walk '..' and '/' (O_NOFOLLOW guards links only): every path from
    a manifest, an index or a stage index goes through check_member_path first, which
    refuses them (resists)."""
    from modelward.updater.bundle._tarstream import check_member_path

    with pytest.raises(ValueError):
        check_member_path(bad)


def _swap_staging_after(module, monkeypatch, state: Path, elsewhere: Path) -> list[int]:
    """Make ``module.plain_dir`` swap ``staging`` for a link to ``elsewhere`` right after
    its check passed (the moment between the check and the next call by name)."""
    real = module.plain_dir
    swapped: list[int] = []

    def check_then_swap(base: Path, rel: str, **kw) -> Path:
        out = real(base, rel, **kw)
        if rel == "staging" and not swapped:
            swapped.append(1)
            os.rename(state / "staging", state.parent / "staging-moved")
            os.symlink(elsewhere, state / "staging")
        return out

    monkeypatch.setattr(module, "plain_dir", check_then_swap)
    return swapped


def test_fresh_stage_creates_nothing_outside_state_dir(tmp_path: Path, monkeypatch) -> None:
    from modelward.updater.install import _stage

    state = tmp_path / "state"
    state.mkdir()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    swapped = _swap_staging_after(_stage, monkeypatch, state, elsewhere)
    stage = _stage.Stage(state / "staging", state / "staging" / "incoming", "k")
    with contextlib.suppress(StateDirError, OSError):
        stage.writer(0).close()
    assert swapped
    assert os.listdir(elsewhere) == [], "the agent wrote in the directory a link named"


def test_delta_prepare_deletes_nothing_outside_state_dir(tmp_path: Path,
                                                         monkeypatch) -> None:
    """_prepare lists staging by name after its check; the swapped-in link's directory is
    listed, but each removal opens staging O_NOFOLLOW and is refused (resists)."""
    from modelward.updater.install import _delta

    state = tmp_path / "state"
    (state / "staging" / "incoming").mkdir(parents=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "precious").write_bytes(b"keep me")
    (elsewhere / "incoming").mkdir()
    (elsewhere / "incoming" / "other").write_bytes(b"keep me too")
    swapped = _swap_staging_after(_delta, monkeypatch, state, elsewhere)
    with contextlib.suppress(StateDirError, OSError):
        _delta._prepare(state / "staging", state / "staging" / "incoming", "k", {"x"})
    assert swapped
    assert (elsewhere / "precious").read_bytes() == b"keep me"
    assert (elsewhere / "incoming" / "other").read_bytes() == b"keep me too"


def test_a_full_release_in_subdirectories_is_still_a_base(tmp_path: Path) -> None:
    from modelward.trust._fingerprint import MAX_ENTRIES, directory_entries

    slot = tmp_path / "slot"
    for i in range(MAX_ENTRIES):
        p = slot / f"d{i % 8}" / f"f{i}"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"x")
        p.chmod(0o640)
    for d in slot.iterdir():
        d.chmod(0o750)
    slot.chmod(0o750)
    entries = directory_entries(slot)
    assert len(entries) == MAX_ENTRIES and all(e.size == 1 for e in entries)  # (a release)
    fd = os.open(slot, os.O_RDONLY | os.O_DIRECTORY)
    try:
        stats = plain_stats_at(fd, MAX_ENTRIES)
    finally:
        os.close(fd)
    assert stats is not None and len(stats) == MAX_ENTRIES


def test_planted_entries_in_the_previous_slot_only_cost_it_as_a_base(tmp_path: Path) -> None:
    """Over MAX_ENTRIES planted in a slot: it is no base (fine), nothing raises."""
    from modelward.trust._fingerprint import MAX_ENTRIES
    from modelward.updater.install._delta import slot_bases

    state = tmp_path / "state"
    (state / "slots" / "a").mkdir(parents=True)
    for i in range(MAX_ENTRIES + 5):
        (state / "slots" / "a" / f"junk{i}").write_bytes(b"")
    os.mkfifo(state / "slots" / "a" / "fifo")
    bases = slot_bases(state, state / "slots", [("previous", "a", "0" * 64)])
    assert [b.name for b, _ in bases] and bases[0][0].sizes == {}


def test_a_planted_deep_chain_is_pruned_without_fd_or_stack_exhaustion(tmp_path: Path
                                                                      ) -> None:
    """1000 nested directories in incoming: _prune (walk_at stops at depth 64 and removes
    the rest as one entry through remove_at) leaves only the kept file (resists)."""
    from modelward.updater.install._stage import _prune

    state, staging = _state(tmp_path)
    inc = staging / "incoming"
    (inc / "keep").write_bytes(b"k")
    fd = os.open(inc, os.O_RDONLY | os.O_DIRECTORY)
    for _ in range(1000):
        os.mkdir("d", dir_fd=fd)
        nxt = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
        os.close(fd)
        fd = nxt
    os.close(fd)
    before = _nfds()
    _prune(inc, {"keep"}, state)
    assert os.listdir(inc) == ["keep"]
    assert _nfds() == before
