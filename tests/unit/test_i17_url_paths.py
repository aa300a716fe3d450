"""Issue 17: ``repo init --repo s3://bucket/repo`` created a local directory named ``s3:``
and exited 0. A URL given where a local path is expected is a one-line usage error naming
the option (every path option of every command: none is a bare ``Path`` any more), and a
URL for a path key of agent.toml is a config error naming the key; nothing is created."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from modelward._inputs import local_path, url_scheme
from modelward.agent._config import load_config
from modelward.agent.errors import ConfigError
from modelward.cli import build_parser


def _actions(p: argparse.ArgumentParser) -> Iterator[tuple[str, argparse.Action]]:
    for a in p._actions:
        if isinstance(a, argparse._SubParsersAction):
            for sub in a.choices.values():
                yield from _actions(sub)
        else:
            yield p.prog, a


def test_no_path_option_takes_a_url() -> None:
    typed = [(prog, a.option_strings or a.dest) for prog, a in _actions(build_parser())
             if a.type is Path]
    assert typed == []  # each path option is local_path
    assert sum(a.type is local_path for _, a in _actions(build_parser())) >= 40


@pytest.mark.parametrize("text", ["s3://bucket/repo", "https://cdn.example/repo",
                                  "gs://b", "file:///tmp/x", "S3+x.y-z://b"])
def test_urls_are_refused(text: str) -> None:
    assert url_scheme(text) is not None
    with pytest.raises(argparse.ArgumentTypeError, match="URL, not a local path"):
        local_path(text)


@pytest.mark.parametrize("text", ["repo", "./s3:/x", "/srv/repo", "a:b", "3s://x", "-x"])
def test_paths_are_paths(text: str) -> None:
    assert local_path(text) == Path(text)


@pytest.mark.parametrize("argv", [
    ["repo", "init", "--repo", "s3://bucket/repo", "--keys", "keys"],
    ["repo", "init", "--repo", "repo", "--keys", "s3://bucket/keys"],
    ["fleet", "status", "--fleet-dir", "https://x/fleet", "--broker", "mqtts://h:1",
     "--fleet", "f"],
    ["agent", "status", "--config", "s3://b/agent.toml"],
])
def test_a_url_for_a_path_is_one_line_and_creates_nothing(argv: list[str],
                                                           tmp_path: Path) -> None:
    env = {**os.environ, "MODELWARD_KEY_PASSPHRASE": "correct horse battery staple"}
    r = subprocess.run([sys.executable, "-I", "-m", "modelward", *argv], cwd=tmp_path,
                       capture_output=True, text=True, timeout=60, env=env, check=False)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "URL, not a local path" in lines[0], r.stderr
    assert "Traceback" not in r.stderr
    assert list(tmp_path.iterdir()) == []  # no directory named s3: (or https:)


def test_a_url_for_a_config_path_names_the_key(tmp_path: Path) -> None:
    conf = tmp_path / "agent.toml"
    conf.write_text('device_id = "d"\nfleet = "f"\nstate_dir = "s3://bucket/state"\n'
                    'tcti = "swtpm:port=1"\nmodel = "m"\n[https]\n'
                    'metadata_url = "https://o/m/"\ntargets_url = "https://o/t/"\n')
    with pytest.raises(ConfigError, match=r"state_dir.*s3:// URL; this key takes a local"):
        load_config(conf)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["agent.toml"]
