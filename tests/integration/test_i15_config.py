"""Issue 15, must-show 5 (config part), through the real command: `agent check-config`,
config mistakes caught at load (before any TPM or network step, nothing moves), and
`agent status` with and without the TPM (swtpm)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from modelward.simulator._swtpm import stop_swtpm
from tests.conftest import World

EXIT_ERROR = 1


def _cli(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-I", "-m", "modelward", *argv], capture_output=True,
                          text=True, timeout=60, check=False)


def _one_line_error(r: subprocess.CompletedProcess[str]) -> str:
    assert r.returncode == EXIT_ERROR, (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr, r.stderr
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("modelward: error:")]
    assert len(errors) == 1, r.stderr
    return errors[0]


def test_i15_check_config_prints_every_key_and_hides_secrets(tmp_path: Path) -> None:
    (tmp_path / "ca.pem").write_text("pem")
    conf = tmp_path / "agent.toml"
    conf.write_text(
        'device_id = "d1"\nfleet = "f"\nstate_dir = "state"\ntcti = "swtpm:port=1"\n'
        'model = "m"\n[mqtt]\nhost = "broker.example"\nport = 8883\nca_file = "ca.pem"\n'
        'password = "hunter2-secret"\n[agent]\npoll_interval = 60\n')
    os.chmod(conf, 0o640)  # an inline password in a world-readable config is refused
    r = _cli("agent", "check-config", "--config", str(conf))
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "hunter2-secret" not in out + r.stderr
    assert "password = <set>" in out
    assert "poll_interval = 60.0\n" in out  # set in the file
    assert "tpm_wait = 120.0  # default" in out
    assert f'ca_file = "{tmp_path / "ca.pem"}"' in out
    assert "# [https]: not configured" in out
    assert "[health]" in out and "nice = 10  # default" in out

    conf.write_text(conf.read_text() + "[helth]\ntimeout = 5\n")
    line = _one_line_error(_cli("agent", "check-config", "--config", str(conf)))
    assert "[helth]: unknown section; did you mean [health]?" in line


def test_i15_default_config_path_is_etc_modelward(tmp_path: Path) -> None:
    line = _one_line_error(_cli("agent", "check-config"))
    assert "/etc/modelward/agent.toml" in line


def test_i15_config_mistakes_are_caught_at_load_and_nothing_moves(world: World) -> None:
    world.publish("1.0.0", seed=1)
    assert world.update().outcome.name == "INSTALLED"
    before = world.snapshot()
    good = world.conf_path.read_text()
    cases = {  # mistake -> what the one line must say
        good.replace(f'ca_file = "{world.ca.cert}"', 'ca_file = "/nonexistent/ca.pem"'):
            "[https] ca_file: cannot read /nonexistent/ca.pem",
        good.replace('metadata_url = "https://', 'metadata_url = "http://'):
            "[https] metadata_url: ",
        good.replace("[agent]\n", "[agent]\npoll_intervall = 5\n", 1):
            "[agent] poll_intervall: unknown key; did you mean poll_interval?",
    }
    for text, want in cases.items():
        world.conf_path.write_text(text)
        line = _one_line_error(world.cli("agent", "update", "--config", str(world.conf_path)))
        assert want in line, line
        assert "root.json" not in line  # not "Failed to download .../2.root.json"
    world.conf_path.write_text(good)
    assert world.snapshot() == before


def test_i15_status_verified_with_the_tpm_and_unverified_without(world: World) -> None:
    world.publish("1.0.0", seed=1)
    world.update()
    conf = str(world.conf_path)
    r = world.cli("agent", "status", "--config", conf)
    assert r.returncode == 0, r.stderr
    assert "UNVERIFIED" not in r.stdout and "verified  by the TPM" in r.stdout
    assert "classifier 1.0.0" in r.stdout

    stop_swtpm(world.tpm.state)
    r = world.cli("agent", "status", "--config", conf)
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].startswith("UNVERIFIED: the TPM is not available")
    assert world.tpm.tcti in lines[0]
    assert any(ln.startswith("active    classifier 1.0.0") for ln in lines)
    assert "verified  by the TPM" not in r.stdout
