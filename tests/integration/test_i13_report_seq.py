"""A planted report-seq (the disk as attacker) neither silences a real device nor makes its
fresh, TPM-signed reports look replayed (real swtpm)."""

from __future__ import annotations

import json
import time

from modelward.agent._commands import signed_report
from modelward.agent._observe import SEQUENCE_FILE
from modelward.publisher._fleet import REPLAYED, judge_report
from modelward.trust._report import MAX_SEQ, report_digest
from tests.conftest import World


def test_a4_planted_report_seq_is_not_believed_by_a_real_device(world: World) -> None:
    world.publish("1.0.0", seed=1)
    world.update()
    before = world.snapshot()
    seen = None
    for planted in (MAX_SEQ, int((time.time() + 30 * 86400) * 1000)):
        (world.state / SEQUENCE_FILE).write_text(f"{planted}\n")
        now = time.time()
        report = json.loads(signed_report(world.cfg, "idle"))["report"]
        assert int(now * 1000) <= report["seq"] <= int(time.time() * 1000) + 1
        j = judge_report(report, report_digest(report), seen=seen, now=time.time(),
                         fleet=report["fleet"])
        assert REPLAYED not in j.flags, j.detail
        seen = j.seen
    assert world.snapshot() == before  # a report moves nothing trusted
