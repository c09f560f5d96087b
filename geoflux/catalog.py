"""STAC search (I/O edge): items for each driver from a static catalog or a STAC API.

A static ``catalog.json`` cannot be searched by pystac-client, so it is walked with pystac and filtered
here by collection, bbox and time; a URL is searched with pystac-client. Either way the result is a list
of :class:`pystac.Item` with absolute asset hrefs.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pandas as pd
import pystac
from shapely.geometry import box, shape

from geoflux.errors import CatalogError

MAX_ITEMS = 10_000  # always bound a search (pystac-client pages lazily, forever if unbounded)


def _item_interval(item: pystac.Item) -> tuple[dt.datetime, dt.datetime]:
    """An item's time interval; ``start_datetime``/``end_datetime`` are used when ``datetime`` is null."""
    props = item.properties
    if props.get("start_datetime") and props.get("end_datetime"):
        t0 = pd.Timestamp(props["start_datetime"])
        t1 = pd.Timestamp(props["end_datetime"])
    elif item.datetime is not None:
        t0 = t1 = pd.Timestamp(item.datetime)
    else:
        raise CatalogError(f"item {item.id}: has neither datetime nor start_datetime/end_datetime")
    return _naive_utc(t0), _naive_utc(t1)


def _naive_utc(t: pd.Timestamp) -> pd.Timestamp:
    return t.tz_convert("UTC").tz_localize(None) if t.tzinfo is not None else t


def _overlaps(
    item: pystac.Item,
    bbox: tuple[float, float, float, float] | None,
    start: pd.Timestamp | None,
    end: pd.Timestamp | None,
) -> bool:
    if bbox is not None and item.geometry is not None:
        if not shape(item.geometry).intersects(box(*bbox)):
            return False
    if start is not None and end is not None:
        t0, t1 = _item_interval(item)
        if t1 < start or t0 > end:
            return False
    return True


def open_static(path: str | Path) -> pystac.Catalog:
    """Open a static STAC catalog (or collection) JSON file."""
    path = Path(path)
    if not path.exists():
        raise CatalogError(f"{path}: catalog not found")
    try:
        return pystac.read_file(str(path))
    except (pystac.STACError, ValueError, KeyError) as exc:
        raise CatalogError(f"{path}: not a STAC catalog ({exc})") from None


def search_items(
    catalog: str,
    collection: str,
    bbox: tuple[float, float, float, float] | None = None,
    start: str | pd.Timestamp | None = None,
    end: str | pd.Timestamp | None = None,
    static: bool = False,
) -> list[pystac.Item]:
    """Items of ``collection`` that intersect ``bbox`` (lon/lat, degrees) and overlap ``[start, end]``.

    Parameters
    ----------
    catalog : path of a static ``catalog.json`` or ``http(s)://`` URL of a STAC API.
    collection : collection id.
    bbox : lon_min, lat_min, lon_max, lat_max (EPSG:4326).
    start, end : time range (inclusive); ignored for ``static`` drivers (one item for all times).
    static : the collection holds time-invariant data (elevation, land cover).

    Raises
    ------
    CatalogError
        if the catalog cannot be opened, the collection does not exist, or nothing matches.
    """
    t0 = None if static or start is None else _naive_utc(pd.Timestamp(start))
    t1 = None if static or end is None else _naive_utc(pd.Timestamp(end))
    if catalog.startswith(("http://", "https://")):
        items = _search_api(catalog, collection, bbox, t0, t1)
    else:
        items = _search_static(catalog, collection, bbox, t0, t1)
    if not items:
        raise CatalogError(
            f"{catalog}: collection '{collection}': no items intersect bbox {bbox} and time {t0}..{t1}"
        )
    return sorted(items, key=lambda i: (_item_interval(i)[0], i.id))


def _search_static(catalog: str, collection: str, bbox, t0, t1) -> list[pystac.Item]:
    root = open_static(catalog)
    coll = next((c for c in root.get_children() if c.id == collection), None)
    if coll is None:
        ids = sorted(c.id for c in root.get_children())
        raise CatalogError(f"{catalog}: no collection '{collection}' (available: {', '.join(ids)})")
    out = []
    for item in coll.get_items(recursive=True):
        if _overlaps(item, bbox, t0, t1):
            item.make_asset_hrefs_absolute()
            out.append(item)
    return out


def _search_api(url: str, collection: str, bbox, t0, t1) -> list[pystac.Item]:
    from pystac_client import Client
    from pystac_client.exceptions import APIError

    try:
        client = Client.open(url)
        dt_range = None if t0 is None else f"{t0:%Y-%m-%dT%H:%M:%SZ}/{t1:%Y-%m-%dT%H:%M:%SZ}"
        search = client.search(
            collections=[collection], bbox=bbox, datetime=dt_range, max_items=MAX_ITEMS, limit=100
        )
        return list(search.items())
    except APIError as exc:
        raise CatalogError(
            f"{url}: collection '{collection}': search failed ({str(exc).splitlines()[0]})"
        ) from None
    except OSError as exc:
        raise CatalogError(f"{url}: cannot reach STAC API ({exc})") from None
