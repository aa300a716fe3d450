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
)
from modelward.updater.errors import PolicyFormatError, ProvenanceRefusedError
from tests._modelsig import SignerFiles, cert_signer, key_signer, policy_doc, sign_model


@pytest.fixture(scope="module")
def side(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    d = tmp_path_factory.mktemp("sig")
    model = d / "model.onnx"
    model.write_bytes(b"\x08\x07" + bytes(range(256)) * 64)
    team, other = key_signer(d / "team"), key_signer(d / "other")
    ci = cert_signer(d / "ci", "train@ml.example")
    return {"d": d, "model": model, "sha": hashlib.sha256(model.read_bytes()).hexdigest(),
            "team": team, "other": other, "ci": ci,
            "team_sig": sign_model(model, d / "team.sig", team).read_bytes(),
            "ci_sig": sign_model(model, d / "ci.sig", ci).read_bytes()}


def _policy(d: Path, rules: list[tuple[str, list[str], list[SignerFiles]]]):  # type: ignore[no-untyped-def]
    return parse_policy(policy_doc(rules), "test", base=d)


def test_key_and_certificate_signers_verify(side: dict) -> None:  # type: ignore[type-arg]
    p = _policy(side["d"], [("vision", ["resnet*"], [side["team"]]),
                            ("all", ["*"], [side["ci"]])])
    v = check_model(p, "resnet50", side["team_sig"], side["sha"])
    assert (v.rule, v.signer) == ("vision", "vision-0")
    v = check_model(p, "bert", side["ci_sig"], side["sha"])
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
        sig = sign_model(side["model"], tmp_path / "o.sig", side["other"]).read_bytes()
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
        check_model(p, name, sig, sha)
    assert want in str(e.value)
    assert e.value.rule == ("" if case == "no_rule" else "vision")
    assert e.value.model == name


def test_first_matching_rule_decides(side: dict) -> None:  # type: ignore[type-arg]
    p = _policy(side["d"], [("strict", ["resnet50"], [side["other"]]),
                            ("loose", ["resnet*"], [side["team"]])])
    with pytest.raises(ProvenanceRefusedError) as e:
        check_model(p, "resnet50", side["team_sig"], side["sha"])
    assert e.value.rule == "strict"
    assert check_model(p, "resnet18", side["team_sig"], side["sha"]).rule == "loose"


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
    sig = sign_model(side["model"], tmp_path / "x.sig", other).read_bytes()
    p = _policy(side["d"], [("all", ["*"], [ci])])
    with pytest.raises(ProvenanceRefusedError, match="not by a signer it trusts"):
        check_model(p, "m", sig, side["sha"])
    assert check_model(p, "m", side["ci_sig"], side["sha"]).signer == "all-0"


def test_model_signing_warnings_stay_off_stdout(side: dict,  # type: ignore[type-arg]
                                               capfd: pytest.CaptureFixture[str]) -> None:
    sig = json.loads(side["team_sig"])
    sig["verificationMaterial"]["publicKey"]["hint"] = ""
    p = _policy(side["d"], [("all", ["*"], [side["team"]])])
    check_model(p, "m", json.dumps(sig).encode(), side["sha"])
    assert capfd.readouterr().out == ""
