"""Operator tooling: repository, keys, bundle writer, publishing."""

from publisher._bridge import Bridge, announce
from publisher._broker_config import BrokerConfig, write_broker_config
from publisher._bundle_build import BuildOptions, build_bundle, generate_vectors
from publisher._fleet import DeviceRow, add_device, collect_status, format_table
from publisher._keys import ROLES, generate_key, load_signer
from publisher._repo import Expiry, PublishResult, Repository

__all__ = [
    "DeviceRow",
    "add_device",
    "collect_status",
    "format_table",
    "Bridge",
    "BrokerConfig",
    "announce",
    "write_broker_config",
    "ROLES",
    "BuildOptions",
    "Expiry",
    "PublishResult",
    "Repository",
    "build_bundle",
    "generate_key",
    "generate_vectors",
    "load_signer",
]
