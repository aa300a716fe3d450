"""Passphrases per role: a provider (role -> bytes) instead of one value for every key.

Each top-level role and each delegated team can have its own passphrase, so that a team
that holds its own key file and passphrase cannot open ``root.pem``:

1. ``MODELWARD_KEY_PASSPHRASE_<ROLE>``: ``ROOT``, ``TARGETS``, ``SNAPSHOT``, ``TIMESTAMP``,
   or the team's name upper-cased with every other character than A-Z and 0-9 made ``_``;
2. else ``MODELWARD_KEY_PASSPHRASE``, shared by the roles without their own;
3. else, on a terminal, a prompt naming the role (asked once per role and command).

The CLI builds an :class:`EnvPassphrases` at its entry point; library code only sees the
``PassphraseProvider`` callable.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable, Mapping

from modelward.publisher.errors import KeyError_, OperatorInputError

logger = logging.getLogger(__name__)

PassphraseProvider = Callable[[str], bytes]
Passphrase = bytes | PassphraseProvider  # one value for every role (tests, old callers)

PASSPHRASE_ENV = "MODELWARD_KEY_PASSPHRASE"  # noqa: S105 - a variable name, not a secret
NEW_PASSPHRASE_ENV = "MODELWARD_NEW_KEY_PASSPHRASE"  # noqa: S105 - `repo rekey`'s new ones
TOP_LEVEL = ("root", "targets", "snapshot", "timestamp")
OFFLINE = ("root", "targets")


def as_provider(passphrase: Passphrase) -> PassphraseProvider:
    """A provider for ``passphrase``: bytes stand for the same passphrase for every role."""
    if isinstance(passphrase, bytes):
        value = passphrase
        return lambda _role: value
    return passphrase


def env_suffix(role: str) -> str:
    """The ``<ROLE>`` of ``MODELWARD_KEY_PASSPHRASE_<ROLE>`` for a role or team name.

    Raises:
        KeyError_: a team whose name maps to a top-level role's variable (``Root``,
            ``TARGETS``...): its key would share that role's passphrase.
    """
    suffix = re.sub(r"[^A-Z0-9]", "_", role.upper())
    if role not in TOP_LEVEL and suffix.lower() in TOP_LEVEL:
        raise KeyError_(
            f"team {role!r} would share {PASSPHRASE_ENV}_{suffix} with the {suffix.lower()} "
            "key; a team's passphrase must be its own", path=role,
            hint="delegate to a team name that differs from every top-level role")
    return suffix


def check_team_variable(name: str, teams: Iterable[str]) -> None:
    """A new team's passphrase variable must be its own: ``cls-team`` and ``cls_team``
    (or ``Cls-Team``) would both read ``MODELWARD_KEY_PASSPHRASE_CLS_TEAM``, and one
    team's passphrase would open the other team's key.

    Raises:
        KeyError_: ``name`` maps to a top-level role's variable or to an existing team's.
    """
    suffix = env_suffix(name)
    for team in teams:
        if team != name and team not in TOP_LEVEL and env_suffix(team) == suffix:
            raise KeyError_(
                f"team {name!r} would share {PASSPHRASE_ENV}_{suffix} with team {team!r}; "
                "a team's passphrase must be its own", path=name,
                hint="delegate to a name that differs from every team's in more than case "
                     "and punctuation")


def env_var(role: str, prefix: str = PASSPHRASE_ENV) -> str:
    """The environment variable holding ``role``'s own passphrase."""
    return f"{prefix}_{env_suffix(role)}"


class EnvPassphrases:
    """Passphrases from the environment, else a prompt per role on a terminal.

    Args:
        environ: the environment (read once, at the entry point).
        prompt: asks a person (``getpass.getpass``), or None when not on a terminal.
        confirm: ask twice: always (``repo init``), or for the roles a callable names (those
            without a key file yet, e.g. a team at ``repo delegate``).
        prefix: the variables' name prefix.
        fallback: used when neither variable is set and there is no prompt (``repo rekey``:
            the new passphrase defaults to the current one).
        what: how prompts call it ("passphrase", "new passphrase").
    """

    def __init__(self, environ: Mapping[str, str], prompt: Callable[[str], str] | None = None,
                 *, confirm: bool | Callable[[str], bool] = False,
                 prefix: str = PASSPHRASE_ENV,
                 fallback: PassphraseProvider | None = None,
                 what: str = "passphrase") -> None:
        self._environ = dict(environ)
        self._prompt = prompt
        self._confirm = confirm
        self._prefix = prefix
        self._fallback = fallback
        self._what = what
        self._cache: dict[str, bytes] = {}

    def source(self, role: str) -> str:
        """Where ``role``'s passphrase comes from: a variable's name, "prompt" or ""."""
        own = env_var(role, self._prefix)
        if own in self._environ:
            return own
        if self._prefix in self._environ:
            return self._prefix
        return "prompt" if self._prompt is not None else ""

    def __call__(self, role: str) -> bytes:
        """``role``'s passphrase.

        Raises:
            OperatorInputError: nothing set and no terminal, an empty value, or the two
                prompted values differ.
            KeyError_: a team name that collides with a top-level role's variable.
        """
        if role in self._cache:
            return self._cache[role]
        where = self.source(role)
        if where in (env_var(role, self._prefix), self._prefix):
            value = self._environ[where]
            if not value:
                raise OperatorInputError(f"{where} is empty (the {role} key's passphrase)")
            self._warn_if_shared(role, where)
            out = _utf8(value, f"{where} (the {role} key's passphrase)")
        elif where == "prompt" and self._prompt is not None:
            out = self._ask(role)
        elif self._fallback is not None:
            out = self._fallback(role)
        else:
            raise OperatorInputError(
                f"no passphrase for the {role} key: set {env_var(role, self._prefix)} or "
                f"{self._prefix}, or run on a terminal")
        self._cache[role] = out
        return out

    def _ask(self, role: str) -> bytes:
        assert self._prompt is not None
        first = self._prompt(f"{self._what} for the {role} key: ")
        twice = self._confirm(role) if callable(self._confirm) else self._confirm
        if twice and self._prompt(f"the {role} {self._what} again: ") != first:
            raise OperatorInputError(f"the two {role} {self._what}s differ")
        if not first:
            raise OperatorInputError(f"an empty {self._what} for the {role} key is not allowed")
        return _utf8(first, f"the {self._what} typed for the {role} key")

    def _warn_if_shared(self, role: str, where: str) -> None:
        """A team whose passphrase opens an offline key too is worth a warning."""
        if role in TOP_LEVEL:
            return
        mine = self._environ[where]
        for offline in OFFLINE:
            theirs = self._environ.get(env_var(offline, self._prefix),
                                       self._environ.get(self._prefix))
            if theirs == mine:
                logger.warning(
                    "the key of team %s has the same passphrase as the %s key (%s): set "
                    "%s so that the team cannot open %s.pem", role, offline, where,
                    env_var(role, self._prefix), offline)
                return


def _utf8(value: str, what: str) -> bytes:
    """``value`` in UTF-8.

    Raises:
        OperatorInputError: ``value`` holds a byte that is not UTF-8 (decoded with
            surrogateescape); the error names ``what``, never the byte nor where it is
            in the passphrase, and chains no cause that would.
    """
    try:
        return value.encode("utf-8")
    except UnicodeEncodeError:
        pass  # (not raised from it: its message quotes the byte and its position)
    raise OperatorInputError(f"{what} is not valid UTF-8 text",
                             hint="set it in UTF-8 (check the locale it was written under)")
