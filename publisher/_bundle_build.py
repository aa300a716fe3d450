"""Writing v1 bundles: manifest, model, test vectors, extra files."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import tarfile
import tempfile
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from modelward.publisher._encrypt import Encryption, encrypt_file
from modelward.publisher.errors import OperatorInputError
from modelward.trust._fingerprint import FileChangedError, file_merkle_root
from modelward.updater.bundle._bundle import MANIFEST, BundleFile, Manifest, TensorSpec
from modelward.updater.bundle._encryption import TABLE_NAME, Header, table_bytes
from modelward.updater.bundle._names import check_model_name
from modelward.updater.bundle._provenance import (
    BIND_NAME_VERSION,
    MAX_PROVENANCE_BYTES,
    MAX_SIGNATURE_BYTES,
    PROVENANCE_NAME,
    SIGNATURE_NAME,
    Policy,
    Rule,
    TrustedSigner,
    check_model,
    parse_attestation,
)
from modelward.updater.bundle._semver import SemVer
from modelward.updater.bundle._tarstream import check_member_path
from modelward.updater.errors import ProvenanceRefusedError

MODEL_NAME = "model.onnx"
VECTORS_NAME = "vectors.npz"
_READ = 1 << 20


@dataclass(frozen=True)
class BuildOptions:
    """Knobs of ``bundle build``.

    Attributes:
        rtol, atol: tolerances the device's health check applies.
        seed: seed of the generated test inputs.
        provenance: free-form provenance recorded in the manifest.
        check_vectors: given vectors must pass the device's health check here (what
            `bundle build` does; tests that build bad bundles on purpose leave it off).
        model_signature: a ``model-signing`` signature of the model file, carried as
            ``model.sig``; verified here against ``signers`` (one of them made it).
        signers: the model signers to verify ``model_signature`` against.
        signature_bind: what the signature must be for (the policy rule's ``bind``):
            this release's name and version (the default), or the bytes only.
        verify_signature: off only in tests that build refused bundles on purpose.
        provenance_attestation: a signed SLSA provenance attestation of the model
            (``modelward provenance sign``), carried as ``provenance.dsse.json``; its
            subject must be the model file (its builder is checked at publish).
        encryption: encrypt the files (all but the manifest, the table and the provenance
            files) with this content key, wrapped for its recipients
            (``publisher._encrypt.content_key``).
    """

    rtol: float = 1e-4
    atol: float = 1e-5
    seed: int = 0
    provenance: dict[str, Any] | None = None
    check_vectors: bool = False
    model_signature: Path | None = None
    signers: tuple[TrustedSigner, ...] = ()
    signature_bind: str = BIND_NAME_VERSION
    verify_signature: bool = True
    provenance_attestation: Path | None = None
    encryption: Encryption | None = None


Progress = Callable[[int], None]  # called with a byte count as work advances


def _hash_file(path: Path, arcname: str, progress: Progress) -> BundleFile:
    """sha256 and Merkle root of a file, at once: the Merkle leaves are hashed on every
    core from the page cache (``trust.file_merkle_root``) while this thread reads for the
    sha256, so the two passes overlap instead of following each other."""
    with ThreadPoolExecutor(max_workers=1) as ex:
        merkle = ex.submit(file_merkle_root, path)
        sha = hashlib.sha256()
        read = 0
        with open(path, "rb") as f:
            while chunk := f.read(_READ):
                sha.update(chunk)
                read += len(chunk)
                progress(len(chunk))
        try:
            size, root = merkle.result()
        except FileChangedError as e:
            raise OperatorInputError(f"{path} changed while it was being hashed") from e
    if size != read:
        raise OperatorInputError(f"{path} changed while it was being hashed")
    return BundleFile(arcname, size, sha.hexdigest(), root)


def _graph_io(model_path: Path) -> tuple[int, list[TensorSpec], list[TensorSpec]]:
    import onnx
    from onnx import helper

    try:
        model = onnx.load(str(model_path), load_external_data=False)
    except Exception as e:  # noqa: BLE001 - protobuf raises assorted types on bad files
        raise OperatorInputError(f"{model_path} is not an ONNX model: {e}") from e
    opset = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)
    inits = {i.name for i in model.graph.initializer}

    def spec(vi: Any) -> TensorSpec:
        tt = vi.type.tensor_type
        dims: list[int | str | None] = []
        for d in tt.shape.dim:
            if d.HasField("dim_value"):
                dims.append(int(d.dim_value))
            else:
                dims.append(d.dim_param or None)
        return TensorSpec(vi.name, str(helper.tensor_dtype_to_np_dtype(tt.elem_type)), tuple(dims))

    inputs = [spec(v) for v in model.graph.input if v.name not in inits]
    outputs = [spec(v) for v in model.graph.output]
    return opset, inputs, outputs


def generate_vectors(model_path: Path, inputs: Sequence[TensorSpec], seed: int, out: Path) -> None:
    """Run the model on seeded random inputs and save inputs and outputs as ``.npz``."""
    import numpy as np
    import onnxruntime as ort

    rng = np.random.default_rng(seed)
    feeds: dict[str, Any] = {}
    for s in inputs:
        shape = [d if isinstance(d, int) and d > 0 else 1 for d in s.shape]
        dt = np.dtype(s.dtype)
        if dt.kind == "f":
            feeds[s.name] = rng.standard_normal(shape).astype(dt)
        elif dt.kind in "iu":
            feeds[s.name] = rng.integers(0, 10, size=shape).astype(dt)
        elif dt.kind == "b":
            feeds[s.name] = rng.integers(0, 2, size=shape).astype(dt)
        else:
            raise OperatorInputError(
                f"cannot generate test inputs of dtype {s.dtype} for {s.name!r}",
                hint="pass --vectors FILE.npz with input:<name> and output:<name> arrays",
            )
    sess = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    outs = sess.run(names, feeds)
    arrays = {f"input:{k}": v for k, v in feeds.items()}
    arrays.update({f"output:{n}": v for n, v in zip(names, outs, strict=True)})
    with open(out, "wb") as f:
        np.savez(f, **arrays)


def check_vectors(model_path: Path, vectors: Path, inputs: Sequence[TensorSpec],
                  outputs: Sequence[TensorSpec], rtol: float, atol: float) -> None:
    """The device's health check, before publishing: ``vectors`` is an ``.npz`` (no
    pickles) holding exactly ``input:<name>`` for the model's inputs and ``output:<name>``
    for its outputs, and the model computes those outputs within ``rtol``/``atol``.

    Raises:
        OperatorInputError: naming ``--vectors`` and what does not fit.
    """
    import zipfile

    import numpy as np
    import onnxruntime as ort

    where = f"--vectors {vectors}"
    hint = "give an .npz with input:<name> and output:<name> arrays of this model"
    try:
        with np.load(vectors, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise OperatorInputError(f"{where}: not a NumPy .npz file ({e})", hint=hint) from e
    want = {f"input:{s.name}" for s in inputs} | {f"output:{s.name}" for s in outputs}
    if set(arrays) != want:
        raise OperatorInputError(f"{where}: holds {sorted(arrays)}, the model needs "
                                 f"{sorted(want)}", hint=hint)
    try:
        sess = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
        got = sess.run([s.name for s in outputs],
                       {s.name: arrays[f"input:{s.name}"] for s in inputs})
    except Exception as e:  # noqa: BLE001 - onnxruntime raises its own assorted types
        raise OperatorInputError(f"{where}: the model does not run on these inputs: {e}",
                                 hint=hint) from e
    for s, out in zip(outputs, got, strict=True):
        expected = arrays[f"output:{s.name}"]
        if np.shape(out) != np.shape(expected) or not np.allclose(out, expected, rtol=rtol,
                                                                  atol=atol):
            raise OperatorInputError(f"{where}: output {s.name!r} is not what the model "
                                     f"computes (rtol {rtol}, atol {atol})",
                                     hint="vectors of another model? regenerate them, or "
                                     "leave --vectors out")


def _check_signature(path: Path, listed: BundleFile, name: str, version: str,
                     model_sha256: str, signers: Sequence[TrustedSigner], bind: str) -> None:
    """``--model-signature``: one of ``signers`` signed exactly the model's bytes (and,
    as ``bind`` says, for this release).

    Raises:
        OperatorInputError: naming the signature file and what is wrong.
    """
    where = f"--model-signature {path}"
    if not signers:
        raise OperatorInputError(f"{where}: nothing to verify it against",
                                 hint="give --signer-key PEM, or --signer-chain PEM with "
                                 "--signer-identity, or --policy FILE")
    if listed.size > MAX_SIGNATURE_BYTES:
        raise OperatorInputError(f"{where}: over {MAX_SIGNATURE_BYTES} bytes; not a "
                                 "model-signing signature")
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != listed.sha256:
        raise OperatorInputError(f"{where} changed while the bundle was built")
    try:
        check_model(Policy((Rule("build", ("*",), tuple(signers), bind=bind),)), name,
                    version, data, model_sha256)
    except ProvenanceRefusedError as e:
        raise OperatorInputError(f"{where}: {e.reason}",
                                 hint="sign the model file itself with `model_signing "
                                 "sign key` or `sign certificate`") from e


def _check_attestation(path: Path, listed: BundleFile, model_sha256: str) -> None:
    """``--provenance``: a well-formed attestation whose subject is the model file.

    Raises:
        OperatorInputError: naming the file and what is wrong.
    """
    where = f"--provenance {path}"
    if listed.size > MAX_PROVENANCE_BYTES:
        raise OperatorInputError(f"{where}: over {MAX_PROVENANCE_BYTES} bytes")
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != listed.sha256:
        raise OperatorInputError(f"{where} changed while the bundle was built")
    try:
        att = parse_attestation(data)
    except ValueError as e:
        raise OperatorInputError(f"{where}: {e}") from e
    if model_sha256 not in {sha for _, sha in att.subjects}:
        raise OperatorInputError(f"{where}: its subject is not this model file",
                                 hint="attest the model file the bundle carries")


def build_bundle(
    model: Path,
    name: str,
    version: str,
    out: Path,
    *,
    vectors: Path | None = None,
    extra: Sequence[tuple[Path, str]] = (),
    options: BuildOptions | None = None,
    progress: Progress = lambda _n: None,
) -> Manifest:
    """Write a v1 bundle to ``out``.

    Args:
        model: the ONNX model file.
        name: model name (what devices are configured with).
        version: semantic version.
        out: bundle file to write.
        vectors: ``.npz`` with ``input:<name>``/``output:<name>`` arrays; generated if None.
        extra: more files as (source, path in bundle), e.g. provenance documents.
        options: tolerances, seed, provenance.
        progress: called with byte counts (hashing, then writing: twice the input size).

    Raises:
        OperatorInputError: bad name, version, model or paths.
    """
    opts = options or BuildOptions()
    try:
        SemVer.parse(version)
        check_model_name(name)  # (the rule devices and the manifest parser apply)
        for _, arc in extra:
            check_member_path(arc)
    except ValueError as e:
        raise OperatorInputError(str(e)) from e
    if not model.is_file():
        raise OperatorInputError(f"model file {model} does not exist")
    opset, inputs, outputs = _graph_io(model)
    with tempfile.TemporaryDirectory() as tmp:
        if vectors is None:
            vectors = Path(tmp) / VECTORS_NAME
            generate_vectors(model, inputs, opts.seed, vectors)
        elif opts.check_vectors:  # what the device will check, before it is published
            check_vectors(model, vectors, inputs, outputs, opts.rtol, opts.atol)
        sources = [(model, MODEL_NAME), (vectors, VECTORS_NAME), *extra]
        if opts.model_signature is not None:
            sources.append((opts.model_signature, SIGNATURE_NAME))
        if opts.provenance_attestation is not None:
            sources.append((opts.provenance_attestation, PROVENANCE_NAME))
        arcs = [a for _, a in sources]
        if len(set(arcs)) != len(arcs) or MANIFEST in arcs:
            raise OperatorInputError(f"duplicate or reserved file names in the bundle: {arcs}")
        files = tuple(_hash_file(src, arc, progress) for src, arc in sources)
        if opts.model_signature is not None and opts.verify_signature:
            _check_signature(opts.model_signature, files[2 + len(extra)], name, version,
                             files[0].sha256, opts.signers, opts.signature_bind)
        if opts.provenance_attestation is not None and opts.verify_signature:
            _check_attestation(opts.provenance_attestation, files[-1], files[0].sha256)
        manifest = Manifest(
            name=name,
            version=version,
            created=datetime.now(UTC).replace(microsecond=0).isoformat(),
            files=files,
            model_path=MODEL_NAME,
            opset=opset,
            inputs=tuple(inputs),
            outputs=tuple(outputs),
            vectors=VECTORS_NAME,
            rtol=opts.rtol,
            atol=opts.atol,
            provenance=opts.provenance or {},
            requires={"agent": "0.1.0", "execution_providers": ["CPUExecutionProvider"]},
            model_signature=SIGNATURE_NAME if opts.model_signature is not None else "",
            provenance_attestation=(PROVENANCE_NAME if opts.provenance_attestation is not None
                                    else ""),
        )
        if opts.encryption is not None:
            manifest, sources = _encrypted(manifest, sources, opts.encryption, Path(tmp),
                                           progress)
        raw = manifest.to_bytes()
        tmp_out = out.with_name(out.name + ".tmp")
        with tarfile.open(tmp_out, "w", format=tarfile.PAX_FORMAT) as tar:
            tar.addfile(_info(MANIFEST, len(raw)), io.BytesIO(raw))
            for (src, arc), bf in zip(sources, manifest.files, strict=True):
                with open(src, "rb") as f:
                    tar.addfile(_info(arc, bf.size), f)
                progress(bf.size)
        tmp_out.replace(out)
    return manifest


def _encrypted(manifest: Manifest, sources: list[tuple[Path, str]], enc: Encryption,
               tmp: Path, progress: Progress) -> tuple[Manifest, list[tuple[Path, str]]]:
    """The manifest and sources of the encrypted bundle: the table first (the chunk index
    cuts the encrypted files where they were encrypted), then each file, encrypted but
    for the provenance files."""
    plain = set(manifest.signed_files)
    out: list[tuple[Path, str]] = []
    table: dict[str, list[tuple[int, bytes]]] = {}
    shas: dict[str, str] = {}
    for i, (src, arc) in enumerate(sources):
        if arc in plain:
            out.append((src, arc))
            continue
        ef = encrypt_file(enc.key, src, tmp / f"enc-{i}")
        table[arc], shas[arc] = ef.chunks, ef.sha256
        out.append((ef.path, arc))
        progress(0)
    if TABLE_NAME in {a for _, a in sources}:
        raise OperatorInputError(f"{TABLE_NAME} is reserved in an encrypted bundle")
    table_path = tmp / TABLE_NAME
    table_path.write_bytes(table_bytes(enc.key.key_id, table))
    header = Header(enc.key.key_id, tuple(a for _, a in sources if a in table), shas,
                    TABLE_NAME, enc.recipients)
    files = (_hash_file(table_path, TABLE_NAME, lambda _n: None), *manifest.files)
    return (dataclasses.replace(manifest, files=files, encryption=header),
            [(table_path, TABLE_NAME), *out])


def _info(name: str, size: int) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.size, ti.mode, ti.mtime, ti.uid, ti.gid = size, 0o644, 0, 0, 0
    return ti
