"""The catalog and cube stages against a real STAC API: stac-fastapi-pgstac over PostgreSQL + PostGIS.

One server per module (started once, ~10 s) holding the tiny demo world's collections and the recorded
Planetary Computer MODIS items (hrefs rewritten to local COGs on the items' own sinusoidal grid).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pystac
import pytest
import xarray as xr
from stac_server import (
    PgstacServer,
    modis_pattern,
    pgstac_unavailable,
    stac_docs_from_static,
    write_modis_cogs,
)

from geoflux.config import GridSpec, load_config
from geoflux.errors import CatalogError

MODIS_ASSETS = [
    "500m_16_days_NDVI",
    "500m_16_days_VI_Quality",
    "500m_16_days_red_reflectance",
    "500m_16_days_NIR_reflectance",
]


@pytest.fixture(scope="module")
def modis_items(realdata, tmp_path_factory) -> list[pystac.Item]:
    """The recorded modis-13A1-061 items; the Terra one with hrefs rewritten to local COGs."""
    folder = realdata / "stac" / "modis-061" / "modis-13A1-061"
    out = []
    cogs = tmp_path_factory.mktemp("modis")
    for f in sorted(folder.glob("M*.json")):
        item = pystac.Item.from_dict(json.loads(f.read_text()))
        if item.id.startswith("MOD13A1"):
            item = write_modis_cogs(item, cogs, MODIS_ASSETS)
        out.append(item)
    return out


@pytest.fixture(scope="module")
def pgstac(realdata, tiny_world_pristine, modis_items):
    reason = pgstac_unavailable()
    if reason:
        pytest.skip(f"pgstac STAC API unavailable: {reason}")
    colls, items = stac_docs_from_static(tiny_world_pristine / "world" / "catalog.json")
    modis_coll = json.loads((realdata / "stac/modis-061/modis-13A1-061/collection.json").read_text())
    modis_coll["links"] = []
    modis_docs = []
    for it in modis_items:
        d = it.to_dict(include_self_link=False, transform_hrefs=False)
        d["links"] = []
        for a in d["assets"].values():
            if a["href"].startswith("/"):
                a["href"] = Path(a["href"]).as_uri()
        modis_docs.append(d)
    with PgstacServer() as srv:
        srv.load([*colls, modis_coll], [*items, *modis_docs])
        yield srv


def test_api_search_pages_and_matches_static(pgstac, tiny_world_pristine):
    from pystac_client import Client

    from geoflux.catalog import search_items

    static = search_items(str(tiny_world_pristine / "world/catalog.json"), "demo-ndvi")
    api = search_items(pgstac.url, "demo-ndvi", limit=5)
    assert [i.id for i in api] == [i.id for i in static]
    assert all(
        i.assets["data"].href == Path(s.assets["data"].href).as_uri()
        for i, s in zip(api, static, strict=True)
    )
    # the 16 items really come in pages of 5 (4 pages) that pystac-client follows
    pages = list(Client.open(pgstac.url).search(collections=["demo-ndvi"], limit=5, max_items=100).pages())
    assert [len(p.items) for p in pages] == [5, 5, 5, 1]
    # max_items bounds the search even when more pages exist
    assert len(search_items(pgstac.url, "demo-ndvi", limit=5, max_items=7)) == 7
    # time window: same 8-day overlap rule as the static walk
    t = search_items(pgstac.url, "demo-ndvi", None, "2021-03-20", "2021-04-10")
    assert [i.id for i in t] == [
        i.id
        for i in search_items(
            str(tiny_world_pristine / "world/catalog.json"), "demo-ndvi", None, "2021-03-20", "2021-04-10"
        )
    ]


def test_api_null_datetime_items_query_and_filter(pgstac):
    from geoflux.catalog import item_crs, search_items

    # MODIS items: datetime null, start/end bound the 16-day composite (Terra 17 Jan - 1 Feb, Aqua 9 - 24 Jan)
    both = search_items(pgstac.url, "modis-13A1-061", None, "2022-01-20", "2022-01-22")
    assert [i.id for i in both] == ["MYD13A1.A2022009.h25v02.061", "MOD13A1.A2022017.h12v11.061"]
    assert all(i.datetime is None for i in both)
    late = search_items(pgstac.url, "modis-13A1-061", None, "2022-01-26", "2022-01-30")
    assert [i.id for i in late] == ["MOD13A1.A2022017.h12v11.061"]
    # bbox: only the South American tile (h12v11) intersects
    sa = search_items(pgstac.url, "modis-13A1-061", (-62.0, -26.0, -61.0, -25.0))
    assert [i.id for i in sa] == ["MOD13A1.A2022017.h12v11.061"]
    # intersects (GeoJSON) instead of bbox: the Siberian tile
    pt = {"type": "Point", "coordinates": [165.0, 63.0]}
    assert [i.id for i in search_items(pgstac.url, "modis-13A1-061", intersects=pt)] == [
        "MYD13A1.A2022009.h25v02.061"
    ]
    # query extension and CQL2 filter extension
    aqua = search_items(pgstac.url, "modis-13A1-061", query={"platform": {"eq": "aqua"}})
    assert [i.id for i in aqua] == ["MYD13A1.A2022009.h25v02.061"]
    terra = search_items(
        pgstac.url, "modis-13A1-061", filter={"op": "=", "args": [{"property": "platform"}, "terra"]}
    )
    assert [i.id for i in terra] == ["MOD13A1.A2022017.h12v11.061"]
    # the recorded asset keys and projection fields survive the round trip through pgstac
    item = terra[0]
    assert "500m_16_days_NDVI" in item.assets
    assert item.properties.get("proj:epsg") is None and item.properties.get("proj:code") is None
    assert item_crs(item, "500m_16_days_NDVI").startswith("PROJCRS")  # the CRS is the WKT2 only


def test_api_empty_search_and_unknown_collection_are_clear(pgstac):
    from geoflux.catalog import search_items

    with pytest.raises(CatalogError, match=r"127\.0\.0\.1.*'demo-ndvi'.*no items"):
        search_items(pgstac.url, "demo-ndvi", (100.0, 10.0, 101.0, 11.0))
    with pytest.raises(CatalogError, match=r"'demo-nope'"):
        search_items(pgstac.url, "demo-nope")
    with pytest.raises(CatalogError, match=r"no items .* with query"):
        search_items(pgstac.url, "modis-13A1-061", query={"platform": {"eq": "sentinel"}})


def test_demo_config_through_pgstac_gives_identical_cube(pgstac, tiny_world_pristine):
    from geoflux.cube import cube_from_config

    cfg = load_config(tiny_world_pristine / "config.yaml")
    via_api = cfg.model_copy(update={"catalog": pgstac.url})
    a = cube_from_config(cfg)
    b = cube_from_config(via_api)
    assert set(a.data_vars) == set(b.data_vars)
    xr.testing.assert_identical(a.compute(), b.compute())


def test_modis_sinusoidal_items_from_api_into_cube(pgstac, modis_items):
    """Recorded MODIS items (CRS only as WKT2, datetime null) found through the API load onto a UTM grid
    and onto their own sinusoidal grid, decoded, QA-masked and in the right period."""
    from geoflux.catalog import search_items
    from geoflux.catalog.definitions import find_definition, variable_specs
    from geoflux.cube import composite, load_variable, target_grid

    defn = find_definition("pc-modis-13A1-061")
    (ndvi,) = variable_specs(defn, ["ndvi"], catalog=pgstac.url)
    local = {i.id: i for i in modis_items}
    items = search_items(
        pgstac.url,
        ndvi.collection,
        (-62.0, -26.0, -61.0, -25.0),
        "2022-01-17",
        "2022-02-01",
        query=ndvi.query,
    )
    assert [i.id for i in items] == ["MOD13A1.A2022017.h12v11.061"]
    item = items[0]
    assert item.assets[ndvi.asset].href == Path(local[item.id].assets[ndvi.asset].href).as_uri()  # local COG

    # on the item's own grid (pixel-aligned window): exact raw * scale where QA passes, NaN elsewhere
    wkt = item.properties["proj:wkt2"]
    a, _, x0, _, e, y0 = item.properties["proj:transform"][:6]
    r0, c0, n = 300, 1000, 64
    grid = GridSpec(
        crs=wkt, resolution=a, bbox=(x0 + c0 * a, y0 + (r0 + n) * e, x0 + (c0 + n) * a, y0 + r0 * e), chunk=32
    )
    gb = target_grid(grid)
    arr = load_variable(items, ndvi, gb, grid.chunk)
    assert arr.chunks is not None
    periods = pd.date_range("2022-01-09", periods=4, freq="8D")
    comp = composite(arr, periods, "8D", ndvi.aggregation)
    got = comp.sel(time="2022-01-17").values
    shape = tuple(item.properties["proj:shape"])
    raw = modis_pattern(shape, ndvi.asset)[r0 : r0 + n, c0 : c0 + n].astype("float64")
    qa = modis_pattern(shape, ndvi.qa_asset)[r0 : r0 + n, c0 : c0 + n].astype("int64")
    ok = np.isin(qa & ndvi.qa_mask, ndvi.qa_keep)
    assert 0 < ok.sum() < ok.size  # the pattern has both masked and kept pixels here
    np.testing.assert_allclose(got[ok], raw[ok] * 1e-4, atol=1e-6)
    assert np.isnan(got[~ok]).all()
    assert np.isnan(comp.sel(time="2022-01-09").values).all()  # composite starts on 17 Jan: not in period 1

    # a UTM grid inside the tile: reprojected from sinusoidal, values in the pattern's range
    utm = GridSpec(crs="EPSG:32720", resolution=500, bbox=(600000, 7230000, 620000, 7250000), chunk=20)
    vals = load_variable(items, ndvi, target_grid(utm), utm.chunk).isel(time=0).values
    finite = vals[np.isfinite(vals)]
    assert finite.size > 0.5 * vals.size
    assert finite.min() >= 0.1 - 1e-6 and finite.max() <= 0.9 + 1e-3
    assert not math.isnan(float(np.nanmean(vals)))
