"""Issue 13, must-show 13, through the real CLI (swtpm, nginx, onnxruntime): whatever sits at
``busy_file`` (a FIFO, a symlink, a regular file with a future mtime, a 1 GiB sparse file),
``agent update --once`` neither hangs nor reads it whole; a broken signal is ignored with
one warning, so the update goes through."""

from __future__ import annotations

import os
import subprocess
import time

import pytest

from tests._helpers import update_peak_rss
from tests.conftest import World


def _update(w: World) -> tuple[int, str]:
    try:
        rc, rss, err = update_peak_rss(w.conf_path, timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail("agent update --once hung on busy_file")
    assert rc == 0, err
    return rss, err


@pytest.mark.xdist_group("machine")
def test_i13_busy_file_that_is_no_signal_neither_hangs_nor_blocks_the_update(
    world: World,
) -> None:
    busy = world.tmp / "app-busy"
    world.conf_path.write_text(world.conf_path.read_text() +
                               f'\n[idle]\nbusy_file = "{busy}"\npoll = 0.1\n')
    target = world.tmp / "depth"
    target.write_text("9\n")  # busy, if it were believed
    future = time.time() + 86400

    def fifo() -> None:
        os.mkfifo(busy)

    def symlink() -> None:
        busy.symlink_to(target)

    def future_mtime() -> None:
        busy.write_text("9\n")
        os.utime(busy, (future, future))

    def sparse() -> None:
        with open(busy, "wb") as f:
            f.truncate(1 << 30)

    cases = [("FIFO", fifo, "it is a FIFO"), ("symlink", symlink, "it is a symlink"),
             ("future", future_mtime, "mtime is in the future"),
             ("sparse", sparse, "it holds 1073741824 bytes")]
    peaks = {}
    for i, (name, make, warning) in enumerate(cases, start=1):
        busy.unlink(missing_ok=True)
        make()
        world.publish(f"{i}.0.0", seed=i)
        peaks[name], err = _update(world)
        assert world.active_version() == f"{i}.0.0", (name, err)
        assert err.count("ignoring busy_file") == 1, (name, err)
        assert warning in err, (name, err)
    print("peak RSS KiB", peaks)
    # a 1 GiB file read whole would add 1 GiB; at most 65 bytes are read
    assert peaks["sparse"] <= peaks["FIFO"] + 16 * 1024, peaks
