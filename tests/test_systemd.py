"""systemd units: they verify, and their exposure stays low (issue #4 must-show 5)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

UNITS = Path(__file__).resolve().parents[1] / "systemd"
# systemd-analyze: one worker, alone (scripts/test)
pytestmark = [pytest.mark.xdist_group("machine"),
              pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                                 reason="systemd-analyze missing (scripts/setup installs it)")]


def _installed_copy(tmp_path: Path, name: str) -> Path:
    """The unit with ExecStart pointing at this checkout's modelward (verify checks it)."""
    exe = Path(sys.executable).parent / "modelward"
    text = (UNITS / name).read_text().replace("/usr/bin/modelward", str(exe))
    out = tmp_path / name
    out.write_text(text)
    return out


@pytest.mark.parametrize("unit", ["modelward-agent.service", "modelward-bootcheck.service"])
def test_unit_verifies(tmp_path: Path, unit: str) -> None:
    r = subprocess.run(["systemd-analyze", "verify", str(_installed_copy(tmp_path, unit))],
                       capture_output=True, text=True, check=False)
    assert r.returncode == 0, r.stderr
    assert r.stderr.strip() == "", r.stderr


@pytest.mark.parametrize("unit", ["modelward-agent.service", "modelward-bootcheck.service"])
def test_exposure_is_at_most_2_5(unit: str) -> None:
    r = subprocess.run(["systemd-analyze", "security", "--offline=yes", str(UNITS / unit)],
                       capture_output=True, text=True, check=False)
    m = re.search(r"Overall exposure level for \S+: ([0-9.]+)", r.stdout)
    assert m, r.stdout + r.stderr
    assert float(m.group(1)) <= 2.5, r.stdout


def test_agent_unit_runs_unprivileged_with_tpm_and_watchdog() -> None:
    text = (UNITS / "modelward-agent.service").read_text()
    for line in ("Type=notify", "User=modelward", "SupplementaryGroups=tss",
                 "DeviceAllow=/dev/tpmrm0 rw", "StateDirectory=modelward", "NoNewPrivileges=yes"):
        assert line in text
    assert re.search(r"^WatchdogSec=\d+", text, re.M)
    sysusers = (UNITS / "modelward.sysusers.conf").read_text()
    assert "u modelward" in sysusers and "m modelward tss" in sysusers


# --- the activation notice (issue 15): a template, verified as an instance -------------

@pytest.mark.parametrize("unit", ["modelward-activate@.path", "modelward-activate@.service"])
def test_activation_units_verify(tmp_path: Path, unit: str) -> None:
    for name in ("modelward-activate@.path", "modelward-activate@.service"):
        (tmp_path / name).write_text((UNITS / name).read_text())
    inst = tmp_path / unit.replace("@.", "@inference.")
    r = subprocess.run(["systemd-analyze", "verify", str(inst)],
                       capture_output=True, text=True, check=False)
    assert r.returncode == 0, r.stderr
    assert r.stderr.strip() == "", r.stderr


def test_activation_service_exposure_is_at_most_2_5(tmp_path: Path) -> None:
    inst = tmp_path / "modelward-activate@inference.service"
    inst.write_text((UNITS / "modelward-activate@.service").read_text())
    r = subprocess.run(["systemd-analyze", "security", "--offline=yes", str(inst)],
                       capture_output=True, text=True, check=False)
    m = re.search(r"Overall exposure level for \S+: ([0-9.]+)", r.stdout)
    assert m, r.stdout + r.stderr
    assert float(m.group(1)) <= 2.5, r.stdout


# --- the online host's refresh unit (issue 14, must-show 4) ---------------------------

REFRESH = "modelward-repo-refresh.service"


def test_refresh_unit_verifies(tmp_path: Path) -> None:
    r = subprocess.run(["systemd-analyze", "verify", str(_installed_copy(tmp_path, REFRESH))],
                       capture_output=True, text=True, check=False)
    assert r.returncode == 0, r.stderr
    assert r.stderr.strip() == "", r.stderr


def test_refresh_unit_exposure_is_at_most_2_5() -> None:
    r = subprocess.run(["systemd-analyze", "security", "--offline=yes", str(UNITS / REFRESH)],
                       capture_output=True, text=True, check=False)
    m = re.search(r"Overall exposure level for \S+: ([0-9.]+)", r.stdout)
    assert m, r.stdout + r.stderr
    assert float(m.group(1)) <= 2.5, r.stdout


def test_refresh_unit_sees_only_the_online_directory() -> None:
    """Parsed from the unit: the online directory read-only, the metadata writable, and
    every place an offline key directory may lie on a single machine hidden."""
    from modelward.publisher._online import CREDENTIAL
    from tests._i14_online_unit import directives, exec_args, view

    d = directives()
    argv = exec_args(d)
    online, repo = argv[argv.index("--online-dir") + 1], argv[argv.index("--repo") + 1]
    assert "--keys" not in argv and argv[1:3] == ["repo", "refresh"]
    assert view(online, d) == "ro"
    assert view(f"{online}/snapshot.pem", d) == "ro"
    assert view(f"{repo}/metadata", d) == "rw"
    assert view(f"{repo}/targets", d) == "hidden"  # refresh needs no bundles
    for keys in ("/var/lib/modelward-keys", "/var/lib/modelward/keys", "/srv/modelward-keys",
                 "/etc/modelward/keys", "/root/keys", "/home/operator/keys",
                 "/opt/modelward/keys", "/mnt/usb/keys", "/media/usb/keys", "/tmp/keys",
                 "/etc/credstore/modelward-key-passphrase-root"):
        assert view(keys, d) == "hidden", keys
    # passphrases only as credentials, one per online role, never in the environment
    creds = {c.split(":")[0] for c in d["LoadCredential"]}
    assert creds == {CREDENTIAL.format(role=r) for r in ("snapshot", "timestamp")}
    assert "Environment" not in d and "EnvironmentFile" not in d
    assert d["PrivateNetwork"] == ["yes"] and d["IPAddressDeny"] == ["any"]
    assert d["User"] == ["modelward-repo"] and d["CapabilityBoundingSet"] == []
    sysusers = (UNITS / "modelward-repo.sysusers.conf").read_text()
    assert "u modelward-repo" in sysusers


def test_refresh_unit_view_model_catches_a_widened_unit() -> None:
    """The view model is not vacuous: without the TemporaryFileSystem= line a key directory
    under /var is visible."""
    from tests._i14_online_unit import UNIT, directives, view

    text = "\n".join(ln for ln in UNIT.read_text().splitlines()
                     if not ln.startswith("TemporaryFileSystem="))
    assert view("/var/lib/modelward-keys", directives(text)) == "ro"


# --- updates from local media (issue 19): udev rule, mount and service examples --------

MEDIA = UNITS / "examples" / "media"


def test_media_units_verify(tmp_path: Path) -> None:
    exe = Path(sys.executable).parent / "modelward"
    for name in ("media-modelward.mount", "modelward-media-update.service"):
        (tmp_path / name).write_text(
            (MEDIA / name).read_text().replace("/usr/bin/modelward", str(exe)))
    for name in ("media-modelward.mount", "modelward-media-update.service"):
        r = subprocess.run(["systemd-analyze", "verify", str(tmp_path / name)],
                           capture_output=True, text=True, check=False)
        assert r.returncode == 0, r.stderr
        assert r.stderr.strip() == "", r.stderr


def test_media_service_exposure_is_at_most_2_5_and_it_has_no_network() -> None:
    unit = MEDIA / "modelward-media-update.service"
    r = subprocess.run(["systemd-analyze", "security", "--offline=yes", str(unit)],
                       capture_output=True, text=True, check=False)
    m = re.search(r"Overall exposure level for \S+: ([0-9.]+)", r.stdout)
    assert m, r.stdout + r.stderr
    assert float(m.group(1)) <= 2.5, r.stdout
    text = unit.read_text()
    for line in ("PrivateNetwork=yes", "IPAddressDeny=any", "User=modelward",
                 "BindsTo=media-modelward.mount", "ReadOnlyPaths=/media/modelward"):
        assert line in text


def test_media_rule_mount_and_service_name_the_same_label_path_and_command() -> None:
    from modelward.cli import build_parser

    rule = (MEDIA / "90-modelward-media.rules").read_text()
    mount = (MEDIA / "media-modelward.mount").read_text()
    service = (MEDIA / "modelward-media-update.service").read_text()
    assert 'ENV{ID_FS_LABEL}=="MODELWARD"' in rule
    assert 'SYSTEMD_WANTS}+="modelward-media-update.service"' in rule
    assert "What=/dev/disk/by-label/MODELWARD" in mount
    assert "Where=/media/modelward" in mount  # (the unit's name is its escaped path)
    assert re.search(r"^Options=ro,nosuid,nodev,noexec$", mount, re.M)
    assert re.search(r"^Type=vfat$", mount, re.M)  # (only that driver parses the medium)
    assert 'ENV{ID_BUS}=="usb|mmc"' in rule and 'ENV{ID_FS_TYPE}=="vfat|exfat"' in rule
    exec_start = re.search(r"^ExecStart=(\S+) (.*)$", service, re.M)
    assert exec_start and exec_start.group(1) == "/usr/bin/modelward"
    args = build_parser().parse_args(exec_start.group(2).split())
    assert args.source_dir == Path("/media/modelward") and args.once
    assert args.expired_grace is None  # off by default
