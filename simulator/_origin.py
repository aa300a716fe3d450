"""nginx as the static HTTPS origin of a repository, on loopback."""

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
worker_processes 1;
pid {work}/nginx.pid;
error_log {work}/error.log warn;
events {{ worker_connections 64; }}
http {{
    access_log {work}/access.log;
    client_body_temp_path {work}/tmp/body;
    proxy_temp_path {work}/tmp/proxy;
    fastcgi_temp_path {work}/tmp/fastcgi;
    uwsgi_temp_path {work}/tmp/uwsgi;
    scgi_temp_path {work}/tmp/scgi;
    types {{ application/json json; application/x-tar tar; }}
    default_type application/octet-stream;
    sendfile on;
    server {{
        listen 127.0.0.1:{port} ssl;{http_listen}
        ssl_certificate {cert};
        ssl_certificate_key {key};
        root {root};
        autoindex off;{limit}
        location / {{ try_files $uri =404; }}
    }}
}}
"""


@dataclass(frozen=True)
class OriginHandle:
    """A running HTTPS origin."""

    work: Path
    port: int
    pid: int

    @property
    def url(self) -> str:
        """Base URL of the served directory."""
        return f"https://127.0.0.1:{self.port}"


def start_origin(
    root: Path, work: Path, tls: CertPair, port: int | None = None,
    unsafe_plain_http_port: int | None = None, limit_rate: int | None = None,
) -> OriginHandle:
    """Serve ``root`` over HTTPS on 127.0.0.1 with nginx (daemonised, pid in ``work``).

    ``unsafe_plain_http_port`` adds a plain-HTTP listener; only benchmarks use it, as the
    "curl over HTTP" reference. Devices refuse http:// URLs. ``limit_rate`` (bytes/s per
    connection) makes a slow origin for the slow-retrieval attack.

    Raises:
        ServiceError: nginx is missing or did not come up.
    """
    nginx = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/sbin")
    if nginx is None:
        raise ServiceError("nginx is not installed", service="nginx",
                           hint="apt-get install nginx-light (the README's set-up does this)")
    work.mkdir(parents=True, exist_ok=True)
    (work / "tmp").mkdir(exist_ok=True)
    port = port or free_port()
    # As root, nginx workers would drop to `nobody`, which cannot read private test dirs.
    user = "user root root;" if os.geteuid() == 0 else ""
    conf = work / "nginx.conf"
    http_listen = (f"\n        listen 127.0.0.1:{unsafe_plain_http_port};"
                   if unsafe_plain_http_port else "")
    conf.write_text(_CONF.format(user=user, work=work, port=port, cert=tls.cert, key=tls.key,
                                 root=root.resolve(), http_listen=http_listen,
                                 limit=(f"\n        limit_rate {limit_rate};"
                                        if limit_rate else "")))
    proc = subprocess.run([nginx, "-p", str(work), "-c", str(conf)],
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0 or not wait_for_port(port):
        raise ServiceError(f"nginx did not start on port {port}: {proc.stderr.strip()}",
                           service="nginx", log=str(work / "error.log"))
    pid = read_pid(work / "nginx.pid")
    if pid is None:
        raise ServiceError("nginx wrote no pid file", service="nginx")
    return OriginHandle(work, port, pid)


def stop_origin(work: Path) -> bool:
    """Stop the nginx whose pid file is in ``work``."""
    return stop_pid(work / "nginx.pid")
