"""Provenance policy: which model signers (the training side's keys or certificate
identities) a model needs, checked at publish and on the device before the health check.

The TUF chain proves that the *fleet operator* published a bundle; the policy makes a
second role necessary: a model signature made with the OpenSSF ``model-signing`` package
(``bundle build --model-signature``; a sigstore bundle holding a DSSE-signed in-toto
statement whose one resource is the model file's sha256).

Where the policy lives (design note, "Provenance policy"): a top-level TUF target
``_modelward/provenance-policy-<sha256>.json`` (model names cannot start with ``_``, so it
never sits in a model's namespace), *pinned by root*: root carries the unrecognized field
``x-modelward-provenance-policy`` = ``{"sha256", "length"}``. A targets key alone can
therefore neither change nor drop the policy (root's threshold signs a change: ``repo
policy set`` stages root N+1 through the usual root flow), and a device takes exactly the
pinned bytes. A root without the field means no policy (the behaviour before it).

Semantics: the first rule whose ``models`` pattern (``fnmatch``, case-sensitive) matches the
model name applies; a model no rule covers is refused (a compromised targets key cannot
dodge the policy with a new name). A rule needs a signature by one of its ``signers``
over exactly the model file's bytes, and (``bind``, by default ``name-version``) for
exactly the release the bundle claims: the file the training team signed is named
``<name>-<version>`` with at most one extension (what ``model-signing`` records as the
signed model's name, inside the signed statement), so a stolen targets key cannot take a
genuinely signed old model and publish it as a newer version or under another name the
same signer is trusted for. ``bind: digest`` drops that (the signature covers the bytes
only); it is named in the policy and warned about wherever it admits a model. A signature
cannot be taken back, and a targets key can publish a signed release again as itself or
pin devices down to it: the policy's ``revoked`` list names model files (by sha256) no
rule admits, under any name or version.
Certificate signers are checked by ``model-signing`` (chain to the rule's CA, key usage
code signing, at the leaf's not-before time: there is no trusted timestamp, so a leaf's
expiry or revocation is not seen) and here (the leaf's subject alternative names hold the
rule's ``identity``).

Everything read here is bounded before it is parsed: a policy at most
:data:`MAX_POLICY_BYTES`, a signature at most :data:`MAX_SIGNATURE_BYTES`, each nested to
at most 32 levels.
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import io
import json
import re
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from modelward.trust._bounded import UntrustedJsonError, loads_bounded
from modelward.updater.bundle._names import MODEL_NAME
from modelward.updater.bundle._semver import SemVer
from modelward.updater.errors import PolicyFormatError, ProvenanceRefusedError

POLICY_FORMAT = "modelward-provenance-policy/1"
#: root's unrecognized field that pins the policy (its sha256 and length)
PIN_FIELD = "x-modelward-provenance-policy"
RESERVED_DIR = "_modelward"  # no model name starts with "_": never a model's namespace
MAX_POLICY_BYTES = 256 << 10
MAX_SIGNATURE_BYTES = 64 << 10
MAX_RULES, MAX_SIGNERS, MAX_PATTERNS, MAX_PEM = 64, 16, 64, 32 << 10
MAX_REVOKED = 512  # revoked model files one policy lists (~100 bytes each)
SIGNATURE_NAME = "model.sig"  # the model signature's file in a bundle
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@:/+-]{0,127}")
_HEX64 = re.compile(r"[0-9a-f]{64}")
#: a rule's ``bind``: the signature is for one release (the default), or for bytes only
BIND_NAME_VERSION, BIND_DIGEST = "name-version", "digest"
BINDS = (BIND_NAME_VERSION, BIND_DIGEST)
#: what is logged wherever a ``bind: digest`` rule admits a model
DIGEST_BIND_RISK = ("binds the model signature to the file's bytes only (bind digest): "
                    "a stolen targets key can publish any model this signer signed, as any "
                    "newer version and under any model name the rule covers")
_EXTENSION = re.compile(r"(.+)\.([A-Za-z][A-Za-z0-9]{0,15})")
MAX_SIGNED_NAME = 256  # characters of a signed model name shown or parsed


@dataclass(frozen=True)
class TrustedSigner:
    """A model signer a rule trusts: a public key (PEM), or a CA chain (PEM) and the
    identity (a subject alternative name: e-mail, URI or DNS name) its leaf must carry."""

    name: str
    public_key: str = ""
    certificate_chain: str = ""
    identity: str = ""

    def to_json(self) -> dict[str, str]:
        if self.public_key:
            return {"name": self.name, "public_key": self.public_key}
        return {"name": self.name, "certificate_chain": self.certificate_chain,
                "identity": self.identity}


@dataclass(frozen=True)
class Builder:
    """A trusted builder: its SLSA builder id and the EC public key (PEM) that signs its
    provenance attestations."""

    id: str
    public_key: str


@dataclass(frozen=True)
class ProvenanceRule:
    """What a rule asks of the provenance attestation: signed by one of ``builders``
    (whose id the attestation names), and, if ``dataset_digests``, a dataset among its
    resolved dependencies (annotated ``kind: dataset``, with a sha256 digest)."""

    builders: tuple[Builder, ...]
    dataset_digests: bool = False

    def to_json(self) -> dict[str, Any]:
        return {"builders": [{"id": b.id, "public_key": b.public_key} for b in self.builders],
                "dataset_digests": self.dataset_digests}


@dataclass(frozen=True)
class Rule:
    """One rule: the models it covers, the signers one of which must sign them, and what
    their provenance attestation must show (None: none is required)."""

    name: str
    models: tuple[str, ...]
    signers: tuple[TrustedSigner, ...]
    provenance: ProvenanceRule | None = None
    bind: str = BIND_NAME_VERSION  # what the signature must be for (BINDS)

    def covers(self, model: str) -> bool:
        return any(fnmatch.fnmatchcase(model, p) for p in self.models)

    def to_json(self) -> dict[str, Any]:
        # (the default is left out: a policy that does not opt out keeps its canonical
        # bytes, and so its pin, and an older agent still takes it)
        return {"name": self.name, "models": list(self.models),
                "signers": [s.to_json() for s in self.signers]} | (
                    {"provenance": self.provenance.to_json()} if self.provenance else {}) | (
                    {"bind": self.bind} if self.bind != BIND_NAME_VERSION else {})


@dataclass(frozen=True)
class Revocation:
    """A model file no rule admits (a known-bad release the training team had signed)."""

    sha256: str
    note: str = ""  # the operator's words: which release, why

    def to_json(self) -> dict[str, str]:
        return {"sha256": self.sha256} | ({"note": self.note} if self.note else {})


@dataclass(frozen=True)
class Policy:
    """A parsed provenance policy."""

    rules: tuple[Rule, ...]
    revoked: tuple[Revocation, ...] = ()

    def revocation(self, model_sha256: str) -> Revocation | None:
        """The revocation of the model file with ``model_sha256``, or None."""
        return next((r for r in self.revoked if r.sha256 == model_sha256), None)

    def rule_for(self, model: str) -> Rule | None:
        """The rule that applies to ``model`` (the first that covers it), or None."""
        return next((r for r in self.rules if r.covers(model)), None)

    def digest_bound(self) -> tuple[str, ...]:
        """The names of the rules that opt out of the release binding (``bind: digest``)."""
        return tuple(r.name for r in self.rules if r.bind == BIND_DIGEST)

    def to_bytes(self) -> bytes:
        """The canonical document (sorted keys): what is published and pinned."""
        doc: dict[str, Any] = {"format": POLICY_FORMAT,
                               "rules": [r.to_json() for r in self.rules]}
        if self.revoked:  # (left out when empty: a policy without it keeps its pin)
            doc["revoked"] = [r.to_json() for r in self.revoked]
        return json.dumps(doc, sort_keys=True, indent=1).encode() + b"\n"


@dataclass(frozen=True)
class Verdict:
    """What a policy check found: the rule and the signer that signed the model."""

    rule: str
    signer: str
    builder: str = ""  # the builder whose provenance the rule verified ("": not required)
    signed_as: str = ""  # the model name inside the signature (the file it signed)
    bind: str = BIND_NAME_VERSION  # the rule's binding (BIND_DIGEST: bytes only)


def _str(d: Mapping[str, Any], key: str, where: str, *, limit: int = 128) -> str:
    v = d.get(key)
    if not isinstance(v, str) or not v or len(v) > limit:
        raise ValueError(f"{where}: {key!r} must be a non-empty string of at most {limit} "
                         "characters")
    return v


def _pem(v: str, kind: str, where: str) -> str:
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    if len(v) > MAX_PEM:
        raise ValueError(f"{where}: {kind} is over {MAX_PEM} bytes")
    try:
        if kind == "public_key":
            if not isinstance(load_pem_public_key(v.encode()), ec.EllipticCurvePublicKey):
                raise ValueError("not an elliptic-curve key (what model-signing signs with)")
        elif not x509.load_pem_x509_certificates(v.encode()):
            raise ValueError("no certificate")
    except ValueError as e:
        raise ValueError(f"{where}: {kind} is not a PEM {kind.replace('_', ' ')}: {e}") from e
    return v


def _signer(d: Any, where: str, base: Path | None) -> TrustedSigner:
    if not isinstance(d, dict):
        raise ValueError(f"{where}: a signer must be an object")
    name = _str(d, "name", where)
    if not _NAME.fullmatch(name):
        raise ValueError(f"{where}: signer name {name!r} has characters outside "
                         "[A-Za-z0-9._@:/+-]")
    where = f"{where} (signer {name!r})"
    for key in ("public_key", "certificate_chain"):
        if f"{key}_file" in d:  # (the operator's input only: inlined before publishing)
            if base is None:
                raise ValueError(f"{where}: {key}_file in a published policy")
            try:
                d = {**d, key: (base / _str(d, f"{key}_file", where, limit=4096)).read_text()}
            except (OSError, UnicodeDecodeError) as e:
                raise ValueError(f"{where}: cannot read {key}_file: {e}") from e
    extra = set(d) - {"name", "public_key", "certificate_chain", "identity",
                      "public_key_file", "certificate_chain_file"}
    if extra:
        raise ValueError(f"{where}: unknown fields {sorted(extra)}")
    if ("public_key" in d) == ("certificate_chain" in d):
        raise ValueError(f"{where}: give exactly one of public_key and certificate_chain")
    if "public_key" in d:
        if "identity" in d:
            raise ValueError(f"{where}: identity goes with certificate_chain, not public_key")
        return TrustedSigner(name, public_key=_pem(_str(d, "public_key", where, limit=MAX_PEM),
                                                   "public_key", where))
    chain = _pem(_str(d, "certificate_chain", where, limit=MAX_PEM), "certificate_chain",
                 where)
    return TrustedSigner(name, certificate_chain=chain,
                         identity=_str(d, "identity", where, limit=256))


def _provenance_rule(d: Any, where: str, base: Path | None) -> ProvenanceRule:
    where = f"{where} (provenance)"
    if not isinstance(d, dict) or set(d) - {"builders", "dataset_digests"}:
        raise ValueError(f"{where}: an object of builders and dataset_digests")
    builders = d.get("builders")
    if not isinstance(builders, list) or not 1 <= len(builders) <= MAX_SIGNERS:
        raise ValueError(f"{where}: builders must be a list of 1 to {MAX_SIGNERS} builders")
    out: list[Builder] = []
    for b in builders:
        if not isinstance(b, dict) or set(b) - {"id", "public_key", "public_key_file"}:
            raise ValueError(f"{where}: a builder is an object of id and public_key")
        if "public_key_file" in b:
            if base is None:
                raise ValueError(f"{where}: public_key_file in a published policy")
            try:
                b = {**b, "public_key": (base / _str(b, "public_key_file", where, limit=4096)
                                         ).read_text()}
            except (OSError, UnicodeDecodeError) as e:
                raise ValueError(f"{where}: cannot read public_key_file: {e}") from e
        out.append(Builder(_str(b, "id", where, limit=512), _pem(
            _str(b, "public_key", where, limit=MAX_PEM), "public_key", where)))
    digests = d.get("dataset_digests", False)
    if not isinstance(digests, bool):
        raise ValueError(f"{where}: dataset_digests must be true or false")
    return ProvenanceRule(tuple(out), digests)


def parse_policy(data: bytes, what: str, *, base: Path | None = None) -> Policy:
    """Parse and validate a provenance policy.

    Args:
        data: the document.
        what: names it in errors.
        base: the operator's input may name key files (``public_key_file``,
            ``certificate_chain_file``) relative to ``base``; a published policy may not.

    Raises:
        PolicyFormatError: not a valid policy (names the rule and field at fault).
    """
    try:
        d = loads_bounded(data, max_bytes=MAX_POLICY_BYTES, what=what, max_depth=8)
        if not isinstance(d, dict) or d.get("format") != POLICY_FORMAT:
            raise ValueError(f"format must be {POLICY_FORMAT!r}")
        if unknown := set(d) - {"format", "rules", "revoked"}:
            raise ValueError(f"unknown fields {sorted(unknown)}")
        revoked = _revoked(d.get("revoked", []))
        raw_rules = d.get("rules")
        if not isinstance(raw_rules, list) or not 1 <= len(raw_rules) <= MAX_RULES:
            raise ValueError(f"rules must be a list of 1 to {MAX_RULES} rules")
        rules: list[Rule] = []
        for i, r in enumerate(raw_rules):
            if not isinstance(r, dict):
                raise ValueError(f"rule {i} must be an object")
            name = _str(r, "name", f"rule {i}")
            where = f"rule {name!r}"
            if not _NAME.fullmatch(name) or name in {x.name for x in rules}:
                raise ValueError(f"{where}: a duplicate name, or characters outside "
                                 "[A-Za-z0-9._@:/+-]")
            if unknown := set(r) - {"name", "models", "signers", "provenance", "bind"}:
                raise ValueError(f"{where}: unknown fields {sorted(unknown)}")
            bind = r.get("bind", BIND_NAME_VERSION)
            if bind not in BINDS:  # (strict: a typo never weakens the rule)
                raise ValueError(f"{where}: bind must be {BIND_NAME_VERSION!r} (the "
                                 f"default) or {BIND_DIGEST!r}, not {str(bind)[:40]!r}")
            models = r.get("models")
            if not isinstance(models, list) or not 1 <= len(models) <= MAX_PATTERNS or not all(
                    isinstance(p, str) and 0 < len(p) <= 128 for p in models):
                raise ValueError(f"{where}: models must be 1 to {MAX_PATTERNS} name patterns")
            signers = r.get("signers")
            if not isinstance(signers, list) or not 1 <= len(signers) <= MAX_SIGNERS:
                raise ValueError(f"{where}: signers must be a list of 1 to {MAX_SIGNERS} "
                                 "signers")
            parsed = tuple(_signer(s, where, base) for s in signers)
            if len({s.name for s in parsed}) != len(parsed):
                raise ValueError(f"{where}: two signers have the same name")
            rules.append(Rule(name, tuple(models), parsed,
                              None if "provenance" not in r else
                              _provenance_rule(r["provenance"], where, base), bind))
    except (UntrustedJsonError, ValueError) as e:
        raise PolicyFormatError(f"provenance policy {what}: {e}") from e
    return Policy(tuple(rules), revoked)


def _revoked(v: Any) -> tuple[Revocation, ...]:
    """The policy's ``revoked`` list: ``{"sha256": HEX, "note": TEXT}`` objects."""
    if not isinstance(v, list) or len(v) > MAX_REVOKED:
        raise ValueError(f"revoked must be a list of at most {MAX_REVOKED} model files")
    out: list[Revocation] = []
    for i, r in enumerate(v):
        where = f"revoked[{i}]"
        if not isinstance(r, dict) or not set(r) <= {"sha256", "note"} or not isinstance(
                r.get("sha256"), str) or not _HEX64.fullmatch(r["sha256"]):
            raise ValueError(f"{where}: an object of sha256 (the model file's, 64 lowercase "
                             "hex digits) and an optional note")
        note = r.get("note", "")
        if not isinstance(note, str) or len(note) > 256:
            raise ValueError(f"{where}: note must be a string of at most 256 characters")
        if r["sha256"] in {x.sha256 for x in out}:
            raise ValueError(f"{where}: {r['sha256'][:16]}... is listed twice")
        out.append(Revocation(r["sha256"], note))
    return tuple(out)


def policy_pin(data: bytes) -> dict[str, Any]:
    """Root's pin of the policy ``data``."""
    return {"sha256": hashlib.sha256(data).hexdigest(), "length": len(data)}


def read_pin(root_fields: Mapping[str, Any]) -> tuple[str, int] | None:
    """(sha256, length) of the policy a root pins, or None when it pins none.

    Raises:
        PolicyFormatError: the field is there but malformed (a root that verified says
            something this device does not understand: refuse, never ignore a policy).
    """
    pin = root_fields.get(PIN_FIELD)
    if pin is None:
        return None
    if not isinstance(pin, dict) or set(pin) != {"sha256", "length"} or not isinstance(
            pin["sha256"], str) or not _HEX64.fullmatch(pin["sha256"]) or not isinstance(
            pin["length"], int) or isinstance(pin["length"], bool) or not \
            0 < pin["length"] <= MAX_POLICY_BYTES:
        raise PolicyFormatError(f"root's {PIN_FIELD} is malformed: {str(pin)[:200]!r}")
    return pin["sha256"], pin["length"]


def policy_path(sha256: str) -> str:
    """The target path of the policy with that digest."""
    return f"{RESERVED_DIR}/provenance-policy-{sha256}.json"


def _san_values(cert: Any, identity: str) -> set[str]:
    """The leaf's subject alternative names of the kind ``identity`` is: a URI (it has
    ``://``), an e-mail (``@``), else a DNS name (an e-mail never matches a URI SAN)."""
    from cryptography import x509

    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return set()
    kind: Any = (x509.UniformResourceIdentifier if "://" in identity else
                 x509.RFC822Name if "@" in identity else x509.DNSName)
    return {str(v) for v in san.get_values_for_type(kind)}


def _check_leaf(cert: Any) -> None:
    """A code-signing leaf: not a CA, with the code-signing extended key usage
    (model-signing also takes a digital-signature key usage alone: a TLS certificate)."""
    from cryptography import x509
    from cryptography.x509.oid import ExtendedKeyUsageOID

    try:
        if cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca:
            raise ValueError("the signing certificate is a CA certificate")
    except x509.ExtensionNotFound:
        pass
    try:
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        raise ValueError("the signing certificate has no code-signing extended key "
                         "usage") from None
    if ExtendedKeyUsageOID.CODE_SIGNING not in eku:
        raise ValueError("the signing certificate is not for code signing (extended key "
                         "usage)")


def signed_release(signed_name: str) -> tuple[str, str] | None:
    """The release (model name, version) a signature is for, read from the model name
    ``model-signing`` put in the signed statement (the name of the file it signed), or
    None when it names none.

    The name is ``<name>-<version>`` and at most one extension; one reading only, so a
    signature is for exactly one release: a last ``.part`` that starts with a letter is
    the extension (``detector-2.1.0-rc.1.onnx`` is detector 2.1.0-rc.1), and the name
    ends at the first ``-`` that a valid semantic version follows.
    """
    if len(signed_name) > MAX_SIGNED_NAME:
        return None
    m = _EXTENSION.fullmatch(signed_name)
    for stem in ([m.group(1)] if m else []) + [signed_name]:
        for i, c in enumerate(stem):
            if c != "-" or not MODEL_NAME.fullmatch(stem[:i]):
                continue
            try:
                SemVer.parse(stem[i + 1:])
            except ValueError:
                continue
            return stem[:i], stem[i + 1:]
    return None


def _binding_refusal(signer: str, signed_name: str, model: str, version: str) -> str:
    """Why a signature for ``signed_name`` is not for ``model`` ``version``; "" if it is."""
    release = signed_release(signed_name)
    if release == (model, version):
        return ""
    shown = ascii(signed_name[:MAX_SIGNED_NAME])
    claims = (f"the bundle claims {model} {version} (bind {BIND_NAME_VERSION}: the "
              f"training team signs the model file named as the release, e.g. "
              f"{model}-{version}.onnx)")
    if release is None:
        return (f"the signature by {signer!r} is for the file {shown}, which names no "
                f"release NAME-VERSION[.EXT]; {claims}")
    return (f"the signature by {signer!r} is for {release[0]} {release[1]} (it signs the "
            f"file {shown}); {claims}")


def _verify_one(sig: bytes, signer: TrustedSigner, tmp: Path) -> tuple[str, str, str]:
    """(digest algorithm, hex digest) of the one file ``sig`` signs and the model name
    the signed statement gives it, if ``signer`` made it.

    Raises:
        ValueError: not made by ``signer`` (any failure of the library counts as that).
    """
    from cryptography import x509
    from model_signing._signing import sign_certificate, sign_ec_key, sign_sigstore_pb

    path = tmp / "model.sig"
    path.write_bytes(sig)
    try:
        signature = sign_sigstore_pb.Signature.read(path)
        verifier: Any
        if signer.public_key:
            (tmp / "key.pem").write_text(signer.public_key)
            verifier = sign_ec_key.Verifier(tmp / "key.pem")
        else:
            (tmp / "chain.pem").write_text(signer.certificate_chain)
            verifier = sign_certificate.Verifier([tmp / "chain.pem"])
        with contextlib.redirect_stdout(io.StringIO()):  # (the library print()s warnings:
            manifest = verifier.verify(signature)  # stdout is the caller's --json channel)
        if signer.certificate_chain:  # (the chain verified: the leaf's names count)
            chain = signature.bundle.verification_material.x509_certificate_chain
            if chain is None or not chain.certificates:
                raise ValueError("no signing certificate")
            leaf = x509.load_der_x509_certificate(chain.certificates[0].raw_bytes)
            _check_leaf(leaf)
            names = _san_values(leaf, signer.identity)
            if signer.identity not in names:
                raise ValueError(f"the certificate is for {sorted(names)[:4]}, not "
                                 f"{signer.identity!r}")
        resources = list(manifest.resource_descriptors())
    except ValueError:
        raise
    except Exception as e:  # noqa: BLE001 - model-signing, pydantic, OpenSSL raise their own
        raise ValueError(f"{type(e).__name__}: {e}") from e
    if len(resources) != 1:
        raise ValueError(f"it signs {len(resources)} files, not exactly the model file")
    return (resources[0].digest.algorithm, resources[0].digest.digest_hex,
            str(manifest.model_name))


def check_model(policy: Policy, model: str, version: str, signature: bytes | None,
                model_sha256: str, provenance: bytes | None = None) -> Verdict:
    """The policy's verdict on release ``model`` ``version`` (as its bundle's manifest
    says) whose model file has ``model_sha256``, carrying the model ``signature`` and the
    ``provenance`` attestation (None: absent).

    Raises:
        ProvenanceRefusedError: naming the rule and what it missed.
    """
    rule = policy.rule_for(model)

    def refuse(rule_name: str, reason: str) -> ProvenanceRefusedError:
        where = f"rule {rule_name!r}" if rule_name else "no rule"
        return ProvenanceRefusedError(
            f"{model} {version}: the provenance policy refuses it ({where}): {reason}",
            model=model, version=version, rule=rule_name, reason=reason)

    if (revoked := policy.revocation(model_sha256)) is not None:  # (whatever signed it)
        note = f": {ascii(revoked.note)[1:-1]}" if revoked.note else ""
        raise refuse(rule.name if rule else "", f"the model file (sha256 "
                     f"{model_sha256[:16]}...) is revoked by the policy{note}")
    if rule is None:
        raise refuse("", "no rule of the provenance policy covers this model name")
    if signature is None:
        raise refuse(rule.name, "the model signature is missing (bundle build "
                     "--model-signature)")
    if len(signature) > MAX_SIGNATURE_BYTES:
        raise refuse(rule.name, f"the model signature is over {MAX_SIGNATURE_BYTES} bytes")
    try:  # (bounded before model-signing parses it, with json's unbounded recursion)
        loads_bounded(signature, max_bytes=MAX_SIGNATURE_BYTES, what="model signature",
                      max_depth=32)
    except UntrustedJsonError as e:
        raise refuse(rule.name, f"the model signature is not a sigstore bundle: {e}") from e
    tried: list[str] = []
    with tempfile.TemporaryDirectory(prefix="modelward-sig-") as tmp:
        for signer in rule.signers:
            try:
                alg, digest, signed_name = _verify_one(signature, signer, Path(tmp))
            except ValueError as e:
                tried.append(f"{signer.name}: {str(e)[:200]}")
                continue
            if alg != "sha256" or digest != model_sha256:
                raise refuse(rule.name, f"the signature by {signer.name!r} covers different "
                             f"bytes ({alg} {digest[:16]}..., the model file is sha256 "
                             f"{model_sha256[:16]}...)")
            if rule.bind == BIND_NAME_VERSION and (
                    why := _binding_refusal(signer.name, signed_name, model, version)):
                raise refuse(rule.name, why)
            builder = ""
            if rule.provenance is not None:
                try:
                    builder = check_provenance(rule.provenance, provenance, model_sha256)
                except ValueError as e:
                    raise refuse(rule.name, str(e)) from e
            return Verdict(rule.name, signer.name, builder, signed_name[:MAX_SIGNED_NAME],
                           rule.bind)
    raise refuse(rule.name, "the model signature is not by a signer it trusts ("
                 + "; ".join(tried) + ")")


PROVENANCE_NAME = "provenance.dsse.json"  # the provenance attestation's file in a bundle
MAX_PROVENANCE_BYTES = 256 << 10
SLSA_PROVENANCE = "https://slsa.dev/provenance/v1"
IN_TOTO_PAYLOAD = "application/vnd.in-toto+json"
#: how an attestation marks a training dataset among its resolved dependencies
KIND_ANNOTATION, DATASET_KIND = "kind", "dataset"


@dataclass(frozen=True)
class Attestation:
    """A parsed (not yet verified) provenance attestation."""

    envelope: Any  # securesystemslib.dsse.Envelope
    subjects: tuple[tuple[str, str], ...]  # (name, sha256)
    builder_id: str
    dependencies: tuple[tuple[str, str], ...]  # (name or uri, "alg:hex" of its digests)
    parameters: dict[str, Any]
    #: (name, sha256) of the resolved dependencies marked as datasets (annotation
    #: ``kind: dataset``, as ``modelward provenance sign --dataset`` writes them) whose
    #: sha256 is 64 lowercase hex digits
    datasets: tuple[tuple[str, str], ...] = ()


def parse_attestation(data: bytes) -> Attestation:
    """Parse a DSSE envelope holding an in-toto v1 statement of SLSA v1 provenance
    (bounded, then strictly through the in-toto-attestation protobufs).

    Raises:
        ValueError: naming what is wrong.
    """
    import binascii

    from google.protobuf import json_format
    from in_toto_attestation.predicates.provenance.v1 import provenance_pb2
    from in_toto_attestation.v1 import statement_pb2
    from in_toto_attestation.v1.statement import Statement
    from securesystemslib.dsse import Envelope

    try:
        doc = loads_bounded(data, max_bytes=MAX_PROVENANCE_BYTES, what="the provenance "
                            "attestation", max_depth=32)
        envelope = Envelope.from_dict(doc)
        if envelope.payload_type != IN_TOTO_PAYLOAD:
            raise ValueError(f"payload type {envelope.payload_type[:80]!r}, not "
                             f"{IN_TOTO_PAYLOAD}")
        statement = loads_bounded(envelope.payload, max_bytes=MAX_PROVENANCE_BYTES,
                                  what="its statement", max_depth=32)
        pb = json_format.ParseDict(statement, statement_pb2.Statement())
        Statement.copy_from_pb(pb).validate()
        if pb.predicate_type != SLSA_PROVENANCE:
            raise ValueError(f"predicate type {pb.predicate_type[:80]!r}, not "
                             f"{SLSA_PROVENANCE}")
        prov = json_format.ParseDict(statement["predicate"], provenance_pb2.Provenance())
    except (UntrustedJsonError, ValueError, KeyError, TypeError, binascii.Error,
            json_format.ParseError) as e:
        raise ValueError(f"the provenance attestation is malformed: {str(e)[:300]}") from e
    subjects = tuple((s.name, s.digest.get("sha256", "")) for s in pb.subject)
    resolved = prov.build_definition.resolved_dependencies
    deps = tuple((d.name or d.uri, ",".join(f"{k}:{v}" for k, v in sorted(d.digest.items())))
                 for d in resolved)
    datasets = tuple((d.name or d.uri, d.digest["sha256"]) for d in resolved
                     if _is_dataset(d) and _HEX64.fullmatch(d.digest.get("sha256", "")))
    return Attestation(envelope, subjects, prov.run_details.builder.id, deps,
                       json_format.MessageToDict(prov.build_definition.external_parameters),
                       datasets)


def _is_dataset(dependency: Any) -> bool:
    """A resolved dependency (ResourceDescriptor protobuf) annotated ``kind: dataset``."""
    kind = dependency.annotations.fields.get(KIND_ANNOTATION)
    return kind is not None and kind.WhichOneof("kind") == "string_value" and \
        kind.string_value == DATASET_KIND


def check_provenance(rule: ProvenanceRule, data: bytes | None, model_sha256: str) -> str:
    """The id of the builder whose attestation of the model file ``rule`` accepts.

    Raises:
        ValueError: what the rule missed (absent, malformed, another subject, a builder
            it does not trust, not signed by that builder's key, no dataset digests).
    """
    from securesystemslib.exceptions import VerificationError
    from securesystemslib.signer import SSlibKey

    if data is None:
        raise ValueError("the provenance attestation is missing (bundle build --provenance)")
    att = parse_attestation(data)
    if model_sha256 not in {sha for _, sha in att.subjects}:
        raise ValueError("the provenance attestation is about other bytes, not the model "
                         f"file (sha256 {model_sha256[:16]}...)")
    builders = [b for b in rule.builders if b.id == att.builder_id]
    if not builders:
        raise ValueError(f"built by {att.builder_id[:200]!r}, not by a builder it trusts "
                         f"({', '.join(repr(b.id) for b in rule.builders)})")
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    keys = [SSlibKey.from_crypto(load_pem_public_key(b.public_key.encode()))
            for b in builders]
    try:
        att.envelope.verify(keys, 1)
    except VerificationError as e:
        raise ValueError(f"the provenance attestation is not signed by builder "
                         f"{att.builder_id[:200]!r}'s key ({e})") from e
    if rule.dataset_digests and not att.datasets:
        raise ValueError("the provenance attestation names no dataset digests (a resolved "
                         f"dependency annotated {KIND_ANNOTATION}: {DATASET_KIND} with a sha256 "
                         "of 64 hex digits)")
    return att.builder_id
