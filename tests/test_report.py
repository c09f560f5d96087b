"""The report: leads with held-out skill, every image link resolves to a real PNG, partial runs still "
"report."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
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


def _cells(html_text: str, start: str) -> list[list[str]]:
    """Text of the first table after ``start``, row by row (header first)."""
    i = html_text.index(start)
    table = html_text[html_text.index("<table", i) : html_text.index("</table>", i)]
    return [
        [re.sub(r"<[^>]+>", "", c).strip() for c in re.findall(r"<t[hd][^>]*>(.*?)</t[hd]>", row, re.S)]
        for row in re.findall(r"<tr[^>]*>(.*?)</tr>", table, re.S)
    ]


def test_pipeline_writes_the_report(tiny_run):
    out, _ = tiny_run
    index = out / "report" / "index.html"
    assert index.exists() and not (out / "report.part").exists()
    parser = check_report(index)
    names = {Path(s).name for s in parser.srcs}
    assert {"scatter_cv.png", "error.png", "towers.png", "scatter.png", "timeseries.png", "maps.png"} <= names
    assert "budget.png" in names
    html = index.read_text()
    for h in (
        "Held-out skill",
        "Held-out skill per site",
        "Map vs truth (generated world)",
        "Towers over the region",
        "Map at the training towers (in-sample)",
        "Skill",
        "NEE budget",
        "Run configuration and provenance",
    ):
        assert h in parser.headings
    # held-out skill leads: first section, before any figure and anything on training sites
    assert parser.headings[0] == "Held-out skill"
    assert html.index("id='held-out-skill'") < min(html.index("<img"), html.index("in-sample"))
    assert "Footprint validation" in html and "held-out (CV)" in html and "gC m-2 d-1" in html
    assert "not drawn" not in html.split("Driver analysis")[0]  # everything before the optional analysis


def test_held_out_table_copies_metrics_json(tiny_run):
    """The lead table shows metrics.json's cv values (and band coverage), counts as integers."""
    out, _ = tiny_run
    m = json.loads((out / "validation" / "metrics.json").read_text())
    html = (out / "report" / "index.html").read_text()
    header, row = _cells(html, "id='held-out-skill'")[:2]
    got = dict(zip(header, row, strict=True))
    cv = m["cv"]
    assert got["sites"] == str(cv["n_sites"]) and got["n"] == str(cv["n"])
    for k in ("nse", "r2_pearson", "rmse", "bias"):
        assert got[k] == f"{cv[k]:.3f}", k
    assert got["90% band coverage"] == f"{cv['uncertainty']['coverage']:.3f}"
    # the maps' band rule, with the saved model's own margin and DI slope
    card = json.loads((out / "model" / "model.json").read_text())
    assert f"{card['conformal_margin']:.3f} gC m-2 d-1 × (1 + {card['margin_di_slope']:.2f} × DI" in html
    header, row = _cells(html, "Map vs the known true field")[:2]
    truth = dict(zip(header, row, strict=True))
    assert truth["nse"] == f"{m['truth']['nse']:.3f}" and truth["pixel-steps"] == str(m["truth"]["n"])
    # no count printed as a float anywhere (the multi-scale table's n came out as 121.000 before)
    for start in ("<h3>Multi-scale", "Held-out skill per site", "<h3>Summary</h3>"):
        rows = _cells(html, start)
        for col in ("n", "n_sites"):
            if col in rows[0]:
                assert all(re.fullmatch(r"\d+|–", r[rows[0].index(col)]) for r in rows[1:]), (start, col)


def test_per_site_table_matches_the_site_csv(tiny_run):
    import pandas as pd

    out, _ = tiny_run
    csv = pd.read_csv(out / "validation" / "skill_site.csv")
    cv = csv.loc[csv["source"] == "cv"].set_index("site")
    rows = _cells((out / "report" / "index.html").read_text(), "Held-out skill per site")
    header, body = rows[0], rows[1:]
    assert len(body) == len(cv) and header[:3] == ["site", "igbp", "n"]
    nse = [float(r[header.index("nse")]) for r in body]
    assert nse == sorted(nse)  # worst first
    for r in body:
        site = r[0]
        assert r[header.index("nse")] == f"{cv.loc[site, 'nse']:.3f}"
        assert r[header.index("band coverage")] == f"{cv.loc[site, 'interval_coverage']:.3f}"


def test_source_area_level_holds_the_fraction():
    """The level encloses the smallest pixel set with >= 80 % of the weight (checked by brute force)."""
    from geoflux.report import source_area_level

    rng = np.random.default_rng(3)
    w = rng.gamma(0.6, size=(15, 12))
    w /= w.sum()
    level = source_area_level(w, 0.8)
    inside = w > level
    assert w[inside].sum() >= 0.8
    # dropping the lightest pixel inside would fall below the fraction: no smaller set qualifies
    assert w[inside].sum() - w[inside].min() < 0.8
    # nothing lies between the lightest pixel in and the heaviest out: a contour at the level separates them
    assert w[inside].min() > level > w[~inside].max()


def test_graticule_lines_are_where_pyproj_puts_them():
    import matplotlib.pyplot as plt
    from pyproj import Transformer

    from geoflux.report import graticule

    extent = (440000.0, 464000.0, 5556000.0, 5580000.0)  # UTM 32N around 8.3 E, 50.2 N
    fig, ax = plt.subplots()
    ax.set_xlim(extent[:2])
    ax.set_ylim(extent[2:])
    drawn = graticule(ax, "EPSG:32632", extent)
    assert {k for k, _ in drawn} == {"lon", "lat"} and len(drawn) >= 3
    assert ax.get_xlim() == extent[:2] and ax.get_ylim() == extent[2:]
    to_ll = Transformer.from_crs("EPSG:32632", "EPSG:4326", always_xy=True)
    for (kind, value), line in zip(drawn, ax.lines, strict=True):
        lon, lat = to_ll.transform(*line.get_data())
        got = np.asarray(lon if kind == "lon" else lat)
        assert np.allclose(got, value, atol=1e-6), (kind, value)
    assert graticule(ax, "EPSG:4326", extent) == []  # geographic axes already are lon/lat
    plt.close(fig)


def test_step_norms_split_only_when_a_shared_scale_hides_a_step():
    from geoflux.report import step_norms

    winter, summer = np.linspace(-0.3, 0.3, 100), np.linspace(-6, 6, 100)
    norms, per_step = step_norms([winter, summer])
    assert per_step and norms[0].vmax < 0.5 and norms[1].vmax > 5
    norms, per_step = step_norms([summer * 0.8, summer])
    assert not per_step and norms[0].vmax == norms[1].vmax


def test_report_shows_analysis_and_budgets_when_present(tiny_run, tmp_path):
    """analysis/ and budgets/ outputs (written here by hand, small) become report sections."""
    import matplotlib.pyplot as plt
    import pandas as pd

    from geoflux.config import load_config
    from geoflux.report import write_report

    src, _ = tiny_run
    dst = tmp_path / "run"
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("report"))
    (dst / "analysis").mkdir()
    pd.DataFrame({"driver": ["ndvi", "ta"], "importance": [1.5, 0.2], "importance_std": [0.1, 0.05]}).to_csv(
        dst / "analysis" / "importance.csv", index=False
    )
    pd.DataFrame(
        {"driver": ["ndvi"] * 5 + ["ta"] * 5, "value": list(range(5)) * 2, "nee": np.arange(10.0)}
    ).to_csv(dst / "analysis" / "partial_dependence.csv", index=False)
    fig, ax = plt.subplots(figsize=(4, 3))
    ax.imshow(np.arange(100.0).reshape(10, 10))
    fig.savefig(dst / "analysis" / "pd2_ndvi__ta.png", dpi=100)
    plt.close(fig)
    doc = {"dependence": {"interactions": [{"pair": ["ndvi", "ta"], "h2": 0.4321}]}}
    (dst / "analysis" / "analysis.json").write_text(json.dumps(doc))
    (dst / "budgets").mkdir()
    (dst / "budgets" / "budgets.json").write_text(json.dumps({"units": "gC m-2", "interval": "90% band"}))
    pd.DataFrame({"window": ["2021"], "region": ["region"], "pixels": [2304.0], "nee": [-225.08]}).to_csv(
        dst / "budgets" / "budgets.csv", index=False
    )
    attribution = {
        "units": "gC m-2 yr-1",
        "groups": {"ta+lst": ["ta", "lst"]},
        "collinearity": {"threshold": 0.8},
        "extrapolation": {
            "flagged": [
                {"message": "2022: with sm held at its climatology 11.0% of the pixel-days are outside"}
            ]
        },
    }
    (dst / "analysis" / "attribution_years.json").write_text(json.dumps(attribution))
    pd.DataFrame(
        {
            "region": ["region", "landcover=1"],
            "year": [2022, 2022],
            "anomaly": [81.25, 3.0],
            "first_driver": "sm",
            "outside_aoa": [0.05, 0.04],
            "outside_aoa_sm": [0.11, 0.2],
        }
    ).to_csv(dst / "analysis" / "attribution_years.csv", index=False)
    proj = dst / "budgets" / "scenarios" / "warming_2K"
    proj.mkdir(parents=True)
    projection = {
        "scenario": {"name": "warming_2K"},
        "aoa": {"outside_share": 0.073, "base_outside_share": 0.067},
        "budgets": {"2022": {"nee": -10.0, "interval": [-50.0, 30.0], "change": 19.5}},
    }
    (proj / "projection.json").write_text(json.dumps(projection))
    index = write_report(load_config(dst / "config.yaml"))
    parser = check_report(index)
    names = {Path(s).name for s in parser.srcs}
    assert {"importance.png", "dependence.png", "analysis-pd2_ndvi__ta.png"} <= names
    years = _cells(index.read_text(), "Why the budget differs between years")
    assert years[1][:2] == ["2022", "81.250"] and len(years) == 2  # the region row only
    assert "ta+lst" in index.read_text()  # collinear drivers named
    assert "outside_aoa" not in years[0]  # the shares have their own table, with the flagged line
    shares = _cells(index.read_text(), "combinations of drivers the towers may never have seen")
    assert shares[0] == ["year", "outside_aoa", "outside_aoa_sm"] and shares[1] == ["2022", "0.050", "0.110"]
    assert "with sm held at its climatology 11.0%" in index.read_text()
    scen = _cells(index.read_text(), "Scenarios (geoflux project)")
    assert scen[1][scen[0].index("change")] == "19.500" and scen[1][scen[0].index("outside AOA")] == "0.073"
    html = index.read_text()
    assert "Driver analysis" in parser.headings and "not drawn" not in html
    assert _cells(html, "<h3>Interactions</h3>")[1] == ["ndvi × ta", "0.432"]
    budgets = _cells(html, "Budgets with intervals")
    assert budgets[1][budgets[0].index("pixels")] == "2304"  # a count, printed as one


def _check_report_module():
    spec = importlib.util.spec_from_file_location(
        "check_report", Path(__file__).resolve().parents[1] / "bench" / "check_report.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_first_screen_rules():
    """bench/check_report.py's first-screen rules on laid-out positions (no browser needed)."""
    lead = _check_report_module().lead_problems
    ok = {
        "viewport": 900,
        "lead_top": 150,
        "table_bottom": 360,
        "table_text": "sites n nse",
        "first_img_top": 600,
    }
    assert lead({**ok, "in_sample_top": 2000}) == []
    assert "below the 900 px screen" in lead({**ok, "table_bottom": 1200})[0]
    assert "in-sample" in lead({**ok, "in_sample_top": 100})[0]
    assert "a figure comes before" in lead({**ok, "first_img_top": 100})[0]
    assert "no held-out skill section" in lead({"viewport": 900, "lead_top": None})[0]


@pytest.mark.skipif(shutil.which("chromium") is None, reason="chromium not installed (bench/check_report.py)")
def test_first_screen_in_chromium(tiny_run, tmp_path):
    """Headless Chromium lays the report out; the held-out table ends inside the first 1400 x 900 screen."""
    mod = _check_report_module()
    out, _ = tiny_run
    problems, layout = mod.browser_check(out / "report" / "index.html", tmp_path / "first.png")
    assert problems == [] and layout["table_bottom"] < layout["viewport"]
    assert (tmp_path / "first.png").read_bytes()[:8] == PNG_MAGIC


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
