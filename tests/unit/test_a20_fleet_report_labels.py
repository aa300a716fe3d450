"""Attack on ``fleet report`` (issue 17): a device's channel or version that differs from
a real one only in spaces a browser does not draw. HTML and SVG text collapse leading and
trailing spaces and runs of spaces, so ``" stable"``, ``"stable  "`` and ``"stable"`` were
three rows all drawn ``stable`` (and ``"1.0.0 "`` a second ``classifier 1.0.0`` legend
entry in another colour): one device's report read as a second ``stable`` channel. Every
such space is now written ``\\x20``, and what a browser draws of each label is distinct."""

from __future__ import annotations

import re
from pathlib import Path

from modelward.publisher._fleet_report import MAX_LABEL, _spaces, _t, render_report
from modelward.publisher._fleet_summary import summarize
from tests.unit.test_i17_fleet_summary import _rep, _rows

LOOK_ALIKES = ("stable", " stable", "stable ", "stable  ", "  stable", "sta  ble", "sta ble")


def _drawn(text: str) -> str:
    """What a browser draws of a text node (CSS ``white-space: normal``)."""
    return re.sub(r"[ \t\n\r\f]+", " ", text).strip(" ")


def test_channels_and_versions_differing_in_spaces_are_drawn_differently(
        tmp_path: Path) -> None:
    rows = _rows(tmp_path, {f"d{i}": _rep(f"d{i}", channel=c, version="1.0.0" + " " * (i % 2))
                            for i, c in enumerate(LOOK_ALIKES)})
    page = render_report(summarize(rows), fleet="f", generated="now")
    chart = page[page.index('data-chart="versions"'):page.index("</svg>")]
    labels = [_drawn(t) for t in re.findall(r'text-anchor="end">([^<]*)</text>', chart)]
    assert len(labels) == len(LOOK_ALIKES)
    assert len(set(labels)) == len(LOOK_ALIKES), labels  # (was: 5 of them "stable")
    assert labels.count("stable") == 1
    legend = page[page.index('<p class="legend">'):]
    legend = legend[:legend.index("</p>")]
    entries = [_drawn(t) for t in re.findall(r"</i>([^<]*)</span>", legend)]
    assert entries.count("classifier 1.0.0") == 1 and len(set(entries)) == 2, entries


def test_every_space_and_the_empty_string_are_escaped() -> None:
    assert _spaces("sta ble") == "sta\\x20ble"
    assert _spaces(" a  b ") == "\\x20a\\x20\\x20b\\x20"
    assert _spaces("") == '\\"\\"' and _t("") == "\\&quot;\\&quot;"


LONG_REAL = "production-eu-west-1-canary-group-alpha-2026-wave-1"  # 51 characters


def test_long_names_cut_alike_are_told_apart(tmp_path: Path) -> None:
    """A label over MAX_LABEL characters is cut; a device's channel or version that
    shares the cut prefix of a real one drew the very same label (a second row of the
    real channel, a second legend entry of the real version). A cut label now ends in a
    64-bit digest of the whole name; a name short enough is never cut, so never looks
    cut."""
    fake = LONG_REAL[:MAX_LABEL] + "-evil"
    long_version = "1.0.0-rc.1+build." + "a" * 40
    rows = _rows(tmp_path, {
        "d1": _rep("d1", channel=LONG_REAL, version=long_version),
        "d2": _rep("d2", channel=fake, version=long_version[:-1] + "b"),
        "d3": _rep("d3", channel=LONG_REAL[:MAX_LABEL] + "...")})  # (as a cut one looks)
    page = render_report(summarize(rows), fleet="f", generated="now")
    chart = page[page.index('data-chart="versions"'):page.index("</svg>")]
    labels = re.findall(r'text-anchor="end">([^<]*)</text>', chart)
    assert len(labels) == 3 and len(set(labels)) == 3, labels
    assert all(len(x) <= MAX_LABEL + 3 + 17 for x in labels)
    legend = page[page.index('<p class="legend">'):]
    entries = re.findall(r"</i>([^<]*)</span>", legend[:legend.index("</p>")])
    assert len(entries) == 3 and len(set(entries)) == 3, entries
    assert _t("stable") == "stable" and _t("x" * MAX_LABEL) == "x" * MAX_LABEL


def test_model_and_version_pairs_draw_different_labels(tmp_path: Path) -> None:
    """A legend entry is ``model version``: a device whose model holds a space (or whose
    version is empty) drew the very label of a real pair (``classifier 1.0.0`` and ``""``
    beside ``classifier`` and ``1.0.0``), and ``other`` ``versions`` drew the page's own
    grey ``other versions`` entry in a colour of its own. Every space of a device's
    string is now ``\\x20`` and an empty one ``\\"\\"``, so only the page's separators are
    spaces, and the page's own entry has two of them (no pair has)."""
    pairs = [("classifier", "1.0.0"), ("classifier 1.0.0", ""), ("classifier", "1.0.0 "),
             ("a b", "c"), ("a", "b c"), ("x", ""), ("", "x"), ("other", "versions")]
    reports = {f"d{i}{k}": _rep(f"d{i}{k}", active={"name": m, "version": v,
                                                    "fingerprint": "f"})
               for i, (m, v) in enumerate(pairs) for k in "ab"}  # (two each: coloured)
    reports.update({f"e{i}": _rep(f"e{i}", version=f"9.{i}.0") for i in range(3)})
    page = render_report(summarize(_rows(tmp_path, reports)), fleet="f", generated="now")
    legend = page[page.index('<p class="legend">'):]
    legend = legend[:legend.index("</p>")]
    entries = [_drawn(t) for t in re.findall(r"</i>([^<]*)</span>", legend)]
    assert len(entries) == len(pairs) + 1
    assert len(entries) == len(set(entries)), entries
    assert entries.count("classifier 1.0.0") == 1
    grey = re.findall(r'<i style="background:#c7c7c7"></i>([^<]*)</span>', legend)
    assert len(grey) == 1 and entries.count(_drawn(grey[0])) == 1
    titles = [_drawn(t) for t in re.findall(r"<title>([^<]*)</title>", page)]
    assert len(titles) == len(set(titles)), titles  # (every bar's tooltip its own)
