"""Budgets from written maps: weights by true period length, per pixel / class / region, intervals under
each correlation assumption, truth comparison, COG outputs and the CLI verb. Maps are built by hand from
known fields, and every figure is recomputed independently (daily expansion, numpy)."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import rasterio
from click.testing import CliRunner

from geoflux.cog import RasterSpec, save_catalog, stac_item_for_cog, write_cog
from geoflux.config import config_from_dict
from geoflux.cube import target_grid
from geoflux.pipeline import map_paths

NY = NX = 16
RES = 500.0
H05, H95 = 0.8, 1.2  # band half-widths below and above the map, gC m-2 d-1
OFFSET = 0.05  # map = truth + OFFSET


def _config(root: Path, truth: bool = True):
    data = {
        "catalog": "world/catalog.json",
        "variables": [
            {"name": "ta", "collection": "demo-ta", "asset": "data"},
            {
                "name": "landcover",
                "collection": "demo-landcover",
                "asset": "data",
                "kind": "categorical",
                "classes": [1, 2],
                "static": True,
            },
        ],
        "towers": {"files": "world/towers/*.csv", "sites": "world/sites.csv"},
        "grid": {
            "crs": "EPSG:32632",
            "resolution": RES,
            "bbox": [440000, 5572000 - NY * RES, 440000 + NX * RES, 5572000],
            "chunk": 16,
        },
        # 2020 is a leap year: its last MODIS period is 6 days, 2021's is 5
        "time": {"start": "2020-01-01", "end": "2021-12-31", "step": "MODIS8D"},
        "output": ".",
        **({"truth": "world/truth/*.tif"} if truth else {}),
    }
    return config_from_dict(data, base_dir=root)


def _tif(a: np.ndarray, gb, path: Path) -> None:
    """A plain float32 GeoTIFF (budgets read any GeoTIFF; COG conversion would only slow the test)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    profile = {"driver": "GTiff", "width": NX, "height": NY, "count": 1, "dtype": "float32"}
    with rasterio.open(path, "w", **profile, nodata=-9999.0, crs=gb.crs.to_wkt(), transform=gb.affine) as dst:
        dst.write(np.where(np.isnan(a), -9999.0, a).astype("float32"), 1)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A run folder with truth, maps (truth + OFFSET, one nodata pixel) and a land-cover catalog."""
    root = tmp_path_factory.mktemp("budgets")
    cfg = _config(root)
    gb = target_grid(cfg.grid)
    rng = np.random.default_rng(3)
    lc = np.where(np.arange(NX)[None, :] < 6, 1, 2).repeat(NY, axis=0).astype("uint8")
    path = root / "world" / "cogs" / "landcover.tif"
    write_cog(lc, gb, RasterSpec(path, dtype="uint8", nodata=0))
    t0 = dt.datetime(2000, 1, 1)
    items = {"demo-landcover": [stac_item_for_cog(path, gb, "landcover", t0, t0)]}
    save_catalog(root / "world", "test", "test world", items, gb)
    periods = cfg.periods()
    truth = rng.normal(-1.0, 2.0, (len(periods), NY, NX)).astype("float32")
    maps = truth + OFFSET
    maps[5, 3, 4] = np.nan  # one pixel missing in one 2020 period: out of 2020's budget only
    for i, p in enumerate(periods):
        _tif(truth[i], gb, root / "world" / "truth" / f"nee_{p:%Y%m%d}.tif")
        _tif(maps[i], gb, map_paths(cfg, "NEE")[p])
        _tif(maps[i] - H05, gb, map_paths(cfg, "NEE_q05")[p])
        _tif(maps[i] + H95, gb, map_paths(cfg, "NEE_q95")[p])
    return root, cfg, truth.astype("float64"), maps.astype("float64"), lc


def _daily_year_sums(stack: np.ndarray, periods: pd.DatetimeIndex, days: np.ndarray) -> pd.DataFrame:
    """Independent: repeat each period's field for each of its days, then sum by calendar year."""
    dates = pd.date_range(periods[0], periods[0] + pd.Timedelta(days=int(days.sum()) - 1), freq="D")
    daily = np.repeat(stack, days.astype(int), axis=0)
    return {y: daily[dates.year == y].sum(axis=0) for y in np.unique(dates.year)}


def test_budgets_against_independent_sums(run):
    from geoflux.analysis.budgets import compute_budgets

    _, cfg, truth, maps, lc = run
    out = compute_budgets(cfg)
    days = cfg.period_days()
    assert days.sum() == 366 + 365
    per_px = _daily_year_sums(maps, cfg.periods(), days)
    true_px = _daily_year_sums(truth, cfg.periods(), days)
    area = RES * RES
    for y in (2020, 2021):
        w = out["windows"][str(y)]
        assert w["complete"] and w["days"] == (366 if y == 2020 else 365)
        valid = np.isfinite(per_px[y])
        assert w["region"]["pixels"] == valid.sum() == (NY * NX - (1 if y == 2020 else 0))
        b = per_px[y][valid].mean()
        assert w["region"]["nee"] == pytest.approx(b, rel=1e-9)
        assert w["region"]["nee_total_tgc"] == pytest.approx(b * valid.sum() * area * 1e-12, rel=1e-9)
        # full correlation: bounds add (constant half-widths x days)
        lo, hi = w["region"]["intervals"]["full"]
        assert lo == pytest.approx(b - H05 * w["days"]) and hi == pytest.approx(b + H95 * w["days"])
        assert w["region"]["interval"] == [lo, hi]  # the default assumption
        # correlated within a period, independent between: quadrature over periods of days x half-width
        wsum2 = np.sqrt((days[cfg.periods().year == y] ** 2).sum())
        lo, hi = w["region"]["intervals"]["period"]
        assert lo == pytest.approx(b - H05 * wsum2) and hi == pytest.approx(b + H95 * wsum2)
        lo, hi = w["region"]["intervals"]["independent"]
        assert lo == pytest.approx(b - H05 * wsum2 / np.sqrt(valid.sum()))
        # classes
        for code in (1, 2):
            sel = valid & (lc == code)
            c = w["classes"][f"landcover={code}"]
            assert c["pixels"] == sel.sum()
            assert c["nee"] == pytest.approx(per_px[y][sel].mean(), rel=1e-9)
        # truth over the same pixels
        t = w["region"]["truth"]
        assert t["nee"] == pytest.approx(true_px[y][valid].mean(), rel=1e-9)
        assert t["error"] == pytest.approx(OFFSET * w["days"], rel=1e-6)
        assert t["covered"] == {"full": True, "period": True, "independent": False}
        assert t["pixel_coverage"] == 1.0
        assert t["pixel_rmse"] == pytest.approx(OFFSET * w["days"], rel=1e-5)
    s = out["truth_summary"]
    assert s["ranking_matches"] == (
        (out["windows"]["2020"]["region"]["nee"] < out["windows"]["2021"]["region"]["nee"])
        == (true_px[2020][np.isfinite(per_px[2020])].mean() < true_px[2021].mean())
    )


def test_budget_cogs_hold_the_pixel_budgets(run):
    from geoflux.analysis.budgets import compute_budgets

    root, cfg, _, maps, _ = run
    out = compute_budgets(cfg, correlation="period")
    per_px = _daily_year_sums(maps, cfg.periods(), cfg.period_days())
    with rasterio.open(root / "budgets" / "nee_2020.tif") as src:
        b20 = src.read(1, masked=True)
        assert src.tags(1)["units"] == "gC m-2 yr-1"
        assert src.tags()["correlation"] == "period"
    assert b20.mask[3, 4] and b20.mask.sum() == 1  # the pixel with a missing period has no budget
    np.testing.assert_allclose(b20.filled(np.nan), per_px[2020], rtol=1e-5)
    with rasterio.open(root / "budgets" / "nee-q95_2021.tif") as src:
        hi = src.read(1)
    d21 = cfg.period_days()[cfg.periods().year == 2021]
    np.testing.assert_allclose(hi, per_px[2021] + H95 * np.sqrt((d21**2).sum()), rtol=1e-5)
    with rasterio.open(root / "budgets" / "nee-anomaly_2021.tif") as src:
        an = src.read(1, masked=True)
    expected = per_px[2021] - (per_px[2020] + per_px[2021]) / 2
    np.testing.assert_allclose(an.filled(np.nan), expected, rtol=1e-4, atol=1e-3)
    table = pd.read_csv(root / "budgets" / "budgets.csv")
    assert set(table["region"]) == {"region", "landcover=1", "landcover=2"}
    saved = json.loads((root / "budgets" / "budgets.json").read_text())
    assert saved["windows"]["2021"]["region"]["nee"] == pytest.approx(out["windows"]["2021"]["region"]["nee"])


def test_window_weights_partial_periods(run):
    from geoflux.analysis.budgets import Window, compute_budgets

    _, cfg, _, maps, _ = run
    # 2020-12-29..2021-01-03: 3 days of 2020's 6-day last period, 2 days of 2021's first
    win = Window("newyear", pd.Timestamp("2020-12-29"), pd.Timestamp("2021-01-03"))
    out = compute_budgets(cfg, windows=[win], write=False)
    w = out["windows"]["newyear"]
    assert w["days"] == 5 and w["periods"] == 2 and w["complete"]
    k = list(cfg.periods()).index(pd.Timestamp("2020-12-26"))
    assert w["region"]["nee"] == pytest.approx((3 * maps[k] + 2 * maps[k + 1]).mean(), rel=1e-9)


def test_cli_budgets_and_one_line_errors(run, tmp_path):
    import shutil

    from cli.main import cli

    root, _, _, _, _ = run
    res = CliRunner().invoke(cli, ["budgets", str(root / "config.yaml")])
    assert res.exit_code == 1 and res.output.startswith("error: ")  # no config.yaml written yet
    copy = tmp_path / "run"
    shutil.copytree(root, copy)
    from geoflux.config import dump_config

    dump_config(_config(copy), copy / "config.yaml")
    res = CliRunner().invoke(cli, ["budgets", str(copy / "config.yaml")])
    assert res.exit_code == 0, res.output
    assert "2020:" in res.output and "true" in res.output and "inside" in res.output
    res = CliRunner().invoke(
        cli, ["budgets", str(copy / "config.yaml"), "--window", "2021-04-01", "2021-10-01", "--json"]
    )
    assert res.exit_code == 0
    assert json.loads(res.output)["windows"]["20210401-20211001"]["days"] == 183
    for f in (copy / "maps").glob("nee-q05_2021*.tif"):
        f.unlink()
    res = CliRunner().invoke(cli, ["budgets", str(copy / "config.yaml")])
    assert res.exit_code == 1
    assert res.output.count("\n") == 1 and "nee-q05_2021" in res.output and "map not found" in res.output
    res = CliRunner().invoke(
        cli, ["budgets", str(copy / "config.yaml"), "--window", "2021-05-01", "2021-04-01"]
    )
    assert res.exit_code == 1 and "end is not after start" in res.output
