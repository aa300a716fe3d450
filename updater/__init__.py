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
    UpdaterConfig,
    UpdateResult,
    boot_check,
    download_to_staging,
    update_once,
)
from updater._semver import SemVer
from updater._slots import SlotStore

__all__ = [
    "FORMAT",
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
