"""``bundle inspect``: what a bundle says about itself, its model signature and its
provenance. It verifies the bundle's own hashes (the manifest against every member), not
who signed anything: that is the provenance policy's job, at publish and on the device.
Everything printed comes from the bundle and is escaped (a bundle is input)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import IO, Any, cast

from modelward.publisher._policy import member_bytes
from modelward.trust._display import escape
from modelward.updater.bundle._bundle import Manifest, extract_bundle
from modelward.updater.bundle._provenance import (
    MAX_PROVENANCE_BYTES,
    MAX_SIGNATURE_BYTES,
    MAX_SIGNED_NAME,
    parse_attestation,
    signed_release,
)


def _signed_as(doc: Any) -> dict[str, Any]:
    """The file name a model signature's statement says it signed, and the release that
    names (what the policy's ``bind`` holds the bundle to; not verified here)."""
    import base64
    import binascii

    from modelward.trust._bounded import UntrustedJsonError, loads_bounded

    try:
        statement = loads_bounded(base64.b64decode(doc["dsseEnvelope"]["payload"]),
                                  max_bytes=MAX_SIGNATURE_BYTES, what="its statement",
                                  max_depth=32)
        name = statement["subject"][0]["name"]
    except (UntrustedJsonError, KeyError, TypeError, IndexError, ValueError, binascii.Error):
        return {}
    if not isinstance(name, str):
        return {}
    release = signed_release(name)
    return {"signed_as": name[:MAX_SIGNED_NAME],
            "release": None if release is None else {"name": release[0],
                                                     "version": release[1]}}


def _signature_info(data: bytes) -> dict[str, Any]:
    """Who a model signature says signed it, and for which release (not verified here)."""
    from cryptography import x509

    from modelward.trust._bounded import UntrustedJsonError, loads_bounded

    try:
        doc = loads_bounded(data, max_bytes=MAX_SIGNATURE_BYTES, what="model signature",
                            max_depth=32)
        signed = _signed_as(doc)
        material = doc["verificationMaterial"]
        chain = material.get("x509CertificateChain")
        if chain:
            import base64

            leaf = x509.load_der_x509_certificate(
                base64.b64decode(chain["certificates"][0]["rawBytes"]))
            try:
                san = leaf.extensions.get_extension_for_class(
                    x509.SubjectAlternativeName).value
                names = [str(v) for v in san.get_values_for_type(x509.RFC822Name)] + [
                    str(v) for v in san.get_values_for_type(x509.UniformResourceIdentifier)]
            except x509.ExtensionNotFound:
                names = []
            return {"kind": "certificate", "identities": names,
                    "issuer": leaf.issuer.rfc4514_string()} | signed
        return {"kind": "key", "key_hint": str((material.get("publicKey") or {}).get(
            "hint", ""))} | signed
    except (UntrustedJsonError, KeyError, TypeError, ValueError, IndexError) as e:
        return {"kind": "unreadable", "error": str(e)[:200]}


def describe(bundle: Path) -> dict[str, Any]:
    """The bundle's description (as ``--json`` prints it).

    Raises:
        BundleFormatError: the bundle is malformed or its members do not match.
    """
    with open(bundle, "rb") as f:
        manifest, _ = extract_bundle(cast(IO[bytes], f), None, str(bundle))
    out: dict[str, Any] = {
        "name": manifest.name, "version": manifest.version, "created": manifest.created,
        "files": [{"path": f.path, "size": f.size, "sha256": f.sha256}
                  for f in manifest.files],
        "model": {"path": manifest.model_path, "sha256": _sha(manifest, manifest.model_path),
                  "opset": manifest.opset},
        "model_signature": None, "provenance": None,
        "encryption": None if manifest.encryption is None else {
            "scheme": "modelward-siv-cdc/1", "key_id": manifest.encryption.key_id,
            "files": list(manifest.encryption.files),
            "recipients": [r.id for r in manifest.encryption.recipients]},
    }
    if manifest.model_signature:
        sig = member_bytes(bundle, manifest, manifest.model_signature, MAX_SIGNATURE_BYTES)
        out["model_signature"] = {"file": manifest.model_signature} | _signature_info(sig)
    if manifest.provenance_attestation:
        data = member_bytes(bundle, manifest, manifest.provenance_attestation,
                            MAX_PROVENANCE_BYTES)
        prov: dict[str, Any] = {"file": manifest.provenance_attestation,
                                "digest": "sha256:" + hashlib.sha256(data).hexdigest()}
        try:
            att = parse_attestation(data)
            prov |= {"builder_id": att.builder_id,
                     "subjects": [{"name": n, "sha256": s} for n, s in att.subjects],
                     "dependencies": [{"name": n, "digest": d} for n, d in att.dependencies],
                     "parameters": att.parameters,
                     "keyids": sorted(att.envelope.signatures)}
        except ValueError as e:
            prov["error"] = str(e)
        out["provenance"] = prov
    return out


def _sha(manifest: Manifest, path: str) -> str:
    return next(f.sha256 for f in manifest.files if f.path == path)


def inspect(bundle: Path, *, as_json: bool) -> int:
    """Print the description of ``bundle``; returns the exit code."""
    d = describe(bundle)
    if as_json:
        print(json.dumps(d, indent=1, sort_keys=True))
        return 0
    e = escape
    print(f"{e(d['name'])} {e(d['version'])} (created {e(d['created'])}), "
          f"{len(d['files'])} files")
    print(f"model: {e(d['model']['path'])} sha256 {d['model']['sha256']}")
    sig = d["model_signature"]
    if sig is None:
        print("model signature: none")
    elif sig["kind"] == "certificate":
        print(f"model signature: {e(sig['file'])}, certificate for "
              f"{e(', '.join(sig['identities']) or '(no identity)')} issued by "
              f"{e(sig['issuer'])} (not verified here)")
    else:
        print(f"model signature: {e(sig['file'])}, {e(sig['kind'])} "
              f"{e(sig.get('key_hint') or sig.get('error', ''))} (not verified here)")
    if sig is not None and "signed_as" in sig:
        rel = sig["release"]
        mine = rel == {"name": d["name"], "version": d["version"]}
        print(f"  signed as: {e(sig['signed_as'])}, "
              + (f"for {e(rel['name'])} {e(rel['version'])}" if rel else "for no release")
              + (" (this bundle's release)" if mine else
                 " (not this bundle's release: refused unless the rule binds the digest"
                 " only)"))
    enc = d["encryption"]
    if enc is not None:
        print(f"encrypted: {e(', '.join(enc['files']))} with content key {enc['key_id']} for "
              f"{len(enc['recipients'])} device(s): {e(', '.join(enc['recipients'][:20]))}")
    prov = d["provenance"]
    if prov is None:
        print("provenance: none")
        return 0
    print(f"provenance: {e(prov['file'])} {prov['digest']} (not verified here)")
    if "error" in prov:
        print(f"  unreadable: {e(prov['error'])}")
        return 0
    print(f"  builder: {e(prov['builder_id'])}")
    for s in prov["subjects"]:
        print(f"  subject: {e(s['name'])} sha256 {e(s['sha256'])}")
    for dep in prov["dependencies"]:
        print(f"  from: {e(dep['name'])} {e(dep['digest'] or '(no digest)')}")
    for k, v in sorted(prov["parameters"].items()):
        print(f"  parameter: {e(k)} = {e(json.dumps(v))}")
    return 0
