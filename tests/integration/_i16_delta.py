"""Helpers of the issue-16 delta tests: models whose v2 shares most chunks with v1, and
publishing a release's chunk index as the pubindex change will (until it is merged)."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Any

from tuf.api.metadata import TargetFile

from modelward.publisher._bundle_build import BuildOptions, build_bundle
from modelward.publisher._chunking import build_index
from modelward.publisher._repo import Repository
from modelward.updater.bundle._chunkindex import ChunkIndex, index_path
from tests._stock_tuf import stock_refresh

IN_DIM, OUT_DIM = 1024, 512  # W: 2 MiB of float32


def big_model(path: Path, seed: int = 1, changed_rows: int = 0, change_seed: int = 2) -> Path:
    """``y = x @ W + b`` with a 2 MiB ``W``; ``changed_rows`` last rows of W differ (a
    fine-tune of the end)."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    w = rng.standard_normal((IN_DIM, OUT_DIM)).astype(np.float32)
    if changed_rows:
        w[-changed_rows:] = np.random.default_rng(change_seed).standard_normal(
            (changed_rows, OUT_DIM)).astype(np.float32)
    b = rng.standard_normal(OUT_DIM).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["xw"]),
         helper.make_node("Add", ["xw", "b"], ["y"])],
        "big", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", IN_DIM])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", OUT_DIM])],
        initializer=[numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path.write_bytes(model.SerializeToString())
    return path


def build(builds: Path, version: str, **kw: Any) -> Path:
    model = big_model(builds / f"big-{version}.onnx", **kw)
    out = builds / f"classifier-{version}.tar"
    build_bundle(model, "classifier", version, out, options=BuildOptions())
    return out


def publish_index(repo: Repository, repo_dir: Path, bundle_target: str) -> ChunkIndex:
    """Publish the chunk index of the published ``bundle_target`` as its own TUF target
    (what ``publish`` does once the pubindex change is merged): a stock TUF client still
    accepts the repository."""
    targets, _, _ = repo.current()
    tf = targets.targets[bundle_target]
    sha = tf.hashes["sha256"]
    name = bundle_target.split("/", 1)[0]
    base = bundle_target.rpartition("/")[2]
    served = repo_dir / "targets" / name / f"{sha}.{base}"
    ix = build_index(served, sha)
    data = ix.to_bytes()
    ipath = index_path(bundle_target)
    itf = TargetFile(len(data), {"sha256": hashlib.sha256(data).hexdigest()}, ipath)
    itf.unrecognized_fields["custom"] = {"modelward-chunk-index": {"bundle": bundle_target}}
    (served.parent / f"{itf.hashes['sha256']}.{ipath.rpartition('/')[2]}").write_bytes(data)
    if ipath not in targets.targets:  # (pubindex may already publish it)
        targets.targets[ipath] = itf
        repo._commit_targets(targets)  # noqa: SLF001 - the publisher's own signing step
    stock_refresh(repo_dir)
    return ix


def publish(w: Any, version: str, **kw: Any) -> tuple[Path, ChunkIndex]:
    """Build, publish and index ``classifier version``; (served bundle, index)."""
    r = w.repo.publish(build(w.builds, version, **kw))
    ix = publish_index(w.repo, w.repo_dir, r.target_path)
    served = next((w.repo_dir / "targets" / "classifier").glob(f"*.classifier-{version}.tar"))
    return served, ix


def bundle_gets(w: Any, version: str) -> list[tuple[int, int, str]]:
    """(status, body bytes, Range header) of the GETs of a bundle in nginx's log."""
    log = (w.tmp / "origin" / "access.log").read_text()
    pat = rf'"GET /targets/classifier/\w+\.classifier-{re.escape(version)}\.tar HTTP/1\.1" ' \
        r'(\d+) (\d+)'
    return [(int(m.group(1)), int(m.group(2)), "") for m in re.finditer(pat, log)]


def drop_index(repo: Repository, repo_dir: Path, bundle_target: str) -> None:
    """Make ``bundle_target`` a release as published before issue 16: no index target."""
    targets, _, _ = repo.current()
    if targets.targets.pop(index_path(bundle_target), None) is not None:
        repo._commit_targets(targets)  # noqa: SLF001 - the publisher's own signing step
        stock_refresh(repo_dir)
