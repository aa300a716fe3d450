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

The top-level targets decide first: a path they list is theirs without any delegated
role (TUF's search visits them first for every path), so an operator's pin, halt or
tombstone never depends on a team's metadata. A delegated role that fails to load
(expired, unsigned, missing, a name no file may have) removes only the paths whose
search passes through it; :class:`Reach` records it, typed, and the caller decides.

All the work is bounded: at most :data:`MAX_ROLES` roles loaded, succinct hash bins
never enumerated past :data:`MAX_BINS` (a path is resolved to its one bin directly), the
class algebra capped in atoms and over-approximated past the caps, and a total work
budget for each step; past it the search stops with a :class:`SearchBudgetError`
recorded, keeping what the top-level targets decide.
"""

from __future__ import annotations

import fnmatch
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from tuf.api.metadata import DelegatedRole, Root, TargetFile, Targets

from modelward.updater.errors import MetadataError

logger = logging.getLogger(__name__)

TOP = Targets.type  # the top-level targets role: the operator's own

Loader = Callable[[str, str], Targets]
"""``load(role, delegator)``: the role's metadata, verified against the delegator's keys."""

_WILD = frozenset("*?[")
MAX_ROLES = 1024  # roles one search for a model's releases may load
MAX_BINS = 1024  # succinct hash bins enumerated to find releases (2**10)
MAX_WORK = 1_000_000  # elementary steps (pattern comparisons, matches) per phase
_MAX_ATOMS = 16  # patterns of one delegation the class algebra reasons about exactly
_MAX_UNIONS = 8  # delegations along one chain reasoned about exactly
_MAX_CLAIMS = 64  # terminating siblings subtracted exactly


class SearchBudgetError(MetadataError):
    """The delegation search for a model's releases needs more work than it may do.

    Attributes:
        model: the model searched for.
    """

    def __init__(self, model: str, what: str) -> None:
        super().__init__(f"delegation search for {model}/: {what}: the delegated metadata "
                         "is too large to search (the top-level targets still apply)")
        self.model = model


class _Budget:
    def __init__(self, model: str, limit: int, what: str) -> None:
        self.model, self.left, self.what = model, limit, what

    def spend(self, n: int) -> None:
        self.left -= n
        if self.left < 0:
            raise SearchBudgetError(self.model, f"{self.what}: work bound reached")


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


_Atom = _Pattern | _Hash
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
    terminating role matched (a conjunction of unions). ``approx``: a constraint was
    left out (past the caps), so the class may hold more paths than the search reaches
    with (a superset: a role too many is loaded, never one too few).
    """

    within: frozenset[_Union] = frozenset()
    claimed: frozenset[frozenset[_Union]] = frozenset()
    approx: bool = False

    def narrow(self, u: _Union) -> _Class:
        if len(u) > _MAX_ATOMS or len(self.within) >= _MAX_UNIONS:
            return _Class(self.within, self.claimed, True)
        return _Class(self.within | {u}, self.claimed, self.approx)

    def without(self, taken: frozenset[_Union]) -> _Class:
        if len(self.claimed) >= _MAX_CLAIMS or any(len(t) > _MAX_ATOMS for t in taken):
            return _Class(self.within, self.claimed, True)
        return _Class(self.within, self.claimed | {taken}, self.approx)

    @property
    def exact(self) -> bool:
        """The class is exactly the paths the search gets here with, no holes."""
        return not self.claimed and not self.approx

    def _implies(self, u: _Union, model: str, budget: _Budget) -> bool:
        budget.spend(len(u) * (1 + sum(len(w) for w in self.within)))
        return any(_atom_universal(a, model) for a in u) or \
            any(_union_implies(w, u, model) for w in self.within)

    def empty(self, model: str, budget: _Budget) -> bool:
        """Provably empty (False when unsure)."""
        within = list(self.within)
        budget.spend(1 + sum(len(u) for u in within))
        if any(not any(_atom_possible(a, model) for a in u) for u in within):
            return True
        for i, u in enumerate(within):
            for w in within[i + 1:]:
                budget.spend(len(u) * len(w))
                if all(_atoms_disjoint(a, b, model) for a in u for b in w):
                    return True
        return any(all(self._implies(t, model, budget) for t in taken)
                   for taken in self.claimed)

    def covered_by(self, u: _Union, model: str, budget: _Budget) -> bool:
        """Provably: every path of this class matches ``u``."""
        return self._implies(u, model, budget)


# -- the search --------------------------------------------------------------------


@dataclass
class Reach:
    """What the search loaded, and what it could not use.

    Attributes:
        loaded: (delegator, role) -> verified metadata, in load order.
        failed: (delegator, role) -> why the role could not be used (its error); the
            paths whose search passes through it are left out.
        errors: every error that left paths out (role failures, work bounds), in order.
        truncated: a bound stopped the search early.
    """

    loaded: dict[tuple[str, str], Targets] = field(default_factory=dict)
    failed: dict[tuple[str, str], Exception] = field(default_factory=dict)
    errors: list[Exception] = field(default_factory=list)
    truncated: bool = False

    def roles(self) -> list[str]:
        """Names of the roles loaded, in order, each once."""
        return list(dict.fromkeys(role for _, role in self.loaded))

    def _error(self, e: Exception) -> None:
        if not any(x is e for x in self.errors):
            self.errors.append(e)


class _Memo:
    """``load`` once per (delegator, role); a failure is remembered (and raised again)
    when it is one of ``skip``."""

    def __init__(self, load: Loader, reach: Reach,
                 skip: tuple[type[Exception], ...]) -> None:
        self._load, self.reach, self._skip = load, reach, skip

    def __call__(self, role: str, delegator: str) -> Targets:
        key = (delegator, role)
        if key in self.reach.failed:
            raise self.reach.failed[key]
        if key not in self.reach.loaded:
            try:
                self.reach.loaded[key] = self._load(role, delegator)
            except self._skip as e:
                self.reach.failed[key] = e
                self.reach._error(e)  # noqa: SLF001
                logger.warning("delegated role %r (delegated by %r) cannot be used; the "
                               "paths its search speaks for are left out: %s",
                               role, delegator, e)
                raise
        return self.reach.loaded[key]


def _children(targets: Targets) -> Iterator[tuple[str, bool, _Union]]:
    d = targets.delegations
    if d is not None and d.roles is not None:
        for role in d.roles.values():
            yield role.name, role.terminating, _matcher(role)


def reachable_roles(model: str, load: Loader, max_delegations: int = 32, *,
                    skip: tuple[type[Exception], ...] = (),
                    reach: Reach | None = None) -> Reach:
    """Load every role TUF's search can reach for a path ``model/<x>``.

    Mirrors ngclient's walk (a stack, children pushed in reverse order, each role
    visited once per class of paths, which also ends cycles) over classes of paths. A
    role is loaded once, through the first delegator that reaches it: this step only
    decides what to fetch; :func:`preorder_walk` verifies each role through the
    delegator that the search for a given path goes through. ``max_delegations`` is
    ngclient's bound for one path: a role deeper than that in the delegation graph is
    visited by no path's search, so it is not loaded; otherwise the bound applies per
    path (in :func:`preorder_walk`). Here at most :data:`MAX_ROLES` roles are loaded
    and :data:`MAX_WORK` steps spent.

    A role whose load raises one of ``skip`` is recorded in ``Reach.failed`` and not
    searched further; any other error propagates.
    """
    reach = reach if reach is not None else Reach()
    memo = load if isinstance(load, _Memo) else _Memo(load, reach, skip)
    budget = _Budget(model, MAX_WORK, "finding the roles to load")
    by_role: dict[str, Targets] = {}
    stack: list[_Entry] = [(TOP, Root.type, _Class(), 0)]
    seen: set[tuple[str, _Class]] = set()
    try:
        while stack:
            role, delegator, cls, level = stack.pop()
            budget.spend(1)
            if (role, cls) in seen or level > max_delegations or cls.empty(model, budget):
                continue
            seen.add((role, cls))
            if role not in by_role:
                if len(by_role) >= MAX_ROLES:
                    raise SearchBudgetError(model, f"more than {MAX_ROLES} roles to load "
                                            f"({role} and {len(stack)} more not visited)")
                try:
                    by_role[role] = memo(role, delegator)
                except skip:
                    continue
            push = _visit(model, role, by_role[role], cls, stack, budget, reach)
            stack.extend((r, d, c, level + 1) for r, d, c in reversed(push))
    except SearchBudgetError as e:
        reach.truncated = True
        reach._error(e)  # noqa: SLF001
        logger.warning("%s", e)
    return reach


_Entry = tuple[str, str, "_Class", int]  # role, delegator, class of paths, depth


def _visit(model: str, role: str, targets: Targets, cls: _Class,
           stack: list[_Entry], budget: _Budget,
           reach: Reach) -> list[tuple[str, str, _Class]]:
    """The children of ``role`` to visit (in order); edits ``stack`` for terminating ones."""
    push: list[tuple[str, str, _Class]] = []
    d = targets.delegations
    if d is not None and d.succinct_roles is not None:
        # TAP 15: every path hashes to exactly one bin, and every bin is terminating: the
        # delegation covers the whole class and ends the search for it.
        bins = d.succinct_roles
        if 2 ** bins.bit_length > MAX_BINS:
            e = SearchBudgetError(model, f"role {role} delegates to {2 ** bins.bit_length} "
                                  f"succinct hash bins, more than the {MAX_BINS} searched "
                                  "for releases")
            reach._error(e)  # noqa: SLF001
            logger.warning("%s", e)
        else:
            budget.spend(2 ** bins.bit_length)
            push = [(name, role, cls) for name in bins.get_roles()]
        if cls.exact:
            stack[:] = [(r, dg, c.without(cls.within), lv) for r, dg, c, lv in stack]
        return push
    for child, terminating, matcher in _children(targets):
        sub = cls.narrow(matcher)
        if sub.empty(model, budget):
            continue
        push.append((child, role, sub))
        if not terminating:
            continue
        # TUF: the search for a path that a terminating role matches goes no further
        # than that role: not to later siblings, not back up. Pending visits lose
        # those paths; that is exact only when this class has no holes of its own.
        budget.spend(len(stack))
        if cls.covered_by(matcher, model, budget):
            if cls.exact:
                stack[:] = [(r, dg, c.without(cls.within), lv) for r, dg, c, lv in stack]
            break
        if cls.exact and sub.exact:
            stack[:] = [(r, dg, c.without(sub.within), lv) for r, dg, c, lv in stack]
        cls = cls.without(frozenset({matcher}))
    return push


class _Index:
    """Per role and model, the delegations that can match some ``model/<x>`` (computed
    once, so each path's search looks only at those)."""

    def __init__(self) -> None:
        self._cache: dict[int, tuple[Targets, dict[str, list[DelegatedRole]]]] = {}

    def relevant(self, targets: Targets, model: str, budget: _Budget | None
                 ) -> list[DelegatedRole]:
        d = targets.delegations
        if d is None or d.roles is None:
            return []
        entry = self._cache.setdefault(id(targets), (targets, {}))
        if model not in entry[1]:
            if budget is not None:
                budget.spend(len(d.roles))
            entry[1][model] = [r for r in d.roles.values()
                               if any(_atom_possible(a, model) for a in _matcher(r))]
        return entry[1][model]


def _roles_for_target(targets: Targets, path: str, index: _Index | None,
                      budget: _Budget | None) -> Iterator[tuple[str, bool]]:
    d = targets.delegations
    if d is None:
        return
    parts = path.split("/")
    if d.succinct_roles is not None or index is None or len(parts) != 2:
        yield from d.get_roles_for_target(path)
        return
    candidates = index.relevant(targets, parts[0], budget)
    if budget is not None:
        budget.spend(len(candidates))
    for role in candidates:
        if role.is_delegated_path(path):
            yield role.name, role.terminating


def preorder_walk(path: str, load: Loader, max_delegations: int = 32, *,
                  trail: list[str] | None = None, _index: _Index | None = None,
                  _budget: _Budget | None = None) -> tuple[str, TargetFile] | None:
    """TUF's target search for one path: the role that speaks for it and its entry.

    The algorithm of ngclient's ``_preorder_depth_first_walk``, over ``load`` (at most
    ``max_delegations`` roles visited for this path); the roles visited are appended to
    ``trail`` if given.

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
        children: list[tuple[str, str]] = []
        for child, terminating in _roles_for_target(targets, path, _index, _budget):
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


def find_releases(model: str, load: Loader, max_delegations: int = 32, *,
                  skip: tuple[type[Exception], ...] = ()) -> tuple[list[Found], Reach]:
    """Every target at ``model/<x>`` as TUF's search finds it, loading only reached roles.

    The top-level targets' own listings first (no delegated role can change them). Then
    each path a reached role lists, by the per-path search. Listings that the search
    does not end at (a role outside its delegated paths, one hidden by a terminating
    sibling, one shadowed by an earlier role) are left out and logged; so is a path
    whose search passes through a role that failed to load with one of ``skip`` (see
    ``Reach.failed``), or that the work bound did not reach (``Reach.errors``).

    Raises:
        whatever ``load`` raises other than ``skip`` (the top-level role included).
    """
    reach = Reach()
    memo = _Memo(load, reach, skip)
    top = load(TOP, Root.type)
    reach.loaded[(Root.type, TOP)] = top
    found = [Found(p, t, TOP) for p, t in sorted(top.targets.items())
             if in_namespace(p, model)]
    reachable_roles(model, memo, max_delegations, skip=skip, reach=reach)
    listed: dict[str, set[str]] = {}
    for (_, role), targets in list(reach.loaded.items()):
        if role == TOP:
            continue
        for path in targets.targets:
            if in_namespace(path, model) and path not in top.targets:
                listed.setdefault(path, set()).add(role)
    index = _Index()
    budget = _Budget(model, MAX_WORK, "resolving the paths listed")
    for n, path in enumerate(sorted(listed)):
        try:
            hit = preorder_walk(path, memo, max_delegations, _index=index, _budget=budget)
        except skip as e:
            logger.warning("ignoring %r: its delegation search passes through a role that "
                           "cannot be used: %s", path, e)
            continue
        except SearchBudgetError as e:
            reach.truncated = True
            reach._error(e)  # noqa: SLF001
            logger.warning("%s; %d listed paths not resolved", e, len(listed) - n)
            break
        if hit is None:
            logger.warning("ignoring %r: listed by %r, which TUF's delegation search does "
                           "not reach for it", path, sorted(listed[path]))
            continue
        role, target = hit
        for other in sorted(listed[path] - {role}):
            logger.info("%r: %r speaks for it, not %r", path, role, other)
        found.append(Found(path, target, role))
    found.sort(key=lambda f: f.path)
    return found, reach
