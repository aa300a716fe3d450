"""What every load of ``agent.toml`` checks after each key alone (``_config_schema``), and
the loader of ``agent boot-check``.

:func:`check_rules` holds the rules across keys: the places (``_config_places``), the MQTT
secret and certificate pair, a transport that is configured. The full loader
(``_config.py``) builds its dataclasses after it; :func:`load_boot_config` runs the same
validation and rules on the same file, then keeps only what booting uses: no transport,
health or idle dataclasses are built or imported (issue 15: the boot unit's time).
"""

from __future__ import annotations

import logging
from pathlib import Path

from modelward.agent._config_places import check_places
from modelward.agent._config_schema import (
    DEFAULT_CONFIG,
    HINT,
    TOP,
    Resolved,
    read_document,
    read_secret,
    validate,
)
from modelward.agent.errors import ConfigError
from modelward.trust._plain import Frozen


def check_rules(r: Resolved, *, need_transport: bool = True
                ) -> tuple[tuple[str, ...], str | None]:
    """The rules across keys of a validated configuration: (the transports in the order
    they are tried, the MQTT password if any, read from ``password_file`` if set).

    ``need_transport=False`` (``agent update --from DIR``: local media): a file without
    ``[https]`` or ``[mqtt]`` is valid, and gives no transports.

    Raises:
        ConfigError: a place at fault (``check_places``), both ``password`` and
            ``password_file``, an unreadable password file, ``cert_file`` without
            ``key_file`` or the reverse, no transport section, a transport that is not
            configured.
    """
    check_places(r)  # across keys, and the places they name (before a secret is read)
    path = r.path
    password: str | None = None
    if "mqtt" in r.present:
        password = r.get("mqtt", "password")
        pw_file: Path | None = r.get("mqtt", "password_file")
        if pw_file is not None:
            if password is not None:
                raise ConfigError(f"{path}: [mqtt] password_file: set password or "
                                  "password_file, not both", path=str(path),
                                  key="mqtt.password_file")
            password = read_secret(pw_file, "mqtt", "password_file", path)
        cert, key = r.get("mqtt", "cert_file"), r.get("mqtt", "key_file")
        if (cert is None) != (key is None):
            missing = "key_file" if key is None else "cert_file"
            raise ConfigError(f"{path}: [mqtt] {missing}: missing (cert_file and key_file "
                              "go together)", path=str(path), key=f"mqtt.{missing}")
    configured = [k for k in ("https", "mqtt") if k in r.present]
    if not configured and not need_transport:
        return (), password
    if not configured:
        raise ConfigError(f"{path}: configure [https], [mqtt] or both", path=str(path),
                          key="https", hint=HINT)
    if "https" in configured and "mqtt" in configured and \
            r.section_order.index("mqtt") < r.section_order.index("https"):
        configured.reverse()  # "auto" tries them in file order
    transport: str = r.get(TOP, "transport")
    if transport == "auto":
        return tuple(configured), password
    if transport in configured:
        return (transport,), password
    raise ConfigError(
        f"{path}: transport: {transport!r} is not configured (configured: "
        f"{', '.join(f'[{c}]' for c in configured)}; or \"auto\")", path=str(path),
        key="transport")


class BootConfig(Frozen):
    """What ``agent boot-check`` uses of a configuration that loaded in full.

    Attributes:
        path: where it was read from.
        state_dir: the agent's state directory.
        tcti: TPM TCTI string.
        tpm_wait: seconds to wait for a TPM that does not answer (yet).
        metrics_textfile: ``[metrics] textfile`` (None: ``STATE_DIR/metrics.prom``).
    """

    __slots__ = ("path", "state_dir", "tcti", "tpm_wait", "metrics_textfile")
    path: Path
    state_dir: Path
    tcti: str
    tpm_wait: float
    metrics_textfile: Path | None

    def __init__(self, path: Path, state_dir: Path, tcti: str, tpm_wait: float,
                 metrics_textfile: Path | None) -> None:
        self._set(path, state_dir, tcti, tpm_wait, metrics_textfile)


def resolve(path: Path | None) -> Resolved:
    """Read and validate the file at ``path`` (default ``/etc/modelward/agent.toml``), and
    log its notices (a removed key: ignored, said each time it loads).

    Raises:
        ConfigError: unreadable file, bad TOML, unknown, missing or invalid setting.
    """
    path = DEFAULT_CONFIG if path is None else path
    r = validate(read_document(path), path)
    for notice in r.notices:
        logging.getLogger("modelward.agent").warning(notice)
    return r


def load_boot_config(path: Path | None = None) -> BootConfig:
    """Read and validate a configuration exactly as ``load_config`` does (every key, the
    rules across keys, the password file read), keeping what booting uses.

    Raises:
        ConfigError: unreadable file, bad TOML, unknown, missing or invalid setting.
    """
    r = resolve(path)
    check_rules(r, need_transport=False)  # (a device updated from media only boots too)
    return BootConfig(path=r.path, state_dir=r.get(TOP, "state_dir"), tcti=r.get(TOP, "tcti"),
                      tpm_wait=r.get("agent", "tpm_wait"),
                      metrics_textfile=r.get("metrics", "textfile"))
