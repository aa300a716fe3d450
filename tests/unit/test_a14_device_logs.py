"""Attack 14 (one compromised device) on the logs its strings reach: the bridge's refusal
warnings, formatted by ``modelward.agent._log`` (text and JSON).

Worked (strict xfail): a request whose ``path`` is ~16 KiB of characters that
``repr()`` and the escape both expand (supplementary private use: 4 UTF-8 bytes become
``\\\\U000f0000``, 11 characters) is refused with ``{path!r} is outside metadata/ ...`` and
logged whole at WARNING (the default level): one ~44 KiB line per 16 KiB request, one per
request with no bound on their rate, so one device writes the journal ~2.7x faster than
it sends. DEL (0x7f, allowed raw in JSON) does better: one request byte, five log
characters, a ~75 KiB JSON line that journald (LineMax= 48K by default) splits into two
entries, the second starting with text the device chose. The escape itself holds: still
one line, nothing raw.
"""

from __future__ import annotations

import json
import logging
import time
from types import SimpleNamespace
from typing import Any

from modelward.agent._log import JsonFormatter, TextFormatter
from modelward.publisher._bridge import MAX_REQUEST_BYTES, Bridge
from modelward.updater.transport._mqtt import MqttConfig, publish_properties

FLEET = "f1"
CFG = MqttConfig(host="", port=0, fleet=FLEET, client_name="bridge")


class _Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def _bridge(tmp: Any) -> Bridge:
    """A Bridge without a connection: the handler under test, answers dropped."""
    (tmp / "metadata").mkdir()
    b = Bridge(tmp, CFG, connect=False)
    b._send = lambda *a: None  # type: ignore[method-assign]
    return b


def _settle(b: Bridge, n: int) -> None:
    """Until the worker has answered (or the bucket dropped) all ``n`` requests."""
    deadline = time.monotonic() + 10
    while b.stats.refused + b.stats.dropped + b.stats.errors < n and \
            time.monotonic() < deadline:
        time.sleep(0.01)
    b.close()


def _request(device: str, payload: bytes) -> Any:
    p = publish_properties()
    p.CorrelationData = b"c" * 16
    p.ResponseTopic = CFG.topic(f"devices/{device}/repo/resp")
    return SimpleNamespace(topic=CFG.topic(f"repo/req/{device}"), payload=payload,
                           properties=p, retain=False)


def _hostile_request() -> bytes:
    path = "\U000f0000" * 4000
    body = json.dumps({"path": path, "offset": 0, "length": 1}, ensure_ascii=False).encode()
    assert len(body) <= MAX_REQUEST_BYTES
    return body


def _logged(tmp: Any, n: int) -> list[logging.LogRecord]:
    b = _bridge(tmp)
    cap = _Capture()
    log = logging.getLogger("modelward.publisher._bridge")
    log.addHandler(cap)
    old = log.level
    log.setLevel(logging.WARNING)
    try:
        for _ in range(n):
            b._on_message(_request("dev-1", _hostile_request()))
        _settle(b, n)
    finally:
        log.removeHandler(cap)
        log.setLevel(old)
    return cap.records


def test_a_refused_request_is_still_one_escaped_line(tmp_path: Any) -> None:
    """Resisted: the text and JSON lines of the refusal are one line, nothing raw."""
    (rec,) = _logged(tmp_path, 1)
    assert rec.levelno == logging.WARNING
    for line in (TextFormatter().format(rec), JsonFormatter().format(rec)):
        assert "\n" not in line and "\U000f0000" not in line
    json.loads(JsonFormatter().format(rec))


def test_a_bad_request_that_gets_logged_is_not_logged_whole(tmp_path: Any) -> None:
    (rec,) = _logged(tmp_path, 1)
    assert len(TextFormatter().format(rec)) <= 2048
    assert len(JsonFormatter().format(rec)) <= 2048


def test_one_device_cannot_write_the_log_faster_than_it_sends(tmp_path: Any) -> None:
    recs = _logged(tmp_path, 100)
    logged = sum(len(TextFormatter().format(r)) + 1 for r in recs)
    sent = 100 * len(_hostile_request())
    assert logged <= min(sent // 4, 256 * 1024), (logged, sent)


JOURNALD_LINE_MAX = 48 * 1024  # journald.conf LineMax= default: a longer line is split
FORGED = "update failed on dev-2: signature of dev-2's report does not verify"


def _del_wall_request() -> bytes:
    """DEL (0x7f) is allowed raw in a JSON string and passes check_member_path; repr()
    makes it ``\\x7f`` and the escape (or the JSON encoder) doubles the backslash: one
    request byte becomes five log characters."""
    body = {"path": "\x7f" * 15000 + FORGED, "offset": 0, "length": 1}
    data = json.dumps(body, ensure_ascii=False).encode()
    assert len(data) <= MAX_REQUEST_BYTES
    return data


def test_a_refused_request_is_one_journal_entry(tmp_path: Any) -> None:
    b = _bridge(tmp_path)
    cap = _Capture()
    log = logging.getLogger("modelward.publisher._bridge")
    log.addHandler(cap)
    try:
        b._on_message(_request("dev-1", _del_wall_request()))
        _settle(b, 1)
    finally:
        log.removeHandler(cap)
    (rec,) = cap.records
    line = JsonFormatter().format(rec).encode()
    json.loads(line)
    assert len(line) <= JOURNALD_LINE_MAX, (
        f"{len(line)} bytes: the journal's second entry would be "
        f"{line[JOURNALD_LINE_MAX:JOURNALD_LINE_MAX + 60]!r}")
