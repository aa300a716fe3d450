"""Tester tooling: swtpm lifecycle, test PKI, nginx HTTPS origin, model factory, demo.

Exports load on first use (PEP 562), so a process imports only what it touches: the
idle agent daemon stays free of the TUF, TPM and HTTPS stacks.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from trust._lazy import lazy_getattr

_EXPORTS: dict[str, str] = {
    "BrokerHandle": "simulator._broker",
    "CertPair": "simulator._pki",
    "OriginHandle": "simulator._origin",
    "RepoAttacker": "simulator._attacks",
    "SwtpmHandle": "simulator._swtpm",
    "free_port": "simulator._proc",
    "issue_cert": "simulator._pki",
    "make_ca": "simulator._pki",
    "make_linear_model": "simulator._models",
    "manufacture": "simulator._swtpm",
    "run_demo": "simulator._demo",
    "start_broker": "simulator._broker",
    "start_origin": "simulator._origin",
    "start_swtpm": "simulator._swtpm",
    "stop_broker": "simulator._broker",
    "stop_origin": "simulator._origin",
    "stop_swtpm": "simulator._swtpm",
    "wait_for_port": "simulator._proc",
    "write_device_config": "simulator._demo",
}

__all__ = sorted(_EXPORTS)
__getattr__ = lazy_getattr(__name__, _EXPORTS)


if TYPE_CHECKING:
    from simulator._attacks import (
        RepoAttacker as RepoAttacker,
    )
    from simulator._broker import (
        BrokerHandle as BrokerHandle,
    )
    from simulator._broker import (
        start_broker as start_broker,
    )
    from simulator._broker import (
        stop_broker as stop_broker,
    )
    from simulator._demo import (
        run_demo as run_demo,
    )
    from simulator._demo import (
        write_device_config as write_device_config,
    )
    from simulator._models import (
        make_linear_model as make_linear_model,
    )
    from simulator._origin import (
        OriginHandle as OriginHandle,
    )
    from simulator._origin import (
        start_origin as start_origin,
    )
    from simulator._origin import (
        stop_origin as stop_origin,
    )
    from simulator._pki import (
        CertPair as CertPair,
    )
    from simulator._pki import (
        issue_cert as issue_cert,
    )
    from simulator._pki import (
        make_ca as make_ca,
    )
    from simulator._proc import (
        free_port as free_port,
    )
    from simulator._proc import (
        wait_for_port as wait_for_port,
    )
    from simulator._swtpm import (
        SwtpmHandle as SwtpmHandle,
    )
    from simulator._swtpm import (
        manufacture as manufacture,
    )
    from simulator._swtpm import (
        start_swtpm as start_swtpm,
    )
    from simulator._swtpm import (
        stop_swtpm as stop_swtpm,
    )
