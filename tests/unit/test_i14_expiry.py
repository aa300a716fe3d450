"""Issue 14 must-show 6, many variants: expiry windows per role, the persisted lifetimes,
and `repo status` / `repo refresh` on a repository on disk driven by an injected clock."""

from __future__ import annotations

import json
import logging
import re
import shutil
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from modelward.publisher._expiry import (
    EXPIRY_FILE,
    Expiry,
    expiry_warnings,
    format_duration,
    load_expiry,
    parse_assignments,
    parse_duration,
    save_expiry,
)
from modelward.publisher._repo import Repository
from modelward.publisher.errors import OperatorInputError, RepositoryStateError
from tests._helpers import Clock

PASS = b"unit test passphrase"
T0 = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
DAY = timedelta(days=1)
TIMER = Path(__file__).resolve().parents[2] / "systemd" / "modelward-repo-refresh.timer"


# --- pure ----------------------------------------------------------------------------


def test_defaults() -> None:
    e = Expiry()
    assert e.timestamp == DAY and e.snapshot == 30 * DAY
    assert (e.window("root"), e.window("targets"), e.window("snapshot"),
            e.window("timestamp")) == (30 * DAY, 30 * DAY, DAY, timedelta(hours=6))
    assert e.window("some-team") == e.window("targets")
    assert e.lifetime("some-team") == e.targets
    e.check()


def test_refresh_timer_runs_every_6h_and_timestamp_survives_missed_runs() -> None:
    m = re.search(r"^OnUnitActiveSec=(\S+)$", TIMER.read_text(), re.M)
    assert m and m.group(1) == "6h"
    interval = parse_duration(m.group(1), "timer")
    assert Expiry().timestamp >= 3 * interval  # two failed runs in a row are survived
    assert Expiry().window("timestamp") >= interval


@pytest.mark.parametrize(("text", "seconds"), [
    ("30d", 30 * 86400), ("6h", 21600), ("1w2d", 9 * 86400), ("90m", 5400), ("3600s", 3600),
    ("1d12h", 129600), ("0s", 0),
])
def test_parse_duration(text: str, seconds: int) -> None:
    assert parse_duration(text, "x").total_seconds() == seconds


@pytest.mark.parametrize("text", ["", "1", "d", "1x", "-1d", "1.5d", "1 d", "1D", "9" * 7 + "d",
                                  "1d" * 6, "1d\n", "\x1b[2J", "1" * 10_000 + "d", "P1D"])
def test_parse_duration_refuses(text: str) -> None:
    with pytest.raises(OperatorInputError) as e:
        parse_duration(text, "--expiry timestamp")
    assert "--expiry timestamp" in str(e.value) and len(str(e.value)) < 200
    assert "\x1b" not in str(e.value)


@pytest.mark.parametrize("pair", ["timestamp", "team=1d", "=1d", "timestamp=1y"])
def test_parse_assignments_refuses(pair: str) -> None:
    with pytest.raises(OperatorInputError):
        parse_assignments([pair], "--expiry")


def test_parse_assignments() -> None:
    assert parse_assignments(["timestamp=12h", "root=400d"], "--expiry") == {
        "timestamp": timedelta(hours=12), "root": 400 * DAY}


@pytest.mark.parametrize(("lifetimes", "windows", "match"), [
    ({"timestamp": timedelta(minutes=30)}, {}, "timestamp lifetime 30m is out of bounds"),
    ({"timestamp": 31 * DAY}, {}, "timestamp lifetime 31d is out of bounds"),
    ({"snapshot": 400 * DAY}, {}, "snapshot lifetime"),
    ({"root": 10 * 365 * DAY}, {}, "root lifetime"),
    ({}, {"root": 365 * DAY}, "root warning window 365d must be shorter"),
    ({"timestamp": timedelta(hours=4)}, {}, "timestamp warning window 6h must be shorter"),
    ({"team": DAY}, {}, "not a role"),
    ({}, {"vision": DAY}, "not a role"),
])
def test_changed_refuses(lifetimes: dict[str, timedelta], windows: dict[str, timedelta],
                         match: str) -> None:
    with pytest.raises(OperatorInputError, match=match):
        Expiry().changed(lifetimes, windows)


def test_short_timestamp_lifetime_warns(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        Expiry().changed({"timestamp": timedelta(hours=8)}, {"timestamp": timedelta(hours=2)})
    assert "refresh timer runs every 6h" in caplog.text


def test_json_round_trip() -> None:
    e = Expiry().changed({"timestamp": 12 * timedelta(hours=1), "targets": 90 * DAY},
                         {"snapshot": timedelta(hours=12)})
    assert Expiry.from_json(e.to_json(), "f") == e
    assert Expiry.from_json(b"{}", "f") == Expiry()
    assert Expiry.from_json(b'{"lifetimes": {"timestamp": 43200}}', "f").timestamp == \
        timedelta(hours=12)


@pytest.mark.parametrize(("data", "match"), [
    (b" " * 5000, "over 4096 bytes"),
    (b"[" * 3000, "nested deeper"),
    (b'{"lifetimes": {"timestamp": NaN}}', "not JSON"),
    (b'{"lifetimes": {"timestamp": Infinity}}', "not JSON"),
    (b"[]", "expected an object"),
    (b'{"other": 1}', "expected an object"),
    (b'{"lifetimes": []}', "lifetimes is not an object"),
    (b'{"lifetimes": {"timestamp": true}}', "not a role's whole number"),
    (b'{"lifetimes": {"timestamp": 86400.0}}', "not a role's whole number"),
    (b'{"lifetimes": {"timestamp": "1d"}}', "not a role's whole number"),
    (b'{"lifetimes": {"timestamp": -1}}', "not a role's whole number"),
    (b'{"lifetimes": {"timestamp": 99999999999999999999}}', "not a role's whole number"),
    (b'{"lifetimes": {"vision": 86400}}', "not a role's whole number"),
    (b'{"lifetimes": {"timestamp": 315360000}}', "timestamp lifetime"),
    (b'{"warn_within": {"root": 315360000}}', "root warning window"),
    (b"\xff\xfe", "not UTF-8"),
])
def test_from_json_refuses(data: bytes, match: str) -> None:
    with pytest.raises(RepositoryStateError, match=match) as e:
        Expiry.from_json(data, "KEYS/expiry.json")
    assert str(e.value).startswith("KEYS/expiry.json")


def test_load_and_save(tmp_path: Path) -> None:
    assert load_expiry(tmp_path) == Expiry()
    e = Expiry().changed({"timestamp": 2 * DAY})
    path = save_expiry(tmp_path / "keys", e)
    assert path.name == EXPIRY_FILE and path.stat().st_mode & 0o077 == 0
    assert load_expiry(tmp_path / "keys") == e
    path.write_bytes(b"x" * 10_000_000)  # read bounded
    with pytest.raises(RepositoryStateError, match="over 4096 bytes"):
        load_expiry(tmp_path / "keys")


@pytest.mark.parametrize(("role", "left", "warned"), [
    ("root", 31 * DAY, False), ("root", 30 * DAY, True), ("root", DAY, True),
    ("targets", 31 * DAY, False), ("targets", 29 * DAY, True),
    ("snapshot", 2 * DAY, False), ("snapshot", timedelta(hours=23), True),
    ("timestamp", timedelta(hours=7), False), ("timestamp", timedelta(hours=5), True),
    ("vision", 31 * DAY, False), ("vision", 29 * DAY, True),
    ("timestamp", -timedelta(seconds=1), True), ("root", timedelta(0), True),
])
def test_expiry_warnings(role: str, left: timedelta, warned: bool) -> None:
    found = expiry_warnings([(role, 3, T0 + left)], T0, Expiry())
    assert bool(found) == warned
    if found:
        w = found[0]
        assert w.role == role and w.left == left
        assert w.short() == ("EXPIRED" if left <= timedelta(0) else
                             f"expires in {format_duration(left)} (window "
                             f"{format_duration(Expiry().window(role))})")
        assert f"{role} metadata v3" in w.message()


def test_window_zero_warns_only_when_expired() -> None:
    e = Expiry().changed(windows={"root": timedelta(0)})
    assert not expiry_warnings([("root", 1, T0 + timedelta(seconds=1))], T0, e)
    assert expiry_warnings([("root", 1, T0)], T0, e)[0].expired


# --- on a repository on disk ----------------------------------------------------------


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One repository with a delegated team role, made once (key generation is slow)."""
    base = tmp_path_factory.mktemp("expiry")
    r = Repository(base / "repo", base / "keys", PASS, clock=lambda: T0)
    r.init()
    r.delegate("vision", ["detector/*"])
    return base


@pytest.fixture
def world(template: Path, tmp_path: Path) -> tuple[Repository, Clock]:
    shutil.copytree(template, tmp_path / "w")
    clock = Clock(T0)
    return Repository(tmp_path / "w" / "repo", tmp_path / "w" / "keys", PASS,
                      clock=clock), clock


@pytest.mark.parametrize(("later", "warned"), [
    (timedelta(0), set()),
    (timedelta(hours=19), {"timestamp"}),
    (29 * DAY + timedelta(hours=1), {"snapshot", "timestamp"}),
    (336 * DAY, {"root", "targets", "vision", "snapshot", "timestamp"}),
])
def test_status_warns_every_role_inside_its_window(
        world: tuple[Repository, Clock], later: timedelta, warned: set[str],
        caplog: pytest.LogCaptureFixture) -> None:
    repo, clock = world
    clock.now = T0 + later
    rows = {r.role: r for r in repo.status()}
    assert set(rows) == {"root", "targets", "snapshot", "timestamp", "vision"}
    assert {r for r, row in rows.items() if row.warning} == warned
    assert rows["vision"].threshold == 1 and rows["vision"].signatures == 1
    with caplog.at_level(logging.WARNING, logger="modelward.publisher._expiry"):
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            found = repo.expiry_warnings()
    assert {w.role for w in found} == warned
    logged = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert {r.getMessage().split(" ", 1)[0] for r in logged} == warned


def test_refresh_resigns_online_roles_and_warns_about_offline_ones(
        world: tuple[Repository, Clock], caplog: pytest.LogCaptureFixture) -> None:
    repo, clock = world
    clock.now = T0 + 336 * DAY
    with caplog.at_level(logging.WARNING):
        assert repo.refresh() == ["snapshot", "timestamp"]
    warned = {r.getMessage().split(" ", 1)[0] for r in caplog.records
              if r.levelno == logging.WARNING}
    assert warned == {"root", "targets", "vision"}
    assert "the team holding role 'vision' must re-sign it" in caplog.text
    _, snap, ts = repo.current()
    assert ts.expires == clock.now + DAY and snap.expires == clock.now + 30 * DAY


def test_refresh_resigns_snapshot_inside_its_window(world: tuple[Repository, Clock]) -> None:
    repo, clock = world
    clock.now = T0 + 28 * DAY
    assert repo.refresh() == ["timestamp"]
    clock.now = T0 + 29 * DAY + timedelta(hours=1)
    assert repo.refresh() == ["snapshot", "timestamp"]
    assert not repo.expiry_warnings()


def test_set_expiry_persists_and_refresh_uses_it(world: tuple[Repository, Clock]) -> None:
    repo, clock = world
    path = repo.set_expiry({"timestamp": timedelta(hours=12)}, {"snapshot": 2 * DAY})
    again = Repository(repo.repo, repo.keys, PASS, clock=clock)
    assert again.expiry.timestamp == timedelta(hours=12)
    assert again.expiry.window("snapshot") == 2 * DAY
    assert json.loads(path.read_bytes())["lifetimes"]["timestamp"] == 43200
    clock.now = T0 + 28 * DAY + timedelta(hours=1)  # inside the new 2-day snapshot window
    assert again.refresh() == ["snapshot", "timestamp"]
    assert again.current()[2].expires == clock.now + timedelta(hours=12)


def test_set_expiry_refused_leaves_the_file(world: tuple[Repository, Clock]) -> None:
    repo, _ = world
    repo.set_expiry({"timestamp": 2 * DAY})
    before = (repo.keys / EXPIRY_FILE).read_bytes()
    with pytest.raises(OperatorInputError):
        repo.set_expiry({"timestamp": 90 * DAY})
    assert (repo.keys / EXPIRY_FILE).read_bytes() == before
    assert repo.expiry.timestamp == 2 * DAY


def test_corrupt_expiry_file_is_a_clear_error(world: tuple[Repository, Clock]) -> None:
    repo, clock = world
    (repo.keys / EXPIRY_FILE).write_bytes(b'{"lifetimes": {"timestamp": 9e99}}')
    with pytest.raises(RepositoryStateError, match="expiry.json"):
        Repository(repo.repo, repo.keys, PASS, clock=clock)


def test_missing_delegated_role_file_is_left_out_with_a_warning(
        world: tuple[Repository, Clock], caplog: pytest.LogCaptureFixture) -> None:
    repo, _ = world
    for p in repo.metadata_dir.glob("*.vision.json"):
        p.unlink()
    with caplog.at_level(logging.WARNING):
        rows = repo.status()
    assert {r.role for r in rows} == {"root", "targets", "snapshot", "timestamp"}
    assert "delegated role 'vision'" in caplog.text


@pytest.mark.parametrize("content", [b"[" * 200_000, b'{"signed": {"_type": "snapshot"}}',
                                     b"\x1b]0;owned\x07"])
def test_hostile_team_metadata_file_does_not_break_status_or_refresh(
        world: tuple[Repository, Clock], content: bytes,
        caplog: pytest.LogCaptureFixture) -> None:
    """A team (or whoever writes the served directory) replaces its role's file: status
    and refresh go on for every other role, and say what is wrong with that one."""
    repo, clock = world
    (path,) = repo.metadata_dir.glob("*.vision.json")
    path.write_bytes(content)
    clock.now = T0 + 336 * DAY
    with caplog.at_level(logging.WARNING):
        assert {r.role for r in repo.status()} == {"root", "targets", "snapshot", "timestamp"}
        assert repo.refresh() == ["snapshot", "timestamp"]
    assert "delegated role 'vision'" in caplog.text and "\x1b" not in caplog.text
