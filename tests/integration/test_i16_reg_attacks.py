"""Issue 16: the whole-bundle attacks of test_attacks / test_update_https, tried against the
delta path (real nginx and swtpm): bytes appended to a bundle on the origin are never read."""

from __future__ import annotations

from modelward.updater.install._install import Outcome
from tests.conftest import World
from tests.integration._i16_delta import bundle_gets, publish


def test_bytes_appended_to_a_bundle_on_the_origin_are_never_read_by_a_delta(
        world: World) -> None:
    """Endless data after the signed length: the delta asks only for ranges inside it, so
    the right v2 is installed and the device read far less than the signed bundle."""
    publish(world, "1.0.0")
    world.update()
    b2, _ = publish(world, "2.0.0", changed_rows=100)
    signed_len = b2.stat().st_size
    with open(b2, "ab") as f:
        f.write(b"\0" * (64 << 20))
    assert world.update().outcome is Outcome.INSTALLED
    assert world.active_version() == "2.0.0"
    slot = world.state / "current"
    assert (slot / "model.onnx").read_bytes() == (world.builds / "big-2.0.0.onnx").read_bytes()
    gets = bundle_gets(world, "2.0.0")
    assert gets and all(status == 206 for status, _, _ in gets), gets
    assert sum(n for _, n, _ in gets) < signed_len // 2, gets
