"""A team release is published only if devices can reach it: no delegated role on the way
to it has expired.

Publishing into a team's role re-signs that role with a fresh expiry, but the roles that
delegate to it (a chain of teams) and the roles a device's search visits before it are left
as they are. A device refuses expired metadata, so a release behind an expired role would
be published, served and never installed, with nothing telling the operator. The decision
is pure (:func:`expired_on_the_way`); ``publisher._repo.Repository.publish`` calls it with the
search's trail before anything reaches the served directory.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from datetime import datetime

from modelward.publisher.errors import RepositoryStateError


class TeamRoleExpiredError(RepositoryStateError):
    """A delegated role devices search on the way to a team's release has expired.

    Attributes:
        role: the expired role.
        expires: when it expired (UTC).
        publishing: the role the release was to be published in.
    """

    def __init__(self, role: str, expires: datetime, publishing: str, target: str) -> None:
        super().__init__(
            f"delegated role {role!r} expired at {expires.isoformat(timespec='seconds')}: "
            f"devices searching for {target} (in role {publishing!r}) refuse it, so the "
            "release would never install",
            hint=f"have the {role!r} team re-sign its role (a new version with a new expiry) "
                 "first, then publish again")
        self.role, self.expires, self.publishing = role, expires, publishing


def expired_on_the_way(trail: Iterable[str], publishing: str,
                       expires: Callable[[str], datetime], now: datetime,
                       top: str = "targets") -> tuple[str, datetime] | None:
    """The first role of ``trail`` (the delegated roles a device's search visits, in
    order) that has expired by ``now``, or None. ``publishing`` (re-signed with a new expiry
    by the publish itself) and ``top`` (the operator's own, checked elsewhere) are skipped.
    """
    for role in trail:
        if role in (publishing, top):
            continue
        when = expires(role)
        if when <= now:
            return role, when
    return None
