"""Issue 15: ``agent boot-check`` builds only booting's part of the configuration
(``load_boot_config``), yet refuses every file the full loader refuses, with the same
error, including faults in the sections it does not build (transports, health, idle)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from modelward.agent._config import load_config
from modelward.agent._config_rules import BootConfig, load_boot_config
from modelward.agent.errors import ConfigError
from tests.unit._configbase import BASE, config_dir

MQTT = '[mqtt]\nhost = "broker"\nport = 8883\n'


@pytest.mark.parametrize(
    "text",
    [
        BASE + "min_sped = 3\n",  # unknown key of [https]
        BASE.replace('ca_file = "ca.pem"', 'ca_file = "nope.pem"'),  # a file that is not there
        BASE.replace("https://o.example/metadata/", "http://o.example/metadata/"),
        BASE + "min_speed = 0\n",
        BASE + MQTT.replace("8883", "0"),
        BASE + MQTT + "keepalive = 3\n",  # unknown key of [mqtt]
        BASE + MQTT + 'password = "p"\npassword_file = "pw"\n',
        BASE + MQTT + 'cert_file = "ca.pem"\n',  # without key_file
        BASE + MQTT + 'password_file = "loose"\n',  # readable by others
        BASE.replace('model = "m"', 'model = "m"\ntransport = "mqtt"'),  # not configured
        BASE + "[health]\nnice = 99\n",
        BASE + '[idle]\nwindows = ["25:00-26:00"]\n',
        BASE + "[idel]\n",  # unknown section
        BASE + '[activation]\ncommand = "not a list"\n',
        BASE + "[agent]\ntpm_wait = -1\n",
        BASE + '[metrics]\ntextfile = "state/trust/m.prom"\n',
    ],
)
def test_boot_loader_refuses_what_the_full_loader_refuses(tmp_path: Path, text: str) -> None:
    d = config_dir(tmp_path)
    for name, mode in (("pw", 0o600), ("loose", 0o644)):
        (d / name).write_text("secret\n")
        os.chmod(d / name, mode)
    p = d / "agent.toml"
    p.write_text(text)
    os.chmod(p, 0o600)
    with pytest.raises(ConfigError) as full:
        load_config(p)
    with pytest.raises(ConfigError) as boot:
        load_boot_config(p)
    assert (str(boot.value), boot.value.key) == (str(full.value), full.value.key)
    assert str(p) in str(boot.value)


def test_a_device_without_a_transport_boots(tmp_path: Path) -> None:
    """Issue 19: a device updated only from local media has no [https] or [mqtt]: it
    boots (and `agent update --from` runs), the network commands refuse that config."""
    d = config_dir(tmp_path)
    p = d / "agent.toml"
    p.write_text(BASE.split("[https]")[0])
    os.chmod(p, 0o600)
    with pytest.raises(ConfigError, match=r"configure \[https\], \[mqtt\]"):
        load_config(p)
    assert load_config(p, need_transport=False).updater.transports == ()
    assert load_boot_config(p).state_dir == load_config(p, need_transport=False).state_dir


def test_boot_loader_keeps_what_booting_uses(tmp_path: Path) -> None:
    d = config_dir(tmp_path)
    (d / "pw").write_text("secret\n")
    os.chmod(d / "pw", 0o600)
    p = d / "agent.toml"
    p.write_text(BASE + MQTT + 'password_file = "pw"\n[agent]\ntpm_wait = 7\n'
                 '[metrics]\ntextfile = "m.prom"\n')
    os.chmod(p, 0o600)
    full = load_config(p)
    assert load_boot_config(p) == BootConfig(
        path=p, state_dir=full.state_dir, tcti=full.tcti, tpm_wait=full.tpm_wait,
        metrics_textfile=full.metrics_textfile)
    assert (full.tpm_wait, full.metrics_textfile) == (7.0, d / "m.prom")
    assert full.updater.mqtt is not None and full.updater.mqtt.password == "secret"


def test_boot_path_imports_no_transport_config_nor_release_choice() -> None:
    code = ("import sys; import modelward.agent._config_rules, modelward.agent._commands; "
            "print(' '.join(sorted(sys.modules)))")
    mods = set(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              check=True).stdout.split())
    assert "modelward.agent._config_rules" in mods
    assert {"modelward.updater._config", "modelward.agent._config",  # (update path's:)
            "modelward.updater.rollout", "modelward.updater.bundle._semver",
            "modelward.trust._provision"} & mods == set()
