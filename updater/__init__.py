"""Getting and installing model bundles: TUF session, fetchers, bundle reader, slots, health.

Exports load on first use (PEP 562), so a process imports only what it touches: the
idle agent daemon stays free of the TUF, TPM and HTTPS stacks.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from trust._lazy import lazy_getattr

_EXPORTS: dict[str, str] = {
    "AnnouncementListener": "updater._mqttconn",
    "BootResult": "updater._install",
    "BundleFile": "updater._bundle",
    "FORMAT": "updater._bundle",
    "HealthConfig": "updater._config",
    "HttpsConfig": "updater._config",
    "MANIFEST": "updater._bundle",
    "Manifest": "updater._bundle",
    "MqttConfig": "updater._config",
    "MqttConnection": "updater._mqttconn",
    "MqttFetcher": "updater._mqtt",
    "Outcome": "updater._install",
    "RangeFetcher": "updater._fetcher",
    "RequestsFetcher": "updater._fetcher",
    "SemVer": "updater._semver",
    "SlotStore": "updater._slots",
    "Source": "updater._install",
    "TensorSpec": "updater._bundle",
    "UpdateResult": "updater._install",
    "UpdaterConfig": "updater._config",
    "boot_check": "updater._install",
    "check_member_path": "updater._tarstream",
    "extract_bundle": "updater._bundle",
    "open_source": "updater._install",
    "parse_manifest": "updater._bundle",
    "run_health_check": "updater._health",
    "update_once": "updater._install",
}

__all__ = sorted(_EXPORTS)
__getattr__ = lazy_getattr(__name__, _EXPORTS)


if TYPE_CHECKING:
    from updater._bundle import (
        FORMAT as FORMAT,
    )
    from updater._bundle import (
        MANIFEST as MANIFEST,
    )
    from updater._bundle import (
        BundleFile as BundleFile,
    )
    from updater._bundle import (
        Manifest as Manifest,
    )
    from updater._bundle import (
        TensorSpec as TensorSpec,
    )
    from updater._bundle import (
        extract_bundle as extract_bundle,
    )
    from updater._bundle import (
        parse_manifest as parse_manifest,
    )
    from updater._config import (
        HealthConfig as HealthConfig,
    )
    from updater._config import (
        HttpsConfig as HttpsConfig,
    )
    from updater._config import (
        MqttConfig as MqttConfig,
    )
    from updater._config import (
        UpdaterConfig as UpdaterConfig,
    )
    from updater._fetcher import (
        RangeFetcher as RangeFetcher,
    )
    from updater._fetcher import (
        RequestsFetcher as RequestsFetcher,
    )
    from updater._health import (
        run_health_check as run_health_check,
    )
    from updater._install import (
        BootResult as BootResult,
    )
    from updater._install import (
        Outcome as Outcome,
    )
    from updater._install import (
        Source as Source,
    )
    from updater._install import (
        UpdateResult as UpdateResult,
    )
    from updater._install import (
        boot_check as boot_check,
    )
    from updater._install import (
        open_source as open_source,
    )
    from updater._install import (
        update_once as update_once,
    )
    from updater._mqtt import (
        MqttFetcher as MqttFetcher,
    )
    from updater._mqttconn import (
        AnnouncementListener as AnnouncementListener,
    )
    from updater._mqttconn import (
        MqttConnection as MqttConnection,
    )
    from updater._semver import (
        SemVer as SemVer,
    )
    from updater._slots import (
        SlotStore as SlotStore,
    )
    from updater._tarstream import (
        check_member_path as check_member_path,
    )
