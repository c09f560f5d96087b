"""Tower footprints from site rows and records: FFP when possible, disk otherwise; persistence."""

from __future__ import annotations

import numpy as np
import pandas as pd
from odc.geo.geobox import GeoBox

from geoflux.footprint import load_footprints, save_footprints, tower_footprint
from geoflux.footprint.sites import footprint_records


def _grid() -> GeoBox:
    return GeoBox.from_bbox((480_000, 5_530_000, 500_000, 5_550_000), "EPSG:32632", resolution=100)


def _records(n: int = 2000, wd: float = 270.0, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    ws = rng.gamma(3, 1.0, n)
    df = pd.DataFrame({"USTAR": 0.12 * ws, "WS": ws, "WD": np.full(n, wd), "SW_IN": rng.uniform(0, 800, n)})
    df.attrs["resolution"] = "HH"
    return df


def _site(**kw) -> pd.Series:
    return pd.Series({"LAT": 50.0, "LON": 8.86, "HEIGHT_MEAS": 30.0, "HEIGHT_CANOPY": 15.0, **kw}, name="S1")


def test_ffp_from_records_points_upwind():
    gb = _grid()
    fw = tower_footprint(gb, _site(), _records(wd=270.0))  # wind from the west: source area to the west
    assert fw.method == "ffp-neutral"
    assert 0.9 < fw.coverage <= 1.0 + 1e-9
    _, cols = fw.window
    xs = gb.affine.c + gb.affine.a * (np.arange(cols.start, cols.stop) + 0.5)
    x_centroid = (fw.weights.sum(axis=0) * xs).sum() / fw.weights.sum()
    from geoflux.footprint import tower_xy

    x_tower, _ = tower_xy(gb, 8.86, 50.0)
    assert x_centroid < x_tower - 50  # metres west of the tower


def test_disk_fallbacks():
    gb = _grid()
    assert tower_footprint(gb, _site(HEIGHT_MEAS=np.nan), _records()).method == "disk"
    assert tower_footprint(gb, _site(), None).method == "disk"
    assert tower_footprint(gb, _site(), _records(), method="disk").method == "disk"


def test_record_sample_is_daytime_bounded_and_deterministic():
    recs = _records(5000)
    a = footprint_records(recs, 300, seed=1)
    b = footprint_records(recs, 300, seed=1)
    assert len(a) == 300 and (a["SW_IN"] > 20).all()
    pd.testing.assert_frame_equal(a, b)


def test_save_load_roundtrip(tmp_path):
    gb = _grid()
    fps = {"S1": tower_footprint(gb, _site(), _records()), "S2": tower_footprint(gb, _site(), None)}
    path = save_footprints(fps, tmp_path / "fp.npz")
    back = load_footprints(path)
    assert list(back) == ["S1", "S2"]
    for k in fps:
        assert back[k].method == fps[k].method and back[k].window == fps[k].window
        np.testing.assert_array_equal(back[k].weights, fps[k].weights)
