"""Round 2 of the issue-19 attacks: the device's disk after a crash, through the real
device (swtpm decryption key, nginx origin, the agent's ``update``): plaintext that an
interrupted attempt decrypted in ``staging/`` must not stay there when no later attempt
installs that release."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from modelward.publisher._encrypt import content_key
from modelward.simulator._fleet import enroll_device
from modelward.updater.errors import NotARecipientError
from modelward.updater.install import _install
from tests._a19_enc import build_enc, enroll_soft, holds, plain_pattern, trusted
from tests.conftest import World
from tests.integration._i16_delta import big_model, drop_index


def _crash_after_decryption(w: World) -> None:
    """Power loss right after the staged files were decrypted in place (nothing cleaned
    up, the record not moved)."""
    from modelward.updater.install._stage import Stage

    real = _install.decrypt_incoming  # type: ignore[attr-defined]

    def die(state_dir: Path, incoming: Path, *a: Any) -> None:
        real(state_dir, incoming, *a)
        raise KeyboardInterrupt

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(_install, "decrypt_incoming", die)
        mp.setattr(Stage, "discard", lambda self: None)
        with pytest.raises(KeyboardInterrupt):
            w.update()


@pytest.mark.parametrize("path", ["delta", "whole"])
def test_plaintext_of_a_crashed_attempt_goes_when_the_device_is_revoked(
        world: World, tmp_path: Path, path: str) -> None:
    """The device crashed after decrypting 1.0.0 in staging/; the operator then revokes
    it (1.1.0 for another device only). Its next attempt is refused before anything is
    fetched, and must not leave 1.0.0's plaintext in staging/ (a disk attacker reads it:
    the release was not installed, it is no slot's)."""
    w = world
    fleet = tmp_path / "fleet"
    fleet.mkdir()
    assert enroll_device(fleet, w.conf_path, tmp_path / "challenge.json") == "dev-1"
    enroll_soft(fleet, "dev-2")
    w.publish("0.9.0", seed=1)
    w.update()
    r = w.repo.publish(build_enc(big_model(w.builds / "big-1.onnx"), w.builds / "c-1.tar",
                                 content_key(fleet, "classifier", ["dev-1"]), "1.0.0"))
    if path == "whole":
        drop_index(w.repo, w.repo_dir, r.target_path)
    _crash_after_decryption(w)
    assert holds(w.state / "staging", plain_pattern())  # (the precondition: plaintext there)
    before = trusted(w)
    w.repo.publish(build_enc(big_model(w.builds / "big-2.onnx", changed_rows=16),
                             w.builds / "c-2.tar", content_key(fleet, "classifier",
                                                               ["dev-2"]), "1.1.0"))
    with pytest.raises(NotARecipientError):
        w.update()
    assert trusted(w) == before
    assert not holds(w.state / "staging", plain_pattern())
    # (1.1.0 remembered as refused, the device takes 1.0.0, still signed for it: what it
    # was sent before the revocation stays its own; downloaded again, not from staging/)
    w.update()
    assert w.active_version() == "1.0.0"
    assert not holds(w.state / "staging", plain_pattern())


def test_an_attempt_after_a_crash_after_decryption_still_installs(
        world: World, tmp_path: Path) -> None:
    """The same crash, the release still for this device: the next attempt installs it
    (its plaintext in staging/ is dropped, the delta re-encrypts what the slots hold)."""
    w = world
    fleet = tmp_path / "fleet"
    fleet.mkdir()
    assert enroll_device(fleet, w.conf_path, tmp_path / "challenge.json") == "dev-1"
    w.repo.publish(build_enc(big_model(w.builds / "big-1.onnx"), w.builds / "c-1.tar",
                             content_key(fleet, "classifier", ["dev-1"]), "1.0.0"))
    _crash_after_decryption(w)
    w.update()
    assert w.active_version() == "1.0.0"
    assert not holds(w.state / "staging", plain_pattern())
