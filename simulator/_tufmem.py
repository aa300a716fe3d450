"""An in-memory TUF repository with delegations, and a fetcher over it (for unit tests).

python-tuf's ``RepositorySimulator`` in spirit: metadata built with ``tuf.api``, signed
with fresh ed25519 keys, served from a dict; every URL asked for is recorded.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib import parse

from securesystemslib.signer import CryptoSigner
from tuf.api import exceptions as tuf_exc
from tuf.api.metadata import (
    DelegatedRole,
    Delegations,
    Metadata,
    MetaFile,
    Root,
    Snapshot,
    TargetFile,
    Targets,
    Timestamp,
)
from tuf.api.serialization.json import JSONSerializer

from modelward.updater.transport._fetcher import RangeFetcher

METADATA_URL = "mem://repo/metadata/"
TARGETS_URL = "mem://repo/targets/"


class MemRepo:
    """Top-level roles plus any delegated targets roles; :meth:`publish` serves them."""

    def __init__(self, expires: datetime | None = None) -> None:
        self.expires = expires or datetime.now(UTC).replace(microsecond=0) + timedelta(days=30)
        self.signers: dict[str, CryptoSigner] = {}
        root = Root(expires=self.expires, consistent_snapshot=True)
        for role in ("root", "timestamp", "snapshot", "targets"):
            self.signers[role] = CryptoSigner.generate_ed25519()
            root.add_key(self.signers[role].public_key, role)
        self.root = Metadata(root)
        self.roles: dict[str, Metadata[Targets]] = {
            "targets": Metadata(Targets(expires=self.expires))}
        self.served: dict[str, bytes] = {}
        self.version = 0
        self.publish()

    def delegate(self, parent: str, name: str, *, paths: list[str] | None = None,
                 hash_prefixes: list[str] | None = None, terminating: bool = False,
                 key: CryptoSigner | None = None) -> None:
        """``parent`` delegates ``paths`` (or ``hash_prefixes``) to ``name`` (made if new,
        with its own key; a second parent delegates to the same key unless ``key`` names
        another, which then does not sign the role)."""
        if name not in self.signers:
            self.signers[name] = CryptoSigner.generate_ed25519()
        if name not in self.roles:
            self.roles[name] = Metadata(Targets(expires=self.expires))
        p = self.roles[parent].signed
        if p.delegations is None:
            p.delegations = Delegations(keys={}, roles={})
        assert p.delegations.roles is not None
        p.delegations.roles[name] = DelegatedRole(
            name=name, keyids=[], threshold=1, terminating=terminating,
            paths=None if hash_prefixes is not None else (paths or []),
            path_hash_prefixes=hash_prefixes)
        p.add_key((key or self.signers[name]).public_key, name)

    def add_target(self, role: str, path: str, data: bytes = b"x",
                   custom: dict[str, Any] | None = None) -> TargetFile:
        """List ``path`` in ``role`` (its bytes are served too)."""
        tf = TargetFile.from_data(path, data, ["sha256"])
        if custom is not None:
            tf.unrecognized_fields["custom"] = custom
        self.roles[role].signed.targets[path] = tf
        d, _, base = path.rpartition("/")
        self.served[f"{TARGETS_URL}{d}/{tf.hashes['sha256']}.{base}"] = data
        return tf

    def add_release(self, role: str, path: str, bundle: bytes,
                    custom: dict[str, Any] | None = None, *, index: bytes | None = None,
                    with_index: bool = True) -> tuple[TargetFile, TargetFile | None]:
        """List a bundle at ``path`` in ``role`` and, as ``Repository.publish`` does, its
        chunk index next to it (``index``: these bytes instead of the real index, e.g. a
        forged one; ``with_index=False``: none, as a release from before indexes)."""
        from modelward.publisher._indexpub import INDEX_FIELD, index_of_bytes
        from modelward.updater.bundle._chunkindex import index_path

        tf = self.add_target(role, path, bundle, custom)
        if not with_index:
            return tf, None
        data = index if index is not None else index_of_bytes(bundle).to_bytes()
        return tf, self.add_target(role, index_path(path), data,
                                   {INDEX_FIELD: {"bundle": path}})

    def publish(self) -> None:
        """Sign every role at a new version and serve it (consistent snapshots)."""
        self.version += 1
        v = self.version
        ser = JSONSerializer(compact=True)
        self.root.signatures.clear()
        self.root.sign(self.signers["root"])
        self.served[f"{METADATA_URL}1.root.json"] = self.root.to_bytes(ser)
        meta = {}
        for name, md in self.roles.items():
            md.signed.version = v
            md.signatures.clear()
            md.sign(self.signers[name])
            self.served[f"{METADATA_URL}{v}.{parse.quote(name, '')}.json"] = md.to_bytes(ser)
            meta[f"{name}.json"] = MetaFile(version=v)
        snap = Metadata(Snapshot(version=v, expires=self.expires, meta=meta))
        snap.sign(self.signers["snapshot"])
        self.served[f"{METADATA_URL}{v}.snapshot.json"] = snap.to_bytes(ser)
        ts = Metadata(Timestamp(version=v, expires=self.expires,
                                snapshot_meta=MetaFile(version=v)))
        ts.sign(self.signers["timestamp"])
        self.served[f"{METADATA_URL}timestamp.json"] = ts.to_bytes(ser)

    @property
    def root_bytes(self) -> bytes:
        return self.served[f"{METADATA_URL}1.root.json"]


class MemFetcher(RangeFetcher):
    """Serves a :class:`MemRepo`; ``requested`` lists every URL asked for."""

    def __init__(self, repo: MemRepo) -> None:
        self.repo = repo
        self.requested: list[str] = []

    def _fetch(self, url: str) -> Iterator[bytes]:
        self.requested.append(url)
        data = self.repo.served.get(url)
        if data is None:
            raise tuf_exc.DownloadHTTPError(f"{url} not found", 404)
        return iter([data])

    def roles_requested(self) -> list[str]:
        """Metadata role names fetched, in order (``N.name.json`` -> name, unquoted)."""
        out = []
        for url in self.requested:
            if url.startswith(METADATA_URL):
                name = url[len(METADATA_URL):].removesuffix(".json")
                head, _, rest = name.partition(".")
                out.append(parse.unquote(rest if head.isdigit() else name))
        return out
