"""Attack a19 on issue 17 (a device with its own key): a signed report whose
``durations.verify_s`` (or ``poll_interval``) is a 400-digit JSON integer.

What happened: the schema check raises ``OverflowError: int too large to convert to
float`` (not ReportSchemaError), which ``_fleet._judge_device`` does not catch: the whole
``judge_fleet`` fails, ``FleetCollector.refresh`` lets it through (it catches only
ModelwardError and OSError), and ``serve``'s loop ends: the exporter stops for the whole
fleet (and ``fleet status`` fails for everyone) as long as that retained report is on the
broker. One enrolled device's key is all it takes.

Cause: ``_report_schema._durations`` and ``_number`` call ``math.isfinite`` on any
``int`` (a float conversion) before comparing it with the bounds.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from modelward.publisher._fleet import REJECTED, add_device, judge_fleet
from modelward.publisher._fleet_exporter import FleetCollector
from modelward.publisher._fleet_summary import summarize
from modelward.trust._report import sign_report
from tests.unit.test_report import _SoftKey

FLEET = "f1"


def _report(device: str, now: float, **extra: object) -> dict[str, object]:
    return {"device_id": device, "fleet": FLEET, "seq": int(now), "poll_interval": 3600,
            "at": time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime(now)),
            "state": "idle", "active": None, "counters": {}, **extra}


@pytest.mark.parametrize("field", ["durations", "poll_interval"])
def test_one_device_huge_integer_is_its_own_rejection(tmp_path: Path, field: str) -> None:
    fleet_dir = tmp_path / "fleet"
    keys = {d: _SoftKey() for d in ("honest", "liar")}
    for d, k in keys.items():
        add_device(fleet_dir, d, k.identity_public_pem())
    now = time.time()
    huge = int("9" * 400)
    lie = {"durations": {"verify_s": huge}} if field == "durations" else {"poll_interval": huge}
    payloads = {"honest": sign_report(_report("honest", now), keys["honest"]),
                "liar": sign_report(_report("liar", now, **lie), keys["liar"])}
    served: list[dict[str, object]] = []

    def compute() -> dict[str, object]:
        rows = judge_fleet(payloads, fleet_dir, FLEET, now)
        by_id = {r.device_id: r for r in rows}
        assert by_id["liar"].flags == (REJECTED,) and by_id["honest"].verified
        served.append(summarize(rows))
        return served[-1]

    c = FleetCollector(compute)  # type: ignore[arg-type]
    assert c.refresh() is True
    assert served[-1]["believed"] == 1 and served[-1]["devices"] == 2
