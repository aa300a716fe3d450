"""`modelward announce` reads the served timestamp.json as untrusted: no symlink followed, no
FIFO waited on, bounded, and a version that is not a positive integer is refused, before
anything is sent to the broker (no broker runs here: reaching it would be an error)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from modelward.publisher._bridge import announce
from modelward.trust.errors import OperatorInputError
from modelward.updater._config import MqttConfig

CFG = MqttConfig(host="127.0.0.1", port=1, fleet="f", client_name="modelward-operator",
                 ca_file="/nonexistent", password="x")


def _repo(tmp_path: Path) -> Path:
    (tmp_path / "metadata").mkdir()
    return tmp_path


@pytest.mark.parametrize("plant", ["symlink", "fifo", "dir", "big", "missing"])
def test_announce_refuses_a_planted_timestamp_file(tmp_path: Path, plant: str) -> None:
    repo = _repo(tmp_path)
    ts = repo / "metadata" / "timestamp.json"
    if plant == "symlink":
        ts.symlink_to("/dev/zero")
    elif plant == "fifo":
        os.mkfifo(ts)  # opening it blocking would hang forever
    elif plant == "dir":
        ts.mkdir()
    elif plant == "big":
        with open(ts, "wb") as f:
            f.truncate(64 << 20)
    with pytest.raises(OperatorInputError, match="timestamp.json is unreadable") as e:
        announce(repo, CFG)
    assert "\n" not in str(e.value) and e.value.hint


@pytest.mark.parametrize("version", [True, 0, -1, "3", 1.5, None])
def test_announce_refuses_a_version_that_is_no_positive_integer(tmp_path: Path,
                                                                 version: object) -> None:
    repo = _repo(tmp_path)
    (repo / "metadata" / "timestamp.json").write_text(
        json.dumps({"signed": {"version": version}}))
    with pytest.raises(OperatorInputError, match="not a positive integer|unreadable"):
        announce(repo, CFG)
