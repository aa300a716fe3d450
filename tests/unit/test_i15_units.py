"""Units that do what the README says (issue 15), checked from the files themselves:
users, groups, the TPM ordering, the activation notice, the metrics path."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import tomllib
from pathlib import Path

import pytest

from modelward.agent._config import ActivationConfig
from modelward.agent._observe import (
    ACTIVATED_FILE,
    Metrics,
    notify_activation,
    write_activated,
)
from modelward.trust._record import ModelRef

SYSTEMD = Path(__file__).resolve().parents[2] / "systemd"
DROPIN = SYSTEMD / "examples" / "inference.service.d" / "modelward.conf"
UNITS = sorted(p for d in (SYSTEMD, SYSTEMD / "examples") for p in d.iterdir()
               if p.suffix in (".service", ".path", ".timer")) + [DROPIN]


def directives(path: Path) -> dict[str, list[str]]:
    """``Key=value`` lines of a unit file, every section together (values in order)."""
    out: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line[0] in "#;[" or "=" not in line:
            continue
        k, v = line.split("=", 1)
        out.setdefault(k.strip(), []).append(v.strip())
    return out


def sysusers() -> tuple[set[str], set[str]]:
    """(users, groups) that the shipped sysusers.d files create (u: a user and its group;
    g: a group; m: adds to a group, creating it)."""
    users: set[str] = set()
    groups: set[str] = set()
    for f in SYSTEMD.glob("*.sysusers.conf"):
        for line in f.read_text().splitlines():
            parts = line.split()
            if not parts or parts[0].startswith("#"):
                continue
            kind, name = parts[0], parts[1]
            if kind == "u":
                users.add(name)
                groups.add(name)
            elif kind == "g":
                groups.add(name)
            elif kind == "m":
                users.add(name)
                groups.add(parts[2])
    return users, groups


def missing_identities(units: list[Path]) -> list[str]:
    """Each ``User=``, ``Group=`` and ``SupplementaryGroups=`` name no sysusers.d file makes."""
    users, groups = sysusers()
    out = []
    for unit in units:
        d = directives(unit)
        if d.get("DynamicUser") == ["yes"]:
            out += [f"{unit.name}: User= with DynamicUser=yes"] if "User" in d else []
            continue
        out += [f"{unit.name}: User={u}" for u in d.get("User", []) if u not in users]
        out += [f"{unit.name}: group {g}" for g in
                d.get("Group", []) + " ".join(d.get("SupplementaryGroups", [])).split()
                if g not in groups]
    return out


def test_every_user_and_group_of_every_unit_is_made_by_sysusers() -> None:
    assert missing_identities(UNITS) == []
    named = {u for unit in UNITS for u in directives(unit).get("User", [])}
    assert named == {"modelward", "modelward-repo"}  # agent, boot check; refresh


def test_the_user_check_catches_a_missing_user(tmp_path: Path) -> None:
    unit = tmp_path / "x.service"
    unit.write_text("[Service]\nUser=modelward-online\nSupplementaryGroups=tss inference\n")
    assert missing_identities([unit]) == ["x.service: User=modelward-online",
                                          "x.service: group inference"]


def test_boot_check_waits_for_the_tpm_and_fails_clearly_without_one() -> None:
    d = directives(SYSTEMD / "modelward-bootcheck.service")
    assert "dev-tpmrm0.device" in " ".join(d["After"]).split()
    assert "dev-tpmrm0.device" in " ".join(d["Wants"]).split()
    # an assertion fails the unit (and so the inference unit that Requires= it); a
    # Condition would skip it and let the inference unit start unverified
    assert d["AssertPathExists"] == ["/dev/tpmrm0"]
    assert "/dev/tpmrm0" not in " ".join(d.get("ConditionPathExists", []))
    # a oneshot never waits for ever
    assert re.fullmatch(r"\d+", d["TimeoutStartSec"][0])
    # ... but long enough for its own waits (the device lock, then the TPM) and at least
    # 600 s to hash the active and the previous model: killed sooner, a large model
    # never boots after a late TPM
    from modelward.agent._config import AgentConfig
    from modelward.agent._lock import BOOT_WAIT

    tpm_wait = AgentConfig.__dataclass_fields__["tpm_wait"].default
    assert isinstance(tpm_wait, float)
    assert int(d["TimeoutStartSec"][0]) >= BOOT_WAIT + tpm_wait + 600


def test_inference_dropin_reads_the_model_as_group_modelward() -> None:
    d = directives(DROPIN)
    assert "modelward" in " ".join(d["SupplementaryGroups"]).split()
    assert d["Requires"] == ["modelward-bootcheck.service"]
    tmpfiles = (SYSTEMD / "modelward.tmpfiles.conf").read_text()
    assert re.search(r"^d /var/lib/modelward 0750 modelward modelward", tmpfiles, re.M)
    agent = directives(SYSTEMD / "modelward-agent.service")
    assert agent["StateDirectoryMode"] == ["0750"] and agent["UMask"] == ["0027"]


def test_activation_path_unit_watches_the_file_the_agent_replaces() -> None:
    path = directives(SYSTEMD / "modelward-activate@.path")
    assert path["PathChanged"] == [f"/var/lib/modelward/{ACTIVATED_FILE}"]
    assert path["Unit"] == ["modelward-activate@%i.service"]
    svc = directives(SYSTEMD / "modelward-activate@.service")
    # only a running inference unit is reloaded: a stopped one stays stopped
    assert svc["ExecStart"] == ["/usr/bin/systemctl try-reload-or-restart %i.service"]
    assert "User" not in svc  # systemd's own client, no polkit involved
    # Nothing as root acts on a name inside the agent's directory (a link planted there by
    # whoever has the agent's uid): the file is the agent's alone. Its first appearance
    # triggers the path unit too (PathChanged= fires when existence flips).
    tmpfiles = (SYSTEMD / "modelward.tmpfiles.conf").read_text()
    assert ACTIVATED_FILE not in tmpfiles


def test_metrics_directory_is_writable_by_the_agent_unit() -> None:
    agent = directives(SYSTEMD / "modelward-agent.service")
    assert agent["RuntimeDirectory"] == ["modelward"]
    assert agent["ProtectSystem"] == ["strict"]
    example = (SYSTEMD / "agent.example.toml").read_text()
    m = re.search(r'^# textfile = "(\S+)"', example, re.M)
    assert m and Path(m.group(1)).parent == Path("/run/modelward")


def test_example_config_is_all_comments_and_valid_toml_when_uncommented() -> None:
    text = (SYSTEMD / "agent.example.toml").read_text()
    assert tomllib.loads(text) == {}
    settings = "\n".join(ln[2:].split("  #")[0] for ln in text.splitlines()
                         if re.match(r"# (\[[a-z]+\]|[a-z_]+ = )", ln))
    doc = tomllib.loads(settings)
    assert doc["state_dir"] == "/var/lib/modelward"
    assert {"agent", "https", "mqtt", "health", "idle", "activation", "metrics"} <= set(doc)


# --- the agent's side ----------------------------------------------------------------

REF = ModelRef(name="classifier", version="2.0.0", fingerprint="ab" * 32, slot="b")


def test_activation_file_is_replaced_not_followed(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("keep")
    (tmp_path / ACTIVATED_FILE).symlink_to(victim)
    assert write_activated(tmp_path, REF) is None
    assert victim.read_text() == "keep"
    p = tmp_path / ACTIVATED_FILE
    assert not p.is_symlink() and p.stat().st_mode & 0o777 == 0o640
    assert json.loads(p.read_text()) == {"name": "classifier", "version": "2.0.0",
                                         "fingerprint": "ab" * 32}


def test_activation_file_unwritable_is_reported_not_raised(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    r = notify_activation(ActivationConfig(), tmp_path / "file", REF)
    assert r["ok"] is False and "activated" in r["detail"]


def test_unwritable_metrics_textfile_is_one_warning(tmp_path: Path,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "file").write_text("")
    with caplog.at_level(logging.WARNING, "modelward.agent"):
        assert Metrics().write_textfile(tmp_path / "file" / "metrics.prom") is False
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "metrics textfile" in warnings[0].getMessage()
    assert Metrics().write_textfile(tmp_path / "metrics.prom") is True
    assert os.path.getsize(tmp_path / "metrics.prom") > 0


def test_build_deb_names_a_missing_wheelhouse_in_one_line(tmp_path: Path) -> None:
    script = SYSTEMD.parent / "scripts" / "build-deb"
    r = subprocess.run([str(script), "-o", str(tmp_path), "--wheelhouse",
                        str(tmp_path / "nowhere")], capture_output=True, text=True,
                       timeout=60, check=False)
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == [
        f"build-deb: no wheelhouse at {tmp_path / 'nowhere'} (run scripts/setup)"]
    r = subprocess.run([str(script), "--frobnicate"], capture_output=True, text=True,
                       timeout=60, check=False)
    assert r.returncode == 2 and "unknown argument --frobnicate" in r.stderr
    assert list(tmp_path.iterdir()) == []
