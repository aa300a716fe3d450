"""The training side, for tests: model-signing keys, a CA with a code-signing leaf, and
signatures made with the real ``model_signing`` package (keys generated per test)."""

from __future__ import annotations

import datetime
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass(frozen=True)
class SignerFiles:
    """A model signer: its private key, and its public key or certificate files."""

    private_key: Path
    public_key: Path
    certificate: Path | None = None  # the leaf (certificate signers)
    chain: Path | None = None  # the CA certificate that verifies it
    identity: str = ""
    ca: Any = field(default=None, compare=False, repr=False)  # (CA key, cert): more leaves


def _write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> None:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))


def key_signer(d: Path, name: str = "team") -> SignerFiles:
    """An EC P-256 key pair in ``d``."""
    d.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    priv, pub = d / f"{name}.key", d / f"{name}.pub"
    _write_key(key, priv)
    pub.write_bytes(key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    return SignerFiles(priv, pub)


def cert_signer(d: Path, identity: str, name: str = "ci",
                ca: tuple[ec.EllipticCurvePrivateKey, x509.Certificate] | None = None, *,
                eku: list[Any] | None = None, leaf_is_ca: bool = False,
                san: list[Any] | None = None) -> SignerFiles:
    """A CA (or the given one) and a code-signing leaf for ``identity`` (an e-mail)."""
    d.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC) - datetime.timedelta(minutes=5)
    if ca is None:
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{name} CA")])
        ca_cert = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
                   .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now).not_valid_after(now + datetime.timedelta(days=30))
                   .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
                   .add_extension(x509.KeyUsage(False, False, False, False, False, True, True,
                                                False, False), True)
                   .sign(ca_key, hashes.SHA256()))
    else:
        ca_key, ca_cert = ca
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(ca_cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now).not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=leaf_is_ca, path_length=None), True)
            .add_extension(x509.KeyUsage(True, False, False, False, False, leaf_is_ca,
                                         leaf_is_ca, False, False), True)
            .add_extension(x509.ExtendedKeyUsage(
                eku or [ExtendedKeyUsageOID.CODE_SIGNING]), False)
            .add_extension(x509.SubjectAlternativeName(
                san or [x509.RFC822Name(identity)]), False)
            .sign(ca_key, hashes.SHA256()))
    priv, pub = d / f"{name}.key", d / f"{name}.pub"
    _write_key(key, priv)
    pub.write_bytes(key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    cert, chain = d / f"{name}.crt", d / f"{name}-ca.crt"
    cert.write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    chain.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    return SignerFiles(priv, pub, cert, chain, identity, (ca_key, ca_cert))


def sign_model(model: Path, sig: Path, signer: SignerFiles, name: str, version: str, *,
               signed_as: str | None = None) -> Path:
    """Sign the model file's bytes with ``model_signing`` (its key or certificate method)
    as the training team does for release ``name`` ``version``: the file it signs is
    named ``<name>-<version><model's suffix>`` (the signed model name the provenance
    policy binds), or ``signed_as`` verbatim (tests of that binding)."""
    import tempfile

    from model_signing import signing

    cfg = signing.Config()
    if signer.certificate is not None:
        assert signer.chain is not None
        cfg.use_certificate_signer(private_key=signer.private_key,
                                   signing_certificate=signer.certificate,
                                   certificate_chain=[signer.chain])
    else:
        cfg.use_elliptic_key_signer(private_key=signer.private_key)
    with tempfile.TemporaryDirectory(dir=sig.parent) as tmp:
        named = Path(tmp) / (signed_as or f"{name}-{version}{model.suffix}")
        named.write_bytes(model.read_bytes())
        cfg.sign(named, sig)
    return sig


def policy_doc(rules: list[tuple[str, list[str], list[SignerFiles]]]) -> bytes:
    """A policy file naming the signers' key files (as an operator writes one)."""
    out = []
    for name, models, signers in rules:
        entries = []
        for i, s in enumerate(signers):
            if s.chain is not None:
                entries.append({"name": f"{name}-{i}", "certificate_chain_file": str(s.chain),
                                "identity": s.identity})
            else:
                entries.append({"name": f"{name}-{i}", "public_key_file": str(s.public_key)})
        out.append({"name": name, "models": models, "signers": entries})
    return json.dumps({"format": "modelward-provenance-policy/1", "rules": out}).encode()


def attestation(model: Path, builder: SignerFiles, builder_id: str,
                dependencies: list[dict[str, Any]]) -> bytes:
    """A provenance attestation of ``model`` with exactly these resolved dependencies
    (as a builder could write them, not only as ``provenance sign`` does), DSSE-signed by
    ``builder``'s key."""
    import hashlib

    from cryptography.hazmat.primitives.serialization import load_pem_private_key
    from securesystemslib.dsse import Envelope
    from securesystemslib.signer import CryptoSigner

    statement = {
        "_type": "https://in-toto.io/Statement/v1",
        "subject": [{"name": model.name,
                     "digest": {"sha256": hashlib.sha256(model.read_bytes()).hexdigest()}}],
        "predicateType": "https://slsa.dev/provenance/v1",
        "predicate": {"buildDefinition": {"buildType": "https://modelward.dev/training/v1",
                                          "externalParameters": {},
                                          "resolvedDependencies": dependencies},
                      "runDetails": {"builder": {"id": builder_id}}},
    }
    key = load_pem_private_key(builder.private_key.read_bytes(), password=None)
    envelope = Envelope(json.dumps(statement, sort_keys=True).encode(),
                        "application/vnd.in-toto+json", {})
    envelope.sign(CryptoSigner(key))  # type: ignore[arg-type]
    return json.dumps(envelope.to_dict()).encode()
