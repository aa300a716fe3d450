"""Issue 17, "Prometheus, by its conventions": the device textfile (prometheus_client, and
the boot path's lean writer, byte for byte the same) and the fleet exporter's metrics parse
with prometheus_client's parser (and ``promtool check metrics`` where installed); hostile
label values stay escaped, and device-supplied ones bounded."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from modelward.agent._observe import BOOT_SECONDS_FILE, Metrics, model_info, read_boot_sample
from modelward.agent._status import BUCKETS, HISTOGRAMS, clean_status
from modelward.publisher._fleet_exporter import (
    MAX_LABEL_CHARS,
    MAX_LABEL_VALUES,
    FleetCollector,
    summary_metrics,
)
from modelward.trust._record import ModelRef
from modelward.trust.errors import TransportError

HOSTILE = 'a"b\\c\nd} x="1'


def families(text: str) -> dict[str, Any]:
    return {f.name: f for f in text_string_to_metric_families(text)}


def promtool_ok(text: str, tmp: Path) -> None:
    """``promtool check metrics`` where Debian's prometheus package is installed ($PROMTOOL:
    one extracted elsewhere, e.g. ``dpkg-deb -x prometheus_*.deb DIR``)."""
    tool = os.environ.get("PROMTOOL") or shutil.which("promtool")
    if tool is None:
        return  # (the parser check above stands; promtool absent here)
    r = subprocess.run([tool, "check", "metrics"], input=text, capture_output=True,
                       text=True, timeout=30, check=False)
    assert r.returncode == 0, r.stdout + r.stderr


def _metrics() -> Metrics:
    m = Metrics()
    m.counters.update(attempts=5, installed=2, failures=3, fallbacks=1, bytes_fetched=2**40)
    m.last_success = 1_764_000_000.5
    m.verification_seconds = 0.25
    for s in (0.01, 0.07, 3.0, 299.0, 301.0):
        m.observe("verification_duration_seconds", s)
    m.observe("boot_check_duration_seconds", 0.04)
    return m


def test_device_textfile_follows_the_conventions(tmp_path: Path) -> None:
    m = _metrics()
    info = model_info(ModelRef("classifier", "2.0.0", "ab" * 32, "b"), "stable")
    assert m.write_textfile(tmp_path / "metrics.prom", info)
    text = (tmp_path / "metrics.prom").read_text()
    promtool_ok(text, tmp_path)
    f = families(text)
    # the counters keep their names (a dashboard may use them), the parser strips _total
    for name in ("update_attempts", "updates_installed", "update_failures", "fallbacks",
                 "signature_failures", "verification_failures", "bytes_fetched"):
        assert f[f"modelward_{name}"].type == "counter"
        assert f"modelward_{name}_total " in text
    assert f["modelward_update_attempts"].samples[0].value == 5
    assert f["modelward_bytes_fetched"].samples[0].value == 2**40
    assert f["modelward_last_success_timestamp_seconds"].type == "gauge"
    h = f["modelward_verification_duration_seconds"]
    assert h.type == "histogram"
    buckets = {s.labels["le"]: s.value for s in h.samples if s.name.endswith("_bucket")}
    assert len(buckets) == len(BUCKETS) + 1
    assert (buckets["0.05"], buckets["0.1"], buckets["5.0"], buckets["300.0"],
            buckets["+Inf"]) == (1, 2, 3, 4, 5)
    by = {s.name: s.value for s in h.samples}
    assert by["modelward_verification_duration_seconds_count"] == 5
    assert by["modelward_verification_duration_seconds_sum"] == pytest.approx(603.08)
    assert f["modelward_boot_check_duration_seconds"].type == "histogram"
    (sample,) = f["modelward_model_info"].samples  # (a gauge, 1)
    assert sample.name == "modelward_model_info" and sample.value == 1
    assert sample.labels == {"model": "classifier", "version": "2.0.0",
                             "fingerprint": "ab" * 32, "channel": "stable", "slot": "b"}
    # the boot path's writer (no prometheus_client: issue 15) writes the same bytes
    assert m.prometheus_lean(info) == text


def test_hostile_info_labels_stay_escaped_and_both_writers_agree(tmp_path: Path) -> None:
    m = _metrics()
    long = "v" * 1000
    info = model_info(ModelRef(HOSTILE, long, "f\n\n# TYPE x counter", "a"), HOSTILE)
    assert info is not None
    text = m.prometheus(info)
    assert text == m.prometheus_lean(info)
    promtool_ok(text, tmp_path)
    (sample,) = families(text)["modelward_model_info"].samples
    assert sample.labels["model"] == HOSTILE and sample.labels["channel"] == HOSTILE
    assert sample.labels["version"] == "v" * 256  # cut
    assert sample.labels["fingerprint"] == "f\n\n# TYPE x counter"
    assert "\n# TYPE x counter" not in text  # escaped: no line of its own
    assert [ln for ln in text.splitlines() if ln.startswith("modelward_model_info")] \
        == [ln for ln in text.splitlines() if "modelward_model_info{" in ln]
    assert "modelward_model_info" not in m.prometheus(None)


def test_histograms_persist_bounded_and_type_checked() -> None:
    m = _metrics()
    doc = json.loads(json.dumps(m.to_status()))  # what status.json holds
    again = Metrics.from_status(doc)
    assert again.histograms == m.histograms
    again.observe("verification_duration_seconds", 0.2)  # the next run adds to them
    c = again.histograms["verification_duration_seconds"]["counts"]
    assert sum(c) == 6 and c[BUCKETS.index(0.25)] == 1
    again.observe("verification_duration_seconds", float("nan"))
    again.observe("verification_duration_seconds", -1.0)
    again.observe("no_such_histogram", 1.0)
    assert sum(again.histograms["verification_duration_seconds"]["counts"]) == 6
    assert set(again.histograms) <= set(HISTOGRAMS)

    good = doc["histograms"]["verification_duration_seconds"]
    for bad in ({"counts": good["counts"][:-1], "sum": 1.0},  # a bucket short
                {"counts": [True] + good["counts"][1:], "sum": 1.0},
                {"counts": [-1] + good["counts"][1:], "sum": 1.0},
                {"counts": [2**53] + good["counts"][1:], "sum": 1.0},
                {"counts": good["counts"], "sum": float("nan")},
                {"counts": good["counts"], "sum": -1},
                {"counts": good["counts"], "sum": 1e300},
                {"counts": "x"}, [], None):
        planted = dict(doc, histograms={"verification_duration_seconds": bad,
                                        "boot_check_duration_seconds":
                                            doc["histograms"]["boot_check_duration_seconds"],
                                        "x" * 10_000: good})
        cleaned = clean_status(planted)
        # the bad one is dropped; the good one and every other field stay as they were
        assert cleaned["histograms"] == {"boot_check_duration_seconds":
                                         doc["histograms"]["boot_check_duration_seconds"]}
        assert cleaned["counters"] == doc["counters"]
        assert Metrics.from_status(planted).counters == m.counters
    for mark in (-1, 2**63, True, 1.5, "1"):
        assert "boot_check_mark" not in clean_status(dict(doc, boot_check_mark=mark))
    assert clean_status(dict(doc, boot_check_mark=5))["boot_check_mark"] == 5


def test_each_boot_check_is_observed_once(tmp_path: Path) -> None:
    m = Metrics()
    assert read_boot_sample(tmp_path) is None
    m.note_boot_check(read_boot_sample(tmp_path))
    assert m.histograms == {}
    (tmp_path / BOOT_SECONDS_FILE).write_text("0.120\n")
    sample = read_boot_sample(tmp_path)
    assert sample is not None and sample[0] == 0.12
    m.note_boot_check(sample)
    m = Metrics.from_status(json.loads(json.dumps(m.to_status())))  # a later run
    m.note_boot_check(read_boot_sample(tmp_path))  # the same boot: not again
    assert m.histograms["boot_check_duration_seconds"]["counts"][BUCKETS.index(0.25)] == 1
    assert sum(m.histograms["boot_check_duration_seconds"]["counts"]) == 1
    os.utime(tmp_path / BOOT_SECONDS_FILE, ns=(1, sample[1] + 1))  # the next boot's file
    m.note_boot_check(read_boot_sample(tmp_path))
    assert sum(m.histograms["boot_check_duration_seconds"]["counts"]) == 2


def _summary(channels: dict[str, int]) -> dict[str, Any]:
    n = sum(channels.values())
    return {
        "devices": n + 1, "believed": n,
        "states": {"ok": n - 1, "fell back": 1, "MISSING": 1},
        "models": {"classifier": n},
        "versions": [{"model": "classifier", "version": HOSTILE, "devices": 1},
                     {"model": "classifier", "version": "1.0.0", "devices": n - 1}],
        "channels": channels,
        "rollouts": [{"model": "classifier", "version": "2.0.0", "channel": "stable",
                      "percent": 30.0, "halted": False, "devices": n, "eligible": 3,
                      "installed": 1, "failed": 1}],
        "fallback": {"fell_back": 1, "ever": 2, "of": n, "rate": 1 / n},
        "failure_reasons": {"HealthCheckError": {"devices": 1, "attempts": 4}},
        "durations": {"verify_s": {"p50": 1.5, "p95": 9.0, "samples": n},
                      "boot_check_s": {"p50": None, "p95": None, "samples": 0}},
    }


def _render(summary: dict[str, Any], ok: bool = True) -> str:
    from prometheus_client import CollectorRegistry, generate_latest

    class C:
        def collect(self) -> Any:
            return summary_metrics(summary, ok, 1_764_000_000.0)

    r = CollectorRegistry(auto_describe=False)
    r.register(C())  # type: ignore[arg-type]
    return generate_latest(r).decode()


def test_exporter_metrics_parse_and_count(tmp_path: Path) -> None:
    text = _render(_summary({"stable": 8, "beta": 2}))
    promtool_ok(text, tmp_path)
    f = families(text)
    val = {(s.name, tuple(sorted(s.labels.items()))): s.value
           for fam in f.values() for s in fam.samples}
    assert val[("modelward_fleet_devices", ())] == 11
    assert val[("modelward_fleet_state_devices", (("state", "fell back"),))] == 1
    assert val[("modelward_fleet_channel_devices", (("channel", "stable"),))] == 8
    assert val[("modelward_fleet_version_devices",
                (("model", "classifier"), ("version", HOSTILE)))] == 1
    rl = (("channel", "stable"), ("model", "classifier"), ("version", "2.0.0"))
    assert val[("modelward_fleet_rollout_eligible_devices", rl)] == 3
    assert val[("modelward_fleet_rollout_installed_devices", rl)] == 1
    assert val[("modelward_fleet_rollout_failed_devices", rl)] == 1
    assert val[("modelward_fleet_rollout_ratio", rl)] == 0.3
    assert val[("modelward_fleet_fallback_ratio", ())] == 0.1
    assert val[("modelward_fleet_failure_reason_devices",
                (("reason", "HealthCheckError"),))] == 1
    assert val[("modelward_fleet_verification_duration_p95_seconds", ())] == 9.0
    assert val[("modelward_fleet_verification_duration_p50_seconds", ())] == 1.5
    assert not [k for k in val if k[0].startswith("modelward_fleet_boot_check_duration_p")]
    assert val[("modelward_fleet_refresh_success", ())] == 1


def test_ten_thousand_hostile_channels_stay_bounded_and_escaped(tmp_path: Path) -> None:
    channels = {f'{HOSTILE}{i}{"x" * 100}': 1 for i in range(10_000)}
    channels["stable"] = 500
    text = _render(_summary(channels))
    promtool_ok(text, tmp_path)
    samples = families(text)["modelward_fleet_channel_devices"].samples
    assert len(samples) == MAX_LABEL_VALUES  # 10,001 channels: 50 series
    by = {s.labels["channel"]: s.value for s in samples}
    assert by["stable"] == 500
    assert by["other"] == 10_000 - (MAX_LABEL_VALUES - 2)
    assert sum(by.values()) == 10_500  # no device lost, none counted twice
    assert all(len(c) <= MAX_LABEL_CHARS for c in by)
    assert all(c.startswith(HOSTILE) for c in by if c not in ("stable", "other"))
    assert len(text) < 100_000


def test_a_failed_refresh_keeps_the_last_figures_and_says_so() -> None:
    calls: list[Any] = [PermissionError(13, "Permission denied"),
                        TransportError("broker 127.0.0.1:1: connection refused"),
                        _summary({"stable": 3})]

    def compute() -> dict[str, Any]:
        got = calls.pop()
        if isinstance(got, Exception):
            raise got
        return dict(got)

    c = FleetCollector(compute, clock=lambda: 42.0)
    assert c.refresh() is True
    assert c.refresh() is False and c.refresh() is False
    f = {fam.name: fam for fam in c.collect()}
    assert f["modelward_fleet_refresh_success"].samples[0].value == 0
    assert f["modelward_fleet_last_refresh_timestamp_seconds"].samples[0].value == 42.0
    assert f["modelward_fleet_devices"].samples[0].value == 4  # unchanged


def test_without_prometheus_client_the_textfile_is_still_written(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    m = _metrics()
    info = model_info(ModelRef("classifier", "1.0.0", "ab" * 32, "a"), None)
    expected = m.prometheus(info)
    monkeypatch.setitem(sys.modules, "prometheus_client", None)  # (import raises)
    with pytest.raises(ImportError):
        m.prometheus(info)
    assert m.write_textfile(tmp_path / "metrics.prom", info)  # a warning, the same bytes
    assert (tmp_path / "metrics.prom").read_text() == expected


def test_the_grafana_dashboards_query_only_metrics_that_exist() -> None:
    import re

    root = Path(__file__).resolve().parents[2] / "docs" / "grafana"
    m = _metrics()
    device = m.prometheus(model_info(ModelRef("c", "1", "f", "a"), "stable"))
    fleet = _render(_summary({"stable": 3}))
    names = {n for text in (device, fleet) for f in text_string_to_metric_families(text)
             for n in (f.name, *(s.name for s in f.samples))}
    for path, prefix in ((root / "modelward-device.json", "modelward_"),
                         (root / "modelward-fleet.json", "modelward_fleet_")):
        doc = json.loads(path.read_text())
        exprs = [t["expr"] for p in doc["panels"] for t in p["targets"]]
        exprs += [v["query"] for v in doc["templating"]["list"] if v["type"] == "query"]
        used = {n for e in exprs for n in re.findall(r"modelward_[a-z0-9_]+", e)}
        assert used and all(n.startswith(prefix) for n in used), path
        assert used - names == set(), path


def test_rollout_shares_are_never_summed(tmp_path: Path) -> None:
    """Attack a19: a device names 200 releases, or versions equal once cut; before, the
    ratio and halted gauges summed under ``other`` (a share of 60, a flag of 200)."""
    s = _summary({"stable": 10})
    long = "9" * (MAX_LABEL_CHARS + 10)
    s["rollouts"] = [{"model": "classifier", "version": f"{long}{i}", "channel": "stable",
                      "percent": 30.0, "halted": True, "devices": 10, "eligible": 3,
                      "installed": 1, "failed": 0} for i in range(2)]
    s["rollouts"] += [{"model": "m", "version": f"{i}", "channel": "stable",
                       "percent": 50.0, "halted": True, "devices": 10, "eligible": 1,
                       "installed": 0, "failed": 0} for i in range(200)]
    text = _render(s)
    promtool_ok(text, tmp_path)
    f = families(text)
    for name, most in (("modelward_fleet_rollout_ratio", 0.5),
                       ("modelward_fleet_rollout_halted", 1.0)):
        samples = f[name].samples
        assert 0 < len(samples) < MAX_LABEL_VALUES
        assert all(0 <= x.value <= most for x in samples), name
        assert all(x.labels["version"] != "other" for x in samples)
    eligible = {(x.labels["version"]): x.value
                for x in f["modelward_fleet_rollout_eligible_devices"].samples}
    assert eligible[long[:MAX_LABEL_CHARS]] == 6  # (counts do add up over cut labels)
