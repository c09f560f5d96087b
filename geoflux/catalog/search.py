"""STAC search (I/O edge): items for each driver from a STAC API, a static catalog or a stac-geoparquet file.

Three sources, one result (a list of :class:`pystac.Item` with absolute asset hrefs, sorted by start time):

* ``http(s)://`` URL: a STAC API searched with pystac-client (bbox/intersects, datetime, collections,
  query and CQL2 filter extensions, paging). Every search is bounded (``max_items`` and ``limit``); HTTP
  retries with exponential backoff on timeouts, connection errors, 429 and 5xx are done by urllib3's
  ``Retry`` mounted in pystac-client's ``StacApiIO``; a 4xx is a one-line :class:`CatalogError` at once.
* ``*.parquet`` / ``*.geoparquet``: a stac-geoparquet file, filtered with pyarrow (collection, time,
  bbox columns) before the rows are turned back into items with stac-geoparquet.
* anything else: a static ``catalog.json`` (walked with pystac) or a STAC ItemCollection JSON (a saved
  search: a FeatureCollection of items). pystac-client cannot search them, so they are filtered here (bbox,
  time, query extension, CQL2 filter via the ``cql2`` library).

Planetary Computer assets live in Azure Blob Storage and need a SAS token per storage container;
:class:`PlanetaryComputerSigner` signs only hrefs on ``*.blob.core.windows.net`` (the token endpoint is
injectable, so tests point it at a local server).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import threading
import urllib.parse
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import pystac
from shapely.geometry import box, shape
from urllib3.util.retry import Retry

from geoflux.errors import CatalogError

MAX_ITEMS = 10_000  # always bound a search (pystac-client pages lazily, forever if unbounded)
PAGE_LIMIT = 100  # items per page asked of an API
TIMEOUT = (10.0, 60.0)  # s: connect, read
PC_SAS_URL = "https://planetarycomputer.microsoft.com/api/sas/v1/token"
# Planetary Computer's public storage (thumbnails, collection assets) must not be signed.
PC_PUBLIC_ACCOUNTS = frozenset({"ai4edatasetspublicassets"})

BBox = tuple[float, float, float, float]


def default_retry(total: int = 4, backoff: float = 0.5) -> Retry:
    """The urllib3 retry policy used for STAC API calls.

    Parameters
    ----------
    total : retries after the first attempt (timeouts, refused connections, 429 and 5xx).
    backoff : s, backoff factor: waits of ``backoff * 2**n`` between attempts (Retry-After is honoured).

    Notes
    -----
    POST is retried too: a STAC ``/search`` POST only reads. ``raise_on_status=False`` hands the last 5xx
    response back, so pystac-client turns it into an :class:`~pystac_client.exceptions.APIError` that says
    what the server answered.
    """
    return Retry(
        total=total,
        connect=total,
        read=total,
        status=total,
        backoff_factor=backoff,
        status_forcelist=(429, 500, 502, 503, 504),
        allowed_methods=frozenset({"GET", "POST", "HEAD"}),
        raise_on_status=False,
        respect_retry_after_header=True,
    )


# ---------------------------------------------------------------------------------------------------- time


def _naive_utc(t: pd.Timestamp) -> pd.Timestamp:
    return t.tz_convert("UTC").tz_localize(None) if t.tzinfo is not None else t


def _item_interval(item: pystac.Item) -> tuple[pd.Timestamp, pd.Timestamp]:
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


def _iso(t: pd.Timestamp) -> str:
    return f"{t:%Y-%m-%dT%H:%M:%SZ}"


# ---------------------------------------------------------------------------------------------- filtering


_QUERY_OPS: dict[str, Callable[[Any, Any], bool]] = {
    "eq": lambda a, b: a == b,
    "neq": lambda a, b: a != b,
    "lt": lambda a, b: a is not None and a < b,
    "lte": lambda a, b: a is not None and a <= b,
    "gt": lambda a, b: a is not None and a > b,
    "gte": lambda a, b: a is not None and a >= b,
    "in": lambda a, b: a in b,
    "startsWith": lambda a, b: isinstance(a, str) and a.startswith(b),
    "endsWith": lambda a, b: isinstance(a, str) and a.endswith(b),
    "contains": lambda a, b: isinstance(a, str) and b in a,
}


def _matches_query(item: pystac.Item, query: Mapping[str, Mapping[str, Any]], source: str) -> bool:
    """The STAC API query extension evaluated on one item (for sources that are not APIs)."""
    for prop, ops in query.items():
        value = item.properties.get(prop)
        for op, arg in ops.items():
            fn = _QUERY_OPS.get(op)
            if fn is None:
                raise CatalogError(
                    f"{source}: query on '{prop}': unknown operator '{op}' (expected one of "
                    f"{', '.join(_QUERY_OPS)})"
                )
            if isinstance(value, str) and isinstance(arg, str) and prop.endswith("datetime"):
                value, arg = pd.Timestamp(value), pd.Timestamp(arg)  # compare instants, not strings
            try:
                if not fn(value, arg):
                    return False
            except TypeError:
                return False
    return True


def _cql2(filter_: Mapping[str, Any], source: str) -> Any:
    try:
        import cql2
    except ImportError:
        raise CatalogError(f"{source}: a CQL2 filter on a static source needs the 'cql2' package") from None
    try:
        expr = cql2.Expr(dict(filter_))
        expr.validate()
    except Exception as exc:  # cql2 raises its own ParseError/ValidationError types
        raise CatalogError(f"{source}: invalid CQL2 filter ({str(exc).splitlines()[0]})") from None
    return expr


def _keep(
    item: pystac.Item,
    bbox: BBox | None,
    intersects: Mapping[str, Any] | None,
    t0: pd.Timestamp | None,
    t1: pd.Timestamp | None,
    query: Mapping[str, Mapping[str, Any]] | None,
    cql: Any,
    source: str,
) -> bool:
    if item.geometry is not None:
        geom = shape(item.geometry)
        if bbox is not None and not geom.intersects(box(*bbox)):
            return False
        if intersects is not None and not geom.intersects(shape(intersects)):
            return False
    if t0 is not None or t1 is not None:
        s, e = _item_interval(item)
        if (t1 is not None and s > t1) or (t0 is not None and e < t0):
            return False
    if query and not _matches_query(item, query, source):
        return False
    return cql is None or bool(cql.matches(item.to_dict(include_self_link=False, transform_hrefs=False)))


# -------------------------------------------------------------------------------------------------- static


STATIC_KINDS = (
    "a STAC catalog.json/collection.json, an ItemCollection JSON, a stac-geoparquet file or a STAC API URL"
)


def _read_json(path: Path) -> dict[str, Any]:
    """The JSON object in ``path``; every way it can fail is one :class:`CatalogError` naming the file."""
    if not path.exists():
        raise CatalogError(f"{path}: catalog not found (expected {STATIC_KINDS})")
    if path.is_dir():
        raise CatalogError(f"{path}: is a folder (expected {STATIC_KINDS})")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise CatalogError(
            f"{path}: not a JSON file (byte {exc.start} is not UTF-8; expected STAC JSON)"
        ) from None
    except json.JSONDecodeError as exc:
        raise CatalogError(
            f"{path}: not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno}; truncated file?)"
        ) from None
    except OSError as exc:
        raise CatalogError(f"{path}: cannot read catalog ({exc.strerror})") from None
    if not isinstance(data, dict):
        raise CatalogError(f"{path}: not a STAC catalog (expected a JSON object, got {type(data).__name__})")
    return data


def open_static(path: str | Path) -> pystac.Catalog:
    """Open a static STAC catalog (or collection) JSON file.

    Raises
    ------
    CatalogError
        naming the file when it is missing, a folder, not JSON, or not a STAC catalog/collection.
    """
    path = Path(path)
    kind = _read_json(path).get("type")
    if kind not in ("Catalog", "Collection"):
        raise CatalogError(
            f"{path}: not a STAC catalog (type is {kind!r}; expected 'Catalog' or 'Collection', or "
            "'FeatureCollection' for an ItemCollection)"
        )
    try:
        return pystac.read_file(str(path))
    except (pystac.STACError, ValueError, KeyError, TypeError) as exc:
        raise CatalogError(f"{path}: not a STAC catalog ({_first_line(exc)})") from None


def open_item_collection(path: str | Path, data: Mapping[str, Any] | None = None) -> list[pystac.Item]:
    """The items of a STAC ItemCollection (GeoJSON FeatureCollection of STAC Items) file.

    Relative asset hrefs are resolved against the file's folder (an ItemCollection has no self links).

    Parameters
    ----------
    path : the JSON file.
    data : its parsed content, when already read.

    Raises
    ------
    CatalogError
        naming the file (and the feature) when it is not an ItemCollection or a feature is not a STAC Item.
    """
    path = Path(path)
    data = _read_json(path) if data is None else data
    features = data.get("features")
    if data.get("type") != "FeatureCollection" or not isinstance(features, list):
        raise CatalogError(f"{path}: not an ItemCollection (expected type FeatureCollection with 'features')")
    items = []
    for i, feat in enumerate(features):
        fid = feat.get("id", "?") if isinstance(feat, dict) else "?"
        where = f"{path}: feature {i} (id {fid})"
        if not isinstance(feat, dict) or feat.get("type") != "Feature" or "stac_version" not in feat:
            raise CatalogError(f"{where}: not a STAC Item (expected type Feature with stac_version)")
        try:
            item = pystac.Item.from_dict(feat)
        except (pystac.STACError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise CatalogError(f"{where}: not a STAC Item ({_first_line(exc)})") from None
        for asset in item.assets.values():
            if "://" not in asset.href and not Path(asset.href).is_absolute():
                asset.href = str((path.parent / asset.href).resolve())
        items.append(item)
    return items


def search_static(
    catalog: str | Path,
    collection: str,
    bbox: BBox | None = None,
    start: pd.Timestamp | None = None,
    end: pd.Timestamp | None = None,
    *,
    intersects: Mapping[str, Any] | None = None,
    query: Mapping[str, Mapping[str, Any]] | None = None,
    filter: Mapping[str, Any] | None = None,
    max_items: int = MAX_ITEMS,
) -> list[pystac.Item]:
    """Keep the items of ``collection`` that match (see :func:`search_items`) in a static catalog.

    ``catalog`` is a STAC catalog/collection JSON (walked along its links) or an ItemCollection JSON (a
    GeoJSON FeatureCollection of items, e.g. a saved API search; items belong to ``collection`` by their
    ``collection`` field). Both are filtered here by bbox, time, query and CQL2 filter.
    """
    source = str(catalog)
    path = Path(catalog)
    data = _read_json(path)
    cql = _cql2(filter, source) if filter else None
    out = []
    if data.get("type") == "FeatureCollection":
        items = open_item_collection(path, data)
        ids = {i.collection_id for i in items}
        if collection not in ids:
            have = ", ".join(sorted(str(c) for c in ids)) or "none"
            raise CatalogError(
                f"{source}: no items of collection '{collection}' (items have collections: {have})"
            )
        for item in items:
            if item.collection_id == collection and _keep(
                item, bbox, intersects, start, end, query, cql, source
            ):
                out.append(item)
                if len(out) >= max_items:
                    break
        return out
    root = open_static(path)
    # pystac resolves links lazily, so a missing or broken child/item file surfaces while walking
    try:
        if isinstance(root, pystac.Collection) and root.id == collection:
            coll: pystac.Catalog | None = root
        else:
            coll = next((c for c in root.get_children() if c.id == collection), None)
        if coll is None:
            ids = sorted(c.id for c in root.get_children())
            raise CatalogError(f"{source}: no collection '{collection}' (available: {', '.join(ids)})")
        for item in coll.get_items(recursive=True):
            if _keep(item, bbox, intersects, start, end, query, cql, source):
                item.make_asset_hrefs_absolute()
                out.append(item)
                if len(out) >= max_items:
                    break
    except (pystac.STACError, OSError, ValueError, KeyError, TypeError) as exc:
        raise CatalogError(
            f"{source}: broken link while reading collection '{collection}' ({_first_line(exc)}; expected "
            "every child/item link to name an existing STAC JSON file)"
        ) from None
    return out


# ---------------------------------------------------------------------------------------------- geoparquet


def is_geoparquet(catalog: str) -> bool:
    """Whether ``catalog`` names a stac-geoparquet file (by extension)."""
    return not catalog.startswith(("http://", "https://")) and catalog.lower().endswith(
        (".parquet", ".geoparquet")
    )


def search_geoparquet(
    path: str | Path,
    collection: str,
    bbox: BBox | None = None,
    start: pd.Timestamp | None = None,
    end: pd.Timestamp | None = None,
    *,
    intersects: Mapping[str, Any] | None = None,
    query: Mapping[str, Mapping[str, Any]] | None = None,
    filter: Mapping[str, Any] | None = None,
    max_items: int = MAX_ITEMS,
) -> list[pystac.Item]:
    """Items of ``collection`` in a stac-geoparquet file.

    Collection, bbox and time are pushed down to pyarrow as a row filter on the ``collection``, ``bbox``
    (struct of xmin/ymin/xmax/ymax) and ``datetime``/``start_datetime``/``end_datetime`` columns, so only
    matching rows are decoded; the exact geometry test, query and CQL2 filter run on the decoded items.
    """
    import pyarrow.compute as pc
    import pyarrow.dataset as pads
    from stac_geoparquet.arrow import stac_table_to_items

    path = Path(path)
    if not path.exists():
        raise CatalogError(f"{path}: stac-geoparquet file not found")
    try:
        ds = pads.dataset(str(path), format="parquet")
    except Exception as exc:  # pyarrow raises ArrowInvalid and friends
        raise CatalogError(f"{path}: not a parquet file ({str(exc).splitlines()[0]})") from None
    names = set(ds.schema.names)
    if not {"id", "collection", "geometry"} <= names:
        raise CatalogError(f"{path}: not stac-geoparquet (expected columns id, collection, geometry)")
    expr = pc.field("collection") == collection
    if bbox is not None and "bbox" in names:
        x0, y0, x1, y1 = bbox
        expr &= (pc.field("bbox", "xmin") <= x1) & (pc.field("bbox", "xmax") >= x0)
        expr &= (pc.field("bbox", "ymin") <= y1) & (pc.field("bbox", "ymax") >= y0)
    tz = None
    for col in ("datetime", "start_datetime", "end_datetime"):
        if col in names:
            tz = getattr(ds.schema.field(col).type, "tz", None)
    if start is not None or end is not None:
        lo = "end_datetime" if "end_datetime" in names else "datetime"
        hi = "start_datetime" if "start_datetime" in names else "datetime"

        def stamp(t: pd.Timestamp) -> pd.Timestamp:
            return t.tz_localize("UTC") if tz else t

        if end is not None and hi in names:
            expr &= pc.field(hi).is_null() | (pc.field(hi) <= stamp(end))
        if start is not None and lo in names:
            expr &= pc.field(lo).is_null() | (pc.field(lo) >= stamp(start))
    table = ds.to_table(filter=expr)
    if table.num_rows == 0 and collection not in _parquet_collections(ds):
        have = ", ".join(sorted(_parquet_collections(ds)))
        raise CatalogError(f"{path}: no collection '{collection}' (available: {have})")
    source = str(path)
    cql = _cql2(filter, source) if filter else None
    out = []
    for d in stac_table_to_items(table):
        item = pystac.Item.from_dict(d)
        if _keep(item, bbox, intersects, start, end, query, cql, source):
            out.append(item)
            if len(out) >= max_items:
                break
    return out


def _parquet_collections(ds: Any) -> set[str]:
    return set(ds.to_table(columns=["collection"]).column("collection").unique().to_pylist())


# ----------------------------------------------------------------------------------------------------- API


def open_api(
    url: str,
    *,
    retry: Retry | None = None,
    timeout: float | tuple[float, float] = TIMEOUT,
    headers: Mapping[str, str] | None = None,
) -> Any:
    """Open a STAC API with pystac-client, with retries/backoff (urllib3) and timeouts on every request.

    Returns
    -------
    pystac_client.Client

    Raises
    ------
    CatalogError
        if the API cannot be reached or answers with an error.
    """
    from pystac_client import Client
    from pystac_client.exceptions import APIError
    from pystac_client.stac_api_io import StacApiIO

    io = StacApiIO(headers=dict(headers or {}), timeout=timeout, max_retries=retry or default_retry())
    try:
        # the timeout goes to Client.open too: it re-applies its own (default None) to the StacApiIO
        return Client.open(url, stac_io=io, timeout=timeout)
    except (APIError, OSError) as exc:  # requests' ConnectionError/Timeout/RetryError are OSErrors
        raise CatalogError(_api_error(url, exc, "landing page")) from None
    except (pystac.STACError, json.JSONDecodeError, KeyError) as exc:
        raise CatalogError(f"{url}: not a STAC API landing page ({_first_line(exc)})") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:300]


def _api_error(what: str, exc: BaseException, action: str) -> str:
    """One line for a failed API call: unreachable, rejected (4xx, not retried) or failed (5xx, retried)."""
    status = getattr(exc, "status_code", None)
    if status is None:  # pystac-client wraps connection errors in APIError without a status
        text = str(exc)
        m = re.search(r"\[Errno -?\d+\][^'\")]*", text) or re.search(r"[Rr]ead timed out|timed out", text)
        why = m.group(0).strip() if m else _first_line(exc)
        return f"{what}: cannot reach STAC API ({why}, after retries)"
    kind = "rejected" if 400 <= status < 500 else "failed"
    return f"{what}: {action} {kind} (HTTP {status}: {_first_line(exc)})"


def search_api(
    url: str,
    collections: str | Sequence[str],
    bbox: BBox | None = None,
    start: pd.Timestamp | None = None,
    end: pd.Timestamp | None = None,
    *,
    intersects: Mapping[str, Any] | None = None,
    query: Mapping[str, Mapping[str, Any]] | None = None,
    filter: Mapping[str, Any] | None = None,
    limit: int = PAGE_LIMIT,
    max_items: int = MAX_ITEMS,
    retry: Retry | None = None,
    timeout: float | tuple[float, float] = TIMEOUT,
    client: Any = None,
) -> list[pystac.Item]:
    """Search a STAC API with pystac-client, following ``next`` links page by page.

    Parameters
    ----------
    url : API root (landing page) URL.
    collections : collection id(s).
    bbox : lon_min, lat_min, lon_max, lat_max (degrees, EPSG:4326).
    start, end : inclusive time range (UTC); either may be None (open).
    intersects : GeoJSON geometry (EPSG:4326) instead of / besides ``bbox``.
    query : query-extension filter, e.g. ``{"eo:cloud_cover": {"lt": 60}}``.
    filter : CQL2-JSON filter (filter extension).
    limit : items per page; max_items : stop after this many items (both always sent).
    retry, timeout : urllib3 retry policy (default :func:`default_retry`) and (connect, read) timeouts, s.
    client : an already opened ``pystac_client.Client`` (reused across variables).

    Raises
    ------
    CatalogError
        unreachable API, 4xx (bad request, unknown collection) or exhausted retries on 5xx.
    """
    from pystac_client.exceptions import APIError

    cols = [collections] if isinstance(collections, str) else list(collections)
    client = client or open_api(url, retry=retry, timeout=timeout)
    if start is None and end is None:
        dt_range = None
    else:
        dt_range = f"{_iso(start) if start is not None else '..'}/{_iso(end) if end is not None else '..'}"
    what = f"{url}: collection '{', '.join(cols)}'"
    try:
        search = client.search(
            collections=cols,
            bbox=list(bbox) if bbox is not None else None,
            intersects=dict(intersects) if intersects is not None else None,
            datetime=dt_range,
            query=dict(query) if query else None,
            filter=dict(filter) if filter else None,
            filter_lang="cql2-json" if filter else None,
            limit=limit,
            max_items=max_items,
        )
        return list(search.items())
    except (APIError, OSError) as exc:
        raise CatalogError(_api_error(what, exc, "search")) from None
    except (NotImplementedError, ValueError) as exc:  # pystac-client: unsupported extension / bad parameter
        raise CatalogError(f"{what}: {_first_line(exc)}") from None


# ------------------------------------------------------------------------------------------------ dispatch


def search_items(
    catalog: str,
    collection: str,
    bbox: BBox | None = None,
    start: str | pd.Timestamp | None = None,
    end: str | pd.Timestamp | None = None,
    static: bool = False,
    *,
    intersects: Mapping[str, Any] | None = None,
    query: Mapping[str, Mapping[str, Any]] | None = None,
    filter: Mapping[str, Any] | None = None,
    limit: int = PAGE_LIMIT,
    max_items: int = MAX_ITEMS,
    retry: Retry | None = None,
) -> list[pystac.Item]:
    """Items of ``collection`` that intersect ``bbox`` (lon/lat, degrees) and overlap ``[start, end]``.

    Parameters
    ----------
    catalog : ``http(s)://`` URL of a STAC API, path of a stac-geoparquet file (``.parquet``), or path of a
        static ``catalog.json`` or of an ItemCollection JSON.
    collection : collection id.
    bbox : lon_min, lat_min, lon_max, lat_max (EPSG:4326).
    start, end : time range (inclusive); ignored for ``static`` drivers (one item for all times).
    static : the collection holds time-invariant data (elevation, land cover).
    intersects, query, filter, limit, max_items, retry : see :func:`search_api`; static sources evaluate
        ``query`` and ``filter`` themselves.

    Returns
    -------
    Items sorted by (start time, id), asset hrefs absolute.

    Raises
    ------
    CatalogError
        if the catalog cannot be opened/reached, the collection does not exist, or nothing matches.
    """
    if catalog.startswith("file://"):
        catalog = urllib.parse.unquote(urllib.parse.urlparse(catalog).path)
    elif "://" in catalog and not catalog.startswith(("http://", "https://")):
        scheme = catalog.split("://", 1)[0]
        raise CatalogError(
            f"{catalog}: unsupported URL scheme '{scheme}' (expected an http(s):// STAC API or a local file)"
        )
    t0 = None if static or start is None else _naive_utc(pd.Timestamp(start))
    t1 = None if static or end is None else _naive_utc(pd.Timestamp(end))
    kw = {"intersects": intersects, "query": query, "filter": filter, "max_items": max_items}
    if catalog.startswith(("http://", "https://")):
        items = search_api(catalog, collection, bbox, t0, t1, limit=limit, retry=retry, **kw)
    elif is_geoparquet(catalog):
        items = search_geoparquet(catalog, collection, bbox, t0, t1, **kw)
    else:
        items = search_static(catalog, collection, bbox, t0, t1, **kw)
    if not items:
        where = f"bbox {bbox}" if intersects is None else "the given geometry"
        raise CatalogError(
            f"{catalog}: collection '{collection}': no items intersect {where} and time "
            f"{t0 if t0 is not None else '..'}..{t1 if t1 is not None else '..'}"
            + (f" with query {dict(query)}" if query else "")
            + (" with the filter" if filter else "")
        )
    return sorted(items, key=lambda i: (_item_interval(i)[0], i.id))


def check_assets(items: Iterable[pystac.Item], catalog: str, collection: str, assets: Iterable[str]) -> None:
    """Raise a :class:`CatalogError` naming catalog, collection, item and asset if an asset is missing."""
    wanted = list(dict.fromkeys(assets))
    for item in items:
        for key in wanted:
            if key not in item.assets:
                have = ", ".join(sorted(item.assets)) or "none"
                raise CatalogError(
                    f"{catalog}: collection '{collection}': item {item.id} has no asset '{key}' "
                    f"(it has: {have})"
                )


def item_crs(item: pystac.Item, asset: str) -> str | None:
    """The CRS an item (or its asset) declares via the projection extension: code, EPSG, WKT2 or PROJJSON."""
    for props in (item.assets[asset].extra_fields if asset in item.assets else {}, item.properties):
        code = props.get("proj:code")
        if code:
            return str(code)
        epsg = props.get("proj:epsg")
        if epsg:
            return f"EPSG:{epsg}"
        if props.get("proj:wkt2"):
            return str(props["proj:wkt2"])
        if props.get("proj:projjson"):
            return "projjson"
    return None


# ------------------------------------------------------------------------------------------------- signing


class PlanetaryComputerSigner:
    """Sign Planetary Computer asset hrefs with a SAS token per storage account/container.

    Only ``https://<account>.blob.core.windows.net/<container>/...`` hrefs are signed (not public
    accounts, not hrefs that already carry a signature); anything else is returned unchanged, so it is
    safe to apply to every href of a mixed item. Tokens are cached until shortly before they expire.

    Parameters
    ----------
    token_url : token endpoint; GET ``{token_url}/{account}/{container}`` answers
        ``{"token": "...", "msft:expiry": "..."}``. Default: env ``GEOFLUX_PC_SAS_URL`` or the public one.
    retry, timeout : as for :func:`open_api`.
    subscription_key : optional Planetary Computer key (env ``PC_SDK_SUBSCRIPTION_KEY``), sent as header.
    """

    def __init__(
        self,
        token_url: str | None = None,
        *,
        retry: Retry | None = None,
        timeout: float | tuple[float, float] = TIMEOUT,
        subscription_key: str | None = None,
    ) -> None:
        self.token_url = (token_url or os.environ.get("GEOFLUX_PC_SAS_URL") or PC_SAS_URL).rstrip("/")
        self.timeout = timeout
        self._retry = retry
        self._key = subscription_key or os.environ.get("PC_SDK_SUBSCRIPTION_KEY")
        self._tokens: dict[tuple[str, str], tuple[str, dt.datetime]] = {}
        self.requests = 0  # token requests made (tests check the cache)
        self._connect()

    def _connect(self) -> None:
        # No request is made here: the session is only used when a read task asks for a token.
        import requests
        from requests.adapters import HTTPAdapter

        self._session = requests.Session()
        adapter = HTTPAdapter(max_retries=self._retry or default_retry())
        self._session.mount("http://", adapter)
        self._session.mount("https://", adapter)
        if self._key:
            self._session.headers["Ocp-Apim-Subscription-Key"] = self._key
        self._lock = threading.Lock()  # read tasks may sign from several threads

    def __getstate__(self) -> dict[str, Any]:
        # travels with the dask graph to workers (processes): the session and lock are rebuilt there
        state = self.__dict__.copy()
        del state["_session"], state["_lock"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._connect()

    @staticmethod
    def blob_parts(href: str) -> tuple[str, str] | None:
        """(account, container) of an Azure Blob href that needs signing, else None."""
        u = urllib.parse.urlparse(href)
        if u.scheme != "https" or not u.netloc.endswith(".blob.core.windows.net"):
            return None
        account = u.netloc.split(".")[0]
        container = u.path.lstrip("/").split("/")[0]
        if not container or account in PC_PUBLIC_ACCOUNTS:
            return None
        if "sig" in urllib.parse.parse_qs(u.query):
            return None  # already signed
        return account, container

    def token(self, account: str, container: str) -> str:
        """A SAS token for ``account``/``container`` (cached until 5 min before its expiry)."""
        now = dt.datetime.now(dt.timezone.utc)
        with self._lock:
            hit = self._tokens.get((account, container))
            if hit and hit[1] - now > dt.timedelta(minutes=5):
                return hit[0]
            url = f"{self.token_url}/{account}/{container}"
            try:
                r = self._session.get(url, timeout=self.timeout)
            except OSError as exc:
                raise CatalogError(f"{url}: cannot get a SAS token ({_first_line(exc)})") from None
            if r.status_code != 200:
                raise CatalogError(f"{url}: SAS token request failed (HTTP {r.status_code}: {r.text[:200]})")
            try:
                body = r.json()
                token = str(body["token"]).lstrip("?")
                expiry = pd.Timestamp(body["msft:expiry"]).to_pydatetime()
            except (ValueError, KeyError, TypeError):
                raise CatalogError(f"{url}: SAS token answer lacks 'token'/'msft:expiry'") from None
            if expiry.tzinfo is None:
                expiry = expiry.replace(tzinfo=dt.timezone.utc)
            self.requests += 1
            self._tokens[(account, container)] = (token, expiry)
            return token

    def __call__(self, href: str) -> str:
        """``href`` with a SAS token appended when it is a Planetary Computer blob href."""
        parts = self.blob_parts(href)
        if parts is None:
            return href
        sep = "&" if urllib.parse.urlparse(href).query else "?"
        return f"{href}{sep}{self.token(*parts)}"

    def sign_storage_options(self, href: str, options: dict[str, Any]) -> dict[str, Any]:
        """fsspec ``storage_options`` for a Zarr/NetCDF asset with the SAS token as adlfs ``credential``.

        ``abfs://<container>/...`` hrefs take the account from ``options['account_name']`` (as Planetary
        Computer's ``xarray:open_kwargs`` give it); ``https://<account>.blob.core.windows.net/<container>``
        hrefs carry it. Options that already hold a credential, and public accounts, are returned as given.
        """
        out = dict(options)
        if out.get("credential") or out.get("sas_token"):
            return out
        u = urllib.parse.urlparse(href)
        if u.scheme in ("abfs", "abfss", "az"):
            account, container = out.get("account_name"), u.netloc.split("@")[0]
        else:
            parts = self.blob_parts(href)
            account, container = parts if parts else (None, None)
        if account and container and account not in PC_PUBLIC_ACCOUNTS:
            out["credential"] = self.token(str(account), container)
        return out

    def sign_item(self, item: pystac.Item) -> pystac.Item:
        """A copy of ``item`` with every signable asset href signed."""
        out = item.clone()
        for asset in out.assets.values():
            asset.href = self(asset.href)
        return out


def make_signer(kind: str | None, token_url: str | None = None) -> Callable[[str], str] | None:
    """The href signer for a catalog's ``signing`` setting (None: no signing)."""
    if kind is None:
        return None
    if kind == "planetary-computer":
        return PlanetaryComputerSigner(token_url)
    raise CatalogError(f"signing: unknown scheme '{kind}' (expected planetary-computer)")


# Gridded (Zarr / NetCDF / HDF5) assets are read by geoflux.reanalysis, rasters by odc-stac.
ZARR_TYPES = ("application/vnd+zarr", "application/vnd.zarr", "application/x-zarr")
NETCDF_TYPES = ("application/netcdf", "application/x-netcdf", "application/x-hdf5", "application/x-hdf")
GRIDDED_SUFFIXES = (".zarr", ".nc", ".nc4", ".netcdf", ".h5", ".hdf5")


def asset_media_type(asset: pystac.Asset) -> str:
    """An asset's media type without parameters, lower case ('' when it has none)."""
    return (asset.media_type or "").split(";")[0].strip().lower()


def href_suffix(href: str) -> str:
    """The file suffix of an asset href (URL or path), lower case."""
    path = urllib.parse.urlparse(href).path if "://" in href else href
    return Path(path.rstrip("/")).suffix.lower()


def is_gridded(item: pystac.Item, key: str) -> bool:
    """True when the item's asset is a Zarr store or a NetCDF/HDF5 file (media type, else file suffix)."""
    asset = item.assets.get(key)
    if asset is None:
        return False
    media = asset_media_type(asset)
    if media:
        return media in ZARR_TYPES or media in NETCDF_TYPES
    return href_suffix(asset.href) in GRIDDED_SUFFIXES
