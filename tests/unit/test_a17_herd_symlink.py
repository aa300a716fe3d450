"""Attack on issue 17 (7e2525c), the disk: ``state_dir/metadata`` replaced by a symlink to
a directory outside ``state_dir`` (in the moment between an attempt's child exiting and
the daemon reading its timestamp; the child itself refuses such a state directory).

Tried: ``Daemon._trusted_version`` on that state directory (the real method, on a
:class:`~modelward.agent._daemon.Daemon` built from a real config; no TPM or broker is
needed for this read). What happened: it opens ``metadata/timestamp.json`` through the
link and returns the version found outside ``state_dir``, which ``Schedule.finished``
then takes as the handled floor. The cause: it calls ``read_json_file`` without
``parent_nofollow`` (``O_NOFOLLOW`` covers the last component only), against the design's
"never open a path in state_dir through a symlink" and "make the agent touch anything
outside state_dir". What stays unchanged: the file outside is only read, and the regular
``metadata/`` directory still gives its own version (asserted).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from modelward.agent._config import load_config
from modelward.agent._daemon import Daemon


def _daemon(tmp_path: Path) -> Daemon:
    p = tmp_path / "agent.toml"
    p.write_text(f'device_id = "d"\nfleet = "f"\nstate_dir = "{tmp_path}/s"\n'
                 f'tcti = "swtpm:port=1"\nmodel = "m"\n[https]\n'
                 f'metadata_url = "https://o/m/"\ntargets_url = "https://o/t/"\n')
    return Daemon(load_config(p), {})


def _ts(directory: Path, version: int) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "timestamp.json").write_text(json.dumps(
        {"signed": {"_type": "timestamp", "version": version}, "signatures": []}))


@pytest.mark.xfail(strict=True, reason="a17 herd: _trusted_version follows a symlinked "
                   "metadata/ out of state_dir (no parent_nofollow)")
def test_a17_herd_trusted_version_is_not_read_through_a_symlinked_metadata_dir(
        tmp_path: Path) -> None:
    d = _daemon(tmp_path)
    meta = tmp_path / "s" / "metadata"
    _ts(meta, 5)
    assert d._trusted_version() == 5  # (a plain directory is read: the hint works)
    elsewhere = tmp_path / "elsewhere"
    _ts(elsewhere, 2**62)
    meta.rename(tmp_path / "s" / "metadata.old")
    meta.symlink_to(elsewhere, target_is_directory=True)
    got = d._trusted_version()
    assert json.loads((elsewhere / "timestamp.json").read_text())["signed"]["version"] \
        == 2**62  # (only read)
    assert got is None, got


@pytest.mark.xfail(strict=True, reason="a17 herd: _trusted_version reads a hard link to a "
                   "file outside state_dir (no single_link)")
def test_a17_herd_trusted_version_is_not_read_through_a_hard_link(tmp_path: Path) -> None:
    """Tried: ``metadata/timestamp.json`` as a second hard link to a file outside
    ``state_dir``. What happened: read, its version returned (``read_json_file`` without
    ``single_link``; ``read_bounded`` documents that a hard link can name such a file)."""
    d = _daemon(tmp_path)
    _ts(tmp_path / "elsewhere", 2**62)
    meta = tmp_path / "s" / "metadata"
    meta.mkdir(parents=True)
    (meta / "timestamp.json").hardlink_to(tmp_path / "elsewhere" / "timestamp.json")
    got = d._trusted_version()
    assert (tmp_path / "elsewhere" / "timestamp.json").stat().st_nlink == 2  # (only read)
    assert got is None, got
