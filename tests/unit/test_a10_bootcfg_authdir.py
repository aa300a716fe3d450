"""Attacker a10bootcfg (session 10): a state_dir spelled with a trailing ``..`` puts the TPM
auth directory inside the state directory.

``auth_dir_for`` (trust/_tpmauth.py:36) derives the auth directory from the spelling of
``state_dir``: ``STATE/trust/..`` is the state directory itself to the kernel, but its
``name`` is ``..``, so the auth value lands in ``STATE/trust/..-tpm``: inside the state
directory (and its trust directory), which the module says it must be outside of ("so
that a state directory lost or rolled back still heals from the TPM"). Both loaders,
boot-check's and the agent's, accept it (check_places, agent/_config_places.py, compares
the config and the trusted files with the state and auth directories, never the auth
directory with the state directory)."""

from __future__ import annotations

import os
from pathlib import Path

from modelward.agent._config import load_config
from modelward.agent._config_rules import load_boot_config
from modelward.agent.errors import ConfigError
from modelward.trust._tpmauth import auth_dir_for
from tests.unit._configbase import BASE, config_dir


def test_a10_state_dir_spelled_with_dotdot_is_refused(tmp_path: Path) -> None:
    d = config_dir(tmp_path)
    p = d / "agent.toml"
    p.write_text(BASE.replace('state_dir = "state"', 'state_dir = "state/trust/.."'))
    os.chmod(p, 0o600)
    state = Path(os.path.realpath(d / "state"))
    for load in (load_boot_config, load_config):
        try:
            cfg = load(p)
        except ConfigError as e:
            assert e.key == "state_dir"
            continue
        # accepted: then the auth directory must still be outside the state directory
        auth = Path(os.path.realpath(auth_dir_for(cfg.state_dir)))
        assert not auth.is_relative_to(state), f"{load.__name__}: TPM auth dir {auth} " \
            f"inside the state dir {state}"
