"""Download and extraction stream: peak RSS does not grow with the bundle (must-show 8)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests._helpers import update_peak_rss
from tests.conftest import World

# peak RSS: one worker, alone (scripts/test)
pytestmark = pytest.mark.xdist_group("machine")


def _padding(path: Path, mib: int) -> Path:
    block = os.urandom(1 << 20)
    with open(path, "wb") as f:
        for i in range(mib):
            f.write(block[i % 251:] + block[: i % 251])  # no two MiB alike
    return path


def _update_rss_kib(w: World) -> int:
    rc, rss, err = update_peak_rss(w.conf_path, timeout=600)
    assert rc == 0, err
    return rss


@pytest.mark.slow
def test_peak_rss_is_flat_from_16_to_256_mib(world: World) -> None:
    small = _padding(world.builds / "pad16", 16)
    world.publish("1.0.0", seed=1, extra=[(small, "data/pad.bin")])
    rss_small = _update_rss_kib(world)
    small.unlink()

    big = _padding(world.builds / "pad256", 256)
    world.publish("2.0.0", seed=2, extra=[(big, "data/pad.bin")])
    big.unlink()
    for p in world.builds.glob("*.tar"):
        p.unlink()
    rss_big = _update_rss_kib(world)

    assert world.active_version() == "2.0.0"
    assert (world.state / "current" / "data" / "pad.bin").stat().st_size == 256 << 20
    print(f"peak RSS: 16 MiB bundle {rss_small / 1024:.1f} MiB, "
          f"256 MiB bundle {rss_big / 1024:.1f} MiB, ratio {rss_big / rss_small:.3f}")
    # A whole-bundle read would add >= 240 MiB; streaming adds a few buffers at most.
    assert rss_big <= rss_small * 1.1, (rss_small, rss_big)
