"""swtpm lifecycle: manufacture with swtpm_setup, serve on loopback, stop by pid."""

from __future__ import annotations

import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from modelward.simulator._proc import free_port, read_pid, stop_pid, wait_for_port
from modelward.simulator.errors import ServiceError


@dataclass(frozen=True)
class SwtpmHandle:
    """A running swtpm."""

    state: Path
    port: int
    pid: int

    @property
    def tcti(self) -> str:
        """TCTI string for tpm2-pytss / tpm2-tools."""
        return f"swtpm:host=127.0.0.1,port={self.port}"


def _need(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        raise ServiceError(
            f"{tool} is not installed", service="swtpm",
            hint="apt-get install swtpm swtpm-tools (the README's set-up does this)",
        )
    return path


EK_CA_BUNDLE = "ek-ca.pem"


def _ek_ca_config(ca_dir: Path) -> Path:
    """swtpm_setup and swtpm_localca configuration for a local EK CA kept in ``ca_dir``
    (swtpm_localca creates its root CA and issuer there on first use)."""
    ca_dir = ca_dir.absolute()
    ca_dir.mkdir(parents=True, exist_ok=True)
    localca = ca_dir / "swtpm-localca.conf"
    localca.write_text(f"statedir = {ca_dir}\nsigningkey = {ca_dir}/signkey.pem\n"
                       f"issuercert = {ca_dir}/issuercert.pem\n"
                       f"certserial = {ca_dir}/certserial\n")
    options = ca_dir / "swtpm-localca.options"
    options.write_text("--platform-manufacturer modelward\n--platform-version 2.1\n"
                       "--platform-model simulator\n")
    setup = ca_dir / "swtpm_setup.conf"
    setup.write_text(f"create_certs_tool = {_need('swtpm_localca')}\n"
                     f"create_certs_tool_config = {localca}\n"
                     f"create_certs_tool_options = {options}\n"
                     "active_pcr_banks = sha256\n")
    return setup


def ek_ca_bundle(ca_dir: Path) -> Path:
    """The CA certificates (root and issuer) of the local EK CA in ``ca_dir``, for
    ``fleet add-device --ek-ca``; written next to them.

    Raises:
        ServiceError: no swtpm was manufactured with this CA yet.
    """
    try:
        pem = (ca_dir / "swtpm-localca-rootca-cert.pem").read_bytes() + \
            (ca_dir / "issuercert.pem").read_bytes()
    except OSError as e:
        raise ServiceError(f"no EK CA in {ca_dir}: {e}", service="swtpm",
                           hint="manufacture a TPM with it first (`sim tpm start "
                           "--ek-ca DIR`)") from e
    out = ca_dir / EK_CA_BUNDLE
    out.write_bytes(pem)
    return out


def manufacture(state: Path, ek_ca: Path | None = None) -> bool:
    """Create the TPM state (EK) with swtpm_setup unless it exists; True if created.

    The storage root key is left to ``modelward agent provision``, which creates the
    TCG ECC P-256 SRK design.md names (swtpm_setup's ``--create-spk`` makes P-384).

    Args:
        state: the swtpm state directory.
        ek_ca: a directory for a local EK CA: the EK (and platform) certificates are
            issued from it and stored in the TPM's NV (0x01c00002 for the RSA EK), as a
            TPM manufacturer does; :func:`ek_ca_bundle` gives its certificates.
    """
    state.mkdir(parents=True, exist_ok=True)
    if (state / "tpm2-00.permall").exists():
        return False
    cmd = [_need("swtpm_setup"), "--tpm2", "--tpmstate", str(state), "--createek",
           "--pcr-banks", "sha256", "--not-overwrite"]
    if ek_ca is not None:
        cmd += ["--create-ek-cert", "--create-platform-cert",
                "--config", str(_ek_ca_config(ek_ca))]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise ServiceError(
            f"swtpm_setup failed for {state}: {proc.stderr.strip() or proc.stdout.strip()}",
            service="swtpm",
        )
    return True


_START_ATTEMPTS = 4


def _log_tail(log: Path, limit: int = 400) -> str:
    """The last ``limit`` characters of swtpm's log, or "" when there is none."""
    try:
        with log.open("rb") as f:
            f.seek(0, 2)
            f.seek(max(0, f.tell() - limit))
            return f.read().decode("utf-8", "replace").strip()
    except OSError:
        return ""


def start_swtpm(state: Path, port: int | None = None, ek_ca: Path | None = None) -> SwtpmHandle:
    """Start swtpm on 127.0.0.1 (server ``port``, control ``port+1``); manufacture first
    (with EK certificates from the local CA ``ek_ca``, see :func:`manufacture`).

    Idempotent: a swtpm already running for ``state`` is returned as it is.

    Raises:
        ServiceError: swtpm is missing or did not come up.
    """
    manufacture(state, ek_ca)
    pid_file = state / "swtpm.pid"
    port_file = state / "swtpm.port"
    pid = read_pid(pid_file)
    if pid is not None and port_file.exists():
        return SwtpmHandle(state, int(port_file.read_text()), pid)
    log = state / "swtpm.log"
    # A port can be briefly unavailable (another test's connection holding it as its
    # source port, the previous swtpm still releasing it): try again, on the same port
    # when the caller named one (its devices are configured with it), else on a new one.
    chosen = port
    reason = ""
    for attempt in range(_START_ATTEMPTS):
        port = chosen or free_port(2)
        proc = subprocess.run(
            [
                _need("swtpm"), "socket", "--tpm2",
                "--tpmstate", f"dir={state}",
                "--server", f"type=tcp,port={port},bindaddr=127.0.0.1",
                "--ctrl", f"type=tcp,port={port + 1},bindaddr=127.0.0.1",
                "--flags", "not-need-init,startup-clear",
                "--daemon", "--pid", f"file={pid_file}", "--log", f"file={log},level=1",
            ],
            capture_output=True, text=True, check=False,
        )
        if proc.returncode == 0 and wait_for_port(port):
            break
        stop_pid(pid_file)
        reason = proc.stderr.strip() or _log_tail(log) or f"exit code {proc.returncode}"
        time.sleep(0.5 * (attempt + 1))
    else:
        raise ServiceError(
            f"swtpm did not start on port {port} after {_START_ATTEMPTS} tries: {reason}",
            service="swtpm", log=str(log),
        )
    port_file.write_text(str(port))
    pid = read_pid(pid_file)
    if pid is None:
        raise ServiceError("swtpm started but wrote no pid file", service="swtpm", log=str(log))
    return SwtpmHandle(state, port, pid)


def stop_swtpm(state: Path) -> bool:
    """Stop the swtpm serving ``state``; True if one was running."""
    (state / "swtpm.port").unlink(missing_ok=True)
    return stop_pid(state / "swtpm.pid")
