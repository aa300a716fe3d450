"""Attacks (a14-operator) on `repo sign`'s change summary and pending-file checks, as
someone who can write ``KEYS/pending`` (a pending file may be planted unsigned: the
summary is then the signer's only protection), or one delegated team.

Each xfail says what works today; its assertions say what should happen.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from securesystemslib.signer import CryptoSigner, SSlibKey
from tuf.api.metadata import (
    DelegatedRole,
    Delegations,
    Metadata,
    MetaFile,
    Root,
    Snapshot,
    SuccinctRoles,
    TargetFile,
    Targets,
    Timestamp,
)
from tuf.api.serialization.json import JSONSerializer

from modelward.publisher._summary import (
    PendingChangedError,
    PendingMetadataError,
    check_pending,
    summarize,
)
from modelward.updater.install._search import Found
from modelward.updater.install._tuf import _candidate

NOW = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
FP = "ab" * 32
S = {r: CryptoSigner.generate_ed25519()
     for r in ("root", "root2", "targets", "snapshot", "timestamp", "vision", "audio")}


def _as(keyid: str) -> CryptoSigner:
    """An attacker's key that signs under someone else's ``keyid``."""
    priv = ed25519.Ed25519PrivateKey.generate()
    raw = priv.public_key().public_bytes(serialization.Encoding.Raw,
                                         serialization.PublicFormat.Raw)
    return CryptoSigner(priv, SSlibKey(keyid, "ed25519", "ed25519", {"public": raw.hex()}))


def _root(version: int = 1) -> Root:
    root = Root(version=version, expires=NOW + timedelta(days=365))
    for role in ("root", "targets", "snapshot", "timestamp"):
        root.add_key(S[role].public_key, role)
    return root


def _target(path: str = "classifier/classifier-1.0.0.tar", **fields: Any) -> TargetFile:
    tf = TargetFile(100, {"sha256": "11" * 32}, path)
    tf.unrecognized_fields["custom"] = {"modelward": {
        "name": path.split("/")[0], "version": "1.0.0", "fingerprint": FP,
        "channel": "stable", "rollout": {"basis_points": 10000, "halted": False},
        "pinned": False, **fields}}
    return tf


def _targets(version: int, *targets: TargetFile,
             delegations: Delegations | None = None) -> Metadata[Targets]:
    return Metadata(Targets(version=version, expires=NOW + timedelta(days=365),
                            targets={t.path: t for t in targets}, delegations=delegations))


def _changes(lines: list[str]) -> list[str]:
    """The change lines (not the header, expiry and signature lines)."""
    return [x for x in lines[2:-1] if not x.startswith("  no other change")]


def _role(name: str, paths: list[str], terminating: bool = True) -> DelegatedRole:
    return DelegatedRole(name=name, keyids=[S[name].public_key.keyid], threshold=1,
                         terminating=terminating, paths=paths)


def _delegations(*roles: DelegatedRole) -> Delegations:
    keys = {S[r.name].public_key.keyid: S[r.name].public_key for r in roles}
    return Delegations(keys=keys, roles={r.name: r for r in roles})


# --- keys swapped behind unchanged keyids --------------------------------------------


def test_a14_root_key_swapped_behind_same_keyid_is_shown() -> None:
    new = _root(2)
    tid = S["targets"].public_key.keyid
    new.keys[tid] = _as(tid).public_key
    lines = summarize("root", Metadata(_root(1)), Metadata(new), NOW)
    assert any("targets" in x for x in _changes(lines)), lines


def test_a14_pending_root_cannot_redefine_a_trusted_keyid() -> None:
    new = _root(2)
    rid = S["root"].public_key.keyid
    forged = _as(rid)
    new.keys[rid] = forged.public_key
    md = Metadata(new)
    md.sign(forged)
    data = md.to_bytes(JSONSerializer(compact=False))
    with pytest.raises(PendingMetadataError):
        check_pending(Path("/k/pending/2.root.json"), data, "root", _root(1), 1)


def test_a14_delegation_key_swapped_behind_same_keyid_is_shown() -> None:
    old = _delegations(_role("vision", ["detector/*"]))
    new = _delegations(_role("vision", ["detector/*"]))
    vid = S["vision"].public_key.keyid
    new.keys[vid] = _as(vid).public_key
    lines = summarize("targets", _targets(1, delegations=old), _targets(2, delegations=new))
    assert any("vision" in x for x in _changes(lines)), lines


# --- delegations the summary does not see ---------------------------------------------


def test_a14_succinct_delegation_added_is_shown() -> None:
    atk = S["audio"].public_key
    d = Delegations(keys={atk.keyid: atk},
                    succinct_roles=SuccinctRoles([atk.keyid], 1, 1, "bin"))
    lines = summarize("targets", _targets(1, _target()), _targets(2, _target(), delegations=d))
    assert _changes(lines), lines
    assert any(atk.keyid[:16] in x for x in lines), lines


def test_a14_delegation_order_change_is_shown() -> None:
    vision, audio = _role("vision", ["detector/*"]), _role("audio", ["detector/*", "audio/*"])
    old = _targets(1, delegations=_delegations(vision, audio))
    new = _targets(2, delegations=_delegations(audio, vision))
    path = "detector/detector-9.0.0.tar"
    assert next(iter(old.signed.delegations.get_roles_for_target(path)))[0] == "vision"
    assert next(iter(new.signed.delegations.get_roles_for_target(path)))[0] == "audio"
    lines = summarize("targets", old, new)
    assert _changes(lines), lines


def test_a14_delegation_paths_widened_past_the_display_cut_are_shown() -> None:
    paths = [f"detector/{c * 60}-*" for c in "abc"]
    old = _delegations(_role("vision", paths))
    new = _delegations(_role("vision", [*paths, "*/*"]))
    assert new.roles is not None and new.roles["vision"].is_delegated_path("audio/a-1.tar")
    lines = summarize("targets", _targets(1, delegations=old), _targets(2, delegations=new))
    assert any("vision" in x for x in _changes(lines)), lines


def test_a14_delegation_terminating_and_threshold_changes_are_shown() -> None:
    """Resists: terminating, threshold and hash-prefix scopes are in the summary."""
    old = _delegations(_role("vision", ["detector/*"]))
    new = _delegations(_role("vision", ["detector/*"], terminating=False))
    lines = summarize("targets", _targets(1, delegations=old), _targets(2, delegations=new))
    assert any("non-terminating" in x for x in _changes(lines)), lines


# --- modelward fields as the device reads them ---------------------------------------


@pytest.mark.parametrize(("where", "value", "word"), [
    ("pinned", 1, "PINNED"),
    ("pinned", "false", "PINNED"),
    ("withdrawn", 1, "WITHDRAWN"),
    ("halted", 1, "HALTED"),
])
def test_a14_flags_shown_as_the_device_reads_them(where: str, value: Any, word: str) -> None:
    fields: dict[str, Any] = {where: value}
    if where == "halted":
        fields = {"rollout": {"basis_points": 10000, "halted": value}}
    new = _target(**fields)
    cand = _candidate(Found(new.path, new, "targets"), "classifier")
    assert cand is not None and getattr(cand, where) is True  # what devices will do
    for old in (_targets(1, _target()), _targets(1)):
        lines = summarize("targets", old, _targets(2, new))
        assert any(word in x for x in _changes(lines)), lines


# --- snapshot and timestamp fields ---------------------------------------------------


@pytest.mark.parametrize("role", ["timestamp", "snapshot"])
def test_a14_meta_length_and_hash_changes_are_shown(role: str) -> None:
    good = MetaFile(3, 1000, {"sha256": "aa" * 32})
    bad = MetaFile(3, 10, {"sha256": "bb" * 32})
    old: Metadata[Any]
    new: Metadata[Any]
    if role == "timestamp":
        old = Metadata(Timestamp(version=5, expires=NOW, snapshot_meta=good))
        new = Metadata(Timestamp(version=6, expires=NOW, snapshot_meta=bad))
    else:
        old = Metadata(Snapshot(version=5, expires=NOW, meta={"targets.json": good}))
        new = Metadata(Snapshot(version=6, expires=NOW, meta={"targets.json": bad}))
    assert _changes(summarize(role, old, new)), summarize(role, old, new)


# --- pending bytes the checks do not handle -----------------------------------------


def test_a14_pending_with_a_float_is_a_clean_refusal() -> None:
    tf = TargetFile(1, {"sha256": "00"}, "m/m.tar")
    tf.unrecognized_fields["custom"] = {"modelward": {"rollout": {"basis_points": 1.5}}}
    doc = json.loads(_targets(2, tf).to_bytes(JSONSerializer()))
    doc["signatures"] = [{"keyid": S["targets"].public_key.keyid, "sig": "00" * 64}]
    with pytest.raises(PendingMetadataError):
        check_pending(Path("/k/pending/2.targets.json"), json.dumps(doc).encode(), "targets",
                      _root(1), 1)


def test_a14_root_with_a_new_keyid_signature_from_unknown_key_is_refused() -> None:
    """Resists: a signature entry whose keyid is in neither root is refused."""
    md = Metadata(_root(2))
    md.sign(S["audio"])
    with pytest.raises(PendingChangedError):
        check_pending(Path("/k/pending/2.root.json"),
                      md.to_bytes(JSONSerializer()), "root", _root(1), 1)


@pytest.mark.parametrize("rollout", [0, False, "", {}, {"halted": False}])
def test_a14_rollout_shown_as_the_device_reads_it(rollout: Any) -> None:
    new = _target("classifier/classifier-2.0.0.tar", version="2.0.0")
    new.unrecognized_fields["custom"]["modelward"]["rollout"] = rollout
    cand = _candidate(Found(new.path, new, "targets"), "classifier")
    assert cand is not None and cand.percent == 100.0 and not cand.halted
    lines = summarize("targets", _targets(1), _targets(2, new))
    added = [x for x in lines if x.startswith("  + ")]
    assert len(added) == 1 and "rollout 100%" in added[0], added
