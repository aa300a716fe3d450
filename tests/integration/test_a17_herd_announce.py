"""Attack on issue 17 ("no thundering herd", 7e2525c) through the real daemon, fixed:
the handled floor is only the timestamp version an attempt's TUF refresh verified (the
child says it on a line of its own), never an announced number nor a file on the disk,
and "ignored" is logged once for that version; the text below is the attack as found.

(``modelward agent run`` on swtpm + mosquitto + the MQTT bridge): announcements are
untrusted hints, yet the daemon's "already handled" floor is raised by them and by an
unverified file on the disk, so later real announcements are ignored until the daemon
restarts (the device updates only at its poll timer, 1 h by default).

Tried, as someone who can publish on the broker: one announcement of a timestamp version
the repository does not have (the next one, or 2**62). What happened: the device refreshes
(TUF finds nothing new: the attempt succeeds), then ``Schedule.finished`` marks the
*announced* version handled (``handled(self._running)``) and ``is_handled`` ignores every
announcement ``<=`` it; the operator's real next release is announced, logged as
"ignored: already trusted", and not installed. Before the change the skip was
``version == self._done`` (only the very same number). A real announcement that comes
in while the attacker's refresh still runs is dropped by ``finished`` (``_pending <=
_done``) without even the "ignored" line (seen in a run; the test waits for the daemon's
"next refresh in" so the outcome does not depend on that timing).

Tried, as the disk: after a successful attempt, ``metadata/timestamp.json`` holds an
unsigned document of version 2**62 (the agent re-verifies and replaces it on its next
attempt, but the daemon has read it first). What happened: ``Daemon._trusted_version``
reads the file without any signature check and ``finished(trusted=...)`` raises the
floor to 2**62; the same deafness follows.

Tried, as the broker: the device's trusted timestamp version and the one before it,
alternately, many times. What happened: "ignored: already trusted" is logged for every
one of them (``_told_handled`` remembers only the last version logged), so the "logged
once" of the change does not hold.

What stays unchanged (asserted): the attacker's refresh installs nothing (current, the
trust record), and the attempts are successes, not failures.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from modelward.updater.transport._mqttconn import MqttConnection
from tests._helpers import state_attempts, state_status
from tests.conftest import FLEET, MqttWorld

pytestmark = pytest.mark.xdist_group("machine")


def _wait(pred: Callable[[], bool], timeout: float) -> bool:
    end = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > end:
            return False
        time.sleep(0.1)
    return True


def _status(w: MqttWorld) -> dict[str, object]:
    return state_status(w.state)


def _attempts(w: MqttWorld) -> int:
    return state_attempts(w.state)


def _trusted_ts(w: MqttWorld) -> int:
    return int(json.loads((w.state / "metadata" / "timestamp.json").read_bytes())[
        "signed"]["version"])


@contextmanager
def _daemon(w: MqttWorld, first: str = "1.0.0") -> Iterator[Path]:
    log = w.tmp / f"daemon-{len(list(w.tmp.glob('daemon-*.log')))}.log"
    with open(log, "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "modelward", "-v", "agent", "run",
                                 "--config", str(w.conf_path)], stderr=err)
    try:
        # the first (timer) attempt at start installs the published release
        assert _wait(lambda: w.active_version() == first and _attempts(w) >= 1
                     and "next refresh in" in log.read_text(), 90), log.read_text()[-2000:]
        yield log
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, log.read_text()[-2000:]


@contextmanager
def _broker_attacker(w: MqttWorld) -> Iterator[Callable[[bytes], None]]:
    # (the operator's broker identity stands for anyone who can publish there)
    conn = MqttConnection(w.mqtt_cfg("modelward-operator"), f"evil-{os.getpid()}", [])
    topic = f"modelward/{FLEET}/announce"
    try:
        yield lambda payload: conn.publish(topic, payload, wait=True)
    finally:
        conn.publish(topic, b"", retain=True, wait=True)
        conn.close()


def _real_release_is_ignored(w: MqttWorld, log: Path) -> None:
    """The operator publishes and announces 2.0.0: the device must install it well
    before its poll timer (3600 s here)."""
    w.publish("2.0.0", seed=2)
    r = w.cli("announce", "--repo", str(w.repo_dir), *w.broker_args("modelward-operator"))
    assert r.returncode == 0, r.stderr
    installed = _wait(lambda: w.active_version() == "2.0.0", 45)
    assert installed, log.read_text()[-1500:]


def _wait_attempt_after(w: MqttWorld, log: Path, needle: str, before: int) -> None:
    """Until the attempt answering ``needle`` has ended in the daemon too (its schedule
    updated: "next refresh in"; an announcement while it ran would be dropped silently)."""
    def ended() -> bool:
        text = log.read_text()
        return needle in text and "next refresh in" in text.split(needle, 1)[1]
    assert _wait(lambda: ended() and _attempts(w) > before, 60), log.read_text()[-2000:]


@pytest.mark.parametrize("ahead", [1, 2**62])
def test_a17_herd_one_forged_announcement_deafens_the_device(mqtt_world: MqttWorld,
                                                              ahead: int) -> None:
    w = mqtt_world
    w.publish("1.0.0", seed=1)
    with _daemon(w) as log, _broker_attacker(w) as publish:
        forged = _trusted_ts(w) + 1 if ahead == 1 else ahead
        record = (w.state / "trust" / "record.json").read_bytes()
        before = _attempts(w)
        publish(json.dumps({"timestamp_version": forged}).encode())
        _wait_attempt_after(w, log, f"update attempt for announced timestamp version {forged}",
                            before)
        # the forged hint cost one cheap refresh, a success that installed nothing
        assert w.active_version() == "1.0.0"
        assert (w.state / "trust" / "record.json").read_bytes() == record
        assert _status(w).get("last_error") is None
        _real_release_is_ignored(w, log)


def test_a17_herd_an_unsigned_timestamp_file_deafens_the_device(mqtt_world: MqttWorld) -> None:
    w = mqtt_world
    w.publish("1.0.0", seed=1)
    ts = w.state / "metadata" / "timestamp.json"
    forged = json.dumps({"signed": {"_type": "timestamp", "version": 2**62},
                         "signatures": []}).encode()
    stop = threading.Event()

    def disk() -> None:  # whenever the agent has just written its timestamp, replace it
        tmp = ts.with_name(".evil-ts")
        while not stop.is_set():
            try:
                if ts.read_bytes() != forged:
                    tmp.write_bytes(forged)
                    os.replace(tmp, ts)
            except OSError:
                pass
            time.sleep(0.002)

    t = threading.Thread(target=disk, daemon=True)
    t.start()
    try:
        with _daemon(w) as log:  # (its first attempt, the timer's, runs with the disk at it)
            time.sleep(1.5)  # the daemon reads the file after the child and the report
            stop.set()
            t.join(5)
            assert _status(w).get("last_error") is None  # the agent shrugged the file off
            record = (w.state / "trust" / "record.json").read_bytes()
            assert w.active_version() == "1.0.0"
            _real_release_is_ignored(w, log)
            assert (w.state / "trust" / "record.json").read_bytes() != record
    finally:
        stop.set()
        t.join(5)


def test_a17_herd_alternating_trusted_versions_flood_the_log(mqtt_world: MqttWorld) -> None:
    w = mqtt_world
    w.publish("1.0.0", seed=1)
    w.publish("1.0.1", seed=2)  # (two timestamp versions the device will have trusted)
    with _daemon(w, "1.0.1") as log, _broker_attacker(w) as publish:
        v = _trusted_ts(w)
        assert v >= 2
        before = _attempts(w)
        for i in range(200):
            publish(json.dumps({"timestamp_version": v - i % 2}).encode())
        time.sleep(2.0)
        text = log.read_text()
        assert _attempts(w) == before  # nothing woke: already handled
        assert w.active_version() == "1.0.1"
        ignored = text.count("ignored: already trusted")
        assert ignored <= 2, ignored
