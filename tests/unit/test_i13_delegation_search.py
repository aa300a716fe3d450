"""TUF's delegation search for a model's releases (issue 13 must-show 2, in memory).

Each case runs the device's real ``TufSession`` over an in-memory repository and checks
both what it finds and which metadata it asked for; a randomized differential test
compares every answer with python-tuf ngclient's own ``get_targetinfo``.
"""

from __future__ import annotations

import hashlib
import random
from pathlib import Path

import pytest
from tuf.ngclient import Updater

from modelward.simulator._tufmem import METADATA_URL, TARGETS_URL, MemFetcher, MemRepo
from modelward.updater.install._search import TOP, find_releases, preorder_walk, reachable_roles
from modelward.updater.install._tuf import TufSession

TOPLEVEL = ["root", "timestamp", "snapshot", "targets"]


def _session(repo: MemRepo, d: Path) -> tuple[TufSession, MemFetcher]:
    f = MemFetcher(repo)
    s = TufSession(d, METADATA_URL, TARGETS_URL, f, repo.root_bytes)
    s.refresh()
    return s, f


def _search(repo: MemRepo, d: Path, model: str = "m") -> tuple[dict[str, str], list[str]]:
    s, f = _session(repo, d)
    found = s.search(model)
    return {x.path: x.role for x in found}, f.roles_requested()[len(TOPLEVEL):]


def test_three_level_chain_is_followed(tmp_path: Path) -> None:
    r = MemRepo()
    r.delegate("targets", "a", paths=["m/*"])
    r.delegate("a", "b", paths=["m/*"])
    r.delegate("b", "c", paths=["m/*"])
    r.add_target("c", "m/m-1.tar")
    r.publish()
    found, fetched = _search(r, tmp_path)
    assert found == {"m/m-1.tar": "c"}
    assert fetched == ["a", "b", "c"]


def test_terminating_role_hides_a_later_sibling(tmp_path: Path) -> None:
    r = MemRepo()
    r.delegate("targets", "first", paths=["m/*"], terminating=True)
    r.delegate("targets", "second", paths=["m/*"])
    r.add_target("first", "m/m-1.tar")
    r.add_target("second", "m/m-9.tar")
    r.publish()
    found, fetched = _search(r, tmp_path)
    assert found == {"m/m-1.tar": "first"}
    assert fetched == ["first"]  # the hidden sibling is never fetched


def test_partly_terminating_role_hides_only_its_paths(tmp_path: Path) -> None:
    r = MemRepo()
    r.delegate("targets", "first", paths=["m/a*"], terminating=True)
    r.delegate("targets", "second", paths=["m/*"])
    r.add_target("second", "m/a1.tar")  # hidden: the search for it ends at `first`
    r.add_target("second", "m/b1.tar")
    r.publish()
    found, fetched = _search(r, tmp_path)
    assert found == {"m/b1.tar": "second"}
    assert fetched == ["first", "second"]


def test_earlier_sibling_wins_a_path_both_list(tmp_path: Path) -> None:
    r = MemRepo()
    r.delegate("targets", "first", paths=["m/*"])
    r.delegate("targets", "second", paths=["m/*"])
    tf = r.add_target("first", "m/m-1.tar", b"first")
    r.add_target("second", "m/m-1.tar", b"second")
    r.publish()
    s, f = _session(r, tmp_path)
    (hit,) = s.search("m")
    assert (hit.role, hit.target.hashes) == ("first", tf.hashes)
    assert f.roles_requested()[4:] == ["first", "second"]


def test_two_roles_delegating_to_a_third(tmp_path: Path) -> None:
    r = MemRepo()
    r.delegate("targets", "a", paths=["m/a*"])
    r.delegate("targets", "b", paths=["m/b*"])
    r.delegate("a", "shared", paths=["m/a*"])
    r.delegate("b", "shared", paths=["m/b*"])
    for p in ("m/a1.tar", "m/b1.tar", "m/c1.tar"):
        r.add_target("shared", p)
    r.publish()
    found, fetched = _search(r, tmp_path)
    assert found == {"m/a1.tar": "shared", "m/b1.tar": "shared"}  # m/c1: delegated by none
    assert fetched == ["a", "shared", "b"]  # `shared` fetched once


def test_path_not_delegated_by_every_role_in_the_chain_is_ignored(tmp_path: Path) -> None:
    r = MemRepo()
    r.delegate("targets", "a", paths=["m/*"])
    r.delegate("a", "b", paths=["m/b-*"])
    r.delegate("b", "c", paths=["m/*"])  # c may list m/*, but b passed on only m/b-*
    r.add_target("c", "m/b-1.tar")
    r.add_target("c", "m/x-1.tar")
    r.publish()
    found, fetched = _search(r, tmp_path)
    assert found == {"m/b-1.tar": "c"}
    assert fetched == ["a", "b", "c"]


def test_roles_for_other_models_are_never_fetched(tmp_path: Path) -> None:
    r = MemRepo()
    r.delegate("targets", "vision", paths=["detector/*"], terminating=True)
    r.delegate("targets", "speech", paths=["asr/*", "m/*"])
    r.delegate("speech", "deep", paths=["asr/*"])
    r.add_target("vision", "detector/m-1.tar")
    r.add_target("speech", "m/m-1.tar")
    r.add_target(TOP, "other/m-1.tar")
    r.publish()
    found, fetched = _search(r, tmp_path)
    assert found == {"m/m-1.tar": "speech"}
    assert fetched == ["speech"]


def test_hash_prefix_delegations(tmp_path: Path) -> None:
    def h(p: str) -> str:
        return hashlib.sha256(p.encode()).hexdigest()

    r = MemRepo()
    a, b = "m/a.tar", "m/b.tar"
    r.delegate("targets", "bin-a", hash_prefixes=[h(a)[:4]], terminating=True)
    r.delegate("targets", "bin-b", hash_prefixes=[h(b)[:4]], terminating=True)
    r.add_target("bin-a", a)
    r.add_target("bin-a", b)  # outside its prefixes
    r.add_target("bin-b", b)
    r.publish()
    found, fetched = _search(r, tmp_path)
    assert found == {a: "bin-a", b: "bin-b"}
    assert fetched == ["bin-a", "bin-b"]


def test_cycle_is_visited_once(tmp_path: Path) -> None:
    r = MemRepo()
    r.delegate("targets", "a", paths=["m/*"])
    r.delegate("a", "b", paths=["m/*"])
    r.delegate("b", "a", paths=["m/*"])
    r.add_target("b", "m/m-1.tar")
    r.publish()
    found, fetched = _search(r, tmp_path)
    assert found == {"m/m-1.tar": "b"}
    assert fetched == ["a", "b"]


def test_visited_roles_are_bounded(tmp_path: Path) -> None:
    r = MemRepo()
    parent = "targets"
    for i in range(40):
        r.delegate(parent, f"r{i}", paths=["m/*"])
        parent = f"r{i}"
    r.add_target("r39", "m/deep.tar")
    r.add_target("r5", "m/shallow.tar")
    r.publish()
    found, fetched = _search(r, tmp_path)
    assert found == {"m/shallow.tar": "r5"}
    assert len(fetched) == 32  # ngclient's max_delegations


def test_a_role_that_fails_to_verify_ends_the_search(tmp_path: Path) -> None:
    from tuf.api.metadata import Metadata

    from modelward.updater.errors import MetadataError

    r = MemRepo()
    r.delegate("targets", "team", paths=["m/*"])
    r.add_target("team", "m/m-1.tar")
    r.publish()
    url = f"{METADATA_URL}2.team.json"
    md = Metadata.from_bytes(r.served[url])
    md.signed.version = 3  # not what the snapshot names, and the signature breaks
    r.served[url] = md.to_bytes()
    s, _ = _session(r, tmp_path)
    with pytest.raises(MetadataError, match="delegated role team"):
        s.search("m")


def test_delegated_metadata_is_quoted_and_kept_as_ngclient_does(tmp_path: Path) -> None:
    r = MemRepo()
    r.delegate("targets", "team/a b", paths=["m/*"])
    r.add_target("team/a b", "m/m-1.tar")
    r.publish()
    found, fetched = _search(r, tmp_path)
    assert found == {"m/m-1.tar": "team/a b"} and fetched == ["team/a b"]
    assert (tmp_path / "team%2Fa%20b.json").is_file()
    # and a second session reads it from there: nothing fetched but the timestamp
    s, f = _session(r, tmp_path)
    assert [x.role for x in s.search("m")] == ["team/a b"]
    assert f.roles_requested() == ["root", "timestamp"]


def test_a_role_reached_through_a_parent_whose_keys_it_lacks(tmp_path: Path) -> None:
    from securesystemslib.signer import CryptoSigner

    from modelward.updater.errors import MetadataError

    r = MemRepo()
    r.delegate("targets", "left", paths=["m/a*"])
    r.delegate("targets", "right", paths=["m/b*"])
    r.delegate("left", "shared", paths=["m/a*"])
    r.delegate("right", "shared", paths=["m/b*"], key=CryptoSigner.generate_ed25519())
    r.add_target("shared", "m/a1.tar")
    r.publish()
    s, _ = _session(r, tmp_path / "a")
    assert [x.path for x in s.search("m")] == ["m/a1.tar"]  # nothing listed needs `right`
    r.add_target("shared", "m/b1.tar")
    r.publish()
    u = Updater(str(tmp_path / "ref"), METADATA_URL, target_base_url=TARGETS_URL,
                fetcher=MemFetcher(r), bootstrap=r.root_bytes)
    with pytest.raises(Exception) as ref:
        u.get_targetinfo("m/b1.tar")  # ngclient: `shared` does not verify through `right`
    s, _ = _session(r, tmp_path / "b")
    with pytest.raises(MetadataError, match=type(ref.value).__name__):
        s.search("m")


def test_metadata_that_cannot_be_written_is_a_typed_error(tmp_path: Path) -> None:
    import shutil

    from modelward.updater.errors import StagingError

    r = MemRepo()
    f = MemFetcher(r)
    s = TufSession(tmp_path / "md", METADATA_URL, TARGETS_URL, f, r.root_bytes)
    shutil.rmtree(tmp_path / "md")  # ngclient persists the timestamp as it verifies
    with pytest.raises(StagingError, match="cannot write TUF metadata"):
        s.refresh()


# -- differential: the device's search against ngclient's, on random graphs ---------

_PATTERNS = ["m/*", "m/a*", "m/a1.tar", "m/b*", "*/*", "x/*", "m/*.tar", "m/b2.tar", "m/?1*",
             "*", "m/*/*"]
_PATHS = ["m/a1.tar", "m/a2.tar", "m/b1.tar", "m/b2.tar", "x/a1.tar", "m/sub/a.tar",
          "m/c1.tar"]


def _random_repo(rng: random.Random) -> MemRepo:
    r = MemRepo()
    names = [f"r{i}" for i in range(rng.randint(1, 7))]
    for i, name in enumerate(names):
        parent = rng.choice(["targets", "targets", *names[:i]])
        if rng.random() < 0.2:
            prefixes = [hashlib.sha256(rng.choice(_PATHS).encode()).hexdigest()[:1],
                        rng.choice("0123456789abcdef")]
            r.delegate(parent, name, hash_prefixes=prefixes,
                       terminating=rng.random() < 0.4)
        else:
            r.delegate(parent, name, paths=rng.sample(_PATTERNS, rng.randint(1, 2)),
                       terminating=rng.random() < 0.4)
    for _ in range(rng.randint(0, 3)):  # extra edges: diamonds and cycles
        a, b = rng.choice(["targets", *names]), rng.choice(names)
        if a != b:
            r.delegate(a, b, paths=rng.sample(_PATTERNS, 1), terminating=rng.random() < 0.3)
    for name in ["targets", *names]:
        if name in r.roles:
            for p in rng.sample(_PATHS, rng.randint(0, 3)):
                r.add_target(name, p, f"{name}:{p}".encode())
    r.publish()
    return r


@pytest.mark.parametrize("seed", range(150))
def test_same_answers_as_ngclient_and_a_superset_of_its_fetches(
    seed: int, tmp_path: Path
) -> None:
    rng = random.Random(seed)
    r = _random_repo(rng)
    s, f = _session(r, tmp_path / "device")
    mine = {x.path: x for x in s.search("m")}
    ours = set(f.roles_requested()[len(TOPLEVEL):])
    need: set[str] = set()
    for i, path in enumerate(p for p in _PATHS if p.startswith("m/") and p.count("/") == 1):
        ref = MemFetcher(r)
        u = Updater(str(tmp_path / f"ref{i}"), METADATA_URL, target_base_url=TARGETS_URL,
                    fetcher=ref, bootstrap=r.root_bytes)
        want = u.get_targetinfo(path)
        got = mine.get(path)
        assert (got.target if got else None) == want, (seed, path)
        need |= set(ref.roles_requested()[len(TOPLEVEL):])
    # Every role ngclient visits for a release path is one the device fetched.
    assert need <= ours, (seed, need - ours)


def test_pure_walk_matches_on_loaded_roles() -> None:
    """The pure functions need no I/O: a dict of Targets is enough."""
    r = MemRepo()
    r.delegate("targets", "a", paths=["m/*"], terminating=True)
    r.delegate("targets", "b", paths=["m/*"])
    r.add_target("a", "m/1.tar")
    roles = {name: md.signed for name, md in r.roles.items()}

    def load(role: str, _delegator: str) -> object:
        return roles[role]

    reach = reachable_roles("m", load)  # type: ignore[arg-type]
    assert reach.roles() == ["targets", "a"]
    assert preorder_walk("m/1.tar", load) == ("a", roles["a"].targets["m/1.tar"])  # type: ignore[arg-type]
    found, _ = find_releases("m", load)  # type: ignore[arg-type]
    assert [(x.path, x.role) for x in found] == [("m/1.tar", "a")]


def test_class_reasoning_is_sound_against_tufs_own_matcher() -> None:
    """What the walk claims to know about patterns holds for every sample path."""
    from tuf.api.metadata import DelegatedRole

    from modelward.updater.install._search import (
        _atom_implies,
        _atom_possible,
        _atom_universal,
        _atoms_disjoint,
        _Hash,
        _Pattern,
    )

    pats = ["m/*", "m/a*", "m/a1.tar", "m/b*", "*/*", "x/*", "m/*.tar", "m/b2.tar", "m/?1*",
            "*", "m/*/*", "m/[ab]*", "?/a*", "m/**", "m/a1.tar*"]
    paths = [f"m/{a}{b}{c}" for a in ("a", "b", "c", "") for b in ("1", "2", "")
             for c in (".tar", "")]
    paths = [p for p in paths if p != "m/"]

    def hit(atom: object, path: str) -> bool:
        if isinstance(atom, _Pattern):
            role = DelegatedRole("r", [], 1, False, paths=[atom.pattern])
        else:
            assert isinstance(atom, _Hash)
            role = DelegatedRole("r", [], 1, False, path_hash_prefixes=sorted(atom.prefixes))
        return role.is_delegated_path(path)

    atoms: list[object] = [_Pattern(p) for p in pats]
    atoms += [_Hash(frozenset({p})) for p in ("", "0", "a", "ab", "f")]
    for a in atoms:
        if not _atom_possible(a, "m"):  # type: ignore[arg-type]
            assert not any(hit(a, p) for p in paths), a
        if _atom_universal(a, "m"):  # type: ignore[arg-type]
            assert all(hit(a, p) for p in paths), a
        for b in atoms:
            if _atoms_disjoint(a, b, "m"):  # type: ignore[arg-type]
                assert not any(hit(a, p) and hit(b, p) for p in paths), (a, b)
            if _atom_implies(a, b, "m"):  # type: ignore[arg-type]
                assert all(hit(b, p) for p in paths if hit(a, p)), (a, b)
