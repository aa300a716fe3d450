"""The provenance policy's checks (updater.bundle._provenance) against signatures made by
the real model-signing package: key and certificate signers, and what an attacker with a
targets key, a planted signature or a careless operator would try."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from modelward.updater.bundle._provenance import (
    MAX_SIGNATURE_BYTES,
    PIN_FIELD,
    check_model,
    parse_policy,
    policy_pin,
    read_pin,
    signed_release,
)
from modelward.updater.errors import PolicyFormatError, ProvenanceRefusedError
from tests._modelsig import (
    SignerFiles,
    attestation,
    cert_signer,
    key_signer,
    policy_doc,
    sign_model,
)


@pytest.fixture(scope="module")
def side(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    d = tmp_path_factory.mktemp("sig")
    model = d / "model.onnx"
    model.write_bytes(b"\x08\x07" + bytes(range(256)) * 64)
    team, other = key_signer(d / "team"), key_signer(d / "other")
    ci = cert_signer(d / "ci", "train@ml.example")
    return {"d": d, "model": model, "sha": hashlib.sha256(model.read_bytes()).hexdigest(),
            "team": team, "other": other, "ci": ci,  # (signed as resnet50 1.0.0)
            "team_sig": sign_model(model, d / "team.sig", team, *R).read_bytes(),
            "ci_sig": sign_model(model, d / "ci.sig", ci, *R).read_bytes()}


R = ("resnet50", "1.0.0")  # the release the fixture's signatures are for


def _policy(d: Path, rules: list[tuple[str, list[str], list[SignerFiles]]]):  # type: ignore[no-untyped-def]
    return parse_policy(policy_doc(rules), "test", base=d)


def test_key_and_certificate_signers_verify(side: dict) -> None:  # type: ignore[type-arg]
    p = _policy(side["d"], [("vision", ["resnet*"], [side["team"]]),
                            ("all", ["*"], [side["ci"]])])
    v = check_model(p, *R, side["team_sig"], side["sha"])
    assert (v.rule, v.signer, v.signed_as) == ("vision", "vision-0", "resnet50-1.0.0.onnx")
    bert = sign_model(side["model"], side["d"] / "bert.sig", side["ci"], "bert", "0.1.0")
    v = check_model(p, "bert", "0.1.0", bert.read_bytes(), side["sha"])
    assert (v.rule, v.signer) == ("all", "all-0")
    # the canonical form round-trips (what is published and pinned), key files inlined
    again = parse_policy(p.to_bytes(), "published")
    assert again == p and b"public_key_file" not in p.to_bytes()


@pytest.mark.parametrize("case", ["missing", "untrusted", "other_bytes", "no_rule",
                                  "wrong_identity", "other_ca", "deep", "oversized",
                                  "garbage", "cert_for_key_rule"])
def test_refused_naming_the_rule(side: dict, case: str, tmp_path: Path) -> None:  # type: ignore[type-arg]
    d = side["d"]
    rules = [("vision", ["resnet*"], [side["team"]])]
    sig, name, sha = side["team_sig"], "resnet50", side["sha"]
    want = "not by a signer it trusts"
    if case == "missing":
        sig, want = None, "signature is missing"
    elif case == "untrusted":
        sig = sign_model(side["model"], tmp_path / "o.sig", side["other"], *R).read_bytes()
    elif case == "other_bytes":
        sha, want = hashlib.sha256(b"evil").hexdigest(), "covers different bytes"
    elif case == "no_rule":
        name, want = "bert", "no rule"
    elif case == "wrong_identity":
        rules = [("vision", ["resnet*"], [cert_signer(tmp_path, "someone@else.example",
                                                      "x")])]
        # same CA? no: a signer whose leaf names another identity under the rule's CA
        ca_rule = SignerFiles(side["ci"].private_key, side["ci"].public_key,
                              side["ci"].certificate, side["ci"].chain, "boss@ml.example")
        rules = [("vision", ["resnet*"], [ca_rule])]
        sig = side["ci_sig"]
    elif case == "other_ca":
        rules = [("vision", ["resnet*"], [cert_signer(tmp_path, "train@ml.example", "y")])]
        sig = side["ci_sig"]  # same identity, but a CA the rule does not trust
    elif case == "deep":
        sig, want = b"[" * 60_000, "not a sigstore bundle"
    elif case == "oversized":
        sig, want = b" " * (MAX_SIGNATURE_BYTES + 1), "over"
    elif case == "garbage":
        doc = json.loads(side["team_sig"])
        doc["dsseEnvelope"]["payload"] = "AAAA"
        sig = json.dumps(doc).encode()
    elif case == "cert_for_key_rule":
        sig = side["ci_sig"]  # a valid certificate signature, not by the rule's key
    p = _policy(d, rules)
    with pytest.raises(ProvenanceRefusedError) as e:
        check_model(p, name, "1.0.0", sig, sha)
    assert want in str(e.value)
    assert e.value.rule == ("" if case == "no_rule" else "vision")
    assert e.value.model == name


def test_first_matching_rule_decides(side: dict) -> None:  # type: ignore[type-arg]
    p = _policy(side["d"], [("strict", ["resnet50"], [side["other"]]),
                            ("loose", ["resnet*"], [side["team"]])])
    with pytest.raises(ProvenanceRefusedError) as e:
        check_model(p, *R, side["team_sig"], side["sha"])
    assert e.value.rule == "strict"
    r18 = sign_model(side["model"], side["d"] / "r18.sig", side["team"], "resnet18", "1.0.0")
    assert check_model(p, "resnet18", "1.0.0", r18.read_bytes(), side["sha"]).rule == "loose"


@pytest.mark.parametrize("doc", [
    b"{}", b"[" * 10_000, b'{"format": "modelward-provenance-policy/1", "rules": []}',
    b'{"format": "modelward-provenance-policy/1", "rules": [{"name": "a", "models": ["*"],'
    b' "signers": [{"name": "k", "public_key": "not a pem"}]}]}',
    b'{"format": "modelward-provenance-policy/1", "rules": [{"name": "a", "models": ["*"],'
    b' "signers": []}]}',
    b'{"format": "modelward-provenance-policy/1", "rules": [{"name": "a", "models": ["*"],'
    b' "signers": [{"name": "k", "public_key_file": "/etc/hostname"}]}]}',
    b'{"format": "modelward-provenance-policy/1", "rules": [], "extra": 1}',
])
def test_malformed_policies_are_refused(doc: bytes) -> None:
    with pytest.raises(PolicyFormatError):
        parse_policy(doc, "published")  # (a published policy never names files)


def test_root_pin_is_strict() -> None:
    data = b"policy"
    assert read_pin({PIN_FIELD: policy_pin(data)}) == (hashlib.sha256(data).hexdigest(), 6)
    assert read_pin({}) is None
    for bad in ({"sha256": "ab", "length": 6}, {"sha256": "0" * 64, "length": 1 << 30},
                {"sha256": "0" * 64}, "x", {"sha256": "0" * 64, "length": True}):
        with pytest.raises(PolicyFormatError):
            read_pin({PIN_FIELD: bad})


def test_policy_change_waits_for_roots_threshold(tmp_path: Path) -> None:
    """A careless operator (or one holding one root key) sets a policy in a repository
    whose root needs 2 signatures: the policy target is published, the pinning root is
    parked and the published policy stays the old one until a second root key signs."""
    from modelward.publisher import _policy
    from modelward.publisher._repo import Repository
    from modelward.publisher._rootflow import RootNotPublishableError
    from tests._stock_tuf import stock_refresh

    pw = b"a passphrase for tests 123"
    repo = Repository(tmp_path / "repo", tmp_path / "keys", pw)
    repo.init({"root": 2}, {"root": 2})
    team = key_signer(tmp_path / "team")
    doc = policy_doc([("all", ["*"], [team])])
    with pytest.raises(RootNotPublishableError):
        _policy.set_policy(repo, doc, tmp_path)
    assert repo.latest_root_version() == 1 and _policy.published_policy(repo) is None
    assert stock_refresh(repo.repo) == 1  # (what devices see: still root 1, no pin)
    repo.sign_pending("root", "encfile:root-2.pem")
    assert repo.latest_root_version() == 2
    found = _policy.published_policy(repo)
    assert found is not None and found[0].rules[0].name == "all"
    assert stock_refresh(repo.repo) == 2
    # setting the same policy again changes nothing
    assert _policy.set_policy(repo, doc, tmp_path)[0] == 2


@pytest.mark.parametrize("leaf", ["tls", "ca", "uri_for_email"])
def test_certificate_leaf_must_be_a_code_signing_leaf_for_the_identity(
        side: dict, tmp_path: Path, leaf: str) -> None:  # type: ignore[type-arg]
    """Found by attack: model-signing takes a TLS certificate (digital-signature key usage
    alone), a leaf that is a CA, and the identity was matched across SAN kinds."""
    from cryptography import x509
    from cryptography.x509.oid import ExtendedKeyUsageOID

    ci = side["ci"]
    kw: dict = {  # type: ignore[type-arg]
        "tls": {"eku": [ExtendedKeyUsageOID.SERVER_AUTH]},
        "ca": {"leaf_is_ca": True},
        "uri_for_email": {"san": [x509.UniformResourceIdentifier("train@ml.example")]},
    }[leaf]
    other = cert_signer(tmp_path, "train@ml.example", "x", ca=ci.ca, **kw)
    sig = sign_model(side["model"], tmp_path / "x.sig", other, *R).read_bytes()
    p = _policy(side["d"], [("all", ["*"], [ci])])
    with pytest.raises(ProvenanceRefusedError, match="not by a signer it trusts"):
        check_model(p, *R, sig, side["sha"])
    assert check_model(p, *R, side["ci_sig"], side["sha"]).signer == "all-0"


def test_model_signing_warnings_stay_off_stdout(side: dict,  # type: ignore[type-arg]
                                               capfd: pytest.CaptureFixture[str]) -> None:
    sig = json.loads(side["team_sig"])
    sig["verificationMaterial"]["publicKey"]["hint"] = ""
    p = _policy(side["d"], [("all", ["*"], [side["team"]])])
    check_model(p, *R, json.dumps(sig).encode(), side["sha"])
    assert capfd.readouterr().out == ""


# --- the signature is for one release (bind name-version) --------------------------------

@pytest.mark.parametrize(("signed", "release"), [
    ("detector-2.1.0.onnx", ("detector", "2.1.0")),
    ("detector-2.1.0", ("detector", "2.1.0")),
    ("face-det-1.2.3.onnx", ("face-det", "1.2.3")),
    ("yolo-v8-10.0.1.pt", ("yolo-v8", "10.0.1")),
    # one reading only: a last part starting with a letter is the extension
    ("detector-2.1.0-rc.1.onnx", ("detector", "2.1.0-rc.1")),
    ("detector-2.1.0+build.7.onnx", ("detector", "2.1.0+build.7")),
    ("detector-2.1.0-rc.1", ("detector", "2.1.0-rc.1")),
    # ... and the name ends at the first '-' a version follows
    ("x-1.0.0-1.0.0.onnx", ("x", "1.0.0-1.0.0")),
    ("model.onnx", None), ("detector.onnx", None), ("detector-2.1.onnx", None),
    ("detector-2.1.0.tar.gz", None), ("detector-02.1.0.onnx", None),
    ("-1.0.0.onnx", None), (".hidden-1.0.0.onnx", None), ("detector-1.0.0.onnx\n", None),
    ("compat-undefined-not-present", None),  # (model-signing v0.2 signatures name none)
    ("a" * 300 + "-1.0.0.onnx", None),
])
def test_signed_release_reads_one_release(signed: str,
                                          release: tuple[str, str] | None) -> None:
    assert signed_release(signed) == release


@pytest.mark.parametrize("case", ["newer_version", "other_name", "pre_release_suffix",
                                  "unnamed_file"])
def test_replayed_signature_is_refused_naming_the_release(
        side: dict, case: str, tmp_path: Path) -> None:  # type: ignore[type-arg]
    """A thief of the targets key repackages the bytes the training team signed as
    resnet50 1.0.0 (say a known-bad release) as a newer version, or as another model the
    same signer's rule covers: the signature's digest matches, its release does not."""
    p = _policy(side["d"], [("vision", ["resnet*"], [side["team"]])])
    sig, name, version = side["team_sig"], *R
    if case == "newer_version":
        version = "9.0.0"
    elif case == "other_name":
        name = "resnet101"
    elif case == "pre_release_suffix":  # (the one ambiguity a file name has: read once)
        sig = sign_model(side["model"], tmp_path / "rc.sig", side["team"], "resnet50",
                         "2.0.0-rc.1").read_bytes()
        version = "2.0.0-rc.1.onnx"
    else:  # the training team signed a file called model.onnx
        sig = sign_model(side["model"], tmp_path / "m.sig", side["team"], *R,
                         signed_as="model.onnx").read_bytes()
    with pytest.raises(ProvenanceRefusedError) as e:
        check_model(p, name, version, sig, side["sha"])
    assert e.value.rule == "vision" and (e.value.model, e.value.version) == (name, version)
    assert f"the bundle claims {name} {version}" in e.value.reason
    assert "rule 'vision'" in str(e.value) and "bind name-version" in str(e.value)
    if case == "unnamed_file":
        assert "'model.onnx', which names no release" in e.value.reason
    else:
        signed = "2.0.0-rc.1" if case == "pre_release_suffix" else "1.0.0"
        assert f"the signature by 'vision-0' is for resnet50 {signed}" in e.value.reason
    # the release it was signed for is admitted
    signed_version = "2.0.0-rc.1" if case == "pre_release_suffix" else "1.0.0"
    if case != "unnamed_file":
        assert check_model(p, "resnet50", signed_version, sig, side["sha"]).rule == "vision"


def test_bind_digest_is_an_explicit_opt_out(side: dict) -> None:  # type: ignore[type-arg]
    """``bind: digest`` admits the signature for any release the rule covers (the old
    behaviour), is kept in the canonical policy, and is named in the verdict; without it
    the canonical bytes have no ``bind`` (existing pins stay valid)."""
    doc = json.loads(policy_doc([("vision", ["resnet*"], [side["team"]])]))
    plain = parse_policy(json.dumps(doc).encode(), "test", base=side["d"])
    assert b"bind" not in plain.to_bytes() and plain.digest_bound() == ()
    doc["rules"][0]["bind"] = "digest"
    p = parse_policy(json.dumps(doc).encode(), "test", base=side["d"])
    assert b'"bind": "digest"' in p.to_bytes() and parse_policy(p.to_bytes(), "pub") == p
    assert p.digest_bound() == ("vision",)
    v = check_model(p, "resnet101", "9.0.0", side["team_sig"], side["sha"])
    assert (v.bind, v.signed_as) == ("digest", "resnet50-1.0.0.onnx")
    with pytest.raises(ProvenanceRefusedError, match="covers different bytes"):
        check_model(p, *R, side["team_sig"], hashlib.sha256(b"x").hexdigest())


@pytest.mark.parametrize("bind", ["Digest", "name", "", "none", 1, None, ["digest"]])
def test_bind_takes_two_values_only(side: dict, bind: object) -> None:  # type: ignore[type-arg]
    doc = json.loads(policy_doc([("vision", ["resnet*"], [side["team"]])]))
    doc["rules"][0]["bind"] = bind
    with pytest.raises(PolicyFormatError, match="bind must be"):
        parse_policy(json.dumps(doc).encode(), "test", base=side["d"])


def test_replay_refused_at_bundle_build_and_publish(side: dict, tmp_path: Path) -> None:  # type: ignore[type-arg]
    """Through the real publisher: the signed bytes of classifier 1.0.0 built into a
    bundle claiming 9.0.0, or claiming classifier-lite (same rule, same signer): `bundle
    build` refuses them, and so does `publish` (bundles built without the check); the
    repository's targets do not move; the genuine release publishes."""
    from modelward.publisher import _policy
    from modelward.publisher._bundle_build import BuildOptions, build_bundle
    from modelward.publisher._repo import Repository
    from modelward.simulator._models import make_linear_model
    from modelward.trust.errors import OperatorInputError

    repo = Repository(tmp_path / "repo", tmp_path / "keys", b"a passphrase for tests 123")
    repo.init()
    team = side["team"]
    _policy.set_policy(repo, policy_doc([("classifiers", ["classifier*"], [team])]),
                       tmp_path)
    rule = _policy.published_policy(repo)[0].rules[0]  # type: ignore[index]
    model = make_linear_model(tmp_path / "m.onnx", 1)
    sig = sign_model(model, tmp_path / "m.sig", team, "classifier", "1.0.0")
    for name, version in (("classifier", "9.0.0"), ("classifier-lite", "1.0.0")):
        with pytest.raises(OperatorInputError, match=f"claims {name} {version}"):
            build_bundle(model, name, version, tmp_path / "x.tar", options=BuildOptions(
                model_signature=sig, signers=rule.signers))
    def published() -> tuple[int, list[str]]:
        targets = repo.current()[0]
        return targets.version, sorted(targets.targets)

    before = published()
    for name, version in (("classifier", "9.0.0"), ("classifier-lite", "1.0.0")):
        out = tmp_path / f"{name}-{version}.tar"
        build_bundle(model, name, version, out, options=BuildOptions(
            model_signature=sig, verify_signature=False))
        with pytest.raises(ProvenanceRefusedError) as e:
            repo.publish(out)
        assert e.value.rule == "classifiers" and e.value.version == version
        assert "is for classifier 1.0.0" in e.value.reason
    assert published() == before
    good = tmp_path / "good.tar"
    build_bundle(model, "classifier", "1.0.0", good, options=BuildOptions(
        model_signature=sig, signers=rule.signers))
    repo.publish(good)
    assert "classifier/classifier-1.0.0.tar" in published()[1]


def test_revoked_model_file_is_refused_under_any_name_version_or_binding(
        side: dict) -> None:  # type: ignore[type-arg]
    """Found by attack: the release binding leaves a thief of the targets key the
    genuinely signed release itself (published again, or pinned: devices move down to a
    pin). The root-pinned policy's ``revoked`` list refuses that model file whatever
    release it claims, whatever rule covers it, even one with ``bind: digest``."""
    doc = json.loads(policy_doc([("vision", ["resnet*"], [side["team"]])]))
    doc["revoked"] = [{"sha256": side["sha"], "note": "known-bad 1.0.0\x1b[2J"}]
    p = parse_policy(json.dumps(doc).encode(), "test", base=side["d"])
    assert parse_policy(p.to_bytes(), "published") == p
    for name, version in (R, ("resnet50", "9.0.0"), ("resnet101", "1.0.0")):
        with pytest.raises(ProvenanceRefusedError) as e:
            check_model(p, name, version, side["team_sig"], side["sha"])
        assert "is revoked by the policy: known-bad 1.0.0\\x1b[2J" in e.value.reason
        assert e.value.rule == "vision"
    doc["rules"][0]["bind"] = "digest"
    p = parse_policy(json.dumps(doc).encode(), "test", base=side["d"])
    with pytest.raises(ProvenanceRefusedError, match="revoked"):
        check_model(p, "resnet7", "2.0.0", side["team_sig"], side["sha"])
    with pytest.raises(ProvenanceRefusedError, match="revoked") as e:  # (no rule covers it)
        check_model(p, "bert", "1.0.0", side["team_sig"], side["sha"])
    assert e.value.rule == ""
    # another model file is not affected; a policy without revocations keeps its bytes
    other = hashlib.sha256(b"other").hexdigest()
    with pytest.raises(ProvenanceRefusedError, match="covers different bytes"):
        check_model(p, *R, side["team_sig"], other)
    assert b"revoked" not in _policy(side["d"], [("v", ["*"], [side["team"]])]).to_bytes()


@pytest.mark.parametrize("revoked", [
    "x", [{"sha256": "AB" * 32}], [{"sha256": "ab" * 31}], [{"sha256": "ab" * 32, "x": 1}],
    [{"sha256": "ab" * 32, "note": 5}], [{"sha256": "ab" * 32, "note": "n" * 257}],
    [{"sha256": "ab" * 32}, {"sha256": "ab" * 32}], [{"sha256": f"{i:064x}"} for i in range(513)],
    ["ab" * 32],
])
def test_malformed_revocations_are_refused(side: dict, revoked: object) -> None:  # type: ignore[type-arg]
    doc = json.loads(policy_doc([("vision", ["resnet*"], [side["team"]])]))
    doc["revoked"] = revoked
    with pytest.raises(PolicyFormatError, match="revoked"):
        parse_policy(json.dumps(doc).encode(), "test", base=side["d"])


# --- dataset_digests: a dependency marked as a dataset, with a sha256 --------------------

_HEX = "ab" * 32


@pytest.mark.parametrize(("deps", "admitted"), [
    ([{"name": "imagenet-mini", "digest": {"sha256": _HEX},
       "annotations": {"kind": "dataset"}}], True),
    # a dataset among others (provenance sign's source: a uri, no digest)
    ([{"uri": "git+https://git.example/ml@abc", "annotations": {"kind": "source"}},
      {"name": "d", "digest": {"sha256": _HEX, "md5": "0" * 32},
       "annotations": {"kind": "dataset", "note": "x"}}], True),
    ([], False),
    ([{"uri": "git+https://git.example/ml@abc", "annotations": {"kind": "source"}}], False),
    ([{"uri": "git+https://git.example/ml@abc", "digest": {"gitCommit": "abc123"},
       "annotations": {"kind": "source"}}], False),  # a digest, but of the source
    ([{"name": "d", "digest": {"sha256": _HEX}}], False),  # not marked a dataset
    ([{"name": "d", "digest": {"sha256": _HEX}, "annotations": {"kind": "Dataset"}}], False),
    ([{"name": "d", "digest": {"sha256": _HEX}, "annotations": {"kind": ["dataset"]}}],
     False),
    ([{"name": "d", "digest": {"sha256": ""}, "annotations": {"kind": "dataset"}}], False),
    ([{"name": "d", "digest": {"sha256": "ab" * 16}, "annotations": {"kind": "dataset"}}],
     False),
    ([{"name": "d", "digest": {"sha256": _HEX.upper()}, "annotations": {"kind": "dataset"}}],
     False),
    ([{"name": "d", "digest": {"sha256": "zz" * 32}, "annotations": {"kind": "dataset"}}],
     False),
    ([{"name": "d", "digest": {"sha512": "ab" * 64}, "annotations": {"kind": "dataset"}}],
     False),
    ([{"name": "d", "annotations": {"kind": "dataset"}}], False),  # no digest at all
])
def test_dataset_digests_needs_a_dataset_with_a_sha256(
        side: dict, tmp_path: Path, deps: list[dict], admitted: bool) -> None:  # type: ignore[type-arg]
    from modelward.updater.bundle._provenance import Builder, ProvenanceRule, check_provenance

    builder = key_signer(tmp_path / "b", "builder")
    rule = ProvenanceRule((Builder("https://ci.example/train",
                                   builder.public_key.read_text()),), dataset_digests=True)
    att = attestation(side["model"], builder, "https://ci.example/train", deps)
    if admitted:
        assert check_provenance(rule, att, side["sha"]) == "https://ci.example/train"
    else:
        with pytest.raises(ValueError, match="names no dataset digests"):
            check_provenance(rule, att, side["sha"])
    # a rule that does not ask for datasets takes it either way
    assert check_provenance(ProvenanceRule(rule.builders), att, side["sha"])


def test_provenance_sign_marks_datasets_as_the_rule_reads_them(side: dict,  # type: ignore[type-arg]
                                                               tmp_path: Path) -> None:
    from modelward.publisher._attestation import make_attestation
    from modelward.updater.bundle._provenance import parse_attestation

    builder = key_signer(tmp_path / "b", "builder")
    data = make_attestation(side["model"], builder.private_key.read_bytes(), "b",
                            datasets=[("imagenet-mini", _HEX)], source="git+https://x@1")
    att = parse_attestation(data)
    assert att.datasets == (("imagenet-mini", _HEX),)
    assert len(att.dependencies) == 2  # (the source too, but not as a dataset)
    only_source = make_attestation(side["model"], builder.private_key.read_bytes(), "b",
                                   source="git+https://x@1")
    assert parse_attestation(only_source).datasets == ()


def test_an_envelope_with_a_key_twice_is_malformed(side: dict,  # type: ignore[type-arg]
                                                   tmp_path: Path) -> None:
    """A DSSE envelope with ``payload`` twice (found by attack): ``json.loads`` takes the
    last, another tool the first, so one signed file would read as two statements. It is
    refused, and so is a statement with a key twice."""
    import base64

    from modelward.publisher._attestation import make_attestation
    from modelward.updater.bundle._provenance import parse_attestation

    builder = key_signer(tmp_path / "b", "builder")
    good = make_attestation(side["model"], builder.private_key.read_bytes(), "b",
                            source="git+https://x@1")
    parse_attestation(good)  # (the genuine envelope parses)
    decoy = base64.b64encode(b'{"_type": "decoy"}').decode()
    twice = good.replace(b'"payload"', b'"payload": "' + decoy.encode() + b'", "payload"', 1)
    assert twice != good and twice.count(b'"payload"') == 2
    with pytest.raises(ValueError, match="malformed: .*'payload' appears twice"):
        parse_attestation(twice)


# --- a policy the device cannot take is the policy's failure, not the release's ----------

class _Session:
    """What load_policy reads of a TUF session: root's fields, the top-level targets and
    one download (which may fail as ``fails``)."""

    def __init__(self, data: bytes, fails: Exception | None = None, *,
                 listed: bool = True) -> None:
        from tuf.api.metadata import TargetFile

        from modelward.updater.bundle._provenance import policy_path

        self.data, self.fails = data, fails
        self.root_fields = {PIN_FIELD: policy_pin(data)}
        path = policy_path(hashlib.sha256(data).hexdigest())
        self.target = TargetFile.from_data(path, data, ["sha256"]) if listed else None

    def top_level_target(self, path: str) -> object:
        return self.target if self.target is not None and self.target.path == path else None

    def fetch_target_bytes(self, target: object, most: int) -> bytes:
        if self.fails is not None:
            raise self.fails
        return self.data


@pytest.mark.parametrize("case", ["other_bytes", "hash", "not_listed", "malformed",
                                  "bad_pin", "no_origin"])
def test_policy_fetch_failure_is_recorded_as_the_policys(side: dict, case: str) -> None:  # type: ignore[type-arg]
    from modelward.trust._auditchain import DOWNLOAD_REFUSED, POLICY_FETCH_FAILED
    from modelward.updater.bundle._provenance import policy_path
    from modelward.updater.errors import (
        DownloadFailedError,
        MetadataError,
        PolicyUnavailableError,
        TargetHashError,
    )
    from modelward.updater.install import _events
    from modelward.updater.install._provenance import load_policy

    data = _policy(side["d"], [("vision", ["resnet*"], [side["team"]])]).to_bytes()
    session = {
        "other_bytes": _Session(data, MetadataError("the origin served other bytes")),
        "hash": _Session(data, TargetHashError("not hex", target="t")),
        "not_listed": _Session(data, listed=False),
        "malformed": _Session(b'{"format": "x"}'),
        "no_origin": _Session(data, DownloadFailedError("down", url="u")),
    }.get(case)
    if case == "bad_pin":
        session = _Session(data)
        session.root_fields = {PIN_FIELD: {"sha256": "ab"}}
    assert session is not None
    with pytest.raises((PolicyUnavailableError, DownloadFailedError)) as e:
        load_policy(session)  # type: ignore[arg-type]
    release = {"model": "resnet50", "version": "2.0.0", "fingerprint": "f" * 64,
               "target": "resnet50/resnet50-2.0.0.tar"}
    fields = _events.failure_fields(e.value, release, "resnet50")
    if case == "no_origin":  # (transport: not recorded, as for any download)
        assert isinstance(e.value, DownloadFailedError)
        assert _events.refusal_kind(e.value) is None
        return
    assert isinstance(e.value, PolicyUnavailableError)
    assert e.value.cause == {"other_bytes": "MetadataError", "hash": "TargetHashError"}.get(
        case, "PolicyFormatError")
    assert _events.refusal_kind(e.value) == POLICY_FETCH_FAILED
    assert fields["model"] == "resnet50" and "version" not in fields
    assert fields["target"] == (None if case == "bad_pin" else policy_path(
        hashlib.sha256(session.data).hexdigest()))
    # a refusal of the release itself still names the release
    refused = ProvenanceRefusedError("x", model="resnet50", version="2.0.0", rule="r",
                                     reason="y")
    assert _events.refusal_kind(refused) == DOWNLOAD_REFUSED
    assert _events.failure_fields(refused, release, "resnet50")["version"] == "2.0.0"


@pytest.mark.parametrize("payload", ["not base64!", "", "W10=", "e30=", "eyJzdWJqZWN0IjogNX0=",
                                     "eyJzdWJqZWN0IjogW3sibmFtZSI6IDV9XX0=",
                                     "WwAAAA==", None])
def test_inspect_reads_a_signatures_release_from_untrusted_bytes(
        side: dict, payload: str | None) -> None:  # type: ignore[type-arg]
    """`bundle inspect` shows what release a signature is for before anything verifies
    it: a payload that is no statement shows none and raises nothing."""
    from modelward.publisher._inspect import _signature_info

    good = _signature_info(side["team_sig"])
    assert (good["signed_as"], good["release"]) == ("resnet50-1.0.0.onnx", {
        "name": "resnet50", "version": "1.0.0"})
    doc = json.loads(side["team_sig"])
    doc["dsseEnvelope"]["payload"] = payload
    info = _signature_info(json.dumps(doc).encode())
    assert info["kind"] == "key" and "signed_as" not in info
