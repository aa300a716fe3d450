"""Attack on issue 17 (7e2525c), the disk: ``state_dir/metadata/timestamp.json`` replaced
by a symlinked directory, a hard link to a file outside ``state_dir``, or an unsigned
document of version 2**62. The daemon took that file's version as the handled floor
(``Daemon._trusted_version``), so every real announcement after it was ignored until the
poll timer. Fixed by its cause: the daemon reads no version from the state directory at
all. The only source is the attempt child's line naming the timestamp version its TUF
refresh verified (``agent._child.TIMESTAMP_LINE``), parsed strictly here."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from modelward.agent._child import TIMESTAMP_LINE
from modelward.agent._config import load_config
from modelward.agent._daemon import Daemon, verified_timestamp


def _daemon(tmp_path: Path) -> Daemon:
    p = tmp_path / "agent.toml"
    p.write_text(f'device_id = "d"\nfleet = "f"\nstate_dir = "{tmp_path}/s"\n'
                 f'tcti = "swtpm:port=1"\nmodel = "m"\n[https]\n'
                 f'metadata_url = "https://o/m/"\ntargets_url = "https://o/t/"\n')
    return Daemon(load_config(p), {})


def test_a17_herd_the_daemon_reads_no_version_from_the_state_dir(tmp_path: Path) -> None:
    d = _daemon(tmp_path)
    meta = tmp_path / "s" / "metadata"
    meta.mkdir(parents=True)
    (meta / "timestamp.json").write_text(json.dumps(
        {"signed": {"_type": "timestamp", "version": 2**62}, "signatures": []}))
    assert not hasattr(d, "_trusted_version")
    assert d.verified is None
    assert verified_timestamp(['{"report": 1}\n']) is None  # a child that said nothing


@pytest.mark.parametrize(("lines", "want"), [
    ([f"{TIMESTAMP_LINE}7\n", "{}\n"], 7),
    ([f"{TIMESTAMP_LINE}9223372036854775807\n"], 2**63 - 1),
    ([f"{TIMESTAMP_LINE}9223372036854775808\n"], None),  # 2**63
    ([f"{TIMESTAMP_LINE}{'9' * 4000}\n"], None),
    ([f"{TIMESTAMP_LINE}0\n"], None),
    ([f"{TIMESTAMP_LINE}-3\n"], None),
    ([f"{TIMESTAMP_LINE}\u0661\u0662\n"], None),  # (non-ASCII digits)
    ([f"{TIMESTAMP_LINE}7 8\n"], None),
    ([f"x{TIMESTAMP_LINE}7\n"], None),
    ([], None),
])
def test_a17_herd_the_childs_version_line_is_parsed_strictly(lines: list[str],
                                                              want: int | None) -> None:
    assert verified_timestamp(lines) == want
