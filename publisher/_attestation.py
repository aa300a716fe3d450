"""The training side's provenance attestation (``modelward provenance sign``): SLSA v1
provenance of a model file as an in-toto v1 statement (``in-toto-attestation``), signed in a
DSSE envelope (``securesystemslib``) with the builder's EC key. ``bundle build
--provenance`` carries it; the policy's ``provenance`` rule checks it
(:func:`updater.bundle._provenance.check_provenance`)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from pathlib import Path

from modelward.publisher.errors import OperatorInputError
from modelward.updater.bundle._provenance import (
    DATASET_KIND,
    IN_TOTO_PAYLOAD,
    KIND_ANNOTATION,
    SLSA_PROVENANCE,
)

BUILD_TYPE = "https://modelward.dev/training/v1"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def make_attestation(model: Path, key_pem: bytes, builder_id: str, *,
                     datasets: Sequence[tuple[str, str]] = (), source: str = "",
                     parameters: Mapping[str, str] | None = None) -> bytes:
    """A signed provenance attestation of ``model`` (the DSSE envelope's JSON).

    Args:
        model: the model file (its sha256 is the subject).
        key_pem: the builder's EC private key, PEM (unencrypted).
        builder_id: the SLSA builder id (``runDetails.builder.id``).
        datasets: (name, sha256 hex) of the training datasets (resolved dependencies).
        source: the training code's URI (e.g. ``git+https://...@<commit>``).
        parameters: training parameters (external parameters).

    Raises:
        OperatorInputError: a bad key or digest.
    """
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import load_pem_private_key
    from google.protobuf import json_format
    from in_toto_attestation.v1.resource_descriptor import ResourceDescriptor
    from in_toto_attestation.v1.statement import Statement
    from securesystemslib.dsse import Envelope
    from securesystemslib.signer import CryptoSigner

    try:
        key = load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError) as e:
        raise OperatorInputError(f"--key: not an unencrypted PEM private key: {e}") from e
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise OperatorInputError("--key: not an elliptic-curve key")
    deps = []
    for name, digest in datasets:
        if len(digest) != 64 or digest.strip("0123456789abcdef"):
            raise OperatorInputError(f"--dataset {name}: {digest!r} is not a sha256 hex digest")
        deps.append(json_format.MessageToDict(ResourceDescriptor(
            name=name, digest={"sha256": digest},
            annotations={KIND_ANNOTATION: DATASET_KIND}).pb))
    if source:
        deps.append({"uri": source, "annotations": {KIND_ANNOTATION: "source"}})
    predicate = {
        "buildDefinition": {"buildType": BUILD_TYPE,
                            "externalParameters": dict(parameters or {}),
                            "resolvedDependencies": deps},
        "runDetails": {"builder": {"id": builder_id}},
    }
    subject = ResourceDescriptor(name=model.name, digest={"sha256": _sha256(model)}).pb
    statement = Statement([subject], SLSA_PROVENANCE, predicate)
    statement.validate()
    payload = json.dumps(json_format.MessageToDict(statement.pb), sort_keys=True).encode()
    envelope = Envelope(payload, IN_TOTO_PAYLOAD, {})
    envelope.sign(CryptoSigner(key))
    return json.dumps(envelope.to_dict(), indent=1).encode() + b"\n"
