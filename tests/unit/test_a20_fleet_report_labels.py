"""Attack on ``fleet report`` (issue 17): a device's channel or version that differs from
a real one only in spaces a browser does not draw. HTML and SVG text collapse leading and
trailing spaces and runs of spaces, so ``" stable"``, ``"stable  "`` and ``"stable"`` were
three rows all drawn ``stable`` (and ``"1.0.0 "`` a second ``classifier 1.0.0`` legend
entry in another colour): one device's report read as a second ``stable`` channel. Every
such space is now written ``\\x20``, and what a browser draws of each label is distinct."""

from __future__ import annotations

import re
from pathlib import Path

from modelward.publisher._fleet_report import _spaces, render_report
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


def test_only_the_spaces_a_browser_drops_are_escaped() -> None:
    assert _spaces("sta ble") == "sta ble"
    assert _spaces(" a  b ") == "\\x20a \\x20b\\x20"
    assert _spaces("   ") == "\\x20" * 3
