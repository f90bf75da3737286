#!/usr/bin/env python3
"""Check the `llmem serve` dashboard in headless Chromium (stdlib only, Python 3.11).

    check_dashboard.py URL OUT_DIR [--chromium PATH] [--api-key K] [--budget-ms 6000]
                       [--min-pixels 2000] [--ranks N]

URL is the dashboard (e.g. http://127.0.0.1:8080/). Two Chromium runs, each with a fresh
profile: one with --dump-dom (saved as OUT_DIR/dashboard.html) must show
<body data-ready="1"> and a <canvas id="chart"> with data-points >= 2; one with
--screenshot=OUT_DIR/dashboard.png. The PNG is decoded here and the chart's plot area (the
canvas's data-plot rectangle, in page pixels) must hold at least --min-pixels pixels of
the weights colour and of the kv cache colours (used + reserved-free), as the page
declares them in the canvas's data-colors. With --ranks N (a TP/PP server, N >= 2) the
page is opened at ?rank=N-1: the rank selector must offer N ranks, the table of ranks must
have N rows, and the chart (data-rank) must show the last rank. Exit 0 when every check passes; 1 with a
message naming the failed check otherwise; 2 when Chromium cannot run.

To try it without the Rust server: python3 tests/browser/mock_server.py --port 8765 &
then check_dashboard.py http://127.0.0.1:8765/ /tmp/dash
"""

import argparse
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import zlib
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

WIDTH, HEIGHT = 1280, 1000
COLOR_TOLERANCE = 12  # max per-channel difference for a pixel to count as a colour


class Failure(Exception):
    pass


def find_chromium(given):
    if given:
        if not os.access(given, os.X_OK):
            raise Failure(f"--chromium {given}: not an executable file")
        return given
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        path = shutil.which(name)
        if path:
            return path
    raise Failure("no Chromium found: install it (apt-get install -y chromium) or pass --chromium")


def run_chromium(chromium, url, extra, budget_ms):
    with tempfile.TemporaryDirectory(prefix="llmem-chromium-") as profile:
        cmd = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
               "--no-first-run", "--disable-background-networking",
               "--disable-component-update", "--disable-sync", f"--user-data-dir={profile}",
               f"--window-size={WIDTH},{HEIGHT}", "--force-device-scale-factor=1",
               "--hide-scrollbars", f"--virtual-time-budget={budget_ms}", *extra, url]
        try:
            p = subprocess.run(cmd, capture_output=True, timeout=120)
        except subprocess.TimeoutExpired:
            raise Failure(f"Chromium did not finish within 120 s: {' '.join(cmd)}")
        if p.returncode != 0:
            tail = p.stderr.decode(errors="replace")[-1500:]
            raise Failure(f"Chromium exited with {p.returncode}: {' '.join(cmd)}\n{tail}")
        return p.stdout.decode(errors="replace")


class DomScan(HTMLParser):
    """Collects the attributes of <body>, <canvas id="chart"> and the status line's text."""

    def __init__(self):
        super().__init__()
        self.body = None
        self.canvas = None
        self.status = ""
        self._in_status = False
        self.rank_options = 0
        self.rank_rows = []
        self._in_select = False
        self._in_ranks = False

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "body":
            self.body = a
        elif tag == "canvas" and a.get("id") == "chart":
            self.canvas = a
        elif a.get("id") == "status":
            self._in_status = True
        elif tag == "select" and a.get("id") == "rank":
            self._in_select = True
        elif tag == "option" and self._in_select:
            self.rank_options += 1
        elif tag == "tbody" and a.get("id") == "ranks":
            self._in_ranks = True
        elif tag == "tr" and self._in_ranks and "data-rank" in a:
            self.rank_rows.append(a["data-rank"])

    def handle_endtag(self, tag):
        if self._in_status and tag == "div":
            self._in_status = False
        elif tag == "select":
            self._in_select = False
        elif tag == "tbody":
            self._in_ranks = False

    def handle_data(self, data):
        if self._in_status:
            self.status += data


def decode_png(path):
    """(width, height, channels, rows): 8-bit RGB or RGBA, non-interlaced PNG."""
    data = Path(path).read_bytes()
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        raise Failure(f"{path}: not a PNG file")
    pos, idat, ihdr = 8, [], None
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        kind = data[pos + 4:pos + 8]
        body = data[pos + 8:pos + 8 + length]
        if kind == b"IHDR":
            ihdr = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat.append(body)
        elif kind == b"IEND":
            break
        pos += 12 + length
    if ihdr is None or not idat:
        raise Failure(f"{path}: PNG without IHDR or IDAT")
    w, h, depth, ctype, _, _, interlace = ihdr
    if depth != 8 or ctype not in (2, 6) or interlace != 0:
        raise Failure(f"{path}: unsupported PNG (bit depth {depth}, colour type {ctype}, "
                      f"interlace {interlace}); expected 8-bit RGB/RGBA, not interlaced")
    ch = 3 if ctype == 2 else 4
    raw = zlib.decompress(b"".join(idat))
    stride = w * ch
    if len(raw) != h * (stride + 1):
        raise Failure(f"{path}: image data is {len(raw)} bytes, expected {h * (stride + 1)}")
    rows, prev = [], bytearray(stride)
    for y in range(h):
        ftype = raw[y * (stride + 1)]
        line = bytearray(raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)])
        if ftype == 1:  # Sub
            for i in range(ch, stride):
                line[i] = (line[i] + line[i - ch]) & 255
        elif ftype == 2:  # Up
            for i in range(stride):
                line[i] = (line[i] + prev[i]) & 255
        elif ftype == 3:  # Average
            for i in range(stride):
                left = line[i - ch] if i >= ch else 0
                line[i] = (line[i] + ((left + prev[i]) >> 1)) & 255
        elif ftype == 4:  # Paeth
            for i in range(stride):
                a = line[i - ch] if i >= ch else 0
                b = prev[i]
                c = prev[i - ch] if i >= ch else 0
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                pred = a if pa <= pb and pa <= pc else (b if pb <= pc else c)
                line[i] = (line[i] + pred) & 255
        elif ftype != 0:
            raise Failure(f"{path}: row {y} has unknown PNG filter type {ftype}")
        rows.append(line)
        prev = line
    return w, h, ch, rows


def hex_rgb(s):
    s = s.lstrip("#")
    if len(s) != 6:
        raise Failure(f"colour {s!r} in data-colors is not #rrggbb")
    return tuple(int(s[i:i + 2], 16) for i in (0, 2, 4))


def count_colours(img, rect, colours):
    w, h, ch, rows = img
    x0, y0, pw, ph = rect
    # stay 2 px inside the frame so the axis border does not count
    xs, xe = max(0, x0 + 2), min(w, x0 + pw - 2)
    ys, ye = max(0, y0 + 2), min(h, y0 + ph - 2)
    if xe <= xs or ye <= ys:
        raise Failure(f"plot area {rect} lies outside the {w}x{h} screenshot")
    counts = {k: 0 for k in colours}
    total = 0
    for y in range(ys, ye):
        row = rows[y]
        for x in range(xs, xe):
            i = x * ch
            r, g, b = row[i], row[i + 1], row[i + 2]
            total += 1
            for k, (cr, cg, cb) in colours.items():
                if abs(r - cr) <= COLOR_TOLERANCE and abs(g - cg) <= COLOR_TOLERANCE and \
                        abs(b - cb) <= COLOR_TOLERANCE:
                    counts[k] += 1
                    break
    return counts, total


def with_key(url, key):
    if not key:
        return url
    parts = urlsplit(url)
    q = [(k, v) for k, v in parse_qsl(parts.query) if k != "key"] + [("key", key)]
    return urlunsplit(parts._replace(query=urlencode(q)))


def check(args):
    chromium = find_chromium(args.chromium)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    url = with_key(args.url, args.api_key)
    if args.ranks > 1:
        parts = urlsplit(url)
        q = parse_qsl(parts.query) + [("rank", str(args.ranks - 1))]
        url = urlunsplit(parts._replace(query=urlencode(q)))
    print(f"chromium: {chromium}\nurl: {args.url}{' (with ?key=...)' if args.api_key else ''}")

    dom = run_chromium(chromium, url, ["--dump-dom"], args.budget_ms)
    (out / "dashboard.html").write_text(dom)
    scan = DomScan()
    scan.feed(dom)
    status = " ".join(scan.status.split()) or "(empty)"
    print(f"dump-dom: {len(dom)} chars saved to {out / 'dashboard.html'}; status line: {status}")
    if scan.body is None or scan.canvas is None:
        raise Failure("the page is not the llmem dashboard (no <body> or no <canvas id=\"chart\">"
                      "): is the server running and does it serve the dashboard at this URL?")
    if scan.body.get("data-ready") != "1":
        raise Failure(f"<body> lacks data-ready=\"1\" after {args.budget_ms} ms of virtual "
                      f"time: no successful /v1/memory poll was drawn (status line: {status})")
    print("ok: body data-ready=1")
    try:
        points = int(scan.canvas.get("data-points", ""))
    except ValueError:
        raise Failure(f"canvas data-points is {scan.canvas.get('data-points')!r}, not a number")
    if points < 2:
        raise Failure(f"canvas data-points = {points}, expected >= 2 samples drawn")
    print(f"ok: canvas data-points = {points} (>= 2)")
    if args.ranks > 1:
        want = [str(i) for i in range(args.ranks)]
        if scan.rank_options != args.ranks:
            raise Failure(f"the rank selector offers {scan.rank_options} ranks, expected "
                          f"{args.ranks}")
        if scan.rank_rows != want:
            raise Failure(f"the table of ranks has rows {scan.rank_rows}, expected {want}")
        if scan.canvas.get("data-rank") != want[-1]:
            raise Failure(f"the chart shows rank {scan.canvas.get('data-rank')!r}, expected "
                          f"{want[-1]} (opened with ?rank={want[-1]})")
        print(f"ok: {args.ranks} ranks in the selector and the table; the chart shows rank "
              f"{want[-1]}")
    try:
        colours = {k: hex_rgb(v) for k, v in json.loads(scan.canvas["data-colors"]).items()}
        rect = tuple(int(v) for v in scan.canvas["data-plot"].split(","))
        assert len(rect) == 4
    except (KeyError, ValueError, AssertionError) as e:
        raise Failure(f"canvas data-colors / data-plot missing or malformed ({e!r})")
    for k in ("weights", "kv_used", "kv_free"):
        if k not in colours:
            raise Failure(f"data-colors has no {k!r} entry: {sorted(colours)}")

    png = out / "dashboard.png"
    if png.exists():
        png.unlink()
    run_chromium(chromium, url, [f"--screenshot={png}"], args.budget_ms)
    if not png.exists() or png.stat().st_size == 0:
        raise Failure(f"Chromium wrote no screenshot at {png}")
    img = decode_png(png)
    print(f"screenshot: {png} ({img[0]}x{img[1]}, {img[2]} channels)")
    if (img[0], img[1]) != (WIDTH, HEIGHT):
        raise Failure(f"screenshot is {img[0]}x{img[1]}, expected {WIDTH}x{HEIGHT}")
    counts, total = count_colours(img, rect, colours)
    print(f"plot area x={rect[0]} y={rect[1]} w={rect[2]} h={rect[3]}: {total} pixels; "
          "pixels per component colour (±%d): " % COLOR_TOLERANCE +
          ", ".join(f"{k}={n}" for k, n in counts.items()))
    kv = counts["kv_used"] + counts["kv_free"]
    if counts["weights"] < args.min_pixels:
        raise Failure(f"only {counts['weights']} pixels of the weights colour in the plot area "
                      f"(need >= {args.min_pixels}): the stacked chart was not drawn")
    if kv < args.min_pixels:
        raise Failure(f"only {kv} pixels of the kv cache colours in the plot area "
                      f"(need >= {args.min_pixels}): the kv band was not drawn")
    print(f"ok: weights {counts['weights']} px, kv cache {kv} px (each >= {args.min_pixels})")


def main():
    ap = argparse.ArgumentParser(description="Check the llmem dashboard in headless Chromium.")
    ap.add_argument("url")
    ap.add_argument("out_dir")
    ap.add_argument("--chromium", help="Chromium binary (default: chromium on PATH)")
    ap.add_argument("--api-key", help="passed to the page as ?key=")
    ap.add_argument("--budget-ms", type=int, default=6000, help="virtual time to run the page")
    ap.add_argument("--min-pixels", type=int, default=2000)
    ap.add_argument("--ranks", type=int, default=1,
                    help="ranks of a TP/PP server: check the per-rank view (N >= 2)")
    args = ap.parse_args()
    try:
        check(args)
    except Failure as e:
        print(f"FAIL: {e}", file=sys.stderr)
        return 2 if str(e).startswith(("Chromium", "no Chromium", "--chromium")) else 1
    print("PASS: dashboard checks")
    return 0


if __name__ == "__main__":
    sys.exit(main())
