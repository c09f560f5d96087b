"""One metric vocabulary: ``nse`` (1 − SSE/SST), ``r2_pearson`` (squared Pearson correlation), ``rmse``,
``bias``, ``n`` in every output; no bare ``r2`` key anywhere, and the report shows the metrics.json values."""

from __future__ import annotations

import html
import json
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from geoflux.metrics import scores, summarize_metrics

BANNED = "r2"


def _keys(obj, path: str = "") -> list[tuple[str, str]]:
    """Every (path, key) of nested dicts and lists, e.g. ('cv/folds/0', 'nse')."""
    out = []
    if isinstance(obj, dict):
        for k, v in obj.items():
            out.append((path, str(k)))
            out += _keys(v, f"{path}/{k}")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out += _keys(v, f"{path}/{i}")
    return out


def test_run_outputs_have_no_bare_r2_key(tiny_run):
    out, _ = tiny_run
    files = [out / "validation" / "metrics.json", out / "model" / "cv_metrics.json"]
    for f in files:
        keys = _keys(json.loads(f.read_text()))
        assert len(keys) > 20, f  # the walk saw the nested tables
        bad = [f"{p}/{k}" for p, k in keys if k == BANNED]
        assert not bad, f"{f}: bare 'r2' keys at {bad}"
    for csv in sorted((out / "validation").glob("skill_*.csv")):
        cols = list(pd.read_csv(csv, nrows=0).columns)
        assert BANNED not in cols and {"nse", "r2_pearson"} <= set(cols), (csv, cols)
    metrics = json.loads(files[0].read_text())
    for key in ("cv", "towers"):
        assert {"nse", "r2_pearson", "rmse", "bias", "n"} <= set(metrics[key]), key
    assert "nse" in metrics["truth"] and "nse" in metrics["truth_aoa"]["inside"]


def test_towers_entry_is_the_footprint_validation_pairs(tiny_run):
    """metrics.json ``towers`` pools the very pairs of the skill tables (map rows, every role)."""
    out, _ = tiny_run
    metrics = json.loads((out / "validation" / "metrics.json").read_text())
    pairs = pd.read_parquet(out / "validation" / "pairs.parquet")
    m = pairs.loc[pairs["source"] == "map"]
    o, p = m["obs"].to_numpy(float), m["pred"].to_numpy(float)
    w = metrics["towers"]
    assert w["n"] == len(m)
    assert w["n"] == sum(
        r["n"] for r in metrics["footprint_validation"]["tables"]["overall"] if r["source"] == "map"
    )
    assert (m["fp_valid"] >= metrics["footprint_validation"]["min_footprint_valid"]).all()
    assert w["nse"] == pytest.approx(1 - ((p - o) ** 2).sum() / ((o - o.mean()) ** 2).sum())
    assert w["r2_pearson"] == pytest.approx(np.corrcoef(o, p)[0, 1] ** 2)
    assert w["bias"] == pytest.approx((p - o).mean())


class _Cells(HTMLParser):
    """Text of the <td>/<th> cells, row by row."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[list[str]] = []
        self._cell: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        if tag == "tr":
            self.rows.append([])
        elif tag in ("td", "th"):
            self._cell = []

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self.rows[-1].append("".join(self._cell).strip())
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


def _summary_table(index: Path) -> list[list[str]]:
    text = index.read_text()
    start = text.index("<h3>Summary</h3>")
    parser = _Cells()
    parser.feed(text[start : text.index("</table>", start)])
    return parser.rows


def test_report_headline_shows_the_metrics_json_values(tiny_run):
    from geoflux.report import HEADLINE_KEYS, headline

    out, _ = tiny_run
    metrics = json.loads((out / "validation" / "metrics.json").read_text())
    rows = _summary_table(out / "report" / "index.html")
    header, body = rows[0], rows[1:]
    assert header == list(headline(metrics).columns)
    assert "NSE (1-SSE/SST)" in header and "r² (Pearson)" in header
    assert len(body) == 3  # truth, cv, towers
    for cells, key in zip(body, ("truth", "cv", "towers"), strict=True):
        for col, k in zip(header[1:], HEADLINE_KEYS, strict=True):
            v = metrics[key].get(k)
            want = "–" if v is None else (str(v) if k == "n" else f"{v:.3f}")
            assert cells[header.index(col)] == want, (key, col, cells)
    # the printed summary at the top of the report says which statistic each number is
    pre = summarize_metrics(metrics)
    assert f"NSE {metrics['truth']['nse']:.3f}" in pre
    assert f"NSE {metrics['towers']['nse']:.3f}  r² (Pearson) {metrics['towers']['r2_pearson']:.3f}" in pre
    assert f"NSE {metrics['cv']['nse']:.3f}  r² (Pearson) {metrics['cv']['r2_pearson']:.3f}" in pre
    assert "R2" not in pre
    assert html.escape(pre) in (out / "report" / "index.html").read_text()


def test_scores_match_a_hand_computation():
    obs = np.array([1.0, 2.0, 3.0, 4.0, np.nan])
    pred = np.array([2.0, 2.0, 4.0, 6.0, 1.0])
    s = scores(obs, pred)
    # by hand on the 4 valid pairs: errors 1, 0, 1, 2 -> SSE 6; obs mean 2.5 -> SST 5
    assert s["n"] == 4
    assert s["nse"] == pytest.approx(1 - 6 / 5)  # -0.2: worse than the observed mean
    # pred mean 3.5; cov = sum((o-2.5)(p-3.5)) = 1.5*1.5 + 0.5*1.5 + 0.5*0.5 + 1.5*2.5 = 7
    # sum((p-3.5)^2) = 2.25 + 2.25 + 0.25 + 6.25 = 11 -> r² = 49 / (5 * 11)
    assert s["r2_pearson"] == pytest.approx(49 / 55)
    assert s["rmse"] == pytest.approx(np.sqrt(6 / 4))
    assert s["bias"] == pytest.approx(1.0)
    assert BANNED not in s
    # a shift keeps the correlation and costs NSE; a constant prediction has no correlation
    shifted = scores(obs, obs + 10)
    assert shifted["r2_pearson"] == pytest.approx(1.0) and shifted["nse"] < -10
    flat = scores(obs, np.full_like(obs, 2.5))
    assert np.isnan(flat["r2_pearson"]) and flat["nse"] == pytest.approx(0.0)
