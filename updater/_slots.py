"""A/B slot store: ``slots/a``, ``slots/b`` and the ``current`` symlink the app reads.

Extraction goes to ``staging/incoming`` (same file system, so moving it into a slot is a
rename): until a bundle has passed every check, nothing outside ``staging/`` is written.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from trust import fsync_dir, symlink_atomic

SLOTS = ("a", "b")


class SlotStore:
    """The model slots under a state directory.

    The trust record says which slot is active; ``current`` is kept pointing at it
    (``current -> slots/<x>``) so the inference application has a stable path.
    """

    def __init__(self, state_dir: Path) -> None:
        self.root = state_dir / "slots"
        self.current = state_dir / "current"
        self.incoming = state_dir / "staging" / "incoming"

    def path(self, slot: str) -> Path:
        """Directory of ``slot``."""
        return self.root / slot

    @staticmethod
    def other(slot: str | None) -> str:
        """The slot that is not ``slot`` (``a`` when nothing is active)."""
        return "b" if slot == "a" else "a"

    def current_slot(self) -> str | None:
        """Slot that ``current`` points at, or None."""
        try:
            target = os.readlink(self.current)
        except OSError:
            return None
        name = Path(target).name
        return name if name in SLOTS else None

    def install_incoming(self, slot: str) -> None:
        """Move the verified incoming directory into ``slot`` (which must not be active)."""
        dest = self.path(slot)
        self.root.mkdir(parents=True, exist_ok=True)
        old = self.root / f".old-{slot}"
        shutil.rmtree(old, ignore_errors=True)
        if dest.exists():
            os.replace(dest, old)
        os.replace(self.incoming, dest)
        fsync_dir(self.root)
        shutil.rmtree(old, ignore_errors=True)

    def activate(self, slot: str) -> None:
        """Point ``current`` at ``slot`` atomically."""
        symlink_atomic(f"slots/{slot}", self.current)
