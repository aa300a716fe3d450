"""Whether a file that holds a secret is exposed: one rule for every secret file.

The TPM auth file (``_tpmauth``), the agent's MQTT password file and TLS client key
(``agent._config_places``) are each refused when these say why (pure, over an
``os.stat_result`` of the open file). This module imports nothing of the project.
"""

from __future__ import annotations

import os
import stat


def loose_mode(st: os.stat_result) -> str | None:
    """``"has mode 644; it must be 600"`` when group or others have any bit, else None."""
    if st.st_mode & 0o077:
        return f"has mode {stat.S_IMODE(st.st_mode):o}; it must be 600"
    return None


def foreign_owner(st: os.stat_result, *, root_ok: bool) -> str | None:
    """Why the file's owner (who may read it, or chmod it for others) is not the agent's
    user (or root, when ``root_ok``), else None."""
    euid = os.geteuid()
    if st.st_uid == euid or (root_ok and st.st_uid == 0):
        return None
    return (f"belongs to uid {st.st_uid}, not to the agent (uid {euid})"
            + (" or root" if root_ok and euid != 0 else ""))
