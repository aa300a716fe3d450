"""A delegated team key signing whatever it likes into its own role (for attack tests).

``Repository.publish(role=...)`` refuses a path the team may not speak for; an attacker
holding the team's key, or a careless team, does not ask the publisher. This signs a
target at any path, with any ``modelward`` fields, into the role's metadata with the
team's key, serves the bundle where devices fetch it, and publishes a new snapshot and
timestamp (what the repository's online keys do for any new role version).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from modelward.publisher._repo import Repository
from modelward.trust._fingerprint import slot_fingerprint
from modelward.updater.bundle._bundle import extract_bundle


def team_sign(repo: Repository, role: str, bundle: Path, *, path: str | None = None,
              **fields: Any) -> str:
    """Sign ``bundle`` into delegated ``role`` at ``path`` (default: the usual
    ``name/name-version.tar``); ``fields`` override the ``modelward`` fields (``name``,
    ``version``, ``pinned`` ...). Returns the target path."""
    from tuf.api.metadata import TargetFile

    with open(bundle, "rb") as f:
        manifest, entries = extract_bundle(f, None, str(bundle))
    path = path or f"{manifest.name}/{manifest.name}-{manifest.version}.tar"
    tf = TargetFile.from_file(path, str(bundle), ["sha256"])
    tf.unrecognized_fields["custom"] = {"modelward": {
        "name": manifest.name, "version": manifest.version,
        "fingerprint": slot_fingerprint(entries), "channel": "stable",
        "rollout": {"basis_points": 10000, "halted": False}, "pinned": False, **fields}}
    d, _, base = path.rpartition("/")
    dest = repo.targets_dir / d / f"{tf.hashes['sha256']}.{base}"
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_bytes(bundle.read_bytes())
    md = repo._role_md(role)  # noqa: SLF001 - tester tooling
    md.signed.targets[path] = tf
    md.signed.version += 1
    repo._write_delegated(md, role, repo.keys / f"delegated-{role}.pem")  # noqa: SLF001
    targets, _, _ = repo.current()
    repo._snapshot_and_timestamp(targets.version)  # noqa: SLF001
    return path
