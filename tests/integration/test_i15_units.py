"""What the units promise, on a real device (swtpm, nginx, onnxruntime), issue 15:
a metrics textfile that cannot be written is one warning, never a failed install; the
activation notice file names the new model; the group reads the active model."""

from __future__ import annotations

import json
import os
import stat

from modelward.agent._observe import ACTIVATED_FILE
from tests.conftest import World


def test_unwritable_metrics_path_still_installs_and_logs_one_warning(world: World) -> None:
    """The README's old example under ProtectSystem=strict: the directory is not writable
    (here: its parent is a regular file, which fails for root too). One install also shows
    the activation notice and the modes the inference app's group relies on."""
    blocker = world.tmp / "not-a-dir"
    blocker.write_text("")
    with world.conf_path.open("a") as f:
        f.write(f'\n[metrics]\ntextfile = "{blocker}/modelward.prom"\n')
    world.publish("1.0.0", seed=1)
    before = world.snapshot()
    old = os.umask(0o027)  # as the unit runs the agent
    try:
        r = world.cli("agent", "update", "--config", str(world.conf_path), "--once")
    finally:
        os.umask(old)
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    warnings = [ln for ln in r.stderr.splitlines() if "metrics textfile" in ln]
    assert len(warnings) == 1, r.stderr
    assert str(blocker) in warnings[0]
    # installed and committed: counter moved once, `current` names the new slot
    after = world.snapshot()
    assert world.active_version() == "1.0.0"
    assert after.counter == before.counter + 1 and after.current is not None
    status = json.loads((world.state / "status.json").read_bytes())
    assert status.get("last_error") is None
    # the activation notice for modelward-activate@.path names what was activated
    activated = json.loads((world.state / ACTIVATED_FILE).read_bytes())
    assert (activated["name"], activated["version"]) == ("classifier", "1.0.0")
    _assert_group_reads_the_model(world)


def _assert_group_reads_the_model(world: World) -> None:
    """With the unit's UMask=0027 and the 0750 state dir, SupplementaryGroups=modelward in
    the inference drop-in is enough: every directory on the way to the model is group
    r-x, every file group r, nothing group- or world-writable, nothing world-readable."""
    state = world.state
    slot = (state / "current").resolve()
    paths = [state, state / "slots", slot, *sorted(slot.rglob("*"))]
    assert len(paths) > 4
    for p in paths:
        mode = p.lstat().st_mode
        if stat.S_ISDIR(mode):
            assert mode & 0o050 == 0o050, (p, oct(mode))
        else:
            assert stat.S_ISREG(mode), p
            assert mode & 0o040, (p, oct(mode))
        assert mode & 0o022 == 0, (p, oct(mode))  # only the agent writes
        assert mode & 0o007 == 0, (p, oct(mode))  # others: nothing
