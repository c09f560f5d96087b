"""Open a geoflux report in headless Chromium, take a screenshot, and check that no image is broken.

Usage::

    python bench/check_report.py OUT/report/index.html [--screenshot report.png] [--demo DIR]

``--demo DIR`` first runs ``geoflux demo --size tiny --out DIR`` (unless DIR/report/index.html exists) and
checks its report. Checks: every ``<img>`` in the HTML is a relative link to an existing, decodable,
non-blank PNG; Chromium loads the page (``--dump-dom`` shows every image element with a non-zero natural
width, measured by a small inline script appended to a temporary copy of the page) and writes a
screenshot. Exits non-zero naming the first problem. Needs ``chromium`` (``apt-get install -y chromium``).
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
from html.parser import HTMLParser
from pathlib import Path

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--hide-scrollbars",
]
# Appended to a copy of the page: after load, writes each image's natural width into the DOM so that
# --dump-dom shows whether the browser could decode it (a broken image has naturalWidth 0).
PROBE = """<script>
window.addEventListener('load', () => {
  const out = document.createElement('pre'); out.id = 'geoflux-image-probe';
  out.textContent = Array.from(document.images)
    .map(i => i.getAttribute('src') + ' ' + i.naturalWidth).join('\\n');
  document.body.appendChild(out);
});
</script>"""


class _Imgs(HTMLParser):
    def __init__(self):
        super().__init__()
        self.srcs: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.srcs.append(dict(attrs).get("src") or "")


def check_files(index: Path) -> list[str]:
    """Problems with the report's image links (empty list when all are fine)."""
    import matplotlib.image as mpimg

    p = _Imgs()
    p.feed(index.read_text(encoding="utf-8"))
    problems = [] if p.srcs else [f"{index}: no <img> elements"]
    for src in p.srcs:
        png = index.parent / src
        if "://" in src or src.startswith("/"):
            problems.append(f"{src}: not a relative link")
        elif not png.is_file():
            problems.append(f"{src}: file missing")
        elif png.read_bytes()[:8] != PNG_MAGIC:
            problems.append(f"{src}: not a PNG")
        elif float(mpimg.imread(png)[..., :3].std()) < 0.01:
            problems.append(f"{src}: blank image")
    return problems


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return name
    raise SystemExit("error: chromium not found (apt-get install -y chromium)")


def browser_check(index: Path, screenshot: Path, width: int = 1400, height: int = 3000) -> list[str]:
    """Load the page in headless Chromium: screenshot, and natural widths of all images via --dump-dom."""
    exe = chromium()
    problems = []
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run(
            [
                exe,
                *CHROMIUM_FLAGS,
                f"--user-data-dir={profile}",
                f"--screenshot={screenshot}",
                f"--window-size={width},{height}",
                index.resolve().as_uri(),
            ],
            check=True,
            capture_output=True,
            timeout=120,
        )
        probe_page = index.parent / ".probe.html"
        try:
            probe_page.write_text(index.read_text(encoding="utf-8").replace("</body>", PROBE + "</body>"))
            dom = subprocess.run(
                [
                    exe,
                    *CHROMIUM_FLAGS,
                    f"--user-data-dir={profile}",
                    "--virtual-time-budget=5000",
                    "--dump-dom",
                    probe_page.resolve().as_uri(),
                ],
                check=True,
                capture_output=True,
                text=True,
                timeout=120,
            ).stdout
        finally:
            probe_page.unlink(missing_ok=True)
    m = re.search(r'<pre id="geoflux-image-probe">(.*?)</pre>', dom, re.S)
    if not m:
        return ["chromium: the page did not finish loading (no probe output)"]
    for line in m.group(1).strip().splitlines():
        src, w = line.rsplit(" ", 1)
        if int(w) == 0:
            problems.append(f"{src}: broken image in the browser (naturalWidth 0)")
    if not screenshot.exists() or screenshot.read_bytes()[:8] != PNG_MAGIC:
        problems.append(f"{screenshot}: no screenshot written")
    return problems


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("index", nargs="?", type=Path, help="report/index.html")
    ap.add_argument("--demo", type=Path, help="run 'geoflux demo --size tiny' into this folder first")
    ap.add_argument("--screenshot", type=Path, default=Path("report-screenshot.png"))
    args = ap.parse_args(argv)
    index = args.index
    if args.demo is not None:
        index = args.demo / "report" / "index.html"
        if not index.exists():
            subprocess.run(["geoflux", "demo", "--size", "tiny", "--out", str(args.demo)], check=True)
    if index is None or not index.exists():
        print(f"error: {index}: report not found", file=sys.stderr)
        return 1
    problems = check_files(index) + browser_check(index, args.screenshot)
    for p in problems:
        print(f"error: {p}", file=sys.stderr)
    if not problems:
        parser = _Imgs()
        parser.feed(index.read_text(encoding="utf-8"))
        n = len(parser.srcs)
        print(f"ok: {index}: {n} images load in Chromium; screenshot {args.screenshot}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
