"""Issue 13 "bounded before verified" / "trust nothing on disk": the one JSON parser for
unverified bytes (modelward.trust._bounded.loads_bounded) and the one reader of state-dir files
(modelward.trust._bounded.read_bounded), and every call site that meets untrusted JSON.

Attackers: the origin and a signed-but-malicious bundle (manifest), the health child
(report line), the broker / one device credential (announcements, status reports, bridge
requests), the disk (journal, status, stage index, trust record, rejections).
"""

from __future__ import annotations

import ast
import contextlib
import json
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import paho.mqtt.client as mqtt
import pytest

from modelward.trust._bounded import (
    DEFAULT_MAX_DEPTH,
    UnsafeFileError,
    UntrustedJsonError,
    loads_bounded,
    read_bounded,
    read_json_file,
)

ROOT = Path(__file__).resolve().parents[2]
NESTS = [b"[" * 5000, b'{"a":' * 5000, b"[" * 40 + b"]" * 40,
         b'{"ok": true, "detail": ' + b"[" * 4000 + b"}"]


def _loads(data: bytes | str, **kw: Any) -> Any:
    return loads_bounded(data, max_bytes=kw.pop("max_bytes", 1 << 20), what="doc", **kw)


# --- the parser --------------------------------------------------------------------------------


@pytest.mark.parametrize("doc", NESTS)
def test_nesting_over_the_bound_is_refused_before_parsing(doc: bytes) -> None:
    with pytest.raises(UntrustedJsonError, match="nested deeper") as e:
        _loads(doc)
    assert isinstance(e.value, ValueError) and e.value.what == "doc"


def test_nesting_up_to_the_bound_parses() -> None:
    d = DEFAULT_MAX_DEPTH
    assert _loads(b"[" * d + b"]" * d) is not None
    assert _loads(b"[" * 3 + b"]" * 3, max_depth=3) == [[[]]]
    with pytest.raises(UntrustedJsonError):
        _loads(b"[" * 4 + b"]" * 4, max_depth=3)


@pytest.mark.parametrize("doc", [
    '{"a": "[[[[[[[[[[{{{{{{"}',  # brackets inside a string do not nest
    '{"a": "\\"[[[[[[[[[[[[", "b": ["x"]}',  # nor after an escaped quote
    '["\\\\", "[[[[[[[[[["]',  # an escaped backslash ends before the quote
])
def test_brackets_in_strings_do_not_count(doc: str) -> None:
    assert _loads(doc, max_depth=2) == json.loads(doc)
    assert _loads(doc.encode(), max_depth=2) == json.loads(doc)


@pytest.mark.parametrize("doc", [b"NaN", b"[Infinity]", b'{"x": -Infinity}', b"1e400",
                                 b"[-1e999]", b"9" * 5000, b"\xff\xfe\x00", b"\xc3(",
                                 b"", b"{", b"[1,]", b'"\\ud800', b"1 2"])
def test_anything_else_that_is_not_plain_json_is_one_error(doc: bytes) -> None:
    with pytest.raises(UntrustedJsonError):
        _loads(doc)


@pytest.mark.parametrize("doc", [b'{"a": 1, "a": 2}', b'[{"x": {"k": 1, "k": 1}}]',
                                 '{"\u00e9": 1, "\u00e9": 2}'.encode()])
def test_a_key_twice_in_one_object_is_refused(doc: bytes) -> None:
    """Two parsers resolve a repeated key differently (last wins, first wins): a signed
    document must mean one thing."""
    with pytest.raises(UntrustedJsonError, match="appears twice"):
        _loads(doc)
    assert _loads(b'{"a": {"k": 1}, "b": {"k": 2}}') == {"a": {"k": 1}, "b": {"k": 2}}


def test_only_utf8_bytes() -> None:
    """UTF-16/32 (which json.loads would detect) could hide brackets from the scan."""
    with pytest.raises(UntrustedJsonError, match="not UTF-8"):
        _loads('{"a": 1}'.encode("utf-16"))
    with pytest.raises(UntrustedJsonError):  # (valid UTF-8 with NULs: its brackets count)
        _loads(("[" * 40 + "]" * 40).encode("utf-32-le"))
    with pytest.raises(UntrustedJsonError, match="not valid JSON"):
        _loads("[1]".encode("utf-32-le"))
    assert _loads('{"\u00e9": "é"}'.encode()) == {"é": "é"}


def test_size_is_checked_first() -> None:
    with pytest.raises(UntrustedJsonError, match="over 10 bytes"):
        _loads(b"[" + b"1," * 10 + b"1]", max_bytes=10)


@pytest.mark.xdist_group("machine")
def test_the_scan_is_cheap_on_a_megabyte_of_brackets() -> None:
    flat = b"[" + b"[]," * 340_000 + b"[]]"
    t = time.perf_counter()
    assert len(_loads(flat, max_bytes=2 << 20)) == 340_001
    with pytest.raises(UntrustedJsonError):
        _loads(b"[" * (1 << 20), max_bytes=2 << 20)
    strings = b'["' + b"[" * (1 << 20) + b'"]'
    assert _loads(strings, max_bytes=2 << 20, max_depth=1)
    assert time.perf_counter() - t < 5.0


# --- the reader --------------------------------------------------------------------------------


def _returns_within(fn: Callable[[], object], seconds: float = 3.0) -> bool:
    t = threading.Thread(target=lambda: _swallow(fn), daemon=True)
    t.start()
    t.join(seconds)
    return not t.is_alive()


def _swallow(fn: Callable[[], object]) -> None:
    with contextlib.suppress(OSError):
        fn()


def test_reader_refuses_what_the_agent_never_writes(tmp_path: Path) -> None:
    p = tmp_path / "f.json"
    assert read_bounded(p, 100) is None
    p.write_bytes(b"{}")
    assert read_bounded(p, 100) == b"{}"
    with pytest.raises(UnsafeFileError, match="over 1 bytes"):
        read_bounded(p, 1)
    p.unlink()
    with open(p, "wb") as f:
        f.truncate(1 << 40)  # sparse: refused from its size, nothing read
    with pytest.raises(UnsafeFileError, match="over"):
        read_bounded(p, 1 << 16)
    assert read_bounded(p, 10, cut=True) == b"\0" * 10  # an append-only log: cut
    p.unlink()
    p.symlink_to("/dev/zero")
    with pytest.raises(UnsafeFileError, match="symlink") as e:
        read_bounded(p, 100)
    assert e.value.path == p and isinstance(e.value, OSError)
    p.unlink()
    os.mkfifo(p)
    assert _returns_within(lambda: read_bounded(p, 100))
    with pytest.raises(UnsafeFileError, match="not a regular file"):
        read_bounded(p, 100)
    p.unlink()
    outside = tmp_path / "outside"
    outside.write_bytes(b"{}")
    os.link(outside, p)
    assert read_bounded(p, 100) == b"{}"
    with pytest.raises(UnsafeFileError, match="2 hard links"):
        read_bounded(p, 100, single_link=True)


def test_reader_parent_nofollow(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir()
    (real / "f").write_bytes(b"x")
    (tmp_path / "link").symlink_to(real)
    assert read_bounded(tmp_path / "link" / "f", 10) == b"x"  # (by default, as before)
    with pytest.raises(UnsafeFileError, match="not a directory"):
        read_bounded(tmp_path / "link" / "f", 10, parent_nofollow=True)
    assert read_bounded(tmp_path / "none" / "f", 10, parent_nofollow=True) is None


def test_read_json_file(tmp_path: Path) -> None:
    p = tmp_path / "j"
    assert read_json_file(p, 100) is None
    p.write_bytes(b'{"a": [1]}')
    assert read_json_file(p, 100) == {"a": [1]}
    with pytest.raises(UntrustedJsonError):
        read_json_file(p, 100, max_depth=1)


# --- every call site: its own typed error, never a traceback -------------------------------


NESTED = b"[" * 5000


def test_call_sites_turn_nesting_into_their_typed_error(tmp_path: Path) -> None:
    from modelward.publisher._fleet import read_seen
    from modelward.publisher._keys import SignerRegistry
    from modelward.publisher.errors import KeyError_, OperatorInputError
    from modelward.trust._record import decode_record
    from modelward.trust._report import ReportSignatureError, verify_report
    from modelward.trust._store import _root_version as store_root_version
    from modelward.trust.errors import TrustRecordError
    from modelward.updater.bundle._bundle import parse_manifest
    from modelward.updater.errors import BundleFormatError, MetadataError
    from modelward.updater.install._heal import _root_version as heal_root_version
    from modelward.updater.install._health import parse_report
    from modelward.updater.install._rejections import RejectionsFileError, decode
    from modelward.updater.install._sandbox import Completed

    cases: list[tuple[Callable[[], object], type[Exception]]] = [
        (lambda: parse_manifest(NESTED, "b.tar"), BundleFormatError),
        (lambda: decode_record(NESTED, "record.json"), TrustRecordError),
        (lambda: verify_report(NESTED, None, "d"), ReportSignatureError),
        (lambda: decode(NESTED, "rejections.json", lambda d, m: True), RejectionsFileError),
        (lambda: heal_root_version(NESTED), MetadataError),
        (lambda: store_root_version(NESTED, "root.json"), OperatorInputError),
    ]
    for fn, err in cases:
        with pytest.raises(err):
            fn()
    ok, detail = parse_report(Completed(0, NESTED + b"\n", b"", False))
    assert not ok and detail
    ok, _ = parse_report(Completed(0, b'{"ok": true, "detail": "x", "n": NaN}\n', b"", False))
    assert not ok
    (tmp_path / "signers.json").write_bytes(NESTED)
    with pytest.raises(KeyError_):
        SignerRegistry(tmp_path, None).entries()  # type: ignore[arg-type]
    (tmp_path / "signers.json").write_bytes(b"[1]")
    with pytest.raises(KeyError_):
        SignerRegistry(tmp_path, None).entries()  # type: ignore[arg-type]
    from modelward.publisher._fleet import _seen_path
    seen = _seen_path(tmp_path, "d")
    seen.parent.mkdir(parents=True, exist_ok=True)
    seen.write_bytes(b"[" * 4000)
    with pytest.raises(OperatorInputError):
        read_seen(tmp_path, "d")


def test_bridge_refuses_a_nested_request(tmp_path: Path) -> None:
    from modelward.publisher._bridge import Bridge
    from modelward.updater._config import MqttConfig

    (tmp_path / "metadata").mkdir()
    b = Bridge(tmp_path, MqttConfig(host="h", port=1, fleet="f", client_name="br"),
               connect=False)
    sent: list[tuple[str, bytes]] = []
    b._send = lambda t, d, p: sent.append((t, d))  # type: ignore[method-assign]  # noqa: SLF001
    msg = mqtt.MQTTMessage(topic=b"modelward/f/repo/req/dev-1")
    msg.payload = b'{"path": ' + b"[" * 3000
    msg.properties = SimpleNamespace(  # type: ignore[assignment]
        CorrelationData=b"c" * 16, ResponseTopic="modelward/f/devices/dev-1/repo/resp")
    try:
        b._on_message(msg)  # noqa: SLF001
    finally:
        b.close()
    assert b.stats.refused == 1 and len(sent) == 1  # a 400 answer, no traceback


def test_local_state_readers_fall_back_on_anything_planted(tmp_path: Path) -> None:
    from modelward.agent._commands import StatusFile
    from modelward.agent._observe import Metrics
    from modelward.updater.install._journal import Journal

    j, s = tmp_path / "journal.json", tmp_path / "status.json"
    plants: list[bytes] = [NESTED, b"[1]", b'"x"', b'{"step": 7}', b'{"step": ["idle"]}',
                           b"NaN", b"\xff"]
    for plant in plants:
        j.write_bytes(plant)
        assert Journal(j).read().step == "idle", plant
    j.write_bytes(b'{"step": "staged", "model": "m", "version": 7, "evil": "1"}')
    e = Journal(j).read()
    assert (e.step, e.model, e.version) == ("staged", "m", "")
    for plant in [*plants, b'{"counters": [1], "last_success": "x"}',
                  b'{"counters": {"attempts": "9", "failures": true}, "last_error": 3}']:
        s.write_bytes(plant)
        doc = StatusFile(tmp_path).read()
        m = Metrics.from_status(doc)
        assert m.counters["attempts"] == 0 and m.last_success == 0.0, plant
        assert not doc.get("last_error"), plant
    s.write_bytes(json.dumps({
        "counters": {"attempts": 3, "nope": 1, "failures": -1},
        "last_success": 5.5, "verification_seconds": float("nan"),
        "last_error": {"type": "X", "message": None, "at": "t", "extra": [1]},
        "last_result": {"message": ["m"], "at": "t"},
        "last_activation": {"ok": True, "detail": "d"}, "other": 1,
    }).encode().replace(b"NaN", b"1e999"))
    assert StatusFile(tmp_path).read() == {}  # 1e999: the whole file is refused
    s.write_bytes(json.dumps({
        "counters": {"attempts": 3, "nope": 1, "failures": -1}, "last_success": 5.5,
        "last_error": {"type": "X", "message": None, "at": "t", "extra": [1]},
        "last_result": {"message": ["m"], "at": "t"},
        "last_activation": {"ok": True, "detail": "d"}, "other": 1,
    }).encode())
    assert StatusFile(tmp_path).read() == {
        "counters": {"attempts": 3}, "last_success": 5.5,
        "last_error": {"type": "X", "message": None, "at": "t"},
        "last_activation": {"ok": True, "detail": "d"},
    }


def test_status_messages_are_cut(tmp_path: Path) -> None:
    from modelward.agent._status import MAX_TEXT, read_status

    (tmp_path / "status.json").write_text(json.dumps(
        {"last_error": {"type": "E", "message": "m" * 50_000, "at": "t"}}))
    err = read_status(tmp_path / "status.json")["last_error"]
    assert err["type"] == "E" and len(err["message"]) == MAX_TEXT


def test_daemon_status_lines_survive_plants(tmp_path: Path) -> None:
    from modelward.agent._daemon import Daemon

    d = object.__new__(Daemon)
    d.cfg = SimpleNamespace(state_dir=tmp_path)  # type: ignore[assignment]
    for plant in (b'{"last_error": "x"}', b'{"last_error": {"type": [1]}}', b"[]",
                  b'{"last_result": {"message": {"a": 1}}}'):
        (tmp_path / "status.json").write_bytes(plant)
        (tmp_path / "journal.json").write_bytes(plant)
        assert isinstance(d._result_line(), str)  # noqa: SLF001
        assert isinstance(d._journal_line(), str)  # noqa: SLF001
    os.unlink(tmp_path / "journal.json")
    os.mkfifo(tmp_path / "journal.json")
    assert _returns_within(d._journal_line)  # noqa: SLF001


# --- paho's network thread ---------------------------------------------------------------------


def test_guarded_callbacks_never_raise() -> None:
    from modelward.updater.transport._mqttconn import guarded

    def boom(*_a: object) -> None:
        raise RecursionError("deep")

    guarded(boom)(1, 2, 3)  # logged, not raised

    def deep(*_a: object) -> None:
        json.loads(b"[" * 100_000)

    guarded(deep)()


def test_announcement_listener_ignores_nesting_and_constants() -> None:
    from modelward.updater.transport._mqttconn import AnnouncementListener

    got: list[int] = []
    listener = object.__new__(AnnouncementListener)
    listener._cb = got.append  # noqa: SLF001
    for payload in (b"[" * 2000, b'{"timestamp_version": NaN}', b'{"timestamp_version": '
                    + b"[" * 50 + b"}", b'{"timestamp_version": 3}'):
        msg = mqtt.MQTTMessage(topic=b"modelward/f/announce")
        msg.payload = payload
        listener._on_message(msg)  # noqa: SLF001
    assert got == [3]


# --- the class of bug: no other json.loads on untrusted bytes ------------------------------

# json.loads calls that do not meet bytes an attacker of the threat model controls
_ALLOWED = {
    "trust/_bounded.py",  # the helper itself
    # argv[1]: the spec the agent itself passes to the launcher
    "updater/install/_sandbox_launch.py",
    "updater/install/_sandbox.py",  # _read_status: the launcher's own message before execve (8 KiB)
}


def test_no_unbounded_json_loads_in_the_product() -> None:
    found = []
    for pkg in ("agent", "updater", "trust", "publisher", "simulator"):
        for f in sorted((ROOT / pkg).rglob("*.py")):
            rel = f.relative_to(ROOT).as_posix()
            if rel in _ALLOWED:
                continue
            for node in ast.walk(ast.parse(f.read_text())):
                if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                        and node.func.attr in ("loads", "load") \
                        and isinstance(node.func.value, ast.Name) \
                        and node.func.value.id == "json":
                    found.append(f"{rel}:{node.lineno}")
    assert found == [], "use modelward.trust._bounded.loads_bounded for untrusted JSON: " + \
        ", ".join(found)
