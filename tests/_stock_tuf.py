"""A stock python-tuf client (ngclient ``Updater``, nothing of modelward) over local files.

The test suite runs it after every repository-changing command in its operator
scenarios (see ``World.cli``): whatever `repo` publishes must be what an unmodified TUF
client, provisioned with ``1.root.json``, accepts.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

from tuf.api.exceptions import DownloadHTTPError
from tuf.ngclient import FetcherInterface, Updater

BASE = "http://stock-client.invalid/metadata/"
READ_ONLY = {"status", "export", "--help", "-h"}  # `repo` actions that change nothing


class LocalFetcher(FetcherInterface):
    """Serves ``BASE<name>`` from a repository's ``metadata/``; a missing file is a 404."""

    def __init__(self, metadata: Path) -> None:
        self._metadata = metadata

    def _fetch(self, url: str) -> Iterator[bytes]:
        name = url.removeprefix(BASE)
        if "/" in name or not url.startswith(BASE):
            raise DownloadHTTPError(f"{url} is not served here", 404)
        try:
            data = (self._metadata / name).read_bytes()
        except FileNotFoundError as e:
            raise DownloadHTTPError(f"{name} not found", 404) from e
        return iter([data])


def stock_refresh(repo_dir: Path) -> int:
    """A fresh stock client trusting ``1.root.json`` refreshes from ``repo_dir``; returns
    the root version it ends at. Raises whatever python-tuf raises."""
    metadata = repo_dir / "metadata"
    with tempfile.TemporaryDirectory(prefix="stock-tuf-") as d:
        updater = Updater(d, BASE, fetcher=LocalFetcher(metadata),
                          bootstrap=(metadata / "1.root.json").read_bytes())
        updater.refresh()
        return int(updater._trusted_set.root.version)  # noqa: SLF001 - for the test only


def changed_repo(argv: Sequence[str]) -> Path | None:
    """The ``--repo`` a repository-changing CLI command wrote to (None: not such a one)."""
    if not argv or argv[0] not in ("repo", "publish", "rollout"):
        return None
    if argv[0] == "repo" and (len(argv) < 2 or argv[1] in READ_ONLY):
        return None
    args = list(argv)
    repo = next((args[i + 1] for i, a in enumerate(args[:-1]) if a == "--repo"), None)
    if repo is None or not (Path(repo) / "metadata" / "1.root.json").exists():
        return None
    return Path(repo)
