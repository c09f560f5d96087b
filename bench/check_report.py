"""Open a geoflux report in headless Chromium, screenshot the first screen, check held-out skill leads.

Usage::

    python bench/check_report.py OUT/report/index.html [--screenshot first.png] [--full page.png] [--demo DIR]

``--demo DIR`` first runs ``geoflux demo --size tiny --out DIR`` (unless DIR/report/index.html exists) and
checks its report. Checks:

* every ``<img>`` in the HTML is a relative link to an existing, decodable, non-blank PNG;
* Chromium loads the page at 1400 × 900 px (one laptop screen) and writes a screenshot of that first screen
  (``--full`` also a 1400 × 6000 one). A small inline script, appended to a temporary copy of the page, writes
  the laid-out geometry into the DOM (read back with ``--dump-dom``): every image must have a non-zero natural
  width (decoded), the held-out skill table (``#held-out-skill``, with its ``nse`` header) must end inside the
  first screen, and nothing marked in-sample (``.in-sample``: the training-site comparisons) nor any figure
  may come before it.

Exits non-zero naming each problem. Needs ``chromium`` (``apt-get install -y chromium``); without it the
browser checks are skipped with a message saying so (exit 0 after the file checks).
"""

from __future__ import annotations

import argparse
import html
import json
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
FIRST_SCREEN = (1400, 900)  # px: what a reader sees before scrolling
# Appended to a copy of the page: after load, writes each image's natural width (0 = the browser could not
# decode it) and the layout of the lead section into the DOM, so that --dump-dom shows both.
PROBE = """<script>
window.addEventListener('load', () => {
  const out = document.createElement('pre'); out.id = 'geoflux-image-probe';
  const top = e => e ? e.getBoundingClientRect().top + window.scrollY : null;
  const bottom = e => e ? e.getBoundingClientRect().bottom + window.scrollY : null;
  const lead = document.getElementById('held-out-skill');
  const table = lead ? lead.querySelector('table') : null;
  const layout = {
    viewport: window.innerHeight,
    lead_top: top(lead), table_bottom: bottom(table),
    table_text: table ? table.innerText : '',
    in_sample_top: top(document.querySelector('.in-sample')),
    first_img_top: document.images.length ? top(document.images[0]) : null,
    images: Array.from(document.images).map(i => [i.getAttribute('src'), i.naturalWidth]),
  };
  out.textContent = JSON.stringify(layout);
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


def chromium() -> str | None:
    """The Chromium executable, or None."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return name
    return None


def lead_problems(layout: dict) -> list[str]:
    """Problems with the first screen, from the probe's layout (positions in CSS px from the page top)."""
    if layout.get("lead_top") is None:
        return ["first screen: no held-out skill section (#held-out-skill)"]
    if layout.get("table_bottom") is None:
        return ["first screen: the held-out skill section has no table"]
    problems = []
    if layout["table_bottom"] > layout["viewport"]:
        problems.append(
            f"first screen: the held-out skill table ends at {layout['table_bottom']:.0f} px, below the "
            f"{layout['viewport']} px screen"
        )
    if "nse" not in layout.get("table_text", ""):
        problems.append("first screen: the held-out skill table has no nse column")
    for what, key in (
        ("an in-sample (training-site) section", "in_sample_top"),
        ("a figure", "first_img_top"),
    ):
        if layout.get(key) is not None and layout[key] < layout["lead_top"]:
            problems.append(f"first screen: {what} comes before the held-out skill")
    return problems


def _run_chromium(exe: str, profile: str, args: list[str], text: bool = False) -> subprocess.CompletedProcess:
    return subprocess.run(
        [exe, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args],
        check=True,
        capture_output=True,
        text=text,
        timeout=120,
    )


def browser_check(index: Path, screenshot: Path, full: Path | None = None) -> tuple[list[str], dict | None]:
    """Load the page in headless Chromium: first-screen screenshot, image decoding and the lead's layout.

    Returns the problems and the probe's layout (None when Chromium is not installed: nothing was checked).
    """
    exe = chromium()
    if exe is None:
        return [], None
    w, h = FIRST_SCREEN
    with tempfile.TemporaryDirectory() as profile:
        _run_chromium(
            exe, profile, [f"--screenshot={screenshot}", f"--window-size={w},{h}", index.resolve().as_uri()]
        )
        if full is not None:
            _run_chromium(
                exe, profile, [f"--screenshot={full}", f"--window-size={w},6000", index.resolve().as_uri()]
            )
        probe_page = index.parent / ".probe.html"
        try:
            probe_page.write_text(index.read_text(encoding="utf-8").replace("</body>", PROBE + "</body>"))
            dom = _run_chromium(
                exe,
                profile,
                [
                    f"--window-size={w},{h}",
                    "--virtual-time-budget=5000",
                    "--dump-dom",
                    probe_page.resolve().as_uri(),
                ],
                text=True,
            ).stdout
        finally:
            probe_page.unlink(missing_ok=True)
    m = re.search(r'<pre id="geoflux-image-probe">(.*?)</pre>', dom, re.S)
    if not m:
        return ["chromium: the page did not finish loading (no probe output)"], {}
    layout = json.loads(html.unescape(m.group(1)))
    problems = [
        f"{src}: broken image in the browser (naturalWidth 0)" for src, nw in layout["images"] if nw == 0
    ]
    problems += lead_problems(layout)
    if not screenshot.exists() or screenshot.read_bytes()[:8] != PNG_MAGIC:
        problems.append(f"{screenshot}: no screenshot written")
    return problems, layout


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("index", nargs="?", type=Path, help="report/index.html")
    ap.add_argument("--demo", type=Path, help="run 'geoflux demo --size tiny' into this folder first")
    ap.add_argument(
        "--screenshot",
        type=Path,
        default=None,
        help="first screen PNG (default: first-screen.png beside the report, never in the checkout)",
    )
    ap.add_argument("--full", type=Path, default=None, help="also a 1400 x 6000 px screenshot here")
    args = ap.parse_args(argv)
    index = args.index
    if args.demo is not None:
        index = args.demo / "report" / "index.html"
        if not index.exists():
            subprocess.run(["geoflux", "demo", "--size", "tiny", "--out", str(args.demo)], check=True)
    if index is None or not index.exists():
        print(f"error: {index}: report not found", file=sys.stderr)
        return 1
    problems = check_files(index)
    shot = args.screenshot or index.parent / "first-screen.png"
    browser, layout = browser_check(index, shot, args.full)
    problems += browser
    for p in problems:
        print(f"error: {p}", file=sys.stderr)
    if problems:
        return 1
    parser = _Imgs()
    parser.feed(index.read_text(encoding="utf-8"))
    n = len(parser.srcs)
    if layout is None:
        print(
            f"skipped: chromium not found (apt-get install -y chromium); {index}: {n} images pass the file "
            "checks"
        )
        return 0
    print(
        f"ok: {index}: {n} images load in Chromium; held-out skill table ends at "
        f"{layout['table_bottom']:.0f} px "
        f"of the {layout['viewport']} px first screen, before any figure or in-sample section; "
        f"screenshot {shot}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
