"""The Debian package of the device agent (issue 15, must-show 2 and 3).

``scripts/build-deb`` is run once for the module (offline, from the wheelhouse), the
package is installed on this machine with ``apt-get install ./modelward-agent_*.deb``,
its installed units are checked with ``systemd-analyze``, and the installed venv (a fresh
``modelward[device]``, no onnx, rich or pkcs11) provisions a fresh swtpm, updates over
HTTPS (nginx), passes the boot check and, as a daemon, installs an update announced over
MQTT (mosquitto). ``apt-get remove`` then leaves the state directory alone. The machine is
left as it was found: the package is purged, the user and directories it made removed.
Needs root and apt; skipped on a machine that already has a modelward installation.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from modelward.agent._observe import ACTIVATED_FILE
from modelward.simulator._demo import write_device_config
from modelward.simulator._origin import start_origin, stop_origin
from modelward.simulator._pki import CertPair
from modelward.simulator._swtpm import start_swtpm, stop_swtpm
from tests.conftest import FLEET, MqttWorld

ROOT = Path(__file__).resolve().parents[2]
PREFIX = Path("/opt/modelward")
BIN = Path("/usr/bin/modelward")
UNITDIR = Path("/usr/lib/systemd/system")
STATE = Path("/var/lib/modelward")
MADE = (PREFIX, BIN, STATE, Path("/var/lib/modelward-tpm"), Path("/etc/modelward"))
# A clean environment for the installed binary: nothing of the test venv leaks in.
ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8", "TSS2_LOG": "all+NONE"}


def _why_skip() -> str | None:
    if os.geteuid() != 0:
        return "installs a package: needs root"
    for tool in ("apt-get", "dpkg-deb", "systemd-analyze", "systemd-sysusers"):
        if shutil.which(tool) is None:
            return f"{tool} missing"
    if not (ROOT / ".venv" / "wheelhouse").is_dir():
        return "no .venv/wheelhouse (scripts/setup builds it)"
    r = subprocess.run(["dpkg-query", "-W", "-f=${Status}", "modelward-agent"],
                       capture_output=True, text=True, check=False)
    if "installed" in r.stdout or any(p.exists() or p.is_symlink() for p in MADE):
        return "a modelward installation is already on this machine: not touched"
    if subprocess.run(["getent", "passwd", "modelward"], capture_output=True,
                      check=False).returncode == 0:
        return "user modelward exists already: not touched"
    return None


# installs the .deb into /opt/modelward and the system: one worker, alone (scripts/test)
pytestmark = [pytest.mark.xdist_group("machine"),
              pytest.mark.skipif(_why_skip() is not None, reason=str(_why_skip()))]


def _run(*argv: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), capture_output=True, text=True, env=ENV,
                          timeout=timeout, check=False)


def _apt(*argv: str) -> subprocess.CompletedProcess[str]:
    env = dict(ENV, DEBIAN_FRONTEND="noninteractive")
    return subprocess.run(["apt-get", "-y", "-q", *argv], capture_output=True, text=True,
                          env=env, timeout=300, check=False)


@dataclass
class Installed:
    deb: Path
    control: str
    install_log: str
    seconds: dict[str, float]


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Installed]:
    """The package built and installed; purged and cleaned up afterwards."""
    out = tmp_path_factory.mktemp("deb")
    opt_existed = Path("/opt").exists()
    t0 = time.monotonic()
    b = subprocess.run([str(ROOT / "scripts" / "build-deb"), "-o", str(out), "--compression",
                        "zstd"], capture_output=True, text=True, timeout=600, check=False)
    assert b.returncode == 0, b.stderr
    deb = Path(b.stdout.strip().splitlines()[-1])
    t1 = time.monotonic()
    try:
        # apt resolves the Depends against what is installed: no network is used
        r = subprocess.run(["apt-get", "install", "-y", "-q", f"./{deb.name}"], cwd=out,
                           capture_output=True, text=True, timeout=300, check=False,
                           env=dict(ENV, DEBIAN_FRONTEND="noninteractive"))
        assert r.returncode == 0, r.stdout + r.stderr
        control = subprocess.run(["dpkg-deb", "-f", str(deb)], capture_output=True,
                                 text=True, check=True).stdout
        yield Installed(deb, control, r.stdout,
                        {"build": t1 - t0, "install": time.monotonic() - t1})
    finally:
        _apt("purge", "modelward-agent")
        for p in MADE:
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            elif p.exists() or p.is_symlink():
                p.unlink()
        if subprocess.run(["getent", "passwd", "modelward"], capture_output=True,
                          check=False).returncode == 0:
            subprocess.run(["userdel", "modelward"], check=False)
        if subprocess.run(["getent", "group", "modelward"], capture_output=True,
                          check=False).returncode == 0:
            subprocess.run(["groupdel", "modelward"], check=False)
        if not opt_existed and Path("/opt").is_dir() and not any(Path("/opt").iterdir()):
            Path("/opt").rmdir()


def test_deb_name_depends_and_contents(installed: Installed) -> None:
    """modelward-agent_<version>_<arch>.deb; Depends names the interpreter, systemd and the
    TSS libraries tpm2-pytss links (found from the installed .so, not written by hand)."""
    import tomllib

    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    arch = subprocess.run(["dpkg", "--print-architecture"], capture_output=True, text=True,
                          check=True).stdout.strip()
    assert installed.deb.name == f"modelward-agent_{version}_{arch}.deb"
    depends = re.search(r"^Depends: (.*)$", installed.control, re.M)
    assert depends, installed.control
    deps = {d.strip() for d in depends.group(1).split(",")}
    assert "python3 (>= 3.11)" in deps and "systemd" in deps
    so = next((PREFIX / "lib").glob("python3.*/site-packages/tpm2_pytss/_libtpm2_pytss*.so"))
    needed = re.findall(r"NEEDED\s+(libtss2-\S+)", _run("objdump", "-p", str(so)).stdout)
    assert needed
    for lib in needed:  # each linked TSS library's package is a dependency
        owner = _run("dpkg", "-S", f"*/{lib}").stdout.split(":")[0]
        assert owner in deps, (lib, owner, deps)
    assert "libtss2-tcti-device0" in deps  # loaded at run time for /dev/tpmrm0
    # the files: the venv, the command, units, sysusers/tmpfiles, the example config
    assert os.readlink(BIN) == str(PREFIX / "bin" / "modelward")
    assert (PREFIX / "bin" / "modelward").read_text().splitlines()[0] == \
        f"#!{PREFIX}/bin/python3.11 -I"
    for unit in ("modelward-agent.service", "modelward-bootcheck.service",
                 "modelward-activate@.path", "modelward-activate@.service"):
        assert (UNITDIR / unit).is_file(), unit
    assert Path("/usr/lib/sysusers.d/modelward.conf").is_file()
    examples = Path("/usr/share/modelward/examples")
    for f in ("inference.service.d/modelward.conf", "inference_app.py", "inference.service"):
        assert (examples / f).is_file(), f
    assert Path("/usr/lib/tmpfiles.d/modelward.conf").is_file()
    conffiles = subprocess.run(["dpkg-query", "--control-show", "modelward-agent",
                                "conffiles"], capture_output=True, text=True, check=True)
    assert conffiles.stdout.split() == ["/etc/modelward/agent.toml"]
    example = Path("/etc/modelward/agent.toml").read_text()
    assert all(ln.startswith("#") for ln in example.splitlines() if ln.strip())
    # postinst made the user (in group tss) and the state directories, 0750 and 0700
    ids = _run("id", "-nG", "modelward").stdout.split()
    assert "modelward" in ids and "tss" in ids
    assert STATE.stat().st_mode & 0o7777 == 0o750
    assert Path("/var/lib/modelward-tpm").stat().st_mode & 0o7777 == 0o700
    assert STATE.owner() == "modelward"
    # nothing of the build machine's paths is left in the venv
    stray = _run("grep", "-rlI", "/tmp/modelward-deb", str(PREFIX))
    assert stray.stdout == "", stray.stdout


@pytest.mark.parametrize("unit", ["modelward-agent.service", "modelward-bootcheck.service",
                                  "modelward-activate@inference.path",
                                  "modelward-activate@inference.service"])
def test_installed_units_verify(installed: Installed, unit: str) -> None:
    """The installed units as systemd loads them (ExecStart= /usr/bin/modelward exists now;
    templates as an instance). No systemd as PID 1 is needed: verify loads files."""
    r = _run("systemd-analyze", "verify", str(UNITDIR / unit))
    assert r.returncode == 0, r.stderr
    assert r.stderr.strip() == "", r.stderr


def test_installed_agent_unit_exposure_is_at_most_2_5(installed: Installed) -> None:
    for unit in ("modelward-agent.service", "modelward-bootcheck.service"):
        r = _run("systemd-analyze", "security", "--offline=true", str(UNITDIR / unit))
        m = re.search(r"Overall exposure level for \S+: ([0-9.]+)", r.stdout)
        assert m, r.stdout + r.stderr
        assert float(m.group(1)) <= 2.5, r.stdout


def test_installed_modelward_agent_help(installed: Installed) -> None:
    r = _run(str(BIN), "agent", "--help")
    assert r.returncode == 0, r.stderr
    assert "provision" in r.stdout and "boot-check" in r.stdout


def test_installed_files_are_roots_and_not_writable_by_others(installed: Installed) -> None:
    """The agent runs as modelward: nothing it (or any other user) may write is executed."""
    bad = []
    for p in [PREFIX, *PREFIX.rglob("*")]:
        st = p.lstat()
        if st.st_uid != 0 or st.st_gid != 0:
            bad.append(f"{p}: owner {st.st_uid}:{st.st_gid}")
        if not p.is_symlink() and st.st_mode & 0o022:
            bad.append(f"{p}: mode {oct(st.st_mode)}")
    assert bad == [], bad[:5]


def test_installed_command_ignores_the_working_directory_and_pythonpath(
    installed: Installed, tmp_path: Path,
) -> None:
    """A planted ``modelward`` package (and ``agent``/``_child`` modules) in the working
    directory or on PYTHONPATH is never imported by the installed command."""
    marker = tmp_path / "planted-ran"
    for pkg in ("modelward", "agent", "updater"):
        (tmp_path / pkg).mkdir()
        (tmp_path / pkg / "__init__.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    (tmp_path / "agent" / "_child.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    env = dict(ENV, PYTHONPATH=str(tmp_path))
    r = subprocess.run([str(BIN), "agent", "--help"], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=60, check=False)
    assert r.returncode == 0, r.stderr
    assert not marker.exists()


def test_installed_venv_has_no_operator_dependencies(installed: Installed) -> None:
    """Must-show 2: the venv is modelward[device]; onnx and pkcs11 are absent. (rich and
    pygments are not: model-signing's sigstore dependency brings them, issue 19.)"""
    py = str(PREFIX / "bin" / "python3")
    for mod in ("onnx", "pkcs11", "boto3"):
        r = _run(py, "-I", "-c", f"import {mod}")
        assert r.returncode != 0 and f"No module named '{mod}'" in r.stderr, (mod, r.stderr)
    r = _run(py, "-I", "-c", "import tpm2_pytss, onnxruntime, numpy, tuf, paho.mqtt, "
             "modelward.agent._daemon, modelward.updater.install._health, "
             "model_signing._signing.sign_certificate, in_toto_attestation.v1.statement")
    assert r.returncode == 0, r.stderr


def _active(state: Path) -> str | None:
    cur = state / "current"
    if not cur.is_symlink():
        return None
    return str(json.loads((cur / "manifest.json").read_bytes())["version"])


def _wait_for(pred: object, timeout: float, what: str) -> None:
    assert callable(pred)
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def _as_agent(*argv: str) -> list[str]:
    """``argv`` as the unit runs it: user modelward (groups modelward, tss), umask 0027."""
    return ["setpriv", "--reuid=modelward", "--regid=modelward", "--init-groups", "--",
            "sh", "-c", 'umask 027; exec "$@"', "sh", *argv]


def test_installed_agent_provisions_updates_boot_checks_and_runs(
    installed: Installed, mqtt_world: MqttWorld, pki: tuple[CertPair, CertPair],
    tmp_path: Path,
) -> None:
    """Must-show 2 through the real stack, with the INSTALLED binary only, as the user
    modelward in the directories the package made (/var/lib/modelward and -tpm): a fresh
    swtpm provisioned by it, an update over HTTPS (nginx), the boot check, then the daemon
    installing an update announced over MQTT (mosquitto + serve-mqtt)."""
    w = mqtt_world
    ca, server = pki
    origin = start_origin(w.repo_dir, tmp_path / "origin-i15", server)
    tpm = start_swtpm(tmp_path / "tpm-i15")
    etc = Path("/etc/modelward")
    assert w.creds is not None
    shutil.copy(ca.cert, etc / "i15-ca.pem")
    password = etc / "i15-mqtt-password"
    shutil.copy(w.creds["dev-2"], password)
    shutil.chown(password, "modelward", "modelward")
    password.chmod(0o600)  # the agent's credential: not readable by its group
    root = etc / "i15-root.json"
    conf = write_device_config(
        etc / "i15-agent.toml", device_id="dev-2", fleet=FLEET, state=STATE,
        tcti=tpm.tcti, origin_url=origin.url, ca=etc / "i15-ca.pem", poll_interval=3600,
        mqtt={"host": "127.0.0.1", "port": w.broker_port, "ca_file": str(etc / "i15-ca.pem"),
              "password_file": str(password)})
    daemon: subprocess.Popen[str] | None = None
    try:
        w.publish("1.0.0", seed=1)
        shutil.copy(w.repo_dir / "metadata" / "1.root.json", root)
        r = _run(*_as_agent(str(BIN), "agent", "provision", "--config", str(conf),
                            "--root", str(root)))
        assert r.returncode == 0, r.stderr
        assert "provisioned" in r.stdout and "already present" not in r.stdout
        auth = next(Path("/var/lib/modelward-tpm").iterdir())
        assert auth.owner() == "modelward" and auth.stat().st_mode & 0o777 == 0o600
        r = _run(*_as_agent(str(BIN), "agent", "update", "--config", str(conf), "--once"))
        assert r.returncode == 0, r.stderr
        assert _active(STATE) == "1.0.0"
        r = _run(*_as_agent(str(BIN), "agent", "boot-check", "--config", str(conf)))
        assert r.returncode == 0, r.stderr
        assert "Traceback" not in r.stderr

        log = tmp_path / "daemon-i15.log"
        with open(log, "w") as f:
            daemon = subprocess.Popen(
                _as_agent(str(BIN), "-v", "agent", "run", "--config", str(conf)),
                stdout=subprocess.DEVNULL, stderr=f, env=ENV, text=True)
        # its first attempt finds 1.0.0 current; only the announcement brings 2.0.0
        _wait_for(lambda: "nothing to do" in log.read_text(), 30, "the first attempt")
        w.publish("2.0.0", seed=2)
        a = w.cli("announce", "--repo", str(w.repo_dir), *w.broker_args("modelward-operator"))
        assert a.returncode == 0, a.stderr
        _wait_for(lambda: _active(STATE) == "2.0.0", 40, "the announced update")
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(20) == 0, log.read_text()
        daemon = None
        # the activation notice the path unit watches names the new model
        activated = json.loads((STATE / ACTIVATED_FILE).read_text())
        assert activated["version"] == "2.0.0"
        assert "Traceback" not in log.read_text()
        # everything the agent made is its own (nothing root-owned that the unit could not
        # rewrite); others cannot enter the 0750 directory (some files in it are 0644)
        for p in [STATE, *STATE.rglob("*")]:
            assert p.owner() == "modelward" and p.group() == "modelward", p
            assert p.is_symlink() or p.lstat().st_mode & 0o002 == 0, p
        assert STATE.stat().st_mode & 0o777 == 0o750
    finally:
        if daemon is not None:
            daemon.kill()
            daemon.wait(10)
        stop_swtpm(tmp_path / "tpm-i15")
        stop_origin(tmp_path / "origin-i15")


def test_remove_keeps_the_state_directory(installed: Installed) -> None:
    """``apt-get remove`` takes /opt/modelward and /usr/bin/modelward, never the state."""
    keep = STATE / "keep-me"
    keep.write_text("a trusted model would be here\n")
    tpm_dir = Path("/var/lib/modelward-tpm")
    before = _tree(STATE) | _tree(tpm_dir)
    r = _apt("remove", "modelward-agent")
    assert r.returncode == 0, r.stdout + r.stderr
    assert keep.read_text() == "a trusted model would be here\n"
    assert _tree(STATE) | _tree(tpm_dir) == before  # (the record and model, if installed)
    assert STATE.is_dir() and tpm_dir.is_dir()
    assert not PREFIX.exists()
    assert not BIN.exists() and not BIN.is_symlink()
    assert not (UNITDIR / "modelward-agent.service").exists()
    # purge (the fixture's clean-up) removes the conffile, still not the state
    r = _apt("purge", "modelward-agent")
    assert r.returncode == 0, r.stdout + r.stderr
    assert keep.is_file() and not Path("/etc/modelward/agent.toml").exists()
    assert _tree(STATE) | _tree(tpm_dir) == before


def _tree(root: Path) -> dict[str, str]:
    from tests.conftest import tree_digest

    return {f"{root}/{k}": v for k, v in tree_digest(root).items()}
