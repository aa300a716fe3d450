"""Agent configuration errors name the file and the setting."""

from __future__ import annotations

from pathlib import Path

import pytest

from modelward.agent._config import load_config
from modelward.agent.errors import ConfigError

GOOD = """\
device_id = "d"
fleet = "f"
state_dir = "state"
tcti = "swtpm:port=1"
model = "m"
[https]
metadata_url = "https://o/metadata/"
targets_url = "https://o/targets/"
ca_file = "ca.pem"
"""


def test_good_config_resolves_relative_paths(tmp_path: Path) -> None:
    p = tmp_path / "a.toml"
    p.write_text(GOOD)
    (tmp_path / "ca.pem").write_text("x")
    cfg = load_config(p)
    assert cfg.state_dir == tmp_path / "state"
    assert cfg.updater.https.ca_file == str(tmp_path / "ca.pem")
    assert cfg.updater.model == "m"


@pytest.mark.parametrize(
    "text,key",
    [
        (GOOD.replace('model = "m"\n', ""), "model"),
        (GOOD.replace('metadata_url = "https://o/metadata/"\n', ""), "https.metadata_url"),
        (GOOD.replace('fleet = "f"', "fleet = 3"), "fleet"),
        (GOOD.split("[https]")[0], "https"),
    ],
)
def test_missing_or_mistyped_setting_is_named(tmp_path: Path, text: str, key: str) -> None:
    p = tmp_path / "a.toml"
    (tmp_path / "ca.pem").write_text("x")
    p.write_text(text)
    with pytest.raises(ConfigError) as ei:
        load_config(p)
    assert ei.value.key == key
    assert str(p) in str(ei.value)


def test_bad_toml(tmp_path: Path) -> None:
    p = tmp_path / "a.toml"
    p.write_text("device_id = ")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(p)


def test_plain_http_is_refused_when_the_config_loads(tmp_path: Path) -> None:
    p = tmp_path / "a.toml"
    (tmp_path / "ca.pem").write_text("x")
    p.write_text(GOOD.replace("https://o/metadata/", "http://o/metadata/"))
    with pytest.raises(ConfigError, match="not an https") as ei:  # at load, not at update
        load_config(p)
    assert ei.value.key == "https.metadata_url"
