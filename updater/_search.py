"""TUF's pre-order delegation search for the releases of one model (pure).

A release of model ``N`` is a target at ``N/<file>``. A device does not know the file
name in advance: it wants every target under ``N/`` that TUF's target search (the
specification's "preorder depth-first search of delegations", python-tuf ngclient's
``Updater._preorder_depth_first_walk``) would return, and it must load only the roles
that search can reach for such a path.

Two steps, both over a ``load(role, delegator)`` callback that returns the role's
verified ``Targets`` (the caller does the I/O and the TUF verification):

1. :func:`reachable_roles`: the search run once over the *set* of paths ``N/*``
   instead of one path. Each visit carries the class of paths for which the search gets
   there (the delegation patterns it passed, and the terminating roles that already
   claimed paths of it); a child is visited when its delegation may match a path of the
   class, and a terminating child that covers the whole class ends the search for it,
   hiding later siblings and backtracking as TUF says. Where the class cannot be
   decided exactly the walk visits the role (it over-approximates: a role too many is
   only a download, never a wrong answer).
2. :func:`preorder_walk`: for each path that one of those roles lists, the exact
   per-path search (ngclient's algorithm: delegation order, ``terminating``, paths and
   ``path_hash_prefixes`` through ``Delegations.get_roles_for_target``, at most
   ``max_delegations`` visited roles, cycles skipped). Only the role that search ends at
   speaks for the path; a listing in any other role is ignored.
"""

from __future__ import annotations

import fnmatch
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from tuf.api.metadata import DelegatedRole, Root, SuccinctRoles, TargetFile, Targets

logger = logging.getLogger(__name__)

TOP = Targets.type  # the top-level targets role: the operator's own

Loader = Callable[[str, str], Targets]
"""``load(role, delegator)``: the role's metadata, verified against the delegator's keys."""

_WILD = frozenset("*?[")
_STEPS_PER_ROLE = 8  # visits (role, class of paths) per loaded role, against blow-ups


def in_namespace(path: str, model: str) -> bool:
    """Whether ``path`` names a release file of ``model``: exactly ``model/<file>``."""
    parts = path.split("/")
    return len(parts) == 2 and parts[0] == model and parts[1] != ""


# -- classes of paths ``model/<x>`` ------------------------------------------------


@dataclass(frozen=True)
class _Pattern:
    """Paths matching a delegation path pattern (as ``DelegatedRole.paths``)."""

    pattern: str


@dataclass(frozen=True)
class _Hash:
    """Paths whose sha256 starts with one of ``prefixes`` (``path_hash_prefixes``)."""

    prefixes: frozenset[str]


@dataclass(frozen=True)
class _Opaque:
    """A set decided only per path (a succinct hash bin)."""

    name: str


_Atom = _Pattern | _Hash | _Opaque
# A delegation's matcher: a union of atoms (any pattern of the role, or its prefixes).
_Union = frozenset[_Atom]


def _matcher(role: DelegatedRole) -> _Union:
    if role.path_hash_prefixes is not None:
        return frozenset({_Hash(frozenset(role.path_hash_prefixes))})
    return frozenset(_Pattern(p) for p in role.paths or [])


def _literal_prefix(s: str) -> str:
    for i, c in enumerate(s):
        if c in _WILD:
            return s[:i]
    return s


def _second(pattern: str, model: str) -> str | None:
    """The file part of a pattern that can match ``model/<x>`` paths, else None."""
    parts = pattern.split("/")
    if len(parts) != 2 or not fnmatch.fnmatchcase(model, parts[0]):
        return None
    return parts[1]


def _atom_possible(atom: _Atom, model: str) -> bool:
    return not isinstance(atom, _Pattern) or _second(atom.pattern, model) is not None


def _atom_universal(atom: _Atom, model: str) -> bool:
    """Provably matches every ``model/<x>``."""
    if isinstance(atom, _Pattern):
        second = _second(atom.pattern, model)
        return second is not None and second != "" and set(second) == {"*"}
    if isinstance(atom, _Hash):
        return "" in atom.prefixes
    return False


def _atom_implies(a: _Atom, b: _Atom, model: str) -> bool:
    """Provably: every path in ``a`` is in ``b``."""
    if a == b or _atom_universal(b, model):
        return True
    if isinstance(a, _Hash) and isinstance(b, _Hash):
        return all(any(p.startswith(q) for q in b.prefixes) for p in a.prefixes)
    return False


def _atoms_disjoint(a: _Atom, b: _Atom, model: str) -> bool:
    """Provably: no path is in both."""
    if isinstance(a, _Pattern) and isinstance(b, _Pattern):
        sa, sb = _second(a.pattern, model), _second(b.pattern, model)
        if sa is None or sb is None:
            return True
        pa, pb = _literal_prefix(sa), _literal_prefix(sb)
        if not (pa.startswith(pb) or pb.startswith(pa)):
            return True
        if pa == sa and pb == sb:  # both literal
            return sa != sb
        return False
    if isinstance(a, _Hash) and isinstance(b, _Hash):
        return not any(p.startswith(q) or q.startswith(p)
                       for p in a.prefixes for q in b.prefixes)
    return False


def _union_implies(a: _Union, b: _Union, model: str) -> bool:
    return all(any(_atom_implies(x, y, model) for y in b) for x in a)


@dataclass(frozen=True)
class _Class:
    """Paths ``model/<x>`` in every union of ``within`` and in none of ``claimed``.

    ``claimed`` holds what terminating roles took: each entry is the class of paths a
    terminating role matched (a conjunction of unions).
    """

    within: frozenset[_Union] = frozenset()
    claimed: frozenset[frozenset[_Union]] = frozenset()

    def narrow(self, u: _Union) -> _Class:
        return _Class(self.within | {u}, self.claimed)

    def without(self, taken: frozenset[_Union]) -> _Class:
        return _Class(self.within, self.claimed | {taken})

    def _implies(self, u: _Union, model: str) -> bool:
        return any(_atom_universal(a, model) for a in u) or \
            any(_union_implies(w, u, model) for w in self.within)

    def empty(self, model: str) -> bool:
        """Provably empty (False when unsure)."""
        within = list(self.within)
        if any(not any(_atom_possible(a, model) for a in u) for u in within):
            return True
        for i, u in enumerate(within):
            for w in within[i + 1:]:
                if all(_atoms_disjoint(a, b, model) for a in u for b in w):
                    return True
        return any(all(self._implies(t, model) for t in taken) for taken in self.claimed)

    def covered_by(self, u: _Union, model: str) -> bool:
        """Provably: every path of this class matches ``u``."""
        return self._implies(u, model)


# -- the search --------------------------------------------------------------------


@dataclass
class Reach:
    """What :func:`reachable_roles` loaded.

    Attributes:
        loaded: (delegator, role) -> verified metadata, in load order.
        truncated: the bound on visited roles stopped the walk early.
    """

    loaded: dict[tuple[str, str], Targets] = field(default_factory=dict)
    truncated: bool = False

    def roles(self) -> list[str]:
        """Names of the roles loaded, in order, each once."""
        return list(dict.fromkeys(role for _, role in self.loaded))


def _children(targets: Targets) -> Iterator[tuple[str, bool, _Union]]:
    d = targets.delegations
    if d is None:
        return
    if d.roles is not None:
        for role in d.roles.values():
            yield role.name, role.terminating, _matcher(role)
    elif d.succinct_roles is not None:
        succinct: SuccinctRoles = d.succinct_roles
        for name in succinct.get_roles():  # TAP 15: every bin is terminating
            yield name, True, frozenset({_Opaque(name)})


class _Memo:
    def __init__(self, load: Loader, reach: Reach) -> None:
        self._load, self.reach = load, reach

    def __call__(self, role: str, delegator: str) -> Targets:
        key = (delegator, role)
        if key not in self.reach.loaded:
            self.reach.loaded[key] = self._load(role, delegator)
        return self.reach.loaded[key]


def reachable_roles(model: str, load: Loader, max_delegations: int = 32) -> Reach:
    """Load every role TUF's search can reach for a path ``model/<x>``.

    Mirrors ngclient's walk (a stack, children pushed in reverse order, each role
    visited once per class of paths, which also ends cycles) over classes of paths. A
    role is loaded once, through the first delegator that reaches it: this step only
    decides what to fetch; :func:`preorder_walk` verifies each role through the
    delegator that the search for a given path goes through. At most
    ``max_delegations`` + 1 roles are loaded (ngclient's bound for one path).

    Raises:
        whatever ``load`` raises (metadata that fails to verify ends the search).
    """
    reach = Reach()
    by_role: dict[str, Targets] = {}
    stack: list[tuple[str, str, _Class]] = [(TOP, Root.type, _Class())]
    seen: set[tuple[str, _Class]] = set()
    steps = 0
    while stack:
        role, delegator, cls = stack.pop()
        if (role, cls) in seen or cls.empty(model):
            continue
        steps += 1
        if role not in by_role and len(by_role) > max_delegations or \
                steps > _STEPS_PER_ROLE * (max_delegations + 1):
            reach.truncated = True
            logger.warning("delegation search for %s/: bound of %d roles reached; %s and "
                           "%d more not visited", model, max_delegations, role, len(stack))
            break
        seen.add((role, cls))
        if role not in by_role:
            by_role[role] = reach.loaded[(delegator, role)] = load(role, delegator)
        push: list[tuple[str, str, _Class]] = []
        for child, terminating, matcher in _children(by_role[role]):
            sub = cls.narrow(matcher)
            if sub.empty(model):
                continue
            push.append((child, role, sub))
            if not terminating:
                continue
            # TUF: the search for a path that a terminating role matches goes no further
            # than that role: not to later siblings, not back up. Pending visits lose
            # those paths; that is exact only when this class has no holes of its own.
            exact = not cls.claimed
            if cls.covered_by(matcher, model):
                if exact:
                    stack = [(r, d, c.without(cls.within)) for r, d, c in stack]
                break
            if exact:
                stack = [(r, d, c.without(sub.within)) for r, d, c in stack]
            cls = cls.without(frozenset({matcher}))
        push.reverse()
        stack.extend(push)
    return reach


def preorder_walk(path: str, load: Loader, max_delegations: int = 32, *,
                  trail: list[str] | None = None) -> tuple[str, TargetFile] | None:
    """TUF's target search for one path: the role that speaks for it and its entry.

    The algorithm of ngclient's ``_preorder_depth_first_walk``, over ``load``; the
    roles visited are appended to ``trail`` if given.

    Raises:
        whatever ``load`` raises.
    """
    to_visit: list[tuple[str, str]] = [(TOP, Root.type)]
    visited: set[str] = set()
    while len(visited) <= max_delegations and to_visit:
        role, delegator = to_visit.pop(-1)
        if role in visited:
            continue
        targets = load(role, delegator)
        if trail is not None:
            trail.append(role)
        target = targets.targets.get(path)
        if target is not None:
            return role, target
        visited.add(role)
        if targets.delegations is not None:
            children: list[tuple[str, str]] = []
            for child, terminating in targets.delegations.get_roles_for_target(path):
                children.append((child, role))
                if terminating:
                    to_visit = []
                    break
            children.reverse()
            to_visit.extend(children)
    return None


@dataclass(frozen=True)
class Found:
    """A target TUF's search returns for its path, and the role that listed it."""

    path: str
    target: TargetFile
    role: str


def find_releases(model: str, load: Loader,
                  max_delegations: int = 32) -> tuple[list[Found], Reach]:
    """Every target at ``model/<x>`` as TUF's search finds it, loading only reached roles.

    Listings that the search does not end at (a role outside its delegated paths, one
    hidden by a terminating sibling, one shadowed by an earlier role) are left out and
    logged.

    Raises:
        whatever ``load`` raises.
    """
    reach = reachable_roles(model, load, max_delegations)
    memo = _Memo(load, reach)
    listed: dict[str, set[str]] = {}
    for (_, role), targets in list(reach.loaded.items()):
        for path in targets.targets:
            if in_namespace(path, model):
                listed.setdefault(path, set()).add(role)
    found = []
    for path in sorted(listed):
        hit = preorder_walk(path, memo, max_delegations)
        if hit is None:
            logger.warning("ignoring %s: listed by %s, which TUF's delegation search does "
                           "not reach for it", path, ", ".join(sorted(listed[path])))
            continue
        role, target = hit
        for other in sorted(listed[path] - {role}):
            logger.info("%s: %s speaks for it, not %s", path, role, other)
        found.append(Found(path, target, role))
    return found, reach
