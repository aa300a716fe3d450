"""Operator tooling: repository, keys, bundle writer, publishing.

Exports load on first use (PEP 562), so a process imports only what it touches: the
idle agent daemon stays free of the TUF, TPM and HTTPS stacks.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from trust._lazy import lazy_getattr

_EXPORTS: dict[str, str] = {
    "Bridge": "publisher._bridge",
    "BrokerConfig": "publisher._broker_config",
    "BuildOptions": "publisher._bundle_build",
    "DeviceRow": "publisher._fleet",
    "Expiry": "publisher._expiry",
    "PublishResult": "publisher._repo",
    "ROLES": "publisher._keys",
    "Repository": "publisher._repo",
    "RoleStatus": "publisher._repo",
    "add_device": "publisher._fleet",
    "announce": "publisher._bridge",
    "build_bundle": "publisher._bundle_build",
    "collect_status": "publisher._fleet",
    "format_table": "publisher._fleet",
    "generate_key": "publisher._keys",
    "generate_vectors": "publisher._bundle_build",
    "load_signer": "publisher._keys",
    "write_broker_config": "publisher._broker_config",
}

__all__ = sorted(_EXPORTS)
__getattr__ = lazy_getattr(__name__, _EXPORTS)


if TYPE_CHECKING:
    from publisher._bridge import (
        Bridge as Bridge,
    )
    from publisher._bridge import (
        announce as announce,
    )
    from publisher._broker_config import (
        BrokerConfig as BrokerConfig,
    )
    from publisher._broker_config import (
        write_broker_config as write_broker_config,
    )
    from publisher._bundle_build import (
        BuildOptions as BuildOptions,
    )
    from publisher._bundle_build import (
        build_bundle as build_bundle,
    )
    from publisher._bundle_build import (
        generate_vectors as generate_vectors,
    )
    from publisher._expiry import (
        Expiry as Expiry,
    )
    from publisher._fleet import (
        DeviceRow as DeviceRow,
    )
    from publisher._fleet import (
        add_device as add_device,
    )
    from publisher._fleet import (
        collect_status as collect_status,
    )
    from publisher._fleet import (
        format_table as format_table,
    )
    from publisher._keys import (
        ROLES as ROLES,
    )
    from publisher._keys import (
        generate_key as generate_key,
    )
    from publisher._keys import (
        load_signer as load_signer,
    )
    from publisher._repo import (
        PublishResult as PublishResult,
    )
    from publisher._repo import (
        Repository as Repository,
    )
    from publisher._repo import (
        RoleStatus as RoleStatus,
    )
