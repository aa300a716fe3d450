"""Repository-side attacks on a served TUF repository directory.

Like python-tuf's ``tests/repository_simulator.py``, but on the files a real origin (nginx)
serves: an attacker who controls the origin or the path replaces, withholds, replays or
inflates files, and one who stole online keys signs what they like. Every change is
recorded so :meth:`RepoAttacker.restore` can put the operator's files back (what an
operator does after detecting a compromise: re-upload the repository).
"""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from securesystemslib.signer import CryptoSigner, Signer
from tuf.api.metadata import Metadata, MetaFile, TargetFile
from tuf.api.serialization.json import JSONSerializer

from modelward.publisher._keys import load_signer_at
from modelward.trust._fingerprint import slot_fingerprint
from modelward.updater.bundle._bundle import extract_bundle


def _serialize(md: Metadata) -> bytes:  # type: ignore[type-arg]
    return md.to_bytes(JSONSerializer(compact=True))


class RepoAttacker:
    """Tamper with the served files of the repository at ``repo``.

    Args:
        repo: the served directory (``metadata/``, ``targets/``).
        keys: the operator's key directory; only read by the ``stolen_*`` helpers, which
            model an attacker who copied a key file and its passphrase.
        passphrase: passphrase of the key files.
    """

    def __init__(self, repo: Path, keys: Path | None = None, passphrase: bytes = b"") -> None:
        self.repo, self.keys, self._passphrase = repo, keys, passphrase
        self.metadata = repo / "metadata"
        self._originals: dict[Path, bytes | None] = {}

    # -- bookkeeping ---------------------------------------------------------------

    def serve(self, path: Path, data: bytes) -> None:
        """Serve ``data`` at ``path`` (under the repository), remembering the original."""
        if path not in self._originals:
            self._originals[path] = path.read_bytes() if path.exists() else None
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)

    def restore(self) -> None:
        """Put every file this attacker touched back as the operator had it."""
        for path, data in self._originals.items():
            if data is None:
                path.unlink(missing_ok=True)
            else:
                path.write_bytes(data)
        self._originals.clear()

    def snapshot_served(self) -> dict[str, bytes]:
        """Bytes of every metadata file currently served (to replay later)."""
        return {p.name: p.read_bytes() for p in self.metadata.glob("*.json")}

    def load(self, name: str) -> Metadata:  # type: ignore[type-arg]
        """A served metadata file."""
        return Metadata.from_bytes((self.metadata / name).read_bytes())

    def current_names(self) -> tuple[str, str]:
        """File names of the snapshot and top-level targets the timestamp points at."""
        ts = self.load("timestamp.json").signed
        snap = self.load(f"{ts.snapshot_meta.version}.snapshot.json").signed
        return (f"{ts.snapshot_meta.version}.snapshot.json",
                f"{snap.meta['targets.json'].version}.targets.json")

    # -- keys ------------------------------------------------------------------------

    @staticmethod
    def own_key() -> CryptoSigner:
        """A key the attacker made: nothing trusts it."""
        return CryptoSigner.generate_ed25519()

    def stolen(self, role: str, filename: str | None = None) -> Signer:
        """The operator's key for ``role``, as an attacker who copied it would use it."""
        if self.keys is None:
            raise ValueError("no key directory: this attacker has stolen no keys")
        return load_signer_at(self.keys / (filename or f"{role}.pem"), self._passphrase, role)

    # -- scenarios ---------------------------------------------------------------

    def replace_target(self, name: str, version: str, data: bytes) -> Path:
        """Arbitrary installation: other bytes served under a signed target's file name."""
        path = next((self.repo / "targets" / name).glob(f"*.{name}-{version}.tar"))
        self.serve(path, data)
        return path

    def append_to_target(self, name: str, version: str, extra: int) -> Path:
        """Endless data on a target: the signed bundle followed by ``extra`` more bytes."""
        path = next((self.repo / "targets" / name).glob(f"*.{name}-{version}.tar"))
        self.serve(path, path.read_bytes() + b"\0" * extra)
        return path

    def inflate(self, filename: str, size: int) -> None:
        """Endless data on metadata: ``filename`` becomes ``size`` bytes of JSON padding."""
        path = self.metadata / filename
        body = path.read_bytes()
        self.serve(path, body[:-1] + b" " * max(0, size - len(body)) + b"}")

    def replay(self, served: dict[str, bytes], *names: str) -> None:
        """Rollback / freeze: serve older copies of these metadata files."""
        for name in names:
            self.serve(self.metadata / name, served[name])

    def mix_and_match(self, older_targets: str) -> None:
        """Serve the (validly signed) older targets file under the current targets name."""
        _, current = self.current_names()
        self.serve(self.metadata / current, (self.metadata / older_targets).read_bytes())

    def resign_timestamp(self, signer: Signer, *, version: int | None = None,
                         expires: datetime | None = None) -> int:
        """A timestamp re-signed by ``signer`` (fast-forward with a stolen key, or a
        forgery with the attacker's own); returns its version."""
        md = self.load("timestamp.json")
        if version is not None:
            md.signed.version = version
        if expires is not None:
            md.signed.expires = expires
        md.signatures.clear()
        md.sign(signer)
        self.serve(self.metadata / "timestamp.json", _serialize(md))
        return int(md.signed.version)

    def forge_release(
        self, bundle: Path, signers: dict[str, Signer], *, bump: int = 1,
        custom: dict[str, Any] | None = None,
    ) -> str:
        """Publish ``bundle`` as a new release under metadata signed by ``signers``
        (``targets``, ``snapshot``, ``timestamp``): stolen keys or the attacker's own.

        Returns the target path.
        """
        with open(bundle, "rb") as f:
            manifest, entries = extract_bundle(f, None, str(bundle))
        data = bundle.read_bytes()
        target_path = f"{manifest.name}/{manifest.name}-{manifest.version}.tar"
        tf = TargetFile(len(data), {"sha256": hashlib.sha256(data).hexdigest()}, target_path)
        tf.unrecognized_fields["custom"] = custom or {"modelward": {
            "name": manifest.name, "version": manifest.version,
            "fingerprint": slot_fingerprint(entries), "channel": "stable",
            "rollout": {"basis_points": 10000, "halted": False}, "pinned": False}}
        self.serve(self.repo / "targets" / manifest.name /
                   f"{tf.hashes['sha256']}.{manifest.name}-{manifest.version}.tar", data)
        self._sign_chain(tf, signers, bump)
        return target_path

    def _sign_chain(self, tf: TargetFile, signers: dict[str, Signer], bump: int) -> None:
        snap_name, targets_name = self.current_names()
        expires = datetime.now(UTC).replace(microsecond=0) + timedelta(days=7)
        targets = self.load(targets_name)
        targets.signed.targets[tf.path] = tf
        targets.signed.version += bump
        targets.signed.expires = expires
        targets.signatures.clear()
        targets.sign(signers["targets"])
        self.serve(self.metadata / f"{targets.signed.version}.targets.json", _serialize(targets))
        snap = self.load(snap_name)
        snap.signed.meta["targets.json"] = MetaFile(version=targets.signed.version)
        snap.signed.version += bump
        snap.signed.expires = expires
        snap.signatures.clear()
        snap.sign(signers["snapshot"])
        self.serve(self.metadata / f"{snap.signed.version}.snapshot.json", _serialize(snap))
        ts = self.load("timestamp.json")
        ts.signed.snapshot_meta = MetaFile(version=snap.signed.version)
        ts.signed.version += bump
        ts.signed.expires = expires
        ts.signatures.clear()
        ts.sign(signers["timestamp"])
        self.serve(self.metadata / "timestamp.json", _serialize(ts))

    def sign_raw(self, data: bytes, name: str, version: str, fingerprint: str,
                 channel: str = "stable") -> str:
        """Sign arbitrary bytes as release ``name`` ``version`` on ``channel`` with the
        operator's own (stolen) online keys: what a compromised build pipeline gets signed.
        Devices must still refuse a malformed bundle. Returns the target path."""
        target_path = f"{name}/{name}-{version}.tar"
        tf = TargetFile(len(data), {"sha256": hashlib.sha256(data).hexdigest()}, target_path)
        tf.unrecognized_fields["custom"] = {"modelward": {
            "name": name, "version": version, "fingerprint": fingerprint, "channel": channel,
            "rollout": {"basis_points": 10000, "halted": False}, "pinned": False}}
        self.serve(self.repo / "targets" / name /
                   f"{tf.hashes['sha256']}.{name}-{version}.tar", data)
        self._sign_chain(tf, {r: self.stolen(r) for r in ("targets", "snapshot", "timestamp")},
                         1)
        return target_path



def pax_record(key: str, value: str) -> bytes:
    """One pax extended-header record ``"<len> key=value\n"``."""
    body = f" {key}={value}\n".encode()
    n = len(body) + 1
    while len(str(n)) + len(body) != n:
        n += 1
    return str(n).encode() + body


def pax_headers(length: int) -> bytes:
    """``length`` bytes made only of pax extended headers, each 60 KiB of small distinct
    records (what once made the reader hold ~11x the stream): served by an origin under
    a signed release's name, or signed by a compromised pipeline."""
    import tarfile

    records = b"".join(pax_record(f"k{i:016d}", "v") for i in range(60 * 1024 // 22))
    info = tarfile.TarInfo("././@PaxHeader")
    info.type, info.size = tarfile.XHDTYPE, len(records)
    one = info.tobuf(tarfile.USTAR_FORMAT) + records + b"\0" * (-len(records) % 512)
    data = one * (length // len(one))
    return data + b"\0" * (length - len(data))
