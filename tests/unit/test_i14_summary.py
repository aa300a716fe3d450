"""Issue 14 must-show 5, pure parts: the change summary `repo sign` prints, and the checks
of a pending file before it gets another signature (no disk, no TPM: Metadata objects)."""

from __future__ import annotations

import copy
import json
import unicodedata
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from securesystemslib.signer import CryptoSigner
from tuf.api.metadata import (
    DelegatedRole,
    Delegations,
    Metadata,
    MetaFile,
    Root,
    Snapshot,
    TargetFile,
    Targets,
    Timestamp,
)
from tuf.api.serialization.json import JSONSerializer

from modelward.publisher._summary import (
    MAX_PENDING,
    PendingChangedError,
    PendingMetadataError,
    check_pending,
    escape,
    summarize,
)

NOW = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
FP = "ab" * 32
SIGNERS = {role: CryptoSigner.generate_ed25519()
           for role in ("root", "root2", "targets", "snapshot", "timestamp", "team", "other")}


def _root(version: int = 1) -> Root:
    root = Root(version=version, expires=NOW + timedelta(days=365))
    for role in ("root", "targets", "snapshot", "timestamp"):
        root.add_key(SIGNERS[role].public_key, role)
    return root


def _target(path: str = "classifier/classifier-1.0.0.tar", *, name: Any = "classifier",
            version: Any = "1.0.0", fp: Any = FP, rollout: Any = None, length: int = 100,
            sha: str = "11" * 32, **extra: Any) -> TargetFile:
    tf = TargetFile(length, {"sha256": sha}, path)
    fields = {"name": name, "version": version, "fingerprint": fp, "channel": "stable",
              "rollout": rollout if rollout is not None else
              {"basis_points": 10000, "halted": False}, "pinned": False, **extra}
    tf.unrecognized_fields["custom"] = {"modelward": fields}
    return tf


def _targets(version: int, *targets: TargetFile,
             delegations: Delegations | None = None) -> Metadata[Targets]:
    return Metadata(Targets(version=version, expires=NOW + timedelta(days=365),
                            targets={t.path: t for t in targets}, delegations=delegations))


def _all_printable(lines: list[str]) -> None:
    for line in lines:
        assert "\n" not in line and "\r" not in line
        bad = [c for c in line if c != " " and unicodedata.category(c) in
               {"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp", "Zs"}]
        assert not bad, (line, bad)


# --- escape ------------------------------------------------------------------------


@pytest.mark.parametrize(("raw", "shown"), [
    ("plain-1.0.0", "plain-1.0.0"),
    ("\x1b]0;owned\x07", "\\x1b]0;owned\\x07"),  # OSC: retitles the window
    ("\x1b[8mhidden", "\\x1b[8mhidden"),  # SGR conceal
    ("a\nforged row", "a\\nforged row"),
    ("a\rb", "a\\rb"),
    ("evil\u202egpj.exe", "evil\\u202egpj.exe"),  # bidi override
    ("zero\u200bwidth", "zero\\u200bwidth"),
    ("no\u00a0break", "no\\xa0break"),
    ("line\u2028sep", "line\\u2028sep"),
    ("back\\x1b", "back\\\\x1b"),  # a literal backslash cannot pose as an escape
    ("\U000e0041tag", "\\U000e0041tag"),  # a tag character (format, invisible)
    ("ünïcode ok", "ünïcode ok"),
])
def test_escape(raw: str, shown: str) -> None:
    assert escape(raw) == shown


def test_escape_cuts_long_strings_and_says_so() -> None:
    out = escape("x" * 5000)
    assert out.startswith("x" * 200) and out.endswith("...") and len(out) == 203


@pytest.mark.parametrize("value", [None, 3, 2.5, ["a\x1b"], {"k": "\x1b"}, True])
def test_escape_any_json_value(value: object) -> None:
    out = escape(value)
    _all_printable([out])


# --- targets ---------------------------------------------------------------------


def test_added_target_shows_model_version_and_fingerprint() -> None:
    lines = summarize("targets", _targets(1), _targets(2, _target()), NOW)
    assert lines[0] == "targets: version 1 -> 2"
    added = [x for x in lines if x.startswith("  + ")]
    assert len(added) == 1
    assert "classifier/classifier-1.0.0.tar" in added[0]
    assert "model classifier version 1.0.0" in added[0]
    assert f"fingerprint {FP}" in added[0] and "rollout 100%" in added[0]
    assert "100 bytes sha256 1111111111111111" in added[0]


def test_removed_target() -> None:
    lines = summarize("targets", _targets(1, _target()), _targets(2), NOW)
    assert any(x.startswith("  - classifier/classifier-1.0.0.tar: model classifier") for x in lines)


@pytest.mark.parametrize(("before", "after", "expect"), [
    ({}, {"rollout": {"basis_points": 1000, "halted": False}}, "rollout 100% -> 10%"),
    ({"rollout": {"basis_points": 1000, "halted": False}},
     {"rollout": {"basis_points": 1000, "halted": True}}, "rollout 10% -> 10%, HALTED"),
    ({}, {"pinned": True}, "now PINNED"),
    ({"pinned": True}, {}, "no longer PINNED"),
    ({}, {"withdrawn": True}, "now WITHDRAWN"),
    ({}, {"fp": "cd" * 32}, f"fingerprint {FP} -> {'cd' * 32}"),
    ({}, {"version": "1.0.1"}, "version 1.0.0 -> 1.0.1"),
    ({}, {"channel": "beta"}, "channel stable -> beta"),
    ({}, {"sha": "22" * 32}, "BYTES CHANGED: 100 -> 100 bytes, sha256 1111111111111111 -> "
     "2222222222222222"),
    ({}, {"length": 7}, "BYTES CHANGED: 100 -> 7 bytes"),
    ({}, {"note": "x"}, "note - -> x"),
])
def test_changed_target(before: dict[str, Any], after: dict[str, Any], expect: str) -> None:
    lines = summarize("targets", _targets(1, _target(**before)), _targets(2, _target(**after)))
    changed = [x for x in lines if x.startswith("  ~ ")]
    assert any(expect in x for x in changed), lines
    assert all(x.startswith("  ~ classifier/classifier-1.0.0.tar: ") for x in changed)


def test_unchanged_target_is_not_listed() -> None:
    lines = summarize("targets", _targets(1, _target()), _targets(2, _target()))
    assert lines[2] == "  no other change (re-signed with a new version and expiry)"


@pytest.mark.parametrize("custom", [
    None, "modelward", ["list"], {"modelward": "str"}, {"modelward": []},
    {"modelward": {"name": {"nested": ["\x1b"]}, "version": 3, "rollout": "all",
                   "fingerprint": None, "pinned": "yes", "withdrawn": 1}},
    {"modelward": {"rollout": {"basis_points": 12.5, "halted": "no"}}},
    {"modelward": {"rollout": {"basis_points": "\x1b[2J"}}},
    {"modelward": {"rollout": []}},
])
def test_odd_custom_shapes_never_raise(custom: Any) -> None:
    tf = TargetFile(5, {"sha256": "00"}, "m/m.tar")
    if custom is not None:
        tf.unrecognized_fields["custom"] = custom
    for old, new in ((_targets(1), _targets(2, tf)), (_targets(1, tf), _targets(2)),
                     (_targets(1, _target("m/m.tar")), _targets(2, tf)),
                     (_targets(1, tf), _targets(2, _target("m/m.tar")))):
        lines = summarize("targets", old, new)
        _all_printable(lines)


def test_hostile_team_strings_are_escaped() -> None:
    hostile = "det\x1b]0;pwned\x07\n  + fake/row.tar: model ok"
    tf = _target(f"{hostile}/x.tar", name=hostile, version="1.0.0\x1b[8m",
                 fp="\u202e" + FP, channel="st\rable")
    lines = summarize("targets", _targets(1), _targets(2, tf))
    _all_printable(lines)
    assert sum(1 for x in lines if x.startswith("  + ")) == 1  # no forged row
    assert "\\x1b]0;pwned\\x07\\n" in lines[2] and "\\u202e" in lines[2]


def test_many_targets_are_all_listed() -> None:
    new = _targets(2, *[_target(f"m/m-{i}.tar", version=f"1.0.{i}") for i in range(300)])
    lines = summarize("targets", _targets(1), new)
    assert sum(1 for x in lines if x.startswith("  + ")) == 300


# --- delegations -------------------------------------------------------------------


def _delegations(**role: Any) -> Delegations:
    spec = {"name": "vision", "keyids": [SIGNERS["team"].public_key.keyid], "threshold": 1,
            "terminating": True, "paths": ["detector/*"], **role}
    keys = {k: SIGNERS["team"].public_key if k == SIGNERS["team"].public_key.keyid else
            SIGNERS["other"].public_key for k in spec["keyids"]}
    return Delegations(keys=keys, roles={spec["name"]: DelegatedRole(**spec)})


def test_delegation_added_and_removed() -> None:
    lines = summarize("targets", _targets(1), _targets(2, delegations=_delegations()))
    assert any(x.startswith("  + delegation to vision: paths [\"detector/*\"], threshold 1, "
                            "keys ") for x in lines), lines
    lines = summarize("targets", _targets(1, delegations=_delegations()), _targets(2))
    assert "  - delegation to vision removed" in lines


@pytest.mark.parametrize(("change", "expect"), [
    ({"paths": ["*"]}, '-> paths ["*"]'),
    ({"terminating": False}, "non-terminating"),
    ({"threshold": 2, "keyids": [SIGNERS["team"].public_key.keyid,
                                 SIGNERS["other"].public_key.keyid]}, "threshold 1 -> "),
    ({"paths": None, "path_hash_prefixes": ["ab"]}, 'hash prefixes ["ab"]'),
])
def test_delegation_changed(change: dict[str, Any], expect: str) -> None:
    lines = summarize("targets", _targets(1, delegations=_delegations()),
                      _targets(2, delegations=_delegations(**change)))
    assert any(expect in x for x in lines if x.startswith("  ~ delegation to vision")), lines


def test_delegation_key_swapped() -> None:
    other = SIGNERS["other"].public_key.keyid
    lines = summarize("targets", _targets(1, delegations=_delegations()),
                      _targets(2, delegations=_delegations(keyids=[other])))
    assert f"  + delegation to vision: key {other[:16]} ed25519/ed25519" in lines
    assert any(x.startswith("  - delegation to vision: key ") for x in lines)


def test_hostile_delegated_role_name_is_escaped() -> None:
    lines = summarize("targets", _targets(1),
                      _targets(2, delegations=_delegations(name="v\x1b[8m\nx")))
    _all_printable(lines)


# --- root ----------------------------------------------------------------------------


def test_root_key_added_threshold_changed() -> None:
    old, new = _root(1), _root(2)
    new.add_key(SIGNERS["root2"].public_key, "root")
    new.roles["root"].threshold = 2
    lines = summarize("root", Metadata(old), Metadata(new), NOW)
    assert lines[0] == "root: version 1 -> 2"
    assert "  ~ root threshold 1 -> 2 (of 2 keys)" in lines
    assert f"  + root key {SIGNERS['root2'].public_key.keyid[:16]} ed25519/ed25519" in lines


def test_root_key_rotated_and_threshold_lowered() -> None:
    old, new = _root(1), _root(2)
    old.add_key(SIGNERS["root2"].public_key, "root")
    old.roles["root"].threshold = 2
    new.revoke_key(SIGNERS["targets"].public_key.keyid, "targets")
    new.add_key(SIGNERS["other"].public_key, "targets")
    lines = summarize("root", Metadata(old), Metadata(new), NOW)
    assert f"  - targets key {SIGNERS['targets'].public_key.keyid[:16]} ed25519/ed25519" in lines
    assert f"  + targets key {SIGNERS['other'].public_key.keyid[:16]} ed25519/ed25519" in lines
    assert f"  - root key {SIGNERS['root2'].public_key.keyid[:16]} ed25519/ed25519" in lines
    assert "  ~ root threshold 2 -> 1 (of 1 keys)" in lines


def test_root_version_skip_and_past_expiry_are_flagged() -> None:
    new = _root(4)
    new.expires = NOW - timedelta(seconds=1)
    lines = summarize("root", Metadata(_root(1)), Metadata(new), NOW)
    assert "NOT the next version: 2 expected" in lines[0]
    assert lines[1].endswith("ALREADY EXPIRED")


def test_consistent_snapshot_change() -> None:
    new = _root(2)
    new.consistent_snapshot = False
    assert "  ~ consistent_snapshot True -> False" in summarize("root", Metadata(_root(1)),
                                                                 Metadata(new))


def test_signatures_already_on_it_are_listed() -> None:
    md = _targets(2, _target())
    md.sign(SIGNERS["targets"])
    lines = summarize("targets", _targets(1), md)
    assert lines[-1] == f"  already signed by 1 key(s): {SIGNERS['targets'].public_key.keyid[:16]}"


def test_nothing_published_yet() -> None:
    lines = summarize("targets", None, _targets(1, _target()))
    assert lines[0] == "targets: version (none) -> 1"
    assert "(published:" not in lines[1]


# --- snapshot, timestamp -----------------------------------------------------------


def test_snapshot_and_timestamp() -> None:
    old = Snapshot(version=3, expires=NOW, meta={"targets.json": MetaFile(2),
                                                 "vision.json": MetaFile(1)})
    new = Snapshot(version=4, expires=NOW + timedelta(days=30),
                   meta={"targets.json": MetaFile(3), "team\x1b.json": MetaFile(1)})
    lines = summarize("snapshot", Metadata(old), Metadata(new))
    assert "  ~ targets.json v2 -> v3" in lines and "  - vision.json (was v1)" in lines
    assert "  + team\\x1b.json v1" in lines
    ts = summarize("timestamp", Metadata(Timestamp(version=5, expires=NOW,
                                                   snapshot_meta=MetaFile(3))),
                   Metadata(Timestamp(version=6, expires=NOW, snapshot_meta=MetaFile(4))))
    assert "  ~ snapshot v3 -> v4" in ts


# --- check_pending ---------------------------------------------------------------------


def _bytes(md: Metadata[Any]) -> bytes:
    return md.to_bytes(JSONSerializer(compact=False))


def _pending(version: int = 2, *targets: TargetFile) -> Metadata[Targets]:
    md = _targets(version, *(targets or (_target(),)))
    md.sign(SIGNERS["targets"])
    return md


PATH = Path("/keys/pending/2.targets.json")


def test_check_pending_accepts_an_untouched_file() -> None:
    data = _bytes(_pending())
    p = check_pending(PATH, data, "targets", _root(), 1)
    assert p.md.signed.version == 2 and len(p.digest) == 64


def test_unsigned_pending_is_accepted_the_summary_shows_it() -> None:
    check_pending(PATH, _bytes(_targets(2, _target())), "targets", _root(), 1)


@pytest.mark.parametrize("edit", ["rollout", "add", "fingerprint", "expires", "whitespace"])
def test_pending_edited_after_signing_is_refused(edit: str) -> None:
    md = _pending()
    doc = json.loads(_bytes(md))
    f = doc["signed"]["targets"]["classifier/classifier-1.0.0.tar"]["custom"]["modelward"]
    if edit == "rollout":
        f["rollout"]["basis_points"] = 1
    elif edit == "add":
        doc["signed"]["targets"]["evil/evil.tar"] = copy.deepcopy(
            doc["signed"]["targets"]["classifier/classifier-1.0.0.tar"])
    elif edit == "fingerprint":
        f["fingerprint"] = "cd" * 32
    elif edit == "expires":
        doc["signed"]["expires"] = "2099-01-01T00:00:00Z"
    data = json.dumps(doc, indent=4 if edit == "whitespace" else 1).encode()
    if edit == "whitespace":  # re-serialised, same content: signatures still verify
        check_pending(PATH, data, "targets", _root(), 1)
        return
    with pytest.raises(PendingChangedError) as e:
        check_pending(PATH, data, "targets", _root(), 1)
    keyid = SIGNERS["targets"].public_key.keyid
    assert e.value.keyids == [keyid] and e.value.path == PATH
    assert str(PATH) in str(e.value) and keyid[:16] in str(e.value)
    assert "no longer verify" in str(e.value)


def test_signature_by_an_unknown_key_is_refused() -> None:
    md = _pending()
    md.sign(SIGNERS["other"], append=True)
    with pytest.raises(PendingChangedError, match="not a key of the trusted"):
        check_pending(PATH, _bytes(md), "targets", _root(), 1)


def test_pending_root_signed_by_its_own_new_key() -> None:
    new = _root(2)
    new.add_key(SIGNERS["root2"].public_key, "root")
    md = Metadata(new)
    md.sign(SIGNERS["root"])
    md.sign(SIGNERS["root2"], append=True)
    check_pending(Path("/k/pending/2.root.json"), _bytes(md), "root", _root(1), 1)
    md.signed.roles["root"].threshold = 1  # edited afterwards
    md.signed.add_key(SIGNERS["other"].public_key, "targets")
    with pytest.raises(PendingChangedError) as e:
        check_pending(Path("/k/pending/2.root.json"), _bytes(md), "root", _root(1), 1)
    assert len(e.value.keyids) == 2


@pytest.mark.parametrize(("data", "match"), [
    (b"not json", "is not TUF metadata"),
    (b"[" * 100_000, "is not TUF metadata"),
    (b'{"signed": {"_type": "targets"}, "signatures": []}', "is not TUF metadata"),
    (b"\x1b]0;x\x07", "is not TUF metadata"),
])
def test_pending_that_is_not_metadata(data: bytes, match: str) -> None:
    with pytest.raises(PendingMetadataError, match=match) as e:
        check_pending(PATH, data, "targets", _root(), 1)
    assert "\x1b" not in str(e.value)


def test_pending_too_big() -> None:
    with pytest.raises(PendingMetadataError, match="more than"):
        check_pending(PATH, b" " * (MAX_PENDING + 1), "targets", _root(), 1)


def test_pending_of_another_type() -> None:
    md = Metadata(Snapshot(version=2, expires=NOW))
    with pytest.raises(PendingMetadataError, match="holds snapshot metadata, not targets"):
        check_pending(PATH, _bytes(md), "targets", _root(), 1)


def test_pending_version_not_its_file_name() -> None:
    with pytest.raises(PendingMetadataError, match="version 3, not the 2 its name says"):
        check_pending(PATH, _bytes(_pending(3)), "targets", _root(), 1)


@pytest.mark.parametrize("published", [2, 5])
def test_stale_pending_is_refused(published: int) -> None:
    with pytest.raises(PendingMetadataError, match="is published already: it is stale"):
        check_pending(PATH, _bytes(_pending(2)), "targets", _root(), published)


# --- on disk: the review and the signing see the same bytes -------------------------------

PASS = b"unit test passphrase"


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """targets 2-of-2 (two key files); classifier 1.0.0 pending with one signature."""
    from modelward.publisher._bundle_build import BuildOptions, build_bundle
    from modelward.publisher._repo import Repository, ThresholdNotMetError
    from modelward.simulator._models import make_linear_model

    base = tmp_path_factory.mktemp("review")
    r = Repository(base / "repo", base / "keys", PASS)
    r.init({"targets": 2}, {"targets": 2})
    model = make_linear_model(base / "m.onnx", 1)
    build_bundle(model, "classifier", "1.0.0", base / "b.tar", options=BuildOptions())
    with pytest.raises(ThresholdNotMetError):
        r.publish(base / "b.tar")
    return base


@pytest.fixture
def disk(template: Path, tmp_path: Path) -> Any:
    import shutil

    from modelward.publisher._repo import Repository
    shutil.copytree(template, tmp_path / "w")
    return Repository(tmp_path / "w" / "repo", tmp_path / "w" / "keys", PASS)


def _tree(d: Path) -> dict[str, bytes]:
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*"))
            if p.is_file()}


def test_review_then_sign_publishes(disk: Any) -> None:
    pending, lines = disk.review_pending("targets")
    assert pending.path.name == "2.targets.json"
    assert any("model classifier version 1.0.0 fingerprint" in x for x in lines)
    assert disk.sign_pending("targets", "encfile:targets-2.pem", reviewed=pending.digest) == (2, 2)
    assert (disk.metadata_dir / "2.targets.json").exists()


def test_file_swapped_between_review_and_sign_is_refused(disk: Any) -> None:
    """A disk attacker replaces the pending file after the signer read its summary (here
    with an unsigned one, whose own check would pass): the reviewed digest refuses it."""
    pending, _ = disk.review_pending("targets")
    doc = json.loads(pending.path.read_bytes())
    doc["signatures"] = []
    doc["signed"]["targets"]["evil/evil-9.9.9.tar"] = doc["signed"]["targets"].pop(
        "classifier/classifier-1.0.0.tar")
    pending.path.write_bytes(json.dumps(doc).encode())
    swapped, before = pending.path.read_bytes(), _tree(disk.repo)
    from modelward.publisher._summary import PendingReviewError

    with pytest.raises(PendingReviewError, match="changed after its summary was shown"):
        disk.sign_pending("targets", "encfile:targets-2.pem", reviewed=pending.digest)
    assert pending.path.read_bytes() == swapped and _tree(disk.repo) == before
    # Shown again, the summary names what the attacker added.
    _, lines = disk.review_pending("targets")
    assert any(x.startswith("  + evil/evil-9.9.9.tar: model classifier") for x in lines)
    assert lines[-1] == "  already signed by 0 key(s)"


def test_edited_after_first_signature_refused_by_sign_pending_itself(disk: Any) -> None:
    """Through the API too (no review): nothing published, the file left as it is."""
    path = disk.pending_dir / "2.targets.json"
    doc = json.loads(path.read_bytes())
    t = doc["signed"]["targets"]["classifier/classifier-1.0.0.tar"]
    t["custom"]["modelward"]["rollout"]["basis_points"] = 10000
    t["custom"]["modelward"]["channel"] = "beta"
    path.write_bytes(json.dumps(doc).encode())
    edited, before = path.read_bytes(), _tree(disk.repo)
    with pytest.raises(PendingChangedError) as e:
        disk.sign_pending("targets", "encfile:targets-2.pem")
    assert str(path) in str(e.value)
    assert path.read_bytes() == edited and _tree(disk.repo) == before


def test_pending_older_than_published_is_refused(disk: Any) -> None:
    """A pending file replayed after a newer version was published would overwrite it."""
    old = (disk.pending_dir / "2.targets.json").read_bytes()
    disk.sign_pending("targets", "encfile:targets-2.pem")
    (disk.pending_dir / "2.targets.json").write_bytes(old)
    before = _tree(disk.repo)
    with pytest.raises(PendingMetadataError, match="stale"):
        disk.review_pending("targets")
    with pytest.raises(PendingMetadataError, match="stale"):
        disk.sign_pending("targets", "encfile:targets-2.pem")
    assert _tree(disk.repo) == before


@pytest.mark.parametrize("version", [3, 7])
def test_pending_root_that_skips_a_version_is_refused(version: int) -> None:
    md = Metadata(_root(version))
    md.sign(SIGNERS["root"])
    with pytest.raises(PendingMetadataError, match="load only version 2 next"):
        check_pending(Path(f"/k/pending/{version}.root.json"), _bytes(md), "root", _root(1), 1)


@pytest.mark.parametrize("name", ["x\x1b]0;owned\x07.targets.json", "2.targets.json.targets.json",
                                  "02x.targets.json", "9" * 13 + ".targets.json"])
def test_pending_file_not_named_by_the_repository_is_refused(name: str) -> None:
    with pytest.raises(PendingMetadataError, match="is not a pending targets file") as e:
        check_pending(Path("/k/pending") / name, _bytes(_pending()), "targets", _root(), 1)
    assert "\x1b" not in str(e.value) and "\x1b" not in e.value.hint


def test_planted_pending_file_with_a_hostile_name_on_disk(disk: Any) -> None:
    """It sorts after the real one, so it is the one `repo sign` would take: refused."""
    planted = disk.pending_dir / "x\x1b[8m.targets.json"
    planted.write_bytes((disk.pending_dir / "2.targets.json").read_bytes())
    with pytest.raises(PendingMetadataError, match="is not a pending targets file") as e:
        disk.review_pending("targets")
    assert "\x1b" not in str(e.value)
    with pytest.raises(PendingMetadataError):
        disk.sign_pending("targets", "encfile:targets-2.pem")


# --- properties ------------------------------------------------------------------------

_json = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=20),
                     lambda inner: st.lists(inner, max_size=3) |
                     st.dictionaries(st.text(max_size=8), inner, max_size=3), max_leaves=8)
_field = st.sampled_from(["name", "version", "fingerprint", "channel", "rollout", "pinned",
                          "withdrawn", "x\x1b"])


@settings(max_examples=100, deadline=None)
@given(st.text())
def test_escape_output_is_always_one_printable_line(text: str) -> None:
    _all_printable([escape(text)])


@settings(max_examples=100, deadline=None)
@given(st.dictionaries(_field, _json, max_size=7), st.dictionaries(_field, _json, max_size=7),
       st.text(min_size=1, max_size=30))
def test_summary_of_any_custom_fields_is_printable(a: dict[str, Any], b: dict[str, Any],
                                                    path: str) -> None:
    old, new = TargetFile(1, {"sha256": "00"}, path), TargetFile(2, {"sha256": "01"}, path)
    old.unrecognized_fields["custom"] = {"modelward": a}
    new.unrecognized_fields["custom"] = {"modelward": b}
    for pair in ((_targets(1, old), _targets(2, new)), (_targets(1), _targets(2, new))):
        _all_printable(summarize("targets", *pair))
