"""Catalog search without a database: recorded API responses replayed locally, retries/backoff and errors
against scripted servers, Planetary Computer signing against a local token server, static catalogs and
stac-geoparquet files as offline sources. No network."""

from __future__ import annotations

import datetime as dt
import json

import pystac
import pytest
from stac_server import ReplayServer, ScriptedServer, TokenServer, free_port, read_cassette

from geoflux.catalog import (
    PlanetaryComputerSigner,
    default_retry,
    open_api,
    search_api,
    search_geoparquet,
    search_items,
)
from geoflux.errors import CatalogError

FAST = default_retry(total=2, backoff=0.01)


@pytest.fixture(scope="module")
def cassettes(realdata):
    return realdata / "stac" / "recorded-searches"


def test_replayed_planetary_computer_search_pages(realdata, cassettes):
    """Two recorded pages of a real Planetary Computer search (gzip bodies, 'next' token in the POST body)
    are followed by pystac-client; the recorded landing page is the real PC one."""
    inter = read_cassette(cassettes / "TestItemSearch.test_get_all_items.yaml")
    landing = json.loads((realdata / "stac/planetary-computer/planetary-computer-root.json").read_text())
    expected = [f["id"] for it in inter for f in it["json"]["features"]]
    with ReplayServer(inter, "https://planetarycomputer.microsoft.com/api/stac/v1", landing) as srv:
        items = search_api(
            srv.url, "naip", (-73.21, 43.99, -73.12, 44.05), limit=10, max_items=20, retry=FAST
        )
        searches = [r for r in srv.requests if r[0] == "POST"]
    assert [i.id for i in items] == expected and len(items) == 20
    assert len(searches) == 2 and searches[1][2]["token"].startswith("next:")
    assert all(r[2]["limit"] == 10 for r in searches)  # limit is always sent
    assert {i.collection_id for i in items} == {"naip"}


def test_replayed_earth_search_intersects_datetime_two_collections(cassettes):
    inter = read_cassette(cassettes / "test_multiple_collections.yaml")
    with ReplayServer(inter, "https://earth-search.aws.element84.com/v1") as srv:
        items = search_api(
            srv.url,
            ["sentinel-2-l2a", "landsat-c2-l2"],
            intersects={"type": "Point", "coordinates": [-105.1019, 40.1672]},
            start=dt.datetime(2023, 10, 8),
            end=dt.datetime(2023, 10, 8, 23, 59, 59),
            retry=FAST,
        )
    assert [(i.collection_id, i.id) for i in items] == [
        ("sentinel-2-l2a", "S2A_13TDE_20231008_0_L2A"),
        ("landsat-c2-l2", "LC08_L2SP_033032_20231008_02_T1"),
    ]
    # the second (empty) recorded page ends the paging
    assert sum(1 for r in srv.requests if r[0] == "POST") == 2


def _landing(url: str) -> dict:
    return {
        "type": "Catalog",
        "id": "scripted",
        "description": "scripted",
        "stac_version": "1.0.0",
        "conformsTo": ["https://api.stacspec.org/v1.0.0/core", "https://api.stacspec.org/v1.0.0/item-search"],
        "links": [{"rel": "search", "href": f"{url}/search", "method": "POST"}],
    }


def _empty_page() -> dict:
    return {"type": "FeatureCollection", "features": [], "links": []}


def test_retries_with_backoff_on_5xx_and_timeouts():
    calls = {"n": 0}

    def script(method, path, body, n):
        if method == "GET":
            return (503, {"detail": "busy"}, 0) if n <= 2 else (200, _landing(srv.url), 0)
        calls["n"] += 1
        return (200, _empty_page(), 1.0) if calls["n"] == 1 else (200, _empty_page(), 0)  # 1st: too slow

    with ScriptedServer(script) as srv:
        client = open_api(srv.url, retry=default_retry(total=3, backoff=0.01), timeout=(2.0, 0.3))
        got = [r[0] for r in srv.requests]
        assert got == ["GET", "GET", "GET"]  # two 503 answers retried, third attempt served
        assert search_api(srv.url, "c", client=client) == []
        assert calls["n"] == 2  # the read timeout was retried (POST /search is safe to repeat)


def test_4xx_is_immediate_clear_error_and_5xx_exhaustion_too():
    def script(method, path, body, n):
        if method == "GET":
            return 200, _landing(srv.url), 0
        if body.get("collections") == ["bad"]:
            return 400, {"code": "BadRequest", "description": "collection 'bad' bogus parameter"}, 0
        return 502, {"detail": "upstream down"}, 0

    with ScriptedServer(script) as srv:
        with pytest.raises(CatalogError, match=r"collection 'bad': search rejected \(HTTP 400: .*bogus"):
            search_api(srv.url, "bad", retry=FAST)
        assert sum(1 for r in srv.requests if r[0] == "POST") == 1  # a 4xx is not retried
        with pytest.raises(CatalogError, match=r"collection 'c': search failed \(HTTP 502"):
            search_api(srv.url, "c", retry=FAST)
        assert sum(1 for r in srv.requests if r[0] == "POST") == 1 + 3  # first try + 2 retries


def test_unreachable_catalog_is_one_clear_error():
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    with pytest.raises(CatalogError, match=r"127\.0\.0\.1.*cannot reach STAC API"):
        search_items(url, "demo-ndvi", retry=default_retry(total=1, backoff=0.0))


# ------------------------------------------------------------------------------------------------ signing


def _pc_items(realdata) -> list[pystac.Item]:
    """Recorded MODIS items with hrefs as Planetary Computer serves them (Azure blob, modis-061-cogs)."""
    out = []
    for f in sorted((realdata / "stac/modis-061/modis-13A1-061").glob("M*.json")):
        item = pystac.Item.from_dict(json.loads(f.read_text()))
        for a in item.assets.values():
            a.href = "https://modiseuwest.blob.core.windows.net/modis-061-cogs/" + a.href.rsplit("/", 1)[-1]
        out.append(item)
    return out


def test_planetary_computer_signing_only_its_own_hrefs(realdata, cassettes):
    items = _pc_items(realdata)
    s2 = read_cassette(cassettes / "test_multiple_collections.yaml")[0]["json"]["features"][0]
    s2_item = pystac.Item.from_dict(s2)
    with TokenServer() as tok:
        signer = PlanetaryComputerSigner(tok.url, retry=FAST)
        signed = [signer.sign_item(i) for i in items]
        for item, orig in zip(signed, items, strict=True):
            for key, a in item.assets.items():
                base = orig.assets[key].href
                assert a.href.startswith(base + "?sv=") and "sig=testmodiseuwestmodis-061-cogs" in a.href
        assert signer.requests == 1 and len(tok.requests) == 1  # one token per account/container, cached
        assert tok.requests[0][1] == "/modiseuwest/modis-061-cogs"
        # Earth Search (S3/https on AWS), public PC storage, already signed hrefs, local paths: untouched
        s2_signed = signer.sign_item(s2_item)
        assert all(s2_signed.assets[k].href == a.href for k, a in s2_item.assets.items())
        public = "https://ai4edatasetspublicassets.blob.core.windows.net/assets/pc_thumbnails/modis.png"
        presigned = "https://modiseuwest.blob.core.windows.net/modis-061-cogs/x.tif?se=2030&sig=abc"
        for href in (public, presigned, "/data/x.tif", "s3://sentinel-cogs/x.tif"):
            assert signer(href) == href
        assert len(tok.requests) == 1
        # a second container asks for a second token
        signer("https://modiseuwest.blob.core.windows.net/other/x.tif")
        assert len(tok.requests) == 2


def test_signing_refreshes_expiring_tokens_and_reports_failures():
    with TokenServer(lifetime=dt.timedelta(minutes=1)) as tok:  # inside the 5 min safety margin
        signer = PlanetaryComputerSigner(tok.url, retry=FAST)
        a = signer("https://acct.blob.core.windows.net/cont/a.tif")
        b = signer("https://acct.blob.core.windows.net/cont/b.tif")
        assert a.split("?")[1] != b.split("?")[1] and len(tok.requests) == 2
    dead = PlanetaryComputerSigner(f"http://127.0.0.1:{free_port()}", retry=default_retry(total=0, backoff=0))
    with pytest.raises(CatalogError, match=r"/acct/cont: cannot get a SAS token"):
        dead("https://acct.blob.core.windows.net/cont/a.tif")


# ------------------------------------------------------------------------------------- static / geoparquet


def test_static_catalog_query_filter_intersects(tiny_world_pristine):
    cat = str(tiny_world_pristine / "world" / "catalog.json")
    all_ndvi = search_items(cat, "demo-ndvi")
    q = search_items(cat, "demo-ndvi", query={"start_datetime": {"gte": "2021-04-01T00:00:00Z"}})
    assert [i.id for i in q] == [i.id for i in all_ndvi if i.id >= "ndvi-20210401"]
    f = search_items(cat, "demo-ndvi", filter={"op": "=", "args": [{"property": "geoflux:variable"}, "ndvi"]})
    assert len(f) == len(all_ndvi)
    with pytest.raises(CatalogError, match=r"no items .* with the filter"):
        search_items(cat, "demo-ndvi", filter={"op": "=", "args": [{"property": "geoflux:variable"}, "x"]})
    with pytest.raises(CatalogError, match="invalid CQL2 filter"):
        search_items(cat, "demo-ndvi", filter={"op": "nonsense"})
    with pytest.raises(CatalogError, match="unknown operator 'like'"):
        search_items(cat, "demo-ndvi", query={"id": {"like": "x"}})
    b = all_ndvi[0].bbox
    inside = {"type": "Point", "coordinates": [(b[0] + b[2]) / 2, (b[1] + b[3]) / 2]}
    assert len(search_items(cat, "demo-ndvi", intersects=inside)) == len(all_ndvi)
    with pytest.raises(CatalogError, match="no items intersect the given geometry"):
        search_items(cat, "demo-ndvi", intersects={"type": "Point", "coordinates": [0.0, 0.0]})


@pytest.fixture(scope="module")
def geoparquet(tiny_world_pristine, tmp_path_factory):
    """The tiny world's items as one stac-geoparquet file (written with stac-geoparquet)."""
    from stac_geoparquet.arrow import parse_stac_items_to_arrow, to_parquet

    root = pystac.read_file(str(tiny_world_pristine / "world" / "catalog.json"))
    docs = []
    for c in root.get_children():
        for it in c.get_items():
            it.make_asset_hrefs_absolute()
            d = it.to_dict(include_self_link=False, transform_hrefs=False)
            d["collection"] = c.id
            docs.append(d)
    path = tmp_path_factory.mktemp("gpq") / "world-items.parquet"
    to_parquet(parse_stac_items_to_arrow(docs), path)
    return path


def test_geoparquet_source_matches_static(geoparquet, tiny_world_pristine):
    cat = str(tiny_world_pristine / "world" / "catalog.json")
    for args in [("demo-ndvi", None, "2021-03-20", "2021-04-10"), ("demo-landcover", None, None, None)]:
        static = search_items(cat, *args)
        gpq = search_items(str(geoparquet), *args)
        assert [i.id for i in gpq] == [i.id for i in static]
        assert [i.assets["data"].href for i in gpq] == [i.assets["data"].href for i in static]
    with pytest.raises(CatalogError, match=r"world-items\.parquet: no collection 'demo-nope'"):
        search_geoparquet(geoparquet, "demo-nope")
    with pytest.raises(CatalogError, match="no items intersect"):
        search_items(str(geoparquet), "demo-ndvi", (100.0, 10.0, 101.0, 11.0))
    with pytest.raises(CatalogError, match="stac-geoparquet file not found"):
        search_items(str(geoparquet.with_name("nope.parquet")), "demo-ndvi")


def test_demo_cube_from_geoparquet_equals_static(geoparquet, tiny_world_pristine):
    import xarray as xr

    from geoflux.config import load_config
    from geoflux.cube import cube_from_config

    cfg = load_config(tiny_world_pristine / "config.yaml")
    keep = [v for v in cfg.variables if v.name in ("ndvi", "landcover")]
    a = cube_from_config(cfg.model_copy(update={"variables": keep}))
    b = cube_from_config(cfg.model_copy(update={"variables": keep, "catalog": str(geoparquet)}))
    xr.testing.assert_identical(a.compute(), b.compute())
