"""The repository's provenance policy (:mod:`updater.bundle._provenance`): ``repo policy
set`` / ``show``, and the check ``publish`` makes before it signs a bundle.

``set`` publishes the canonical policy as the top-level target
``_modelward/provenance-policy-<sha256>.json`` (targets key; content-addressed, so a device
on the previous root still finds the policy that root pins), then stages root N+1 with the
pin: root's threshold decides, through the usual root flow (``repo sign root`` when one
key is not enough). Until that root is published, devices keep the policy of the root
they trust.
"""

from __future__ import annotations

import hashlib
import logging
import tarfile
from pathlib import Path
from typing import TYPE_CHECKING

from tuf.api.metadata import Metadata, TargetFile

from modelward.publisher._indexpub import served_dest
from modelward.publisher._served import read_file
from modelward.publisher.errors import RepositoryStateError
from modelward.trust._atomic import write_atomic
from modelward.updater.bundle._bundle import Manifest
from modelward.updater.bundle._provenance import (
    BIND_DIGEST,
    DIGEST_BIND_RISK,
    MAX_POLICY_BYTES,
    MAX_PROVENANCE_BYTES,
    MAX_SIGNATURE_BYTES,
    PIN_FIELD,
    Policy,
    Verdict,
    check_model,
    parse_policy,
    policy_path,
    policy_pin,
    read_pin,
)
from modelward.updater.errors import BundleFormatError, PolicyFormatError

if TYPE_CHECKING:
    from modelward.publisher._repo import Repository

logger = logging.getLogger(__name__)


def published_policy(repo: Repository) -> tuple[Policy, str] | None:
    """The policy the newest published root pins and its sha256, or None.

    Raises:
        RepositoryStateError: root pins a policy this repository does not serve intact.
    """
    root = repo._trusted_root()  # noqa: SLF001 - the repository's helper module
    try:
        pin = read_pin(root.unrecognized_fields)
    except PolicyFormatError as e:
        raise RepositoryStateError(str(e)) from e
    if pin is None:
        return None
    sha256, length = pin
    targets, _, _ = repo.current()
    tf = targets.targets.get(policy_path(sha256))
    data = None if tf is None else read_file(served_dest(repo.targets_dir, tf),
                                             MAX_POLICY_BYTES)
    if data is None or len(data) != length or hashlib.sha256(data).hexdigest() != sha256:
        raise RepositoryStateError(
            f"root v{root.version} pins the provenance policy {sha256[:16]}..., which the "
            "top-level targets do not list or the served file does not hold: devices "
            "install nothing until it is back",
            hint="run `repo policy set` again with the policy file")
    try:
        return parse_policy(data, policy_path(sha256)), sha256
    except PolicyFormatError as e:
        raise RepositoryStateError(str(e)) from e


def set_policy(repo: Repository, document: bytes, base: Path) -> tuple[int, str]:
    """Publish ``document`` as the provenance policy; returns (root version, sha256).

    Raises:
        PolicyFormatError: the document is not a valid policy.
        ThresholdNotMetError: the targets listing it waits for signatures.
        RootNotPublishableError: root N+1 waits for more root signatures.
    """
    policy = parse_policy(document, "(the file given)", base=base)
    for rule in policy.digest_bound():  # (the operator's explicit, named opt-out)
        logger.warning("provenance policy rule %r %s", rule, DIGEST_BIND_RISK)
    data = policy.to_bytes()
    pin = policy_pin(data)
    repo.complete_root_change()
    version = repo.latest_root_version()
    repo._refuse_if_root_pending(version + 1)  # noqa: SLF001
    root = repo._trusted_root()  # noqa: SLF001
    if root.unrecognized_fields.get(PIN_FIELD) == pin:
        logger.info("root v%d pins this policy already", root.version)
        return int(root.version), str(pin["sha256"])
    path = policy_path(str(pin["sha256"]))
    tf = TargetFile.from_data(path, data, ["sha256"])
    write_atomic(served_dest(repo.targets_dir, tf), data)
    targets, _, _ = repo.current()
    if path not in targets.targets:  # (first the target, then the root that pins it)
        targets.targets[path] = tf
        repo._commit_targets(targets)  # noqa: SLF001
    root.unrecognized_fields[PIN_FIELD] = pin
    root.version = version + 1
    root.expires = repo._clock() + repo.expiry.root  # noqa: SLF001
    repo._write(Metadata(root), "root", root.version)  # noqa: SLF001
    logger.info("root v%d pins provenance policy %s", root.version, pin["sha256"])
    return int(root.version), str(pin["sha256"])


def member_bytes(bundle: Path, manifest: Manifest, name: str, most: int) -> bytes:
    """The bytes of the bundle's member ``name``, checked against the manifest's sha256
    (which :func:`extract_bundle` verified against the stream just before)."""
    listed = next(f for f in manifest.files if f.path == name)
    if listed.size > most:
        raise BundleFormatError(f"bundle {bundle}: {name} is over {most} bytes",
                                bundle=str(bundle), member=name)
    with tarfile.open(bundle, "r:") as tar:
        f = tar.extractfile(name)
        data = b"" if f is None else f.read(most + 1)
    if hashlib.sha256(data).hexdigest() != listed.sha256:
        raise BundleFormatError(f"bundle {bundle}: {name} changed since it was verified",
                                bundle=str(bundle), member=name)
    return data


def check_bundle(repo: Repository, bundle: Path, manifest: Manifest) -> Verdict | None:
    """The published policy's verdict on a verified bundle (None: no policy): the model
    signature must be for the release the manifest claims (its name and version).

    Raises:
        ProvenanceRefusedError: naming the rule that refuses it.
    """
    found = published_policy(repo)
    if found is None:
        return None
    policy, _ = found
    signature = (member_bytes(bundle, manifest, manifest.model_signature, MAX_SIGNATURE_BYTES)
                 if manifest.model_signature else None)
    attestation = (member_bytes(bundle, manifest, manifest.provenance_attestation,
                           MAX_PROVENANCE_BYTES) if manifest.provenance_attestation else None)
    model_sha256 = next(f.sha256 for f in manifest.files if f.path == manifest.model_path)
    verdict = check_model(policy, manifest.name, manifest.version, signature, model_sha256,
                          attestation)
    if verdict.bind == BIND_DIGEST:
        logger.warning("%s %s: provenance rule %r %s; the signature is for %r",
                       manifest.name, manifest.version, verdict.rule, DIGEST_BIND_RISK,
                       verdict.signed_as)
    return verdict
