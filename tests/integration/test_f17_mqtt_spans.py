"""Fix of attack 17 (device side) through mosquitto: a hostile bridge, with the bridge's
own credentials, answers every block request of a range fetch 429 MAX_BUSY times, then
stays silent once (the device re-asks after its time-out), again and again. The busy
answers count per block across the re-requests: the fetch ends in the typed error after
at most MAX_BUSY + max_retries + 2 requests, nothing taken."""

from __future__ import annotations

import dataclasses
import threading

import pytest
from tuf.api import exceptions as tuf_exc

from tests.conftest import MqttWorld


def test_a_bridge_busy_then_silent_forever_ends_the_range_fetch(
        mqtt_world: MqttWorld, monkeypatch: pytest.MonkeyPatch) -> None:
    import modelward.updater.transport._mqtt as m
    from modelward.publisher._bridge import Bridge

    class Hostile(Bridge):
        lock = threading.Lock()
        asked: dict[int, int] = {}

        def _serve(self, job, part=0):  # type: ignore[no-untyped-def]
            off = job.req.offset
            with self.lock:
                n = self.asked[off] = self.asked.get(off, 0) + 1
            if n % (m.MAX_BUSY + 1):
                self._answer(job.resp_topic, job.corr, 2, 429, off, 0, b"")
            # else: silence once

    monkeypatch.setattr(m, "busy_pause", lambda n: 0.001)
    w = mqtt_world
    w.stop_bridge()
    bridge = Hostile(w.repo_dir, w.mqtt_cfg("modelward-bridge"))
    f = m.MqttFetcher(dataclasses.replace(w.mqtt_cfg("dev-1"), block_timeout=0.3,
                                          range_requests_per_s=0))
    taken = 0
    try:
        with pytest.raises(tuf_exc.DownloadError, match="busy"):
            for _, piece in f.fetch_ranges("mqtt://repo/metadata/1.root.json", [(0, 100)]):
                taken += len(piece)
    finally:
        f.close()
        bridge.close()
    assert taken == 0 and f.bytes_received == 0
    assert 0 < Hostile.asked[0] <= m.MAX_BUSY + f.cfg.max_retries + 2, Hostile.asked
