"""The device's side of the provenance policy (:mod:`updater.bundle._provenance`).

After the refresh the agent takes the policy the trusted root pins, from the trusted
top-level targets only (a delegated team never speaks for it), within the pinned length,
and checks its bytes against the pin before it parses them. Before the health check it
verifies the model signature from the *sealed* copies (:mod:`updater.install._sealed`),
hashing the sealed model itself: the manifest's sha256 is not used (a delta assembles the
model from chunks and never computes it, and a targets key writes the manifest). The
release the signature must be for is the manifest's name and version, which the install
has checked against the signed target's before (a bundle claims what its target claims).

A policy the device cannot take is the policy's fault, not the release's
(:class:`PolicyUnavailableError`): the release is neither remembered as refused nor
recorded as a refused download.
"""

from __future__ import annotations

import hashlib
import logging
import mmap
import os

from modelward.updater.bundle._bundle import Manifest
from modelward.updater.bundle._provenance import (
    BIND_DIGEST,
    DIGEST_BIND_RISK,
    MAX_PROVENANCE_BYTES,
    MAX_SIGNATURE_BYTES,
    Policy,
    Verdict,
    check_model,
    parse_policy,
    policy_path,
    read_pin,
)
from modelward.updater.errors import (
    PolicyFormatError,
    PolicyUnavailableError,
    UntrustedRemoteError,
)
from modelward.updater.install._sealed import SealedFiles
from modelward.updater.install._tuf import TufSession

logger = logging.getLogger(__name__)


def load_policy(session: TufSession) -> Policy | None:
    """The policy the trusted root pins, or None when it pins none.

    Raises:
        PolicyUnavailableError: the pin or the policy is malformed, the top-level targets
            do not list the pinned policy with its pinned sha256 and length, or the
            origin served other bytes for it (a ``MetadataError`` or ``TargetHashError``
            of :meth:`TufSession.fetch_target_bytes`, kept as ``cause``).
        DownloadFailedError: the origin did not deliver it.
    """
    path = ""
    try:
        pin = read_pin(session.root_fields)
        if pin is None:
            return None
        sha256, length = pin
        path = policy_path(sha256)
        target = session.top_level_target(path)
        if target is None or target.length != length or \
                target.hashes.get("sha256") != sha256:
            raise PolicyFormatError(f"root pins the provenance policy {sha256[:16]}... but "
                                    f"the top-level targets do not list it as {path} "
                                    f"({length} bytes): no update is installed until they do")
        data = session.fetch_target_bytes(target, length)
        if hashlib.sha256(data).hexdigest() != sha256:  # (TUF checked it; the pin too, here)
            raise PolicyFormatError(f"{path} is not the policy root pins")
        policy = parse_policy(data, path)
    except UntrustedRemoteError as e:  # (format, listing, other bytes: not DownloadFailed)
        raise PolicyUnavailableError(f"the provenance policy root pins cannot be taken: {e}",
                                     path=path, cause=type(e).__name__) from e
    return policy


def _read_sealed(fd: int, most: int) -> bytes | None:
    size = os.fstat(fd).st_size
    if size > most:
        return None
    return os.pread(fd, size, 0)


def _sha256_sealed(fd: int) -> str:
    size = os.fstat(fd).st_size
    h = hashlib.sha256()
    if size:
        with mmap.mmap(fd, size, prot=mmap.PROT_READ) as m:
            h.update(m)
    return h.hexdigest()


def check_sealed(policy: Policy, manifest: Manifest, sealed: SealedFiles) -> Verdict:
    """``policy``'s verdict on the release whose sealed copies are ``sealed``.

    Raises:
        ProvenanceRefusedError: naming the rule and what it missed.
    """
    def read(name: str, most: int) -> bytes | None:
        if not name:
            return None
        data = _read_sealed(sealed.fds[name], most)
        return b"\0" * (most + 1) if data is None else data  # (refused as over the bound)

    verdict = check_model(policy, manifest.name, manifest.version,
                          read(manifest.model_signature, MAX_SIGNATURE_BYTES),
                          _sha256_sealed(sealed.fds[manifest.model_path]),
                          read(manifest.provenance_attestation, MAX_PROVENANCE_BYTES))
    logger.info("%s %s: model signature by %r of %r verified (provenance rule %r)",
                manifest.name, manifest.version, verdict.signer, verdict.signed_as,
                verdict.rule, extra={"model": manifest.name, "version": manifest.version})
    if verdict.bind == BIND_DIGEST:
        logger.warning("%s %s: provenance rule %r %s; the signature is for %r",
                       manifest.name, manifest.version, verdict.rule, DIGEST_BIND_RISK,
                       verdict.signed_as,
                       extra={"model": manifest.name, "version": manifest.version})
    return verdict
