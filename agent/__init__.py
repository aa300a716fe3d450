"""The device agent: configuration, commands, logging.

Exports load on first use (PEP 562), so a process imports only what it touches: the
idle agent daemon stays free of the TUF, TPM and HTTPS stacks.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from trust._lazy import lazy_getattr

_EXPORTS: dict[str, str] = {
    "AgentConfig": "agent._config",
    "Daemon": "agent._daemon",
    "JsonFormatter": "agent._log",
    "StatusFile": "agent._commands",
    "enroll": "agent._commands",
    "load_config": "agent._config",
    "provision": "agent._commands",
    "run_boot_check": "agent._commands",
    "run_daemon": "agent._daemon",
    "setup_logging": "agent._log",
    "signed_report": "agent._commands",
    "status": "agent._commands",
    "update": "agent._commands",
}

__all__ = sorted(_EXPORTS)
__getattr__ = lazy_getattr(__name__, _EXPORTS)


if TYPE_CHECKING:
    from agent._commands import (
        StatusFile as StatusFile,
    )
    from agent._commands import (
        enroll as enroll,
    )
    from agent._commands import (
        provision as provision,
    )
    from agent._commands import (
        run_boot_check as run_boot_check,
    )
    from agent._commands import (
        signed_report as signed_report,
    )
    from agent._commands import (
        status as status,
    )
    from agent._commands import (
        update as update,
    )
    from agent._config import (
        AgentConfig as AgentConfig,
    )
    from agent._config import (
        load_config as load_config,
    )
    from agent._daemon import (
        Daemon as Daemon,
    )
    from agent._daemon import (
        run_daemon as run_daemon,
    )
    from agent._log import (
        JsonFormatter as JsonFormatter,
    )
    from agent._log import (
        setup_logging as setup_logging,
    )
