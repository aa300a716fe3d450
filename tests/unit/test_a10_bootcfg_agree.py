"""Attacker a10bootcfg (session 10): a careless operator or a disk attacker on agent.toml
looks for a file ``load_boot_config`` (boot-check) reads differently from ``load_config``
(the agent that updates): TOML spellings of the same key, path spellings of the state
dir, and secret files / config files that would make boot-check hang. Resisted: both run
``validate`` + ``check_rules`` on the same document (agent/_config_rules.py:104-106), and
every file is opened O_NONBLOCK and refused unless regular (_config_schema._open_regular)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from modelward.agent._config import load_config
from modelward.agent._config_rules import load_boot_config
from modelward.agent.errors import ConfigError
from tests.unit._configbase import BASE, config_dir

HEAD, _, HTTPS = BASE.partition("[https]")
HTTPS = "[https]" + HTTPS


@pytest.mark.parametrize(
    "text",
    [
        BASE.replace('state_dir = "state"', 'state_dir = "state/"'),  # trailing slash
        BASE.replace('state_dir = "state"', 'state_dir = "./x/../state//"'),
        BASE.replace('state_dir = "state"', 'state_dir = "\\u0073tate"'),  # unicode escape
        BASE.replace('tcti = "swtpm:port=1"', "tcti = 'swtpm:port=1'"),  # literal string
        BASE.replace('tcti = "swtpm:port=1"', 'tcti = """swtpm:port=1"""'),
        HEAD + "agent.tpm_wait = 7\nmetrics.textfile = \"m.prom\"\n" + HTTPS,  # dotted keys
        HEAD + "agent = { tpm_wait = 7 }\n" + HTTPS,  # inline table
        HEAD + HTTPS + "[agent]\ntpm_wait = 0\n",  # integer 0 (a float field)
        HEAD + HTTPS + "[agent]\ntpm_wait = 1e7\n",  # the bound
        HEAD + HTTPS + '[metrics]\ntextfile = "state/x.prom"\n',
        (HEAD + HTTPS).replace("\n", "\r\n"),  # CRLF
        HEAD + HTTPS + "[agent]\nstate_dir = \"other\"\n",  # misplaced: refused by both
        HEAD + HTTPS + '[agent]\ntcti = "device:/dev/tpm0"\n',  # misplaced: refused by both
        HEAD + 'tcti = "device:/dev/tpm0"\n' + HTTPS,  # duplicate key: refused by both
        HEAD + "agent.tpm_wait = 7\n[agent]\npoll_interval = 1\n" + HTTPS,  # table twice
        "\ufeff" + BASE,  # a BOM: refused by both
    ],
)
def test_a10_boot_and_full_loader_agree(tmp_path: Path, text: str) -> None:
    d = config_dir(tmp_path)
    p = d / "agent.toml"
    p.write_text(text, newline="")
    os.chmod(p, 0o600)
    try:
        full = load_config(p)
    except ConfigError as e:
        with pytest.raises(ConfigError) as boot_err:
            load_boot_config(p)
        assert (str(boot_err.value), boot_err.value.key) == (str(e), e.key)
        return
    boot = load_boot_config(p)
    assert (boot.path, boot.state_dir, boot.tcti, boot.tpm_wait, boot.metrics_textfile) == (
        full.path, full.state_dir, full.tcti, full.tpm_wait, full.metrics_textfile)
    assert os.path.realpath(boot.state_dir) == str((d / "state").resolve())


def _planted(d: Path, what: str) -> Path:
    if what == "fifo":
        os.mkfifo(d / "pw")
    elif what == "sparse":  # 64 GiB of holes: only the bounded prefix may be read
        with open(d / "pw", "wb") as f:
            f.truncate(64 << 30)
        os.chmod(d / "pw", 0o600)
    else:
        (d / "pw").symlink_to(what)
    return d / "pw"


@pytest.mark.parametrize("what", ["fifo", "/dev/zero", "/dev/urandom", "sparse"])
@pytest.mark.parametrize("as_config", [False, True])
def test_a10_boot_check_does_not_hang_on_a_planted_file(tmp_path: Path, what: str,
                                                        as_config: bool) -> None:
    """The real CLI, at once: a FIFO, an endless device or a sparse giant as the config
    itself or as its password_file is refused (exit 1, naming it), never read until the
    unit's timeout."""
    d = config_dir(tmp_path)
    pw = _planted(d, what)
    p = d / "agent.toml"
    p.write_text(HEAD + '[mqtt]\nhost = "broker"\nport = 8883\npassword_file = "pw"\n')
    os.chmod(p, 0o600)
    exe = Path(sys.executable).with_name("modelward")
    for cmd in ("boot-check", "check-config"):
        r = subprocess.run([str(exe), "agent", cmd, "--config", str(pw if as_config else p)],
                           capture_output=True, text=True, timeout=30, cwd=d)
        assert r.returncode == 1, r.stderr
        assert ("larger than" if what == "sparse" else "not a regular file") in r.stderr
