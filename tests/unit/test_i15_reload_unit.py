"""``[activation] reload_unit`` and ``restart`` were removed (issue 15): systemd's
``modelward-activate@UNIT.path`` reloads the inference unit. An old config that still has
them keeps loading (an upgraded device keeps booting), and says, each time it loads and in
``check-config``, what to enable instead; no systemctl is ever run."""

from __future__ import annotations

import json
import logging
import subprocess
from pathlib import Path

import pytest

from modelward.agent._config import ActivationConfig, check_config, load_config
from modelward.agent._observe import ACTIVATED_FILE, notify_activation
from modelward.agent.errors import ConfigError
from modelward.trust._record import ModelRef
from tests.unit._configbase import BASE


def _conf(tmp_path: Path, activation: str) -> Path:
    (tmp_path / "ca.pem").write_text("pem")
    p = tmp_path / "agent.toml"
    p.write_text(BASE + "\n[activation]\n" + activation + "\n")
    return p


def test_i15_reload_unit_loads_with_a_notice_naming_the_path_unit(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    p = _conf(tmp_path, 'reload_unit = "inference.service"\nrestart = true\ntimeout = 5')
    with caplog.at_level(logging.WARNING, "modelward.agent"):
        cfg = load_config(p)
    assert cfg.activation == ActivationConfig(timeout=5.0)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2 and all(str(p) in line and "\n" not in line for line in lines)
    assert "systemctl enable --now modelward-activate@inference.path" in lines[0]
    assert "[activation] reload_unit" in lines[0] and "[activation] restart" in lines[1]
    shown = list(check_config(p))
    assert any("modelward-activate@inference.path" in line and line.startswith("# ")
               for line in shown)
    assert not any(line.startswith(("reload_unit", "restart")) for line in shown)


def test_i15_no_notice_without_the_removed_keys(tmp_path: Path,
                                                caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, "modelward.agent"):
        load_config(_conf(tmp_path, "timeout = 5"))
    assert caplog.records == []


def test_i15_a_typo_next_to_it_is_still_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="reload_unitt.*unknown key"):
        load_config(_conf(tmp_path, 'reload_unitt = "x"'))


def test_i15_an_odd_value_is_escaped_in_the_notice(tmp_path: Path,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, "modelward.agent"):
        load_config(_conf(tmp_path, 'reload_unit = "a\\nb\\u001b[31m"'))
    (line,) = [r.getMessage() for r in caplog.records]
    assert "\n" not in line and "\x1b" not in line
    with caplog.at_level(logging.WARNING, "modelward.agent"):
        load_config(_conf(tmp_path, "reload_unit = 5"))
    assert "modelward-activate@UNIT.path" in caplog.records[-1].getMessage()


def test_i15_activation_runs_no_systemctl(tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    ran: list[object] = []
    monkeypatch.setattr(subprocess, "run", lambda cmd, **kw: ran.append(cmd))
    cfg = load_config(_conf(tmp_path, 'reload_unit = "inference.service"'))
    ref = ModelRef(name="classifier", version="2.0.0", fingerprint="ab" * 32, slot="b")
    r = notify_activation(cfg.activation, tmp_path, ref)
    assert ran == [] and r["ok"] is True
    assert json.loads((tmp_path / ACTIVATED_FILE).read_text())["version"] == "2.0.0"
