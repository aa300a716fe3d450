"""Attack on ``fleet report`` (issue 17), measured in Debian's headless Chromium: labels a
browser does not draw as they are. A chart's row label is drawn right-aligned to the left
of its bars; one longer than the label column started left of the SVG and was cut off
there (a device on ``us-west-1-production-...`` drew as the real ``eu-west-1-...`` row,
a rollout's label lost its model and version), and a label's leading, trailing or doubled
spaces were not drawn (``" stable"`` drew as ``stable``). Measured on a copy of the page
with a script that reads the layout (the page itself runs none: its CSP)."""

from __future__ import annotations

import json
import re
from pathlib import Path

from modelward.publisher._fleet_report import CSP, render_report
from modelward.publisher._fleet_summary import RolloutRelease, summarize
from tests.integration.test_i17_fleet_report_chromium import _chromium
from tests.unit.test_i17_fleet_summary import _rep, _rows

REAL = "eu-west-1-production-canary-group-alpha-2026-a"  # 46 characters
_MEASURE = """<pre id="measured"></pre><script>
var out = [];
document.querySelectorAll('svg.chart text').forEach(function (t) {
  var b = t.getBBox(), svg = t.ownerSVGElement;
  out.push({chart: svg.dataset.chart, text: t.textContent, anchor: t.getAttribute('text-anchor'),
            left: b.x, right: b.x + b.width, drawn: t.getComputedTextLength(),
            width: svg.width.baseVal.value});
});
document.getElementById('measured').textContent = JSON.stringify(out);
</script></body>"""


def _measure(tmp_path: Path, page: str) -> list[dict[str, object]]:
    meta = f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
    assert meta in page
    harness = tmp_path / "measure.html"
    harness.write_text(page.replace(meta, "").replace("</body>", _MEASURE))
    dom = _chromium(tmp_path, "--dump-dom", harness.as_uri())
    assert dom.returncode == 0, dom.stderr[-2000:]
    found = re.search(r'<pre id="measured">(.*?)</pre>', dom.stdout, re.S)
    assert found, dom.stdout[-2000:]
    text = found.group(1).replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&")
    return json.loads(text)


def test_every_label_is_drawn_whole_inside_its_chart(tmp_path: Path) -> None:
    rows = _rows(tmp_path, {
        "d1": _rep("d1", channel=REAL),
        "d2": _rep("d2", channel="us" + REAL[2:], version="6.6.6"),
        "d3": _rep("d3", channel="&" * 60),
        "d4": _rep("d4", channel="stable"),
        "d5": _rep("d5", channel=" stable"),
        "d6": _rep("d6", channel="stable  ", version="1.0.0 ")})
    summary = summarize(rows, [
        RolloutRelease("classifier-long-model-name-x", "10.20.30-rc.1+build.5", REAL, 30.0,
                       True)])
    texts = _measure(tmp_path, render_report(summary, fleet="sim", generated="now"))
    labels = [t for t in texts if t["anchor"] == "end"]
    assert {t["chart"] for t in labels} == {"versions", "rollouts", "fallback"}
    for t in texts:  # (was: versions labels from x -76, the rollout's from x -387)
        assert t["left"] >= 0 and t["right"] <= t["width"], t
    one = next(t["drawn"] / len(t["text"]) for t in labels if t["text"] == "stable")
    versions = [t for t in labels if t["chart"] == "versions"]
    assert len(versions) == 6
    for t in versions:  # every character drawn (was: " stable" drawn as wide as "stable")
        assert abs(t["drawn"] - one * len(t["text"])) < 0.5, t
    drawn = [str(t["text"]) for t in versions]
    assert len(set(drawn)) == 6 and drawn.count("stable") == 1, drawn
