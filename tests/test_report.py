"""The report: written by the pipeline, every image link resolves to a real PNG, partial runs still report."""

from __future__ import annotations

import shutil
from html.parser import HTMLParser
from pathlib import Path

import pytest
from click.testing import CliRunner

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


class _Images(HTMLParser):
    def __init__(self):
        super().__init__()
        self.srcs: list[str] = []
        self.headings: list[str] = []
        self._in_h2 = False

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.srcs.append(dict(attrs).get("src", ""))
        self._in_h2 = tag == "h2"

    def handle_data(self, data):
        if self._in_h2:
            self.headings.append(data.strip())
            self._in_h2 = False


def check_report(index: Path) -> _Images:
    """Every <img> of ``index`` is a relative link to an existing, decodable PNG with content."""
    import matplotlib.image as mpimg

    parser = _Images()
    parser.feed(index.read_text(encoding="utf-8"))
    assert parser.srcs, "the report has no images"
    for src in parser.srcs:
        assert "://" not in src and not src.startswith("/"), f"{src}: not a relative link"
        png = index.parent / src
        assert png.exists(), f"{src}: broken image link"
        assert png.read_bytes()[:8] == PNG_MAGIC, f"{src}: not a PNG"
        img = mpimg.imread(png)
        assert img.shape[0] > 200 and img.shape[1] > 200
        assert img[..., :3].std() > 0.01, f"{src}: blank image"
    return parser


def test_pipeline_writes_the_report(tiny_run):
    out, _ = tiny_run
    index = out / "report" / "index.html"
    assert index.exists() and not (out / "report.part").exists()
    parser = check_report(index)
    names = {Path(s).name for s in parser.srcs}
    assert {"towers.png", "scatter.png", "timeseries.png", "maps.png", "budget.png"} <= names
    html = index.read_text()
    for h in (
        "Towers over the region",
        "Predicted vs observed",
        "Skill",
        "NEE budget",
        "Run configuration and provenance",
    ):
        assert h in parser.headings
    assert "Footprint validation" in html and "held-out (CV)" in html and "gC m-2 d-1" in html
    assert "not drawn" not in html.split("Driver importance")[0]  # everything before the optional analysis


def test_report_of_a_partial_run_says_what_is_missing(tiny_run, tmp_path):
    """Without the model files, pairs and truth the report still writes, and says what it left out."""
    from cli.main import cli

    src, _ = tiny_run
    dst = tmp_path / "run"
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("report", "*.skops", "cv_*", "pairs.parquet"))
    (dst / "model" / "model.json").unlink()
    res = CliRunner().invoke(cli, ["report", str(dst / "config.yaml"), "--date", "2021-04-01"])
    assert res.exit_code == 0, res.output
    index = Path(res.stdout.strip().splitlines()[-1])
    assert index == dst / "report" / "index.html"
    check_report(index)
    html = index.read_text()
    assert "scatter not drawn" in html and "validation/pairs.parquet not found" in html
    assert "2021-03-30" in html  # the map period containing --date 2021-04-01 is named in the caption
    bad = CliRunner().invoke(cli, ["report", str(dst / "config.yaml"), "--date", "1999-01-01", "--overwrite"])
    assert bad.exit_code == 1 and "no map period contains it" in bad.output


def test_report_needs_validation(tiny_world):
    from cli.main import cli

    res = CliRunner().invoke(cli, ["report", str(tiny_world / "config.yaml")])
    assert res.exit_code == 1 and "metrics.json: not found" in res.output


@pytest.mark.parametrize("n", [1, 3])
def test_pick_sites_one_per_class(n):
    import pandas as pd

    from geoflux.report import pick_sites

    pairs = pd.DataFrame(
        {
            "source": "map",
            "role": ["training"] * 4 + ["held-out"] * 2,
            "igbp": ["ENF", "ENF", "GRA", "GRA", "CRO", "CRO"],
            "site": ["A", "A", "B", "B", "C", "C"],
        }
    )
    got = pick_sites(pairs, n)
    assert len(got) == n and (n == 1 or set(got) == {"A", "B", "C"})
