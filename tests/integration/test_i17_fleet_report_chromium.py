"""Issue 17 must-show 2: ``fleet report``'s page in Debian's headless Chromium. The charts
drew (the bars' colours cover real pixels of a screenshot, decoded here with zlib, and the
dumped DOM holds every chart's SVG with bars of nonzero size), and a device string holding
``<script>`` and ``<img onerror>`` stayed text: no such element in the DOM, the title the
page set, the markup readable as text."""

from __future__ import annotations

import re
import shutil
import struct
import subprocess
import zlib
from pathlib import Path

from modelward.publisher._fleet_report import BAR, FAILED, INSTALLED, render_report
from modelward.publisher._fleet_summary import RolloutRelease, summarize
from tests.unit.test_i17_fleet_report import IMG, SCRIPT
from tests.unit.test_i17_fleet_summary import HEALTH, _rep, _rows

WIDTH, HEIGHT = 1000, 1800


def _chromium(tmp: Path, *args: str) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("chromium")
    assert exe is not None, "Debian's chromium is not installed (scripts/setup installs it)"
    return subprocess.run([exe, "--headless", "--no-sandbox", "--disable-gpu",
                           f"--user-data-dir={tmp / 'profile'}", "--hide-scrollbars",
                           "--run-all-compositor-stages-before-draw",
                           f"--window-size={WIDTH},{HEIGHT}", *args],
                          capture_output=True, text=True, timeout=120, check=False)


def decode_png(data: bytes) -> tuple[int, int, int, bytes]:
    """(width, height, bytes per pixel, unfiltered rows) of an 8-bit RGB(A) PNG."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, head = 8, b"", b""
    while pos < len(data):
        n, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + n]
        if kind == b"IHDR":
            head = body
        elif kind == b"IDAT":
            idat += body
        pos += 12 + n
    w, h, depth, colour = struct.unpack(">IIBB", head[:10])
    assert depth == 8 and colour in (2, 6), (depth, colour)
    bpp = 3 if colour == 2 else 4
    raw, stride, out = zlib.decompress(idat), w * bpp, bytearray()
    prev = bytearray(stride)
    for y in range(h):
        f, line = raw[y * (stride + 1)], bytearray(raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)])
        for i in range(stride):
            a = line[i - bpp] if i >= bpp else 0
            b, c = prev[i], prev[i - bpp] if i >= bpp else 0
            if f == 1:
                line[i] = (line[i] + a) & 0xFF
            elif f == 2:
                line[i] = (line[i] + b) & 0xFF
            elif f == 3:
                line[i] = (line[i] + (a + b) // 2) & 0xFF
            elif f == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[i] = (line[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 0xFF
        out += line
        prev = line
    return w, h, bpp, bytes(out)


def _pixels(png: tuple[int, int, int, bytes], colour: str) -> int:
    w, h, bpp, px = png
    want = bytes.fromhex(colour[1:])
    return sum(1 for i in range(0, w * h * bpp, bpp) if px[i:i + 3] == want)


def test_the_report_draws_in_chromium_and_hostile_strings_stay_text(tmp_path: Path) -> None:
    rows = _rows(tmp_path, {
        "dev-001": _rep("dev-001"), "dev-002": _rep("dev-002", "2.0.0", verify=0.3),
        "dev-003": _rep("dev-003", channel=SCRIPT, verify=12.0),
        "dev-004": _rep("dev-004", version=IMG, last_error=HEALTH),
        "dev-005": _rep("dev-005", last_error=HEALTH), "dev-006": None})
    summary = summarize(rows, [RolloutRelease("classifier", "2.0.0", "stable", 100.0)])
    page = tmp_path / "fleet.html"
    page.write_text(render_report(summary, fleet="sim", generated="2026-12-01T00:00:00Z"))

    dom = _chromium(tmp_path, "--dump-dom", page.as_uri())
    assert dom.returncode == 0, dom.stderr[-2000:]
    html = dom.stdout
    assert "<title>modelward fleet sim</title>" in html  # (the script would set 'pwned')
    assert "pwned" not in html.split("</title>")[0]
    assert not re.search(r"<(script|img)\b", html, re.I)  # as elements: none
    assert "&lt;script&gt;document.title='pwned'&lt;/script&gt;" in html  # as text
    assert "&lt;img\\x20src=x\\x20onerror=" in html  # (spaces shown: a20)
    svgs = dict(re.findall(r'<svg class="chart" data-chart="(\w+)"(.*?)</svg>', html, re.S))
    assert set(svgs) == {"versions", "rollouts", "fallback", "verify", "boot"}
    for name, body in svgs.items():
        sizes = [(float(w), float(h)) for w, h in
                 re.findall(r'<rect [^>]*width="([0-9.]+)" height="([0-9.]+)"', body)]
        assert sizes and all(w > 0 and h > 0 for w, h in sizes), name

    shot = tmp_path / "fleet.png"
    r = _chromium(tmp_path, f"--screenshot={shot}", page.as_uri())
    assert r.returncode == 0 and shot.is_file(), r.stderr[-2000:]
    png = decode_png(shot.read_bytes())
    assert png[:2] == (WIDTH, HEIGHT)
    # each colour is a bar's, drawn over real pixels (a legend square is 10 x 10)
    assert _pixels(png, INSTALLED) > 1000  # rollout: 1 installed
    assert _pixels(png, FAILED) > 2000  # rollout: 2 failed
    assert _pixels(png, BAR) > 3000  # the two histograms' bars
