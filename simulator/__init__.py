"""Tester tooling: swtpm lifecycle, test PKI, nginx HTTPS origin, model factory, demo."""

from simulator._broker import BrokerHandle, start_broker, stop_broker
from simulator._demo import run_demo, write_device_config
from simulator._models import make_linear_model
from simulator._origin import OriginHandle, start_origin, stop_origin
from simulator._pki import CertPair, issue_cert, make_ca
from simulator._proc import free_port, wait_for_port
from simulator._swtpm import SwtpmHandle, manufacture, start_swtpm, stop_swtpm

__all__ = [
    "BrokerHandle",
    "start_broker",
    "stop_broker",
    "CertPair",
    "OriginHandle",
    "SwtpmHandle",
    "free_port",
    "issue_cert",
    "make_ca",
    "make_linear_model",
    "manufacture",
    "run_demo",
    "start_origin",
    "start_swtpm",
    "stop_origin",
    "stop_swtpm",
    "write_device_config",
    "wait_for_port",
]
