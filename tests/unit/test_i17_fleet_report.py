"""Issue 17, ``fleet report -o fleet.html`` (pure): the page of the summary's figures, with
devices whose validly signed reports hold hostile strings (markup, quotes, control
characters, very long names); and the ``rejected`` list that keeps a refused release
``failed`` after the device goes back to ``ok`` on its old model."""

from __future__ import annotations

import re
from html.parser import HTMLParser
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from modelward.agent._observe import build_report, rejected_releases
from modelward.publisher._fleet import device_state, refuses_upgrade
from modelward.publisher._fleet_report import CSP, MAX_CHANNELS, render_report
from modelward.publisher._fleet_summary import RolloutRelease, summarize
from modelward.publisher._report_schema import ReportSchemaError, check_report
from modelward.trust._report_fields import DURATION_BUCKETS, MAX_REJECTED
from tests.unit.test_i17_fleet_summary import HEALTH, _rep, _rows

SCRIPT = "<script>document.title='pwned'</script>"
IMG = '<img src=x onerror="document.title=\'pwned\'">'
QUOTES = "\"'><svg onload=alert(1)>"
CONTROL = "\x1b[2J\x00\u202e\u200b"
LONG = "L" * 250


class _Page(HTMLParser):
    """Every element, attribute and text node of a page, as a browser's tokenizer sees
    them (html.parser is the stdlib's HTML5-style tokenizer)."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def _parse(page: str) -> _Page:
    p = _Page()
    p.feed(page)
    p.close()
    return p


ALLOWED = {"html", "head", "meta", "title", "style", "body", "section", "h1", "h2", "p",
           "table", "tr", "th", "td", "span", "i", "svg", "rect", "text", "line"}


def _hostile_rows(tmp_path: Path) -> list[Any]:
    return _rows(tmp_path, {
        "d1": _rep("d1", channel=SCRIPT),
        "d2": _rep("d2", version=IMG, channel=QUOTES),
        "d3": _rep("d3", channel=CONTROL, failure_reasons={"Evil_Reason": 3},
                   last_error={"type": SCRIPT, "message": IMG, "at": QUOTES}),
        "d4": _rep("d4", channel=LONG, active={"name": IMG, "version": SCRIPT,
                                               "fingerprint": QUOTES}),
        "d5": _rep("d5", at="x" * 200),  # (no valid signing time: STALE)
        "d6": None,  # MISSING
    })


def _page(rows: list[Any], releases: list[RolloutRelease] | None = None) -> str:
    return render_report(summarize(rows, releases or []), fleet=QUOTES,
                         generated="2026-12-01T00:00:00+00:00")


def test_hostile_fields_appear_as_text_only(tmp_path: Path) -> None:
    rows = _hostile_rows(tmp_path)
    assert all(r.verified for r in rows if r.device_id != "d6")  # (signed and in schema)
    page = _page(rows, [RolloutRelease(IMG, SCRIPT, QUOTES, 30.0)])
    p = _parse(page)
    assert {t for t, _ in p.tags} <= ALLOWED
    assert not [t for t, _ in p.tags if t in ("script", "img", "iframe", "object", "a")]
    assert not [(t, k) for t, a in p.tags for k in a if k.startswith("on") or k == "src"]
    assert not [(t, a) for t, a in p.tags if t == "svg" and set(a) - {
        "class", "data-chart", "role", "aria-label", "width", "height", "viewbox"}]
    text = "".join(p.text)
    # the markup is there, as text: what a person reads, not what the browser runs
    # (every space of a device's string shows as \x20: test_a20_fleet_report_labels.py)
    for needle in ("<script>document.title='pwned'</script>", "<img\\x20src=x\\x20onerror=",
                   "\"'><svg\\x20onload=alert(1)>"):
        assert needle in text
    assert "\\x1b[2J\\x00\\u202e\\u200b" in text  # control and format characters escaped
    assert not re.search(r"[\x00-\x08\x0b-\x1f\x7f\u200b\u202e]", page)
    assert "L" * 49 not in page  # cut (MAX_LABEL) in every place it is printed
    assert "pwned" not in "".join(a.get("aria-label") or "" for _, a in p.tags)


def test_the_page_fetches_nothing_and_runs_nothing(tmp_path: Path) -> None:
    page = _page(_hostile_rows(tmp_path))
    assert not re.search(r"https?:|//|javascript:|data:", page, re.I)  # no URL at all
    assert "url(" not in page and "@import" not in page
    p = _parse(page)
    assert p.tags[0] == ("html", {"lang": "en"}) and p.tags[1] == ("head", {})
    assert p.tags[2] == ("meta", {"http-equiv": "Content-Security-Policy", "content": CSP})
    assert CSP == "default-src 'none'; style-src 'unsafe-inline'"
    assert page.isascii()


def test_the_charts_carry_the_summary_figures(tmp_path: Path) -> None:
    rows = _rows(tmp_path, {
        "a1": _rep("a1"), "a2": _rep("a2", "2.0.0", verify=0.07),
        "a3": _rep("a3", channel="beta", verify=400.0),
        "a4": _rep("a4", last_error=HEALTH), "a5": None})
    s = summarize(rows, [RolloutRelease("classifier", "2.0.0", "stable", 100.0)])
    assert s["histograms"]["verify_s"] == {
        "le": list(DURATION_BUCKETS),
        "counts": [0, 1, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 1]}  # 0.07, 2.0 x2, 400
    assert s["silent"] == [{"device": "a5", "state": "MISSING", "at": ""}]
    assert s["silent_total"] == 1
    page = render_report(s, fleet="f", generated="now")
    p = _parse(page)
    charts = {a["data-chart"] for t, a in p.tags if t == "svg"}
    assert charts == {"versions", "rollouts", "fallback", "verify", "boot"}
    titles = "".join(p.text)
    assert '"stable"' not in titles  # (names are not quoted on the page: escaped instead)
    assert "stable: classifier 1.0.0: 2 devices" in titles
    assert "beta: classifier 1.0.0: 1 devices" in titles
    assert "classifier 2.0.0 on stable at 100%: 1 installed" in titles
    assert "classifier 2.0.0 on stable at 100%: 1 failed" in titles  # a4, health check
    assert "&gt;300s: 1 devices" in page and "&lt;=0.1s: 1 devices" in page
    silent = page[page.index('data-list="silent"'):]
    assert "<td>a5</td><td>MISSING</td>" in silent


def test_what_is_drawn_is_bounded_whatever_the_fleet_claims(tmp_path: Path) -> None:
    reports: dict[str, Any] = {f"d{i}": _rep(f"d{i}", version=f"{i}.0.0",
                                               channel=f"{'c' * 200}{i}") for i in range(60)}
    page = _page(_rows(tmp_path, reports))
    p = _parse(page)
    bars = [a for t, a in p.tags if t == "rect"]
    assert len(bars) <= MAX_CHANNELS + 2 + 30  # channels, fallback, histograms' buckets
    assert len(page) < 60_000


# --- the rejected list ----------------------------------------------------------------


def _rejection(version: str, at: float, reason: str = "HealthCheckError") -> Any:
    return SimpleNamespace(model="classifier", version=version, at=at, until=at + 100,
                           refuses_release=reason != "DeltaRefused",
                           live=lambda now, a=at: a <= now < a + 100)


def test_the_report_lists_the_releases_refused_now_newest_first_bounded() -> None:
    entries = [_rejection(f"{i}.0.0", 1000.0 + i) for i in range(12)]
    entries += [_rejection("99.0.0", 1050.0, "DeltaRefused"), _rejection("98.0.0", 0.0)]
    got = rejected_releases(entries, 1060.0)
    assert got == [{"model": "classifier", "version": f"{i}.0.0"}
                   for i in range(11, 11 - MAX_REJECTED, -1)]
    r = build_report("d1", "f", None, "idle", {}, seq=1, now=1060.0, poll_interval=60,
                     rejected=got)
    assert check_report(r)["rejected"] == got
    assert "rejected" not in build_report("d1", "f", None, "idle", {}, seq=1, now=1.0,
                                          poll_interval=60)


@pytest.mark.parametrize(("rejected", "field"), [
    ([{"model": "m", "version": "1"}] * (MAX_REJECTED + 1), "rejected"),
    ({"model": "m"}, "rejected"),
    ([{"model": "m", "version": 1}], "rejected[0].version"),
    ([{"model": "m", "version": "1", "x": "y"}], "rejected[0].x"),
    ([{"model": "m"}], "rejected[0].version"),
    ([{"model": "m" * 257, "version": "1"}], "rejected[0].model"),
])
def test_a_malformed_rejected_list_is_refused(rejected: object, field: str) -> None:
    with pytest.raises(ReportSchemaError) as e:
        check_report({"device_id": "d1", "rejected": rejected})
    assert e.value.field == field


def test_a_refused_release_stays_failed_after_the_device_reports_ok(tmp_path: Path) -> None:
    rel = RolloutRelease("classifier", "2.0.0", "stable", 100.0)
    refused = [{"model": "classifier", "version": "2.0.0"}]
    rows = _rows(tmp_path, {
        "d1": _rep("d1", rejected=refused),  # ok on 1.0.0, refuses 2.0.0
        "d2": _rep("d2", "2.0.0"),
        "d3": _rep("d3", "3.0.0", rejected=refused),  # refused 2.0.0, runs a newer one
        "d4": _rep("d4", rejected=[{"model": "other", "version": "9.0.0"},
                                   {"model": "classifier", "version": "not semver"}])})
    states = {r.device_id: r.state for r in rows}
    assert states == {"d1": "failed", "d2": "ok", "d3": "ok", "d4": "ok"}
    r = summarize(rows, [rel])["rollouts"][0]
    # (d3 is ok on a newer model, but it did refuse this release: failed for it too)
    assert (r["eligible"], r["installed"], r["failed"]) == (4, 1, 2)
    # without the list the same device is ok and the rollout's failed count is 0
    plain = _rows(tmp_path / "b", {"d1": _rep("d1"), "d2": _rep("d2", "2.0.0")})
    assert summarize(plain, [rel])["rollouts"][0]["failed"] == 0
    assert device_state((), {"active": None, "model": "classifier",
                             "rejected": refused}) == "failed"
    assert not refuses_upgrade({"active": {"name": "classifier", "version": "x",
                                           "fingerprint": "f"}, "rejected": refused})
