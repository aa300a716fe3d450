"""Issue 14, the served directory (modelward.publisher._served), through the real CLI and a real
device (swtpm, nginx): whoever writes ``REPO/metadata`` cannot make the operator's tools
sign onwards from an edit, and cannot freeze the fleet with a planted file.
"""

from __future__ import annotations

import json

from tests.conftest import PASSPHRASE, World


def _rk(w: World) -> list[str]:
    return ["--repo", str(w.repo_dir), "--keys", str(w.keys)]


def _env() -> dict[str, str]:
    return {"MODELWARD_KEY_PASSPHRASE": PASSPHRASE.decode()}


def _served(w: World) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((w.repo_dir / "metadata").iterdir())}


def test_edited_snapshot_is_refused_by_refresh_and_publish(world: World) -> None:
    """The origin rolls the snapshot back to targets v1 (dropping the release): `repo
    refresh` and `publish` name the file and sign nothing; the device stays as it was."""
    w = world
    w.publish("1.0.0", seed=1)
    w.update()
    ts = json.loads((w.repo_dir / "metadata" / "timestamp.json").read_bytes())
    name = f"{ts['signed']['meta']['snapshot.json']['version']}.snapshot.json"
    path = w.repo_dir / "metadata" / name
    doc = json.loads(path.read_bytes())
    doc["signed"]["meta"] = {"targets.json": {"version": 1}}
    path.write_text(json.dumps(doc))
    served, before = _served(w), w.snapshot()
    for argv in (("repo", "refresh"), ("publish", str(w.bundle("2.0.0", seed=2)))):
        r = w.cli(*argv, *_rk(w), env=_env())
        assert r.returncode == 1, (argv, r.stderr)
        assert "Traceback" not in r.stderr and name in r.stderr, r.stderr
        assert _served(w) == served
    w.update()  # the device refuses the edit itself
    assert w.snapshot() == before
    assert w.active_version() == "1.0.0"


def test_planted_team_file_does_not_freeze_the_fleet(world: World) -> None:
    """A planted 999999.<team>.json never gets an operator-signed snapshot entry: the next
    release still reaches the device."""
    w = world
    r = w.cli("repo", "delegate", "vision", "--paths", "detector/*", *_rk(w), env=_env())
    assert r.returncode == 0, r.stderr
    (w.repo_dir / "metadata" / "999999.vision.json").write_bytes(b'{"signed": {}}')
    w.publish("1.0.0", seed=1)
    ts = json.loads((w.repo_dir / "metadata" / "timestamp.json").read_bytes())
    snap = json.loads((w.repo_dir / "metadata" /
                       f"{ts['signed']['meta']['snapshot.json']['version']}.snapshot.json"
                       ).read_bytes())
    assert snap["signed"]["meta"]["vision.json"]["version"] == 1
    w.update()
    assert w.active_version() == "1.0.0"
