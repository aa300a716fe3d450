"""mosquitto on loopback with TLS and the settings `fleet broker-config` wrote (dynamic
security: passwords, client ids and ACLs)."""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from modelward.simulator._pki import CertPair
from modelward.simulator._proc import free_port, read_pid, stop_pid, wait_for_port
from modelward.simulator.errors import ServiceError

_CONF = """\
{user}
pid_file {work}/mosquitto.pid
persistence false
log_dest file {work}/mosquitto.log
log_type error
log_type warning
log_type notice
connection_messages true
{settings}
listener {port} 127.0.0.1
protocol mqtt
cafile {ca}
certfile {cert}
keyfile {key}
tls_version tlsv1.2
"""


@dataclass(frozen=True)
class BrokerHandle:
    """A running mosquitto."""

    work: Path
    port: int
    pid: int

    @property
    def url(self) -> str:
        """``mqtts://127.0.0.1:PORT``."""
        return f"mqtts://127.0.0.1:{self.port}"


def start_broker(
    work: Path, tls: CertPair, ca: Path, conf: Path, port: int | None = None
) -> BrokerHandle:
    """Start mosquitto (daemonised) with TLS on 127.0.0.1 and ``conf``, the
    ``modelward.conf`` that :func:`~modelward.publisher._broker_config.write_broker_config`
    wrote (settings, dynamic-security plugin and its file).

    Raises:
        ServiceError: mosquitto is missing or did not come up.
    """
    exe = shutil.which("mosquitto") or shutil.which("mosquitto", path="/usr/sbin:/sbin")
    if exe is None:
        raise ServiceError("mosquitto is not installed", service="mosquitto",
                           hint="apt-get install mosquitto (the README's set-up does this)")
    work.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    # As root mosquitto would drop to user `mosquitto`, which cannot read private test dirs.
    user = "user root" if os.geteuid() == 0 else ""
    main = work / "mosquitto.conf"
    # the very fragment `fleet broker-config` wrote to modelward.conf
    main.write_text(_CONF.format(user=user, work=work, port=port, ca=ca, cert=tls.cert,
                                 key=tls.key, settings=conf.read_text()))
    proc = subprocess.run([exe, "-c", str(main), "-d"], capture_output=True, text=True,
                          check=False)
    if proc.returncode != 0 or not wait_for_port(port):
        log = work / "mosquitto.log"
        tail = log.read_text()[-500:] if log.exists() else proc.stderr
        raise ServiceError(f"mosquitto did not start on port {port}: {tail.strip()}",
                           service="mosquitto", log=str(log))
    pid = read_pid(work / "mosquitto.pid")
    if pid is None:
        raise ServiceError("mosquitto wrote no pid file", service="mosquitto")
    return BrokerHandle(work, port, pid)


def stop_broker(work: Path) -> bool:
    """Stop the mosquitto whose pid file is in ``work``."""
    return stop_pid(work / "mosquitto.pid")
