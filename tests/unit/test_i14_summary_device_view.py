"""Issue 14 must-show 5 (f14-summary): the change summary describes exactly what a device
would act on, and pending files that a device would read otherwise, or that redefine a
trusted key, are refused before anyone signs. Pure: Metadata objects, no disk but the
pending-file reader's."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from securesystemslib.signer import CryptoSigner, SSlibKey
from tuf.api.metadata import (
    DelegatedRole,
    Delegations,
    Metadata,
    MetaFile,
    Snapshot,
    SuccinctRoles,
)
from tuf.api.serialization.json import JSONSerializer

from modelward.publisher._summary import (
    MAX_PENDING,
    PendingMetadataError,
    check_pending,
    read_pending,
    summarize,
)
from modelward.updater._fields import noncanonical
from modelward.updater._search import Found
from modelward.updater._tuf import _candidate
from tests.unit.test_a14_sign_summary import NOW, _changes, _root, _target, _targets
from tests.unit.test_a14_sign_summary import S as _S

S = {**_S, "new": CryptoSigner.generate_ed25519()}


def _bytes(md: Metadata[Any]) -> bytes:
    return md.to_bytes(JSONSerializer(compact=False))


# --- one reading of the modelward fields -------------------------------------------

ODD = st.one_of(st.booleans(), st.integers(-2, 2), st.sampled_from(["", "false", "yes", None]),
                st.just([]), st.just({}))


@settings(max_examples=300, deadline=None)
@given(pinned=ODD, withdrawn=ODD, halted=ODD,
       rollout=st.one_of(st.none(), st.just(0), st.just(False), st.just({}),
                         st.integers(0, 10000).map(lambda b: {"basis_points": b})))
def test_i14_summary_shows_flags_and_rollout_as_the_device_reads_them(
        pinned: Any, withdrawn: Any, halted: Any, rollout: Any) -> None:
    """For any values, the + line says PINNED/WITHDRAWN/HALTED and the rollout share
    exactly when the device's _candidate reads them so (one function for both)."""
    fields: dict[str, Any] = {"pinned": pinned, "withdrawn": withdrawn}
    if isinstance(rollout, dict):
        rollout = {**rollout, "halted": halted}
    fields["rollout"] = rollout
    new = _target(**fields)
    cand = _candidate(Found(new.path, new, "targets"), "classifier")
    (line,) = [x for x in summarize("targets", _targets(1), _targets(2, new)) if
               x.startswith("  + ")]
    if cand is None:
        assert "IGNORED by devices" in line, line
        return
    assert ("PINNED" in line) == cand.pinned and ("WITHDRAWN" in line) == cand.withdrawn
    assert ("HALTED" in line) == cand.halted, line
    assert f"rollout {cand.percent:g}%" in line, line


@pytest.mark.parametrize(("fields", "why"), [
    ({"pinned": 1}, "pinned is 1"),
    ({"withdrawn": "false"}, "withdrawn is 'false'"),
    ({"rollout": 0}, "rollout is 0"),
    ({"rollout": {"basis_points": 5000, "halted": 1}}, "halted is 1"),
    ({"rollout": {"basis_points": True}}, "basis_points is True"),
    ({"version": 1}, "version is int"),
])
def test_i14_pending_targets_read_otherwise_by_devices_are_refused(
        fields: dict[str, Any], why: str) -> None:
    assert noncanonical(_target(**fields).custom["modelward"])
    data = _bytes(_targets(2, _target("other/other-1.0.0.tar"), _target(**fields)))
    with pytest.raises(PendingMetadataError, match=why):
        check_pending(Path("/k/pending/2.targets.json"), data, "targets", _root(), 1,
                      _targets(1, _target("other/other-1.0.0.tar")))


def test_i14_published_odd_target_kept_as_it_is_is_not_refused() -> None:
    """An entry published already (devices act on it now) does not block every later
    change; the summary still shows how devices read it."""
    odd = _target(pinned=1)
    data = _bytes(_targets(2, odd, _target("m/m-1.0.0.tar")))
    check_pending(Path("/k/pending/2.targets.json"), data, "targets", _root(), 1,
                  _targets(1, odd))
    lines = summarize("targets", _targets(1), _targets(2, odd))
    assert any("PINNED" in x and "NON-CANONICAL" in x for x in lines), lines


# --- keys are their content ----------------------------------------------------------


def test_i14_pending_root_with_a_keyid_that_is_not_its_keys_hash_is_refused() -> None:
    new = _root(2)
    k = S["new"].public_key
    fake = SSlibKey("ee" * 32, k.keytype, k.scheme, k.keyval)
    new.add_key(fake, "targets")
    md = Metadata(new)
    md.sign(S["root"])
    with pytest.raises(PendingMetadataError, match="hash is another keyid"):
        check_pending(Path("/k/pending/2.root.json"), _bytes(md), "root", _root(), 1)
    assert any("KEYID IS NOT THE HASH" in x for x in summarize("root", Metadata(_root()), md))


def test_i14_pending_root_adding_a_proper_key_is_accepted() -> None:
    new = _root(2)
    new.add_key(S["new"].public_key, "root")
    md = Metadata(new)
    md.sign(S["root"])
    check_pending(Path("/k/pending/2.root.json"), _bytes(md), "root", _root(), 1)


def test_i14_pending_delegation_redefining_a_published_keyid_is_refused() -> None:
    vid = S["vision"].public_key.keyid
    role = DelegatedRole("vision", [vid], 1, True, ["detector/*"])
    old = _targets(1, delegations=Delegations({vid: S["vision"].public_key}, {"vision": role}))
    evil = SSlibKey(vid, "ed25519", "ed25519", S["audio"].public_key.keyval)
    new = _targets(2, delegations=Delegations({vid: evil}, {"vision": role}))
    with pytest.raises(PendingMetadataError, match="another key behind keyid"):
        check_pending(Path("/k/pending/2.targets.json"), _bytes(new), "targets", _root(), 1,
                      old)
    assert any("vision" in x and "REPLACED" in x for x in _changes(summarize("targets", old,
                                                                             new)))


# --- delegations as TUF searches them -------------------------------------------------


def _role(name: str, paths: list[str] | None = None, prefixes: list[str] | None = None
          ) -> DelegatedRole:
    return DelegatedRole(name, [S[name].public_key.keyid], 1, True, paths, prefixes)


def _dl(*roles: DelegatedRole, succinct: SuccinctRoles | None = None) -> Delegations:
    keys = {S[n].public_key.keyid: S[n].public_key for n in ("vision", "audio")}
    return Delegations(keys, {r.name: r for r in roles} if not succinct else None, succinct)


def test_i14_role_inserted_before_an_existing_one_shows_the_search_order() -> None:
    old = _targets(1, delegations=_dl(_role("vision", ["detector/*"])))
    new = _targets(2, delegations=_dl(_role("audio", ["*"]), _role("vision", ["detector/*"])))
    assert any("search order" in x for x in summarize("targets", old, new))
    appended = _targets(2, delegations=_dl(_role("vision", ["detector/*"]),
                                           _role("audio", ["*"])))
    assert not any("search order" in x for x in summarize("targets", old, appended))


def test_i14_hash_prefix_and_succinct_changes_are_shown() -> None:
    old = _targets(1, delegations=_dl(_role("vision", prefixes=["00"])))
    new = _targets(2, delegations=_dl(_role("vision", prefixes=["00", "01"])))
    assert _changes(summarize("targets", old, new))
    kid = S["audio"].public_key.keyid
    a = _targets(1, delegations=_dl(succinct=SuccinctRoles([kid], 1, 4, "bin")))
    b = _targets(2, delegations=_dl(succinct=SuccinctRoles([kid], 1, 8, "bin")))
    assert any("256 hash bins" in x for x in _changes(summarize("targets", a, b)))


def test_i14_paths_differing_past_the_cut_are_each_shown() -> None:
    long = "detector/" + "x" * 300
    old = _targets(1, delegations=_dl(_role("vision", [long + "a"])))
    new = _targets(2, delegations=_dl(_role("vision", [long + "b"])))
    lines = _changes(summarize("targets", old, new))
    assert any("differ past" in x or x.startswith("  + delegation") for x in lines), lines


# --- what the summary has no words for is still a change ------------------------------


def test_i14_unrecognized_fields_anywhere_are_shown() -> None:
    root = _root(2)
    root.roles["targets"].unrecognized_fields["x-extra"] = 1
    assert any("x-extra" in x for x in summarize("root", Metadata(_root()), Metadata(root)))
    t = _targets(2, _target())
    t.signed.unrecognized_fields["x-signed"] = "y"
    tf = _target()
    tf.unrecognized_fields["custom"]["modelward"]["x-new"] = True
    tf.unrecognized_fields["custom"]["other"] = 1
    t.signed.targets[tf.path] = tf
    lines = _changes(summarize("targets", _targets(1, _target()), t))
    assert all(any(w in x for x in lines) for w in ("x-signed", "x-new", "custom.other")), lines
    meta = MetaFile(3, 10, {"sha256": "aa" * 32})
    meta2 = MetaFile(3, 10, {"sha256": "aa" * 32}, unrecognized_fields={"x-m": 1})
    s1 = Metadata(Snapshot(version=1, expires=NOW, meta={"targets.json": meta}))
    s2 = Metadata(Snapshot(version=2, expires=NOW, meta={"targets.json": meta2}))
    assert any("x-m" in x for x in summarize("snapshot", s1, s2))


# --- reading the pending file ---------------------------------------------------------


def test_i14_pending_reader_refuses_special_files_and_bounds_the_read(tmp_path: Path) -> None:
    fifo, d, link, big = (tmp_path / n for n in ("fifo", "dir", "link", "big"))
    os.mkfifo(fifo)
    d.mkdir()
    link.symlink_to("/dev/zero")
    for p, why in ((fifo, "FIFO"), (d, "directory"), (link, "symlink")):
        with pytest.raises(PendingMetadataError, match=why):
            read_pending(p)
    with open(big, "wb") as f:
        f.truncate(MAX_PENDING * 4)  # sparse: reading it whole would take 256 MiB
    assert len(read_pending(big)) == MAX_PENDING + 1
    with pytest.raises(PendingMetadataError, match="more than"):
        check_pending(tmp_path / "2.targets.json", read_pending(big), "targets", _root(), 1)


def test_i14_pending_with_nan_is_refused() -> None:
    doc = json.loads(_bytes(_targets(2, _target())))
    doc["signed"]["targets"]["classifier/classifier-1.0.0.tar"]["custom"]["x"] = float("nan")
    with pytest.raises(PendingMetadataError, match="canonical"):
        check_pending(Path("/k/pending/2.targets.json"), json.dumps(doc).encode(), "targets",
                      _root(), 1)


# --- self-attacks (f14-summary), each resisted ------------------------------------------


def test_i14_duplicate_json_keys_are_shown_as_the_published_bytes_will_say() -> None:
    """``"pinned": false, "pinned": true``: the summary, the signature and the published
    (re-serialised) bytes all use the last value, the one devices see."""
    text = _bytes(_targets(2, _target())).decode().replace(
        '"pinned": false', '"pinned": false, "pinned": true')
    checked = check_pending(Path("/k/pending/2.targets.json"), text.encode(), "targets",
                            _root(), 1, _targets(1))
    assert any("PINNED" in x for x in summarize("targets", _targets(1), checked.md))
    assert b'"pinned":true' in checked.md.to_bytes()


def test_i14_trusted_keyid_with_an_extra_field_is_refused() -> None:
    new = _root(2)
    rid = S["root"].public_key.keyid
    k = S["root"].public_key
    new.keys[rid] = SSlibKey(rid, k.keytype, k.scheme, k.keyval, {"x-hsm": "uri"})
    md = Metadata(new)
    md.sign(S["root"])
    with pytest.raises(PendingMetadataError, match="another key behind keyid"):
        check_pending(Path("/k/pending/2.root.json"), _bytes(md), "root", _root(), 1)


def test_i14_succinct_bins_with_a_key_missing_from_the_table_say_so() -> None:
    d = Delegations({}, succinct_roles=SuccinctRoles(["cd" * 32], 1, 2, "bin"))
    lines = summarize("targets", _targets(1), _targets(2, delegations=d))
    assert any("NOT IN THE KEY TABLE" in x and "4 hash bins" in x for x in lines), lines


def test_i14_hostile_delegation_name_is_one_escaped_line() -> None:
    kid = S["vision"].public_key.keyid
    name = "vision\n  + delegation to ok: paths [\"a/*\"]\x1b[8m"
    d = Delegations({kid: S["vision"].public_key},
                    {name: DelegatedRole(name, [kid], 1, True, ["*"])})
    lines = summarize("targets", _targets(1), _targets(2, delegations=d))
    assert sum(1 for x in lines if x.startswith("  + delegation")) == 1, lines
    assert all("\n" not in x and "\x1b" not in x for x in lines)
