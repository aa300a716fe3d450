"""Issue 17, step 3: ``fleet status --summary``, pure: the figures from judged rows
(``publisher._fleet_summary.summarize``), with devices that lie. A device signs whatever
it wants with its own key: it must move only its own share of each figure."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import pytest

from modelward.publisher._fleet import judge_fleet
from modelward.publisher._fleet_summary import (
    MAX_ATTEMPTS_PER_DEVICE,
    MAX_SHOWN_REASONS,
    RolloutRelease,
    format_summary,
    percentile,
    summarize,
    summary_json,
)
from modelward.trust._report import MAX_SEQ, sign_report
from modelward.trust._report_fields import MAX_REASONS
from modelward.updater.rollout import rollout_bucket
from tests.unit.test_i14_fleetview import AT, FLEET, MODEL, NOW, _registry, good_report

HEALTH = {"type": "HealthCheckError", "message": "vectors differ", "at": AT}
FALLBACK = {"type": "ActiveModelAltered", "message": "fell back", "at": AT}


def _rep(device: str, version: str = "1.0.0", *, channel: str = "stable",
         verify: float | None = 2.0, boot: float | None = 0.5, now: float = NOW,
         **changes: Any) -> dict[str, Any]:
    r = good_report(device, now=now, last_error=None, state="idle", model="classifier",
                    channel=channel, durations={"verify_s": verify, "boot_check_s": boot},
                    failure_reasons={}, active={**MODEL, "version": version})
    r.update(changes)
    return r


def _rows(tmp_path: Path, reports: dict[str, dict[str, Any] | bytes | None]) -> list[Any]:
    fd, keys = _registry(tmp_path, sorted(reports))
    payloads = {d: (r if isinstance(r, bytes) else sign_report(r, keys[d]))
                for d, r in reports.items() if r is not None}
    return judge_fleet(payloads, fd, FLEET, NOW, 3600.0)


def _strict(text: str) -> Any:
    def no(name: str) -> Any:
        raise ValueError(name)
    return json.loads(text, parse_constant=no)


def test_counts_per_state_model_version_and_channel(tmp_path: Path) -> None:
    rows = _rows(tmp_path, {
        "d1": _rep("d1"), "d2": _rep("d2", "2.0.0"), "d3": _rep("d3", channel="beta"),
        "d4": _rep("d4", last_error=FALLBACK), "d5": _rep("d5", last_error=HEALTH),
        "d6": _rep("d6", state="downloading"),
        "d7": _rep("d7", now=NOW - 4 * 3600, poll_interval=3600.0),  # STALE (4 polls old)
        "d8": None,  # MISSING
        "d9": b"not a report",  # REJECTED
    })
    s = summarize(rows)
    assert (s["devices"], s["believed"]) == (9, 7)
    assert {k: v for k, v in s["states"].items() if v} == {
        "ok": 3, "updating": 1, "fell back": 1, "failed": 1, "STALE": 1, "MISSING": 1,
        "REJECTED": 1}
    assert s["models"] == {"classifier": 7}
    assert s["versions"] == [{"model": "classifier", "version": "1.0.0", "devices": 6},
                             {"model": "classifier", "version": "2.0.0", "devices": 1}]
    assert s["channels"] == {"beta": 1, "stable": 6}
    assert s["fallback"] == {"fell_back": 1, "ever": 0, "of": 7, "rate": 1 / 7}
    assert s["durations"]["verify_s"] == {"p50": 2.0, "p95": 2.0, "samples": 7}
    text = format_summary(s)
    assert "fell back 1" in text and "fallback rate: 14.3% (1 of 7 devices" in text
    assert _strict(summary_json(s)) == s


def test_rollout_eligible_installed_failed(tmp_path: Path) -> None:
    ids = [f"d{i:02}" for i in range(40)]
    rel = RolloutRelease("classifier", "2.0.0", "stable", 30.0)
    inside = [d for d in ids if rollout_bucket(d, "classifier", "2.0.0") < 30.0]
    assert 3 <= len(inside) <= 25  # (the ids spread over the buckets)
    reports: dict[str, Any] = {d: _rep(d) for d in ids}
    reports[inside[0]] = _rep(inside[0], "2.0.0")
    reports[inside[1]] = _rep(inside[1], last_error=HEALTH)  # eligible, still on 1.0.0
    outside = next(d for d in ids if d not in inside)
    reports[outside] = _rep(outside, last_error=HEALTH)  # not eligible: not its failure
    reports["d00" if "d00" not in inside[:2] else "d39"] = _rep("x", channel="beta")
    reports = {d: ({**r, "device_id": d}) for d, r in reports.items()}
    s = summarize(_rows(tmp_path, reports), [rel])
    [r] = s["rollouts"]
    on = 39  # (one device follows beta)
    assert r == {"model": "classifier", "version": "2.0.0", "channel": "stable",
                 "percent": 30.0, "halted": False, "devices": on,
                 "eligible": len([d for d in inside if reports[d]["channel"] == "stable"]),
                 "installed": 1, "failed": 1, "outside": 0}
    assert '"classifier" "2.0.0" on "stable" at 30%' in format_summary(s)


def test_a_device_cannot_claim_eligibility_or_another_device(tmp_path: Path) -> None:
    """Eligibility is from the enrolled id (topic), not from anything the report says."""
    ids = [f"d{i:02}" for i in range(20)]
    out = next(d for d in ids if rollout_bucket(d, "classifier", "2.0.0") >= 50.0)
    rel = RolloutRelease("classifier", "2.0.0", "stable", 50.0)
    honest = summarize(_rows(tmp_path / "a", {d: _rep(d) for d in ids}), [rel])
    lying = {d: _rep(d) for d in ids}
    lying[out] = _rep(out, device_id=out, seq=MAX_SEQ, uptime_s=MAX_SEQ,
                      counters={k: MAX_SEQ for k in ("attempts", "fallbacks", "failures")})
    s = summarize(_rows(tmp_path / "b", lying), [rel])
    assert s["rollouts"][0]["eligible"] == honest["rollouts"][0]["eligible"]
    assert s["devices"] == honest["devices"] == 20
    assert s["fallback"]["ever"] == 1  # one device, however many fallbacks it claims


def test_durations_cannot_be_dragged_to_nan_or_inf(tmp_path: Path) -> None:
    """NaN, inf and 1e400 are refused before use (REJECTED rows, no sample); the largest
    value the schema allows moves the p95 by one rank only."""
    from tests.unit.test_i14_fleetview import sign_canonical
    from tests.unit.test_report import _SoftKey

    ids = [f"d{i:02}" for i in range(20)]
    reports: dict[str, Any] = {d: _rep(d, verify=float(i + 1)) for i, d in enumerate(ids)}
    honest = summarize(_rows(tmp_path / "a", reports), [])["durations"]["verify_s"]
    assert honest == {"p50": 10.0, "p95": 19.0, "samples": 20}
    fd, keys = _registry(tmp_path / "b", [*ids, "nan", "inf", "big"])
    payloads = {d: sign_report(r, keys[d]) for d, r in reports.items()}
    payloads["d19"] = sign_report(_rep("d19", verify=999_999.0), keys["d19"])  # the max
    for d, v in (("nan", "NaN"), ("inf", "Infinity"), ("big", "1e400")):
        canonical = json.dumps(_rep(d), sort_keys=True, separators=(",", ":")).replace(
            '"verify_s":2.0', f'"verify_s":{v}')
        k: _SoftKey = keys[d]
        payloads[d] = sign_canonical(k, canonical)
    rows = judge_fleet(payloads, fd, FLEET, NOW, 3600.0)
    assert {r.device_id: r.state for r in rows if r.device_id in {"nan", "inf", "big"}} == \
        dict.fromkeys(("nan", "inf", "big"), "REJECTED")
    s = summarize(rows)
    assert s["durations"]["verify_s"] == {"p50": 10.0, "p95": 19.0, "samples": 20}
    assert all(math.isfinite(v) for d in s["durations"].values() for v in
               (d["p50"], d["p95"]) if v is not None)
    _strict(summary_json(s))


def test_failure_reasons_count_devices_and_stay_bounded(tmp_path: Path) -> None:
    reports: dict[str, Any] = {
        "d1": _rep("d1", failure_reasons={"HealthCheckError": 3, "FetchError": 1}),
        "d2": _rep("d2", failure_reasons={"HealthCheckError": 1}),
        # one device's huge counts: one device, and the attempts sum stays exact JSON
        "liar": _rep("liar", failure_reasons={"FetchError": MAX_SEQ}),
    }
    for i in range(3):  # many distinct names: at most MAX_SHOWN_REASONS are shown
        reports[f"n{i}"] = _rep(f"n{i}", failure_reasons={
            f"E{i}x{j:02}": 1 for j in range(MAX_REASONS)})
    s = summarize(_rows(tmp_path, reports))
    fr = s["failure_reasons"]
    assert fr["HealthCheckError"] == {"devices": 2, "attempts": 4}
    # the liar's count is capped at its own share: 1 + MAX_ATTEMPTS_PER_DEVICE
    assert fr["FetchError"] == {"devices": 2, "attempts": 1 + MAX_ATTEMPTS_PER_DEVICE}
    assert len(fr) <= MAX_SHOWN_REASONS + 1 and "other" in fr
    # shown: the two shared reasons, then 30 of the 48 single-device names (by name);
    # other: n1 (2 of the rest) and n2 (16 of them), each device once
    assert fr["other"] == {"devices": 2, "attempts": 2 + MAX_REASONS}
    _strict(summary_json(s))


@pytest.mark.parametrize("evil", ["\nd9  ok  classifier 6.6.6", "\x1b]0;pwned\x07",
                                  "\u202eevil", "a" * 256, 'stable" 100, "beta',
                                  'x\\" 9, "y'])
def test_device_strings_cannot_forge_a_summary_line(tmp_path: Path, evil: str) -> None:
    rows = _rows(tmp_path, {"d1": _rep("d1", channel=evil, model=evil,
                                       active={**MODEL, "name": evil, "version": evil})})
    s = summarize(rows, [RolloutRelease("classifier", "1.0.0", "stable", 100.0)])
    text = format_summary(s)
    lines = text.splitlines()
    assert len(lines) == len(format_summary(summarize(
        _rows(tmp_path / "honest", {"d1": _rep("d1")}),
        [RolloutRelease("classifier", "1.0.0", "stable", 100.0)])).splitlines())
    assert all(c.isprintable() for c in text.replace("\n", ""))
    # one quoted name per entry: the count after it is the real one
    channels = next(line for line in lines if line.startswith("channels: "))
    entry = re.fullmatch(r'channels: "((?:[^"\\]|\\.)*)" (\d+)', channels)
    assert entry is not None and entry.group(2) == "1", channels
    assert _strict(summary_json(s))["channels"] == {evil: 1}  # exact in JSON


def test_percentile_is_nearest_rank() -> None:
    assert percentile([], 50) is None
    assert percentile([3.0], 95) == 3.0
    assert percentile([float(i) for i in range(1, 101)], 95) == 95.0
    assert percentile([1.0, 2.0], 50) == 1.0


@pytest.mark.parametrize("extra", [["--repo", "{tmp}"], ["--summary", "--repo", "{tmp}"]])
def test_repo_goes_with_summary_and_keys(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                         extra: list[str]) -> None:
    from tests.unit.test_i15_mistakes import B, run_main

    argv = ["fleet", "status", "--fleet-dir", str(tmp_path / "fd"), *B,
            *(a.replace("{tmp}", str(tmp_path)) for a in extra)]
    code, out, err = run_main(argv, capsys)
    assert code == 1 and out == "" and "--repo goes with --summary and --keys" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1 and "hint: " in err
    assert not (tmp_path / "fd").exists()  # nothing created, nothing asked of the broker
