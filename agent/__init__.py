"""The device agent: configuration, commands, logging."""

from agent._commands import (
    StatusFile,
    enroll,
    provision,
    run_boot_check,
    signed_report,
    status,
    update,
)
from agent._config import AgentConfig, load_config
from agent._daemon import Daemon, run_daemon
from agent._log import JsonFormatter, setup_logging

__all__ = [
    "AgentConfig",
    "Daemon",
    "JsonFormatter",
    "StatusFile",
    "load_config",
    "enroll",
    "provision",
    "signed_report",
    "run_daemon",
    "run_boot_check",
    "setup_logging",
    "status",
    "update",
]
