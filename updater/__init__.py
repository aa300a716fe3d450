"""Getting and installing model bundles: TUF session, fetchers, bundle reader, slots, health."""

from updater._bundle import (
    FORMAT,
    MANIFEST,
    BundleFile,
    Manifest,
    TensorSpec,
    check_member_path,
    extract_bundle,
    parse_manifest,
)
from updater._fetcher import HttpsConfig, RangeFetcher, RequestsFetcher
from updater._health import HealthConfig, run_health_check
from updater._install import (
    BootResult,
    Outcome,
    Source,
    UpdaterConfig,
    UpdateResult,
    boot_check,
    download_to_staging,
    open_source,
    update_once,
)
from updater._mqtt import AnnouncementListener, MqttConfig, MqttConnection, MqttFetcher
from updater._semver import SemVer
from updater._slots import SlotStore

__all__ = [
    "FORMAT",
    "AnnouncementListener",
    "MqttConfig",
    "MqttConnection",
    "MqttFetcher",
    "Source",
    "open_source",
    "MANIFEST",
    "BootResult",
    "BundleFile",
    "HealthConfig",
    "HttpsConfig",
    "Manifest",
    "Outcome",
    "RangeFetcher",
    "RequestsFetcher",
    "SemVer",
    "SlotStore",
    "TensorSpec",
    "UpdateResult",
    "UpdaterConfig",
    "boot_check",
    "check_member_path",
    "download_to_staging",
    "extract_bundle",
    "parse_manifest",
    "run_health_check",
    "update_once",
]
