"""Outside attack review of the delegation search (issue 13 finding 1), in memory.

Each test is one attack by one attacker of the threat model: a delegated team key, the
origin, or a careless operator. A test marked ``xfail(strict=True)`` demonstrates an
attack that WORKS today (its assertions state what should happen); an unmarked test is
an attack that is refused. The reference for "what should happen" is python-tuf
ngclient's own ``Updater.get_targetinfo`` for one path.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from securesystemslib.signer import CryptoSigner
from tuf.api.metadata import (
    DelegatedRole,
    Delegations,
    Metadata,
    SuccinctRoles,
    Targets,
)
from tuf.ngclient import Updater

import modelward.updater.install._search as search_mod
from modelward.simulator._tufmem import METADATA_URL, TARGETS_URL, MemFetcher, MemRepo
from modelward.updater.errors import MetadataError
from modelward.updater.install._search import SearchBudgetError, in_namespace
from modelward.updater.install._tuf import Candidate, TufSession
from modelward.updater.rollout import choose_release

TOPLEVEL = 4  # root, timestamp, snapshot, targets


def _session(repo: MemRepo, d: Path) -> tuple[TufSession, MemFetcher]:
    f = MemFetcher(repo)
    s = TufSession(d, METADATA_URL, TARGETS_URL, f, repo.root_bytes)
    s.refresh()
    return s, f


def _ngclient(repo: MemRepo, d: Path) -> Updater:
    u = Updater(str(d), METADATA_URL, target_base_url=TARGETS_URL, fetcher=MemFetcher(repo),
                bootstrap=repo.root_bytes)
    u.refresh()
    return u


def _mw(version: str, **extra: Any) -> dict[str, Any]:
    return {"modelward": {"name": "m", "version": version, "fingerprint": "f" * 64,
                          "channel": "stable", "rollout": {"basis_points": 10000},
                          **extra}}


def _h(path: str) -> str:
    return hashlib.sha256(path.encode()).hexdigest()


# -- careless (or ordinary) operator: hash-bin delegations ----------------------------


def test_attack_hash_bin_delegation_hides_most_releases(tmp_path: Path) -> None:
    r = MemRepo()
    for b in range(256):  # the textbook hash-bin layout (PEP 458 uses 16384 bins)
        r.delegate("targets", f"bin-{b:02x}", hash_prefixes=[f"{b:02x}"], terminating=True)
    paths = [f"m/m-{i}.0.0.tar" for i in range(60)]
    for i, p in enumerate(paths):
        r.add_target(f"bin-{_h(p)[:2]}", p, custom=_mw(f"{i}.0.0"))
    r.publish()
    u = _ngclient(r, tmp_path / "ref")
    assert all(u.get_targetinfo(p) is not None for p in paths)  # stock TUF finds each
    s, _ = _session(r, tmp_path / "dev")
    assert sorted(x.path for x in s.search("m")) == sorted(paths)


def _succinct(r: MemRepo, bits: int, listed: dict[str, str]) -> None:
    """The top-level targets delegate to 2**bits succinct hash bins (one shared key)."""
    key = CryptoSigner.generate_ed25519()
    succ = SuccinctRoles(keyids=[key.public_key.keyid], threshold=1, bit_length=bits,
                         name_prefix="bin")
    r.roles["targets"].signed.delegations = Delegations(
        keys={key.public_key.keyid: key.public_key}, succinct_roles=succ)
    for name in succ.get_roles() if bits <= 8 else ():  # a real repository has every bin
        r.roles[name] = Metadata(Targets(expires=r.expires))
        r.signers[name] = key
    for path, version in listed.items():
        name = succ.get_role_for_target(path)
        if name not in r.roles:
            r.roles[name] = Metadata(Targets(expires=r.expires))
            r.signers[name] = key
        r.add_target(name, path, custom=_mw(version))


def test_attack_succinct_hash_bins_hide_releases(tmp_path: Path) -> None:
    r = MemRepo()
    listed = {f"m/m-{i}.0.0.tar": f"{i}.0.0" for i in range(40)}
    _succinct(r, 8, listed)
    r.publish()
    u = _ngclient(r, tmp_path / "ref")
    assert all(u.get_targetinfo(p) is not None for p in listed)
    s, _ = _session(r, tmp_path / "dev")
    assert sorted(x.path for x in s.search("m")) == sorted(listed)


def test_attack_succinct_bins_are_enumerated(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    r = MemRepo()
    _succinct(r, 16, {"m/m-1.0.0.tar": "1.0.0"})
    r.publish()
    made = 0
    real = SuccinctRoles.get_roles

    def counting(self: SuccinctRoles) -> Iterator[str]:
        nonlocal made
        for name in real(self):
            made += 1
            if made > 1000:  # stop the demonstration here: 2**16 bins take hours
                raise AssertionError(f"{made} bin names generated for one search")
            yield name

    monkeypatch.setattr(SuccinctRoles, "get_roles", counting)
    s, _ = _session(r, tmp_path)
    with pytest.raises(SearchBudgetError, match="65536 succinct hash bins"):
        s.search("m")  # a typed bound, named: the bins are never enumerated
    assert made <= 1000, f"{made} bin names generated for one search"  # bits=32: 4e9


# -- one delegated team key: availability of the operator's decisions -------------------


def _pinned_by_operator_with_team(kind: str) -> MemRepo:
    """Operator pins m 1.0.0 in the top-level targets; the m/ team's role is broken."""
    r = MemRepo()
    r.add_target("targets", "m/m-1.0.0.tar", custom=_mw("1.0.0", pinned=True))
    r.delegate("targets", "team", paths=["m/*"])
    r.add_target("team", "m/m-3.0.0.tar", custom=_mw("3.0.0"))
    if kind == "expired":  # the team key signs its role already expired
        r.roles["team"].signed.expires = datetime.now(UTC) - timedelta(days=1)
    elif kind == "ghost-subrole":  # the team delegates to a role no snapshot lists
        team = r.roles["team"].signed
        k = CryptoSigner.generate_ed25519().public_key
        team.delegations = Delegations(keys={k.keyid: k}, roles={"ghost": DelegatedRole(
            "ghost", [k.keyid], 1, False, paths=["m/*"])})
    elif kind == "rekeyed":  # operator re-keyed the team; the team's file has the old key
        p = r.roles["targets"].signed
        assert p.delegations is not None and p.delegations.roles is not None
        p.revoke_key(p.delegations.roles["team"].keyids[0], "team")
        p.add_key(CryptoSigner.generate_ed25519().public_key, "team")
    elif kind == "long-name":  # a valid TUF role name longer than a file name may be
        r.delegate("team", "x" * 251, paths=["m/*"])
    r.publish()
    return r


@pytest.mark.parametrize("kind", ["expired", "ghost-subrole", "rekeyed", "long-name"])
def test_attack_broken_team_role_blocks_the_operators_pin(kind: str, tmp_path: Path) -> None:
    r = _pinned_by_operator_with_team(kind)
    ref = _ngclient(r, tmp_path / "ref").get_targetinfo("m/m-1.0.0.tar")
    assert ref is not None  # stock TUF: the operator's pinned release is there
    s, _ = _session(r, tmp_path / "dev")
    choice = choose_release(s.candidates("m"), "dev-1", "stable")
    assert choice is not None and str(choice.release.version) == "1.0.0"


def test_attack_long_role_name_is_blamed_on_the_device_disk(tmp_path: Path) -> None:
    r = _pinned_by_operator_with_team("long-name")
    s, _ = _session(r, tmp_path)
    with pytest.raises(MetadataError, match="x" * 20):
        s.search("m")


# -- one delegated team key: CPU exhaustion after verification ---------------------


def test_attack_pattern_algebra_is_quadratic(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    n = 300
    r = MemRepo()
    r.delegate("targets", "team", paths=["m/*"])
    r.delegate("team", "c", paths=[f"m/a{i}-*" for i in range(n)])
    r.delegate("c", "d", paths=[f"m/b{i}-*" for i in range(n)])
    r.publish()
    calls = 0
    real = search_mod._atoms_disjoint  # noqa: SLF001

    def counting(a: Any, b: Any, model: str) -> bool:
        nonlocal calls
        calls += 1
        return real(a, b, model)

    monkeypatch.setattr(search_mod, "_atoms_disjoint", counting)
    s, _ = _session(r, tmp_path)
    s.search("m")
    assert calls <= 50 * 2 * n, f"{calls} pattern comparisons for {2 * n} patterns"


def test_attack_per_path_walks_multiply(tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    depth, width, listed = 10, 200, 200
    r = MemRepo()
    parent = "targets"
    for i in range(depth):
        r.delegate(parent, f"c{i}", paths=["m/*"])
        parent = f"c{i}"
    for i in range(depth - 1):  # padding delegations for another namespace: never loaded
        d = r.roles[f"c{i}"].signed.delegations
        assert d is not None and d.roles is not None
        for j in range(width):
            d.roles[f"pad{j}"] = DelegatedRole(f"pad{j}", [], 1, False, paths=[f"x/{j}"])
    for j in range(listed):
        r.add_target(parent, f"m/m-{j}.0.0.tar", custom=_mw(f"{j}.0.0"))
    r.publish()
    calls = 0
    real = DelegatedRole.is_delegated_path

    def counting(self: DelegatedRole, target_filepath: str) -> bool:
        nonlocal calls
        calls += 1
        return real(self, target_filepath)

    monkeypatch.setattr(DelegatedRole, "is_delegated_path", counting)
    s, _ = _session(r, tmp_path)
    assert len(s.search("m")) == listed
    size = depth * width + listed  # entries of signed metadata
    assert calls <= 20 * size, f"{calls} pattern matches for {size} metadata entries"


# -- refused: edge paths, as stock ngclient sees them ------------------------------

_EDGE = ["m/../x/a.tar", "m//a.tar", "m/sub/a.tar", "m/", "m/.", "m/..", "M/a.tar",
         "m/\u00e4.tar", "m/a\u0308.tar", "m/%2e%2e%2fx", "m/a.tar?x=1", "m/a.tar#f",
         "m/" + "a" * 5000, "m/a b.tar", "m\\a.tar", "./m/a.tar", "/m/a.tar"]


@pytest.mark.parametrize("path", _EDGE)
def test_edge_paths_agree_with_ngclient(path: str, tmp_path: Path) -> None:
    """A team for ``m/*`` lists an odd path; the device takes it exactly when it is a
    release path ``m/<file>`` and ngclient returns the same entry for it."""
    r = MemRepo()
    r.delegate("targets", "team", paths=["m/*"])
    r.delegate("targets", "other", paths=["x/*"])
    r.add_target("team", path, custom=_mw("9.0.0"))
    r.add_target("other", path, custom=_mw("9.0.1"))
    r.publish()
    ref = _ngclient(r, tmp_path / "ref").get_targetinfo(path)
    s, f = _session(r, tmp_path / "dev")
    got = {x.path: x for x in s.search("m")}
    assert "other" not in f.roles_requested()[TOPLEVEL:]
    if in_namespace(path, "m"):
        assert ref is not None and got[path].target == ref and got[path].role == "team"
    else:
        assert got == {}


@pytest.mark.parametrize("name", ["../../evil", "..", ".", "a/b", "%2e%2e", "root_history",
                                  "1.root", "\u00e4-team", "Team", "team\x00"])
def test_odd_role_names_stay_inside_the_metadata_dir(name: str, tmp_path: Path) -> None:
    r = MemRepo()
    r.delegate("targets", "team", paths=["m/*"])
    r.delegate("team", name, paths=["m/*"])
    r.add_target(name, "m/m-1.0.0.tar", custom=_mw("1.0.0"))
    r.publish()
    d = tmp_path / "md"
    s, _ = _session(r, d)
    assert [(x.path, x.role) for x in s.search("m")] == [("m/m-1.0.0.tar", name)]
    outside = {p for p in tmp_path.rglob("*") if not p.is_relative_to(d)}
    assert outside == set()
    assert (d / "root.json").resolve().parent == d / "root_history"


@pytest.mark.parametrize("name", ["targets", "root", "snapshot", "timestamp"])
def test_team_delegating_to_a_top_level_role_name_is_a_typed_error(
    name: str, tmp_path: Path
) -> None:
    r = MemRepo()
    r.delegate("targets", "team", paths=["m/*"])
    r.publish()
    team = r.roles["team"].signed
    k = CryptoSigner.generate_ed25519().public_key
    team.delegations = Delegations(keys={k.keyid: k}, roles={"ok": DelegatedRole(
        "ok", [k.keyid], 1, False, paths=["m/*"])})
    team.delegations.roles = {name: DelegatedRole(name, [k.keyid], 1, False, paths=["m/*"])}
    r.publish()
    s, _ = _session(r, tmp_path)
    with pytest.raises(MetadataError, match="delegated role team"):
        s.search("m")


def test_team_subdelegation_cannot_widen_its_paths(tmp_path: Path) -> None:
    """The m/ team delegates ``*/*`` onwards: a ``x/`` listing there is no release of x,
    and an x device never reaches the team."""
    r = MemRepo()
    r.delegate("targets", "team", paths=["m/*"])
    r.delegate("team", "wide", paths=["*/*", "*"])
    r.add_target("wide", "x/x-9.0.0.tar", custom=_mw("9.0.0") | {})
    r.add_target("wide", "m/m-2.0.0.tar", custom=_mw("2.0.0"))
    r.publish()
    s, f = _session(r, tmp_path / "x")
    assert s.search("x") == [] and f.roles_requested()[TOPLEVEL:] == []
    s, _ = _session(r, tmp_path / "m")
    assert [x.path for x in s.search("m")] == ["m/m-2.0.0.tar"]


def test_team_entry_cannot_shadow_an_operator_release(tmp_path: Path) -> None:
    """Same version, other path, pinned, build metadata: the operator's entry rules."""
    r = MemRepo()
    r.add_target("targets", "m/m-2.0.0.tar", b"op", custom=_mw("2.0.0", pinned=True))
    r.add_target("targets", "m/m-1.0.0.tar", b"op1", custom=_mw("1.0.0"))
    r.delegate("targets", "team", paths=["m/*"])
    r.add_target("team", "m/m-2.0.0.tar", b"evil", custom=_mw("2.0.0", pinned=True))
    r.add_target("team", "m/m-2.0.0+evil.tar", b"evil", custom=_mw("2.0.0+evil", pinned=True))
    r.add_target("team", "m/m-1.0.0-x.tar", b"evil", custom=_mw("1.0.0-x", pinned=True))
    r.publish()
    s, _ = _session(r, tmp_path)
    choice = choose_release(s.candidates("m"), "dev-1", "stable")
    assert choice is not None and choice.release.role == "targets"
    assert isinstance(choice.release, Candidate)
    assert choice.release.target.hashes == {"sha256": hashlib.sha256(b"op").hexdigest()}


def test_origin_oversized_team_role_is_cut_off(tmp_path: Path) -> None:
    """The origin serves 6 MB for a team role: cut at ngclient's 5 MB, a typed error."""
    r = MemRepo()
    r.delegate("targets", "team", paths=["m/*"])
    r.publish()
    r.served[f"{METADATA_URL}{r.version}.team.json"] = b"[" + b"{}," * 2_000_000 + b"{}]"
    s, _ = _session(r, tmp_path)
    with pytest.raises(Exception) as e:
        s.search("m")
    assert type(e.value).__module__.startswith("modelward.updater"), repr(e.value)


# -- refused: wider differential (more roles, diamonds, cycles, empty hash prefixes) ----

_FP = ["m/*", "m/a*", "m/a1.tar", "m/b*", "*/*", "x/*", "m/*.tar", "m/b2.tar", "m/?1*", "*",
       "m/*/*", "m/[ab]*", "m/[!a]*", "m/*1*", "?/*", "m/a?.tar", "[m]/*", "m/a1.tar*", "m/**"]
_FPATHS = ["m/a1.tar", "m/a2.tar", "m/b1.tar", "m/b2.tar", "x/a1.tar", "m/c1.tar",
           "m/a1.tarx", "m/ab", "m/1"]


@pytest.mark.parametrize("seed", range(60))
def test_wider_graphs_agree_with_ngclient(seed: int, tmp_path: Path) -> None:
    import random

    rng = random.Random(1000 + seed)
    r = MemRepo()
    names = [f"r{i}" for i in range(rng.randint(2, 12))]
    for i, n in enumerate(names):
        parent = rng.choice(["targets", "targets", *names[:i]])
        if rng.random() < 0.25:
            prefixes = [_h(rng.choice(_FPATHS))[:rng.randint(0, 2)]
                        for _ in range(rng.randint(1, 2))]
            r.delegate(parent, n, hash_prefixes=prefixes, terminating=rng.random() < 0.5)
        else:
            r.delegate(parent, n, paths=rng.sample(_FP, rng.randint(1, 3)),
                       terminating=rng.random() < 0.5)
    for _ in range(rng.randint(0, 6)):
        a, b = rng.choice(["targets", *names]), rng.choice(names)
        if a != b:
            r.delegate(a, b, paths=rng.sample(_FP, rng.randint(1, 2)),
                       terminating=rng.random() < 0.4)
    for n in ["targets", *names]:
        for p in rng.sample(_FPATHS, rng.randint(0, 4)):
            r.add_target(n, p, f"{n}:{p}".encode())
    r.publish()
    s, _ = _session(r, tmp_path / "dev")
    mine = {x.path: x.target for x in s.search("m")}
    for i, p in enumerate(x for x in _FPATHS if x.startswith("m/")):
        want = _ngclient(r, tmp_path / f"ref{i}").get_targetinfo(p)
        assert mine.get(p) == want, (seed, p)
