"""Issue 19: model signatures from the training side, a provenance policy pinned by root,
enforced at publish and on the device (real swtpm, nginx origin, model-signing, CLI).

Attackers tried: an operator (or a stolen targets key) publishing a bundle whose model
signature is missing, made by an untrusted key or over other bytes; the same bundle forced
onto the origin with the operator's TUF keys; a targets key that publishes its own policy
target or drops the pinned one; a certificate for another identity under the trusted CA.
"""

from __future__ import annotations

import hashlib
import json
import tarfile
from pathlib import Path
from typing import Any

import pytest
from tuf.api.metadata import TargetFile

from modelward.publisher import _policy
from modelward.publisher._bundle_build import BuildOptions, build_bundle
from modelward.simulator._models import make_linear_model
from modelward.updater.bundle._provenance import RESERVED_DIR, parse_policy, policy_path
from modelward.updater.errors import (
    DownloadFailedError,
    PolicyUnavailableError,
    ProvenanceRefusedError,
)
from tests._helpers import repo_cli_ok
from tests._modelsig import SignerFiles, cert_signer, key_signer, policy_doc, sign_model
from tests.conftest import PASSPHRASE, World, stock_refresh


def _bundle(w: World, version: str, seed: int, signer: SignerFiles | None, *,
            signed_seed: int | None = None, signed_for: tuple[str, str] | None = None,
            name: str = "classifier") -> Path:
    """A bundle of model ``seed`` released as ``name`` ``version``, carrying a signature
    by ``signer`` of model ``signed_seed`` (default: the same model) for the release
    ``signed_for`` (default: this one), built without checking it."""
    model = make_linear_model(w.builds / f"m-{name}-{version}.onnx", seed)
    sig = None
    if signer is not None:
        signed = model if signed_seed is None else make_linear_model(
            w.builds / f"s-{name}-{version}.onnx", signed_seed)
        sig = sign_model(signed, w.builds / f"{name}-{version}.sig", signer,
                         *(signed_for or (name, version)))
    out = w.builds / f"{name}-{version}.tar"
    build_bundle(model, name, version, out, options=BuildOptions(
        model_signature=sig, verify_signature=False))
    return out


def _state(w: World) -> tuple[object, ...]:
    s = w.snapshot()
    return s.record, s.counter, s.anchor, s.current, s.slots


def _audit(w: World) -> list[dict[str, Any]]:
    """The device's audit trail (its live segment), oldest first."""
    from modelward.trust._auditchain import split_lines

    p = w.state / "audit" / "live.jsonl"
    return [json.loads(x) for x in split_lines(p.read_bytes())] if p.exists() else []


def _incoming_empty(w: World) -> bool:
    incoming = w.state / "staging" / "incoming"
    return not incoming.exists() or not any(incoming.iterdir())


def _targets(w: World) -> bytes:
    return (w.repo_dir / "metadata" / "targets.json").read_bytes() if (
        w.repo_dir / "metadata" / "targets.json").exists() else json.dumps(
        sorted(p.name for p in (w.repo_dir / "metadata").glob("*.targets.json"))).encode()


def test_policy_enforced_at_publish_and_on_the_device(world: World,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    w = world
    team, thief = key_signer(w.tmp / "team"), key_signer(w.tmp / "thief")
    policy = w.tmp / "policy.json"
    policy.write_bytes(policy_doc([("classifiers", ["classifier*"], [team])]))
    out = repo_cli_ok(w, "repo", "policy", "set", str(policy))
    assert "pinned by root v2" in out and "root is now version 2" in out
    shown = repo_cli_ok(w, "repo", "policy", "show")
    assert "rule classifiers: models classifier*" in shown and "EC public key" in shown

    # the training team signs 1.0.0; `bundle build` verifies it; publish and install
    model = make_linear_model(w.builds / "good.onnx", 1)
    sig = sign_model(model, w.builds / "good.sig", team, "classifier", "1.0.0")
    good = w.builds / "good.tar"
    r = w.cli("bundle", "build", str(model), "--name", "classifier", "--version", "1.0.0",
              "--model-signature", str(sig), "--signer-key", str(thief.public_key),
              "-o", str(good))
    assert r.returncode == 1 and "not by a signer it trusts" in r.stderr, r.stderr
    assert not good.exists()
    r = w.cli("bundle", "build", str(model), "--name", "classifier", "--version", "1.0.0",
              "--model-signature", str(sig), "--policy", str(policy), "-o", str(good))
    assert r.returncode == 0, r.stderr
    repo_cli_ok(w, "publish", str(good))
    assert w.update().active is not None and w.active_version() == "1.0.0"

    # refused at publish, naming the rule; the repository's targets do not move
    bad = {"missing": _bundle(w, "2.0.0", 2, None),
           "untrusted": _bundle(w, "2.0.1", 3, thief),
           "other bytes": _bundle(w, "2.0.2", 4, team, signed_seed=1)}
    want = {"missing": "signature is missing", "untrusted": "not by a signer it trusts",
            "other bytes": "covers different bytes"}
    before = _targets(w)
    for case, bundle in bad.items():
        r = w.cli("publish", str(bundle), "--repo", str(w.repo_dir), "--keys", str(w.keys))
        assert r.returncode == 1, (case, r.stdout)
        assert "rule 'classifiers'" in r.stderr and want[case] in r.stderr, (case, r.stderr)
        assert "Traceback" not in r.stderr
    assert _targets(w) == before

    # forced onto the origin with the operator's TUF keys: every device refuses it
    monkeypatch.setattr(_policy, "check_bundle", lambda *a: None)
    for case, bundle in bad.items():
        kept = _state(w)
        w.repo.publish(bundle)
        stock_refresh(w.repo_dir)  # (a stock TUF client takes it: only the policy refuses)
        with pytest.raises(ProvenanceRefusedError) as e:
            w.update()
        assert e.value.rule == "classifiers" and want[case] in str(e.value), case
        assert _state(w) == kept and w.active_version() == "1.0.0", case
        assert not any((w.state / "staging" / "incoming").iterdir()) if (
            w.state / "staging" / "incoming").exists() else True
    status = json.loads(w.cli("agent", "status", "--json", "--config",
                              str(w.conf_path)).stdout)
    assert "provenance policy refuses" in json.dumps(status)

    # a targets key alone cannot change the policy: its own policy target is not pinned
    forged = w.tmp / "forged.json"
    forged.write_bytes(policy_doc([("classifiers", ["classifier*"], [thief])]))
    data = parse_policy(forged.read_bytes(), "forged", base=w.tmp).to_bytes()
    tf = TargetFile.from_data(policy_path(hashlib.sha256(data).hexdigest()), data, ["sha256"])
    (w.repo_dir / "targets" / RESERVED_DIR / f"{tf.hashes['sha256']}.{Path(tf.path).name}"
     ).write_bytes(data)
    targets, _, _ = w.repo.current()
    targets.targets[tf.path] = tf
    w.repo._commit_targets(targets)  # noqa: SLF001 - the stolen targets key's own change
    kept = _state(w)
    w.repo.publish(_bundle(w, "3.0.0", 5, thief))
    with pytest.raises(ProvenanceRefusedError):
        w.update()
    assert _state(w) == kept
    # ... nor drop the pinned one: then nothing installs, not even a well-signed release
    targets, _, _ = w.repo.current()
    for path in [p for p in targets.targets if p.startswith(RESERVED_DIR)]:
        del targets.targets[path]
    w.repo._commit_targets(targets)  # noqa: SLF001
    model = make_linear_model(w.builds / "good4.onnx", 6)
    w.repo.publish(_bundle(w, "4.0.0", 6, team))
    with pytest.raises(PolicyUnavailableError, match="do not list it") as pe:
        w.update()
    assert pe.value.cause == "PolicyFormatError"
    assert _state(w) == kept and w.active_version() == "1.0.0"
    last = _audit(w)[-1]  # (the policy's failure, not a refusal of 4.0.0)
    assert last["kind"] == "policy-fetch-failed" and "version" not in last["fields"]


def test_certificate_identity_and_untouched_devices_without_policy(
        world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    w = world
    w.publish("1.0.0", seed=1)  # no policy yet: unsigned models install as before
    assert w.update().active is not None
    ci = cert_signer(w.tmp / "ci", "train@ml.example")
    intern = cert_signer(w.tmp / "intern", "intern@ml.example", "intern",
                         ca=ci.ca)
    policy = w.tmp / "policy.json"
    policy.write_bytes(policy_doc([("all", ["*"], [ci])]))
    repo_cli_ok(w, "repo", "policy", "set", str(policy))
    w.update()  # (nothing new: the device re-anchors root v2, which pins the policy)
    kept = _state(w)
    with pytest.raises(ProvenanceRefusedError, match="not 'train@ml.example'"):
        w.repo.publish(_bundle(w, "2.0.0", 2, intern))  # same CA, another identity
    with monkeypatch.context() as m:  # forced onto the origin
        m.setattr(_policy, "check_bundle", lambda *a: None)
        w.repo.publish(_bundle(w, "2.0.0", 2, intern))
    with pytest.raises(ProvenanceRefusedError, match="not 'train@ml.example'"):
        w.update()
    assert _state(w) == kept
    w.repo.publish(_bundle(w, "2.1.0", 3, ci))
    assert w.update().active is not None and w.active_version() == "2.1.0"



def _provenance_policy(w: World, team: SignerFiles, builder_x: SignerFiles) -> Path:
    policy = w.tmp / "policy.json"
    doc = json.loads(policy_doc([("classifiers", ["classifier*"], [team])]))
    doc["rules"][0]["provenance"] = {"builders": [
        {"id": "https://ci.example/train-x", "public_key_file": str(builder_x.public_key)}],
        "dataset_digests": True}
    policy.write_text(json.dumps(doc))
    return policy


def test_policy_requires_builder_x(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    """A rule that requires provenance from builder X: Y's (even naming X) is refused at
    publish and on the device; X's without dataset digests too; X's with them installs;
    `bundle inspect` prints what the attestation says."""
    w = world
    team = key_signer(w.tmp / "team")
    x, y = key_signer(w.tmp / "x", "x"), key_signer(w.tmp / "y", "y")
    repo_cli_ok(w, "repo", "policy", "set", str(_provenance_policy(w, team, x)))
    w.update()  # (root v2 re-anchored: the state compared below)

    def build(version: str, seed: int, key: SignerFiles, builder: str,
              datasets: bool = True) -> Path:
        model = make_linear_model(w.builds / f"p-{version}.onnx", seed)
        sig = sign_model(model, w.builds / f"p-{version}.sig", team, "classifier", version)
        att = w.builds / f"p-{version}.dsse.json"
        argv = ["provenance", "sign", str(model), "--key", str(key.private_key),
                "--builder-id", builder, "--source", "git+https://git.example/ml@abc123",
                "--param", "epochs=3", "-o", str(att)]
        if datasets:
            argv += ["--dataset", f"imagenet-mini=sha256:{'ab' * 32}"]
        r = w.cli(*argv)
        assert r.returncode == 0, r.stderr
        out = w.builds / f"p-{version}.tar"
        r = w.cli("bundle", "build", str(model), "--name", "classifier", "--version", version,
                  "--model-signature", str(sig), "--signer-key", str(team.public_key),
                  "--provenance", str(att), "-o", str(out))
        assert r.returncode == 0, r.stderr
        return out

    by_y = build("1.0.0", 1, y, "https://ci.example/train-y")
    forged = build("1.0.1", 2, y, "https://ci.example/train-x")  # Y's key, X's name
    bare = build("1.0.2", 3, x, "https://ci.example/train-x", datasets=False)
    want = {by_y: "not by a builder it trusts", forged: "not signed by builder",
            bare: "no dataset digests"}
    for bundle, reason in want.items():
        r = w.cli("publish", str(bundle), "--repo", str(w.repo_dir), "--keys", str(w.keys))
        assert r.returncode == 1 and "rule 'classifiers'" in r.stderr, r.stderr
        assert reason in r.stderr, (reason, r.stderr)
    kept = _state(w)
    with monkeypatch.context() as m:  # forced onto the origin: the device refuses each
        m.setattr(_policy, "check_bundle", lambda *a: None)
        for bundle, reason in want.items():
            w.repo.publish(bundle)
            with pytest.raises(ProvenanceRefusedError, match=reason):
                w.update()
            assert _state(w) == kept
    good = build("2.0.0", 4, x, "https://ci.example/train-x")
    repo_cli_ok(w, "publish", str(good))
    assert w.update().active is not None and w.active_version() == "2.0.0"

    shown = w.cli("bundle", "inspect", str(good))
    assert shown.returncode == 0, shown.stderr
    assert "builder: https://ci.example/train-x" in shown.stdout
    assert f"from: imagenet-mini sha256:{'ab' * 32}" in shown.stdout
    assert "parameter: epochs" in shown.stdout
    assert "signed as: classifier-2.0.0.onnx, for classifier 2.0.0 (this bundle's " \
        "release)" in shown.stdout
    d = json.loads(w.cli("bundle", "inspect", "--json", str(good)).stdout)
    assert d["provenance"]["digest"].startswith("sha256:")
    assert d["model_signature"]["kind"] == "key"
    assert d["model_signature"]["release"] == {"name": "classifier", "version": "2.0.0"}

    # the TPM-signed status report names the active model's provenance digest, and the
    # operator's schema and fleet table take it
    from modelward.agent._commands import signed_report
    from modelward.publisher._fleet import DeviceRow, row_json
    from modelward.publisher._report_schema import check_report

    att = w.builds / "p-2.0.0.dsse.json"
    digest = "sha256:" + hashlib.sha256(att.read_bytes()).hexdigest()
    assert d["provenance"]["digest"] == digest
    report = check_report(json.loads(signed_report(w.cfg, "idle"))["report"])
    assert report["provenance"] == {"digest": digest}
    assert report["active"]["version"] == "2.0.0"
    assert row_json(DeviceRow("dev-1", True, "", report))["report"]["provenance"] == {
        "digest": digest}  # (fleet status --json)


def test_policy_travels_on_local_media(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    """`repo export` carries the pinned policy; `agent update --from` enforces it with no
    network: an unsigned release on the medium is refused, the signed one installs."""
    from modelward.agent._commands import update as agent_update
    from modelward.agent._config import load_config
    from modelward.simulator._demo import write_device_config

    w = world
    team = key_signer(w.tmp / "team")
    policy = w.tmp / "policy.json"
    policy.write_bytes(policy_doc([("classifiers", ["classifier*"], [team])]))
    repo_cli_ok(w, "repo", "policy", "set", str(policy))
    with monkeypatch.context() as m:
        m.setattr(_policy, "check_bundle", lambda *a: None)
        w.repo.publish(_bundle(w, "1.0.0", 1, None))  # forced: unsigned
    medium = w.tmp / "usb"
    r = w.cli("repo", "export", "--repo", str(w.repo_dir), "--to", str(medium))
    assert r.returncode == 0, r.stderr
    assert list((medium / "targets" / RESERVED_DIR).glob("*.provenance-policy-*.json"))
    conf = write_device_config(w.tmp / "offline.toml", device_id="dev-1", state=w.state,
                               tcti=w.tpm.tcti)
    cfg = load_config(conf, need_transport=False)
    with pytest.raises(ProvenanceRefusedError, match="signature is missing"):
        agent_update(cfg, source_dir=medium)
    assert w.active_version() is None
    w.repo.publish(_bundle(w, "1.1.0", 2, team))
    r = w.cli("repo", "export", "--repo", str(w.repo_dir), "--to", str(medium))
    assert r.returncode == 0, r.stderr
    assert agent_update(cfg, source_dir=medium).active is not None
    assert w.active_version() == "1.1.0"


def _served_policy(w: World) -> Path:
    (found,) = (w.repo_dir / "targets" / RESERVED_DIR).glob("*.provenance-policy-*.json")
    return found


def test_replayed_model_signature_is_refused_on_the_device(
        world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    """Finding 1 (replay): a thief of the targets key takes what the training team
    genuinely signed, straight from the origin's bundles: the known-bad classifier 1.0.0
    republished as 9.0.0, and the team's classifier-lite 3.0.0 (another model the same
    rule and signer cover) published as classifier 9.1.0. `bundle build` and `publish`
    refuse both; forced onto the origin with the operator's TUF keys, the device (real
    swtpm, nginx) refuses each naming the rule and both releases, and nothing trusted,
    active or on disk moves; the genuine next release still installs."""
    w = world
    team = key_signer(w.tmp / "team")
    policy = w.tmp / "policy.json"
    policy.write_bytes(policy_doc([("classifiers", ["classifier*"], [team])]))
    repo_cli_ok(w, "repo", "policy", "set", str(policy))
    for version, seed in (("1.0.0", 1), ("2.0.0", 2)):
        repo_cli_ok(w, "publish", str(_bundle(w, version, seed, team)))
        assert w.update().active is not None and w.active_version() == version
    lite = _bundle(w, "3.0.0", 7, team, name="classifier-lite")  # (signed for its own name)

    def take(bundle: Path, where: Path) -> tuple[Path, Path]:
        """The model file and model signature a bundle carries (what the thief reuses)."""
        where.mkdir()
        with tarfile.open(bundle) as tar:
            for member in ("model.onnx", "model.sig"):
                f = tar.extractfile(member)
                assert f is not None
                (where / member).write_bytes(f.read())
        return where / "model.onnx", where / "model.sig"

    served_v1 = next((w.repo_dir / "targets" / "classifier").glob("*.classifier-1.0.0.tar"))
    replays = {"9.0.0": (take(served_v1, w.tmp / "v1"), "classifier 1.0.0"),
               "9.1.0": (take(lite, w.tmp / "lite"), "classifier-lite 3.0.0")}
    bundles = {}
    for version, ((model, sig), signed_for) in replays.items():
        r = w.cli("bundle", "build", str(model), "--name", "classifier", "--version",
                  version, "--model-signature", str(sig), "--policy", str(policy),
                  "-o", str(w.builds / f"replay-{version}.tar"))
        assert r.returncode == 1 and f"is for {signed_for}" in r.stderr, r.stderr
        assert f"claims classifier {version}" in r.stderr and "Traceback" not in r.stderr
        bundles[version] = w.builds / f"replay-{version}.tar"
        build_bundle(model, "classifier", version, bundles[version], options=BuildOptions(
            model_signature=sig, verify_signature=False))
        before = _targets(w)
        r = w.cli("publish", str(bundles[version]), "--repo", str(w.repo_dir), "--keys",
                  str(w.keys))
        assert r.returncode == 1 and "rule 'classifiers'" in r.stderr, r.stderr
        assert f"is for {signed_for}" in r.stderr and _targets(w) == before

    with monkeypatch.context() as m:  # the thief's publish, with the operator's keys
        m.setattr(_policy, "check_bundle", lambda *a: None)
        for version, (_, signed_for) in replays.items():
            kept, audited = _state(w), len(_audit(w))
            w.repo.publish(bundles[version])
            stock_refresh(w.repo_dir)  # (TUF alone takes it: only the policy refuses)
            with pytest.raises(ProvenanceRefusedError) as e:
                w.update()
            assert (e.value.rule, e.value.model, e.value.version) == (
                "classifiers", "classifier", version)
            assert f"is for {signed_for}" in e.value.reason
            assert f"the bundle claims classifier {version}" in e.value.reason
            assert _state(w) == kept and w.active_version() == "2.0.0" and _incoming_empty(w)
            new = _audit(w)[audited:]
            assert [x["kind"] for x in new] == ["download-refused"], new
            assert new[0]["fields"]["version"] == version
            assert "ProvenanceRefusedError" in new[0]["fields"]["reason"]
    # ... nor can its signed target call the genuine 1.0.0 bundle 9.0.1: the signature is
    # checked against the manifest's release, and that must be the target's
    from modelward.simulator._attacks import RepoAttacker
    from modelward.updater.errors import FingerprintMismatchError

    kept = _state(w)
    v1 = w.repo.current()[0].targets["classifier/classifier-1.0.0.tar"]
    RepoAttacker(w.repo_dir, w.keys, PASSPHRASE).sign_raw(
        served_v1.read_bytes(), "classifier", "9.0.1",
        v1.unrecognized_fields["custom"]["modelward"]["fingerprint"])
    with pytest.raises(FingerprintMismatchError, match="bundle says classifier 1.0.0, its "
                       "signed target says classifier 9.0.1"):
        w.update()
    assert _state(w) == kept and w.active_version() == "2.0.0" and _incoming_empty(w)
    repo_cli_ok(w, "publish", str(_bundle(w, "9.2.0", 3, team)))
    assert w.update().active is not None and w.active_version() == "9.2.0"


def test_revoked_release_is_refused_even_when_pinned(world: World) -> None:
    """Found by attack on the release binding: a thief of the targets key needs no
    replay under another version to bring back the known-bad 1.0.0: a pin moves devices
    down to it (shown first). Once root's threshold revokes its model file in the
    policy, the same pin is refused on the device (real swtpm, nginx), nothing trusted
    or on disk moves, and `repo policy show` lists the revocation."""
    w = world
    team = key_signer(w.tmp / "team")
    policy = w.tmp / "policy.json"
    doc = json.loads(policy_doc([("classifiers", ["classifier*"], [team])]))
    policy.write_text(json.dumps(doc))
    repo_cli_ok(w, "repo", "policy", "set", str(policy))
    for version, seed in (("1.0.0", 1), ("2.0.0", 2)):
        repo_cli_ok(w, "publish", str(_bundle(w, version, seed, team)))
        assert w.update().active is not None and w.active_version() == version
    w.repo.pin("classifier", "1.0.0")  # the thief's targets signature
    assert w.update().active is not None and w.active_version() == "1.0.0"
    w.repo.pin("classifier", None)
    assert w.update().active is not None and w.active_version() == "2.0.0"

    bad = hashlib.sha256((w.builds / "m-classifier-1.0.0.onnx").read_bytes()).hexdigest()
    doc["revoked"] = [{"sha256": bad, "note": "classifier 1.0.0: known-bad"}]
    policy.write_text(json.dumps(doc))
    repo_cli_ok(w, "repo", "policy", "set", str(policy))  # (root's keys)
    assert f"revoked model file sha256 {bad}: classifier 1.0.0: known-bad" in repo_cli_ok(
        w, "repo", "policy", "show")
    w.update()  # (nothing new: root v3, which pins the new policy, is anchored)
    kept, audited = _state(w), len(_audit(w))
    w.repo.pin("classifier", "1.0.0")
    with pytest.raises(ProvenanceRefusedError, match="is revoked by the policy") as e:
        w.update()
    assert e.value.version == "1.0.0" and e.value.rule == "classifiers"
    assert _state(w) == kept and w.active_version() == "2.0.0" and _incoming_empty(w)
    assert [x["kind"] for x in _audit(w)[audited:]] == ["download-refused"]


def test_bind_digest_opt_out_is_named_and_warned(world: World,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    """A careless operator opts out (`"bind": "digest"`): `repo policy set` and `repo
    policy show` say what that opens, and the replay it allows (classifier 1.0.0's
    signed bytes as 9.0.0) is published and installed with a warning naming the rule and
    what the signature was for. A typo in `bind` is refused, never read as the opt-out."""
    import logging

    w = world
    team = key_signer(w.tmp / "team")
    policy = w.tmp / "policy.json"
    doc = json.loads(policy_doc([("classifiers", ["classifier*"], [team])]))
    doc["rules"][0]["bind"] = "Digest"
    policy.write_text(json.dumps(doc))
    r = w.cli("repo", "policy", "set", str(policy), "--repo", str(w.repo_dir), "--keys",
              str(w.keys))
    assert r.returncode == 1 and "bind must be 'name-version'" in r.stderr, r.stderr
    doc["rules"][0]["bind"] = "digest"
    policy.write_text(json.dumps(doc))
    r = w.cli("repo", "policy", "set", str(policy), "--repo", str(w.repo_dir), "--keys",
              str(w.keys))
    assert r.returncode == 0, r.stderr
    assert "'classifiers' binds the model signature to the file's bytes only" in r.stderr
    shown = repo_cli_ok(w, "repo", "policy", "show")
    assert "UNSAFE: it binds the model signature to the file's bytes only" in shown
    replay = _bundle(w, "9.0.0", 1, team, signed_for=("classifier", "1.0.0"))
    shown = w.cli("bundle", "inspect", str(replay)).stdout
    assert "signed as: classifier-1.0.0.onnx, for classifier 1.0.0 (not this bundle's " \
        "release" in shown, shown
    r = w.cli("publish", str(replay), "--repo", str(w.repo_dir), "--keys", str(w.keys))
    assert r.returncode == 0, r.stderr
    assert "the signature is for 'classifier-1.0.0.onnx'" in r.stderr, r.stderr
    with caplog.at_level(logging.WARNING, "modelward.updater.install._provenance"):
        assert w.update().active is not None and w.active_version() == "9.0.0"
    assert "rule 'classifiers' binds the model signature to the file's bytes only" in \
        caplog.text and "'classifier-1.0.0.onnx'" in caplog.text


def test_policy_fetch_failure_is_no_refusal_of_the_release(world: World) -> None:
    """Finding 3: the origin serving other bytes for the pinned policy is the policy's
    failure: the audit trail records `policy-fetch-failed` naming the policy's target (no
    release version), not `download-refused` of the release, and the release is not
    remembered as refused: once the origin serves the policy again, it installs. The
    origin not serving the policy at all is a transport error, recorded nowhere (as for
    any download)."""
    w = world
    team = key_signer(w.tmp / "team")
    policy = w.tmp / "policy.json"
    policy.write_bytes(policy_doc([("classifiers", ["classifier*"], [team])]))
    repo_cli_ok(w, "repo", "policy", "set", str(policy))
    w.update()  # (nothing to install: root v2, which pins the policy, is anchored)
    repo_cli_ok(w, "publish", str(_bundle(w, "1.0.0", 1, team)))
    served = _served_policy(w)
    good = served.read_bytes()
    bad = bytearray(good)
    bad[len(bad) // 2] ^= 0x20  # (same length: TUF's hash check refuses it)
    served.write_bytes(bytes(bad))
    kept, audited = _state(w), len(_audit(w))
    with pytest.raises(PolicyUnavailableError) as e:
        w.update()
    assert e.value.cause == "MetadataError" and e.value.path.startswith(RESERVED_DIR)
    assert _state(w) == kept and w.active_version() is None
    new = _audit(w)[audited:]
    assert [x["kind"] for x in new] == ["policy-fetch-failed"], new
    assert new[0]["fields"]["target"] == e.value.path
    assert {"version", "fingerprint"}.isdisjoint(new[0]["fields"])
    assert "PolicyUnavailableError" in new[0]["fields"]["reason"]
    rejections = w.state / "rejections.json"
    assert not rejections.exists() or b"classifier-1.0.0" not in rejections.read_bytes()

    served.unlink()  # the origin does not deliver it: transport, not recorded
    with pytest.raises(DownloadFailedError):
        w.update()
    assert len(_audit(w)) == audited + 1 and _state(w) == kept

    served.write_bytes(good)
    assert w.update().active is not None and w.active_version() == "1.0.0"
    r = w.cli("agent", "audit", "--config", str(w.conf_path), "--json")
    assert r.returncode == 0, r.stderr  # (the new kind verifies as any other)
    assert "policy-fetch-failed" in [x["kind"] for x in json.loads(r.stdout)["entries"]]
