"""``fleet report -o fleet.html``: the fleet summary (:func:`~._fleet_summary.summarize`)
as one self-contained HTML page of charts, drawn here as inline SVG (issue 17).

The page needs nothing but itself: inline CSS, inline SVG, no script, no image, no font and
no URL of any kind, and a Content-Security-Policy (``default-src 'none'; style-src
'unsafe-inline'``) as its first element, so a browser fetches nothing and runs nothing
even if some text were not escaped. The figures are the summary's, never recomputed.

Every string a device supplies (channel, model, version, failure reason, device id, a
report's time) is hostile: it is cut and escaped as the terminal view escapes it
(:func:`~modelward.trust._display.escape_ascii`: control, format and non-ASCII characters
as ``\\x``/``\\u`` escapes, so a look-alike ``stable`` stays visibly different), then
HTML-escaped with quotes (:func:`html.escape`) wherever it goes: element text, SVG
``<text>``, ``<title>`` and attribute values alike; every space in it is written
``\\x20`` (and an empty one ``\\"\\"``), so ``" stable"`` is not drawn as a second
``stable`` (a browser draws no leading, trailing or doubled space) and the page's own
spaces are the only separators of a label's parts (``model version``), and a
chart's label column is as wide as its longest label, so no label
is cut off at the chart's left edge. Device ids print in the enrolled-id
alphabet (:func:`~modelward.trust._display.escape_id`). What is drawn is bounded whatever
the fleet claims: at most :data:`MAX_CHANNELS` channels and :data:`MAX_VERSION_COLOURS`
versions with a colour of their own (the rest: ``other``), :data:`MAX_ROLLOUTS`
rollouts, the summary's own bound on the silent list and the failure reasons, and
:data:`MAX_LABEL` characters of any label (a cut one ends in a digest of the whole name,
so names that share the part shown still draw different labels).
"""

from __future__ import annotations

import hashlib
import html
import math
from collections import Counter
from collections.abc import Iterable
from typing import Any

from modelward.trust._display import escape_ascii, escape_id

MAX_LABEL = 48  # characters of a device-supplied label (before HTML escaping)
MAX_CHANNELS = 20  # channels drawn (those with the most devices)
MAX_VERSION_COLOURS = 8  # versions with a colour of their own; the rest are "other"
MAX_ROLLOUTS = 30  # releases drawn
#: px of one character of a chart's label (12 px monospace is 7.2 px: DejaVu Sans Mono,
#: Liberation Mono, Courier), with a margin for the font a browser picks
CHAR_WIDTH = 8.0
CSP = "default-src 'none'; style-src 'unsafe-inline'"

_PALETTE = ("#1f77b4", "#ff7f0e", "#9467bd", "#17becf", "#bcbd22", "#8c564b", "#e377c2",
            "#7f7f7f")
OTHER_COLOUR = "#c7c7c7"
#: the grey legend entry: two spaces, where a device's ``model version`` has one
OTHER_VERSIONS = "all other versions"
INSTALLED = "#2ca02c"
FAILED = "#d62728"
PENDING = "#aec7e8"
FELL_BACK = "#ff9896"
KEPT = "#98df8a"
BAR = "#4c72b0"

_CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:24px;color:#222;background:#fff}
h1{font-size:20px;margin:0 0 4px} h2{font-size:16px;margin:24px 0 6px}
.meta{color:#555} section{max-width:960px}
table{border-collapse:collapse} td,th{padding:2px 10px;border-bottom:1px solid #ddd;
text-align:left;font-family:ui-monospace,monospace;font-size:12px}
.legend span{display:inline-block;margin-right:14px;font-size:12px}
.legend i{display:inline-block;width:10px;height:10px;margin-right:4px}
svg text{font:12px ui-monospace,monospace;fill:#222}
"""


def _t(text: object, limit: int = MAX_LABEL) -> str:
    """A device-supplied string, safe as HTML text or a quoted attribute (module doc),
    with every space as ``\\x20`` (:func:`_spaces`); cut to
    ``limit``, it ends in ``...#`` and 16 hex digits of a digest of the whole string
    (:func:`_cut_mark`)."""
    s = text if isinstance(text, str) else str(text)
    shown = escape_ascii(s, limit)
    if shown != escape_ascii(s, None):
        shown += _cut_mark(s)
    return html.escape(_spaces(shown), quote=True)


def _cut_mark(text: str) -> str:
    """``#`` and 64 bits of BLAKE2b over the whole of a cut ``text`` (pure): two names
    that share the part shown (a device's ``production-eu-west-1-...-evil`` beside the
    real ``production-eu-west-1-...``) draw different labels; a name short enough to be
    shown whole is never cut, so it never looks like a cut one."""
    data = text.encode("utf-8", "surrogatepass")
    return "#" + hashlib.blake2b(data, digest_size=8).hexdigest()


EMPTY = '\\"\\"'  # an empty device string: no escape_ascii output is exactly this


def _spaces(text: str) -> str:
    """``text`` (escaped by :func:`escape_ascii`) with every space written ``\\x20``, and
    ``\\"\\"`` when it is empty (pure). A browser does not draw leading, trailing or
    doubled spaces (``" stable"`` drew as ``stable``), and with no space left in a
    device's string the page's own separators tell the parts of a label apart: the
    legend's ``model version`` of ``classifier 1.0.0`` and ``""`` was the real
    ``classifier`` ``1.0.0``. :func:`escape_ascii` doubles a device's own backslashes,
    so neither escape is ever the device's."""
    return text.replace(" ", "\\x20") if text else EMPTY


def _id(text: object) -> str:
    return html.escape(escape_id(text, 64), quote=True)


def _n(v: float) -> str:
    """A coordinate (finite: the summary's counts and bounded shares)."""
    return f"{v:.1f}"


def _svg(name: str, label: str, width: int, height: int, body: Iterable[str]) -> str:
    return (f'<svg class="chart" data-chart="{name}" role="img" aria-label="{label}" '
            f'width="{width}" height="{height}" viewBox="0 0 {width} {height}">'
            + "".join(body) + "</svg>")


def _rect(x: float, y: float, w: float, h: float, fill: str, title: str) -> str:
    return (f'<rect x="{_n(x)}" y="{_n(y)}" width="{_n(w)}" height="{_n(h)}" '
            f'fill="{fill}"><title>{title}</title></rect>')


def _text(x: float, y: float, text: str, anchor: str = "start") -> str:
    return f'<text x="{_n(x)}" y="{_n(y)}" text-anchor="{anchor}">{text}</text>'


def _legend(items: Iterable[tuple[str, str]]) -> str:
    return '<p class="legend">' + "".join(f'<span><i style="background:{c}"></i>{t}</span>'
                                          for t, c in items) + "</p>"


def _stacked(name: str, label: str, rows: list[tuple[str, list[tuple[float, str, str]]]],
             scale: float) -> str:
    """Horizontal stacked bars: per row a label and (value, colour, tooltip) segments,
    ``scale`` the value of a full bar. The label column is as wide as the longest label
    (at :data:`CHAR_WIDTH` a character): a label drawn to the left of the SVG is cut off
    there, and a device's ``us-west-1-...`` would read as the cut ``eu-west-1-...``."""
    longest = max((len(html.unescape(text)) for text, _ in rows), default=0)
    left, width, bar, gap = max(300, 16 + math.ceil(CHAR_WIDTH * longest)), 560, 18, 8
    body, y = [], 4.0
    for text, segments in rows:
        body.append(_text(left - 8, y + bar - 5, text, "end"))
        x = float(left)
        for value, colour, title in segments:
            w = width * value / scale if scale > 0 else 0.0
            if w > 0:
                body.append(_rect(x, y, w, bar, colour, title))
            x += w
        body.append(_text(x + 6, y + bar - 5, str(int(sum(v for v, _, _ in segments)))))
        y += bar + gap
    return _svg(name, label, left + width + 60, max(int(y), bar + 8), body)


def _versions_chart(summary: dict[str, Any]) -> str:
    per = summary.get("channel_versions", [])
    by_version: Counter[tuple[str, str]] = Counter()
    by_channel: Counter[str] = Counter()
    for e in per:
        by_version[(e["model"], e["version"])] += e["devices"]
        by_channel[e["channel"]] += e["devices"]
    if not per:
        return '<p class="meta">no believed report</p>'
    top = [k for k, _ in sorted(by_version.items(), key=lambda kv: (-kv[1], kv[0]))
           [:MAX_VERSION_COLOURS]]
    colour = {k: _PALETTE[i % len(_PALETTE)] for i, k in enumerate(top)}
    channels = sorted(by_channel, key=lambda c: (-by_channel[c], c))[:MAX_CHANNELS]
    rows = []
    counts = {(e["channel"], e["model"], e["version"]): e["devices"] for e in per}
    for ch in channels:
        segments: list[tuple[float, str, str]] = [
            (n, colour[(m, v)], f"{_t(ch)}: {_t(m)} {_t(v)}: {n} devices")
            for m, v in top if (n := counts.get((ch, m, v), 0))]
        other = by_channel[ch] - sum(n for n, _, _ in segments)
        if other:
            segments.append((other, OTHER_COLOUR, f"{_t(ch)}: {OTHER_VERSIONS}: {other} devices"))
        rows.append((_t(ch), segments))
    more = len(by_channel) - len(channels)
    legend = [(f"{_t(m)} {_t(v)}", colour[(m, v)]) for m, v in top]
    if len(by_version) > len(top):
        legend.append((OTHER_VERSIONS, OTHER_COLOUR))
    return (_stacked("versions", "versions per channel", rows, max(by_channel.values()))
            + _legend(legend)
            + (f'<p class="meta">and {more} more channels</p>' if more > 0 else ""))


def _rollouts_chart(summary: dict[str, Any]) -> str:
    rollouts = summary.get("rollouts", [])[:MAX_ROLLOUTS]
    if not rollouts:
        return '<p class="meta">no rollout: give --repo and --keys</p>'
    rows = []
    for r in rollouts:
        pending = max(r["eligible"] - r["installed"] - r["failed"], 0)
        who = (f"{_t(r['model'], 24)} {_t(r['version'], 24)} on {_t(r['channel'], 24)} "
               f"at {r['percent']:g}%" + (" HALTED" if r["halted"] else ""))
        rows.append((who, [(r["installed"], INSTALLED, f"{who}: {r['installed']} installed"),
                           (r["failed"], FAILED, f"{who}: {r['failed']} failed"),
                           (pending, PENDING, f"{who}: {pending} eligible, not yet")]))
    scale = max([r["eligible"] for r in rollouts] + [1])
    table = "".join(
        f"<tr><td>{_t(r['model'])}</td><td>{_t(r['version'])}</td><td>{_t(r['channel'])}</td>"
        f"<td>{r['percent']:g}%{' HALTED' if r['halted'] else ''}</td>"
        f"<td>{r['eligible']}</td><td>{r['installed']}</td><td>{r['failed']}</td>"
        f"<td>{r['devices']}</td><td>{r['outside']}</td></tr>" for r in rollouts)
    return (_stacked("rollouts", "rollout progress per release", rows, scale)
            + _legend([("installed", INSTALLED), ("failed", FAILED),
                       ("eligible, not yet", PENDING)])
            + "<table><tr><th>model</th><th>version</th><th>channel</th><th>rollout</th>"
              "<th>eligible</th><th>installed</th><th>failed</th><th>on channel</th>"
              "<th>outside</th></tr>" + table + "</table>")


def _fallback_chart(summary: dict[str, Any]) -> str:
    fb = summary.get("fallback", {})
    of, fell = fb.get("of", 0), fb.get("fell_back", 0)
    rate = "n/a" if fb.get("rate") is None else f"{fb['rate']:.1%}"
    chart = _stacked("fallback", "fallback rate", [(f"fallback rate {rate}", [
        (fell, FELL_BACK, f"{fell} devices fell back"),
        (max(of - fell, 0), KEPT, f"{max(of - fell, 0)} devices did not")])],
        max(of, 1))
    return (chart + f'<p class="meta">{fell} of {of} believed devices run their previous '
            f'model after a boot-check fallback; {fb.get("ever", 0)} ever fell back</p>')


def _histogram_chart(name: str, label: str, hist: dict[str, Any],
                     durations: dict[str, Any]) -> str:
    counts, bounds = hist.get("counts", []), hist.get("le", [])
    labels = [f"&lt;={b:g}s" for b in bounds] + [f"&gt;{bounds[-1]:g}s" if bounds else "all"]
    left, top, plot_h, col = 40, 20, 160, 56
    peak = max([*counts, 1])
    body = [f'<line x1="{left}" y1="{top + plot_h}" x2="{left + col * len(counts)}" '
            f'y2="{top + plot_h}" stroke="#888"/>']
    for i, (n, text) in enumerate(zip(counts, labels, strict=False)):
        h = plot_h * n / peak
        x = left + i * col
        if n:
            body.append(_rect(x + 4, top + plot_h - h, col - 8, h, BAR,
                              f"{text}: {n} devices"))
            body.append(_text(x + col / 2, top + plot_h - h - 3, str(n), "middle"))
        body.append(_text(x + col / 2, top + plot_h + 16, text, "middle"))
    d = durations or {}

    def s(v: object) -> str:
        return "-" if v is None else f"{v:.3f}s"

    return (_svg(name, label, left + col * len(counts) + 10, top + plot_h + 26, body)
            + f'<p class="meta">p50 {s(d.get("p50"))}, p95 {s(d.get("p95"))} over '
              f'{d.get("samples", 0)} devices (one sample each: its last)</p>')


def _states(summary: dict[str, Any]) -> str:
    return "<table><tr>" + "".join(f"<th>{html.escape(s)}</th>" for s, n in
                                   summary.get("states", {}).items() if n) + "</tr><tr>" + \
        "".join(f"<td>{n}</td>" for n in summary.get("states", {}).values() if n) + \
        "</tr></table>"


def _silent(summary: dict[str, Any]) -> str:
    silent, total = summary.get("silent", []), summary.get("silent_total", 0)
    if not total:
        return '<p class="meta">none: every enrolled device reported recently</p>'
    rows = "".join(f"<tr><td>{_id(e['device'])}</td><td>{html.escape(str(e['state']))}</td>"
                   f"<td>{_t(e['at'] or '-', 40)}</td></tr>" for e in silent)
    more = total - len(silent)
    return (f'<table data-list="silent"><tr><th>device</th><th>state</th>'
            f'<th>last report signed</th></tr>{rows}</table>'
            + (f'<p class="meta">and {more} more</p>' if more > 0 else ""))


def _reasons(summary: dict[str, Any]) -> str:
    reasons = summary.get("failure_reasons", {})
    if not reasons:
        return '<p class="meta">none</p>'
    return "<table><tr><th>reason</th><th>devices</th><th>attempts</th></tr>" + "".join(
        f"<tr><td>{_t(k, 64)}</td><td>{v['devices']}</td><td>{v['attempts']}</td></tr>"
        for k, v in reasons.items()) + "</table>"


def render_report(summary: dict[str, Any], *, fleet: str, generated: str) -> str:
    """The HTML page of ``summary`` (pure; module doc).

    Args:
        summary: :func:`~modelward.publisher._fleet_summary.summarize`'s figures.
        fleet: the fleet's name (the operator's ``--fleet``; escaped like the rest).
        generated: when the figures were taken, for the page's header.
    """
    hist, dur = summary.get("histograms", {}), summary.get("durations", {})
    title = f"modelward fleet {_t(fleet, 64)}"
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head>',
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">',
        '<meta charset="utf-8">',
        '<meta name="referrer" content="no-referrer">',
        f"<title>{title}</title>",
        f"<style>{_CSS}</style>",
        "</head><body><section>",
        f"<h1>{title}</h1>",
        f'<p class="meta">{summary.get("devices", 0)} devices, '
        f'{summary.get("believed", 0)} with a believed report; figures of '
        f"{_t(generated, 64)}</p>",
        _states(summary),
        "<h2>Versions per channel</h2>", _versions_chart(summary),
        "<h2>Rollout progress per release</h2>", _rollouts_chart(summary),
        "<h2>Fallback rate</h2>", _fallback_chart(summary),
        "<h2>Verification time</h2>",
        _histogram_chart("verify", "verification time distribution",
                         hist.get("verify_s", {}), dur.get("verify_s", {})),
        "<h2>Boot-check time</h2>",
        _histogram_chart("boot", "boot-check time distribution",
                         hist.get("boot_check_s", {}), dur.get("boot_check_s", {})),
        "<h2>Stale and missing devices</h2>", _silent(summary),
        "<h2>Failure reasons</h2>", _reasons(summary),
        "</section></body></html>",
    ]
    return "\n".join(parts) + "\n"
