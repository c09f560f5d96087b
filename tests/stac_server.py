"""Test servers for the catalog/cube tests: a real pgstac STAC API, a cassette replayer, a SAS token server.

* :class:`PgstacServer` — a throwaway PostgreSQL + PostGIS cluster (``initdb`` in a temp dir, run as the
  ``postgres`` user when we are root, since postgres refuses root), ``pypgstac migrate``, ``pypgstac load``
  of collections/items, and ``uvicorn stac_fastapi.pgstac.app:create_app --factory`` on 127.0.0.1.
* :class:`ReplayServer` — serves recorded vcrpy cassettes (``../shared/realdata/stac/recorded-searches``)
  from a local HTTP server, with hrefs of the recorded API rewritten to the local address.
* :class:`TokenServer` — answers Planetary Computer SAS token requests (``/{account}/{container}``).
* :func:`write_modis_cogs` — local COGs matching a recorded MODIS item's sinusoidal grid (proj:wkt2,
  proj:transform, proj:shape), and the item with its hrefs rewritten to them.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import gzip
import json
import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pystac
import yaml

PG_VERSIONS = ("17", "16", "15")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------------------------------- pgstac


def _pg_bin() -> Path | None:
    for v in PG_VERSIONS:
        b = Path(f"/usr/lib/postgresql/{v}/bin")
        if (b / "initdb").exists() and (b / "pg_ctl").exists():
            return b
    found = shutil.which("initdb")
    return Path(found).resolve().parent if found else None


def pgstac_unavailable() -> str | None:
    """Why the pgstac server cannot run here (None: it can)."""
    b = _pg_bin()
    if b is None:
        return "PostgreSQL not installed (apt-get install postgresql-15-postgis-3; .ci/run does this)"
    share = Path(f"/usr/share/postgresql/{b.parent.name}/extension/postgis.control")
    if not share.exists():
        return f"PostGIS not installed for PostgreSQL {b.parent.name} ({share} missing)"
    for mod in ("pypgstac", "stac_fastapi.pgstac", "uvicorn", "psycopg"):
        try:
            __import__(mod)
        except ImportError:
            return f"python package {mod} not installed (pip install -e '.[test]')"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return "running as root and there is no 'postgres' user to run the cluster"
        if shutil.which("runuser") is None:
            return "running as root and runuser is missing"
    return None


class PgstacServer:
    """PostgreSQL + pgstac + stac-fastapi-pgstac on 127.0.0.1, all under one temp folder.

    Use as a context manager; ``url`` is the STAC API root once started.
    """

    def __init__(self) -> None:
        self.bin = _pg_bin()
        self.root = Path(tempfile.mkdtemp(prefix="geoflux-pgstac-"))
        self.pg_port = free_port()
        self.api_port = free_port()
        self.dsn = f"postgresql://postgres@127.0.0.1:{self.pg_port}/postgres"
        self.url = f"http://127.0.0.1:{self.api_port}"
        self._api: subprocess.Popen | None = None
        self._pg_started = False

    # postgres refuses to run as root: run the cluster as 'postgres' then
    def _as_pg(self, args: list[str]) -> list[str]:
        return ["runuser", "-u", "postgres", "--", *args] if os.geteuid() == 0 else args

    def _run(self, args: list[str], what: str, timeout: float = 120) -> None:
        r = subprocess.run(args, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
        if r.returncode != 0:
            raise RuntimeError(f"{what} failed ({r.returncode}): {(r.stderr or r.stdout)[-2000:]}")

    def start(self) -> PgstacServer:
        data = self.root / "data"
        if os.geteuid() == 0:
            shutil.chown(self.root, "postgres")
        self._run(
            self._as_pg(
                [
                    str(self.bin / "initdb"),
                    "-D",
                    str(data),
                    "-U",
                    "postgres",
                    "--auth=trust",
                    "-E",
                    "UTF8",
                    "--no-sync",
                ]
            ),
            "initdb",
        )
        # Throwaway cluster: durability settings off for speed; only TCP on localhost.
        opts = (
            f"-p {self.pg_port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off "
            "-c synchronous_commit=off -c full_page_writes=off"
        )
        self._run(
            self._as_pg(
                [
                    str(self.bin / "pg_ctl"),
                    "-D",
                    str(data),
                    "-o",
                    opts,
                    "-l",
                    str(self.root / "postgres.log"),
                    "-w",
                    "-t",
                    "60",
                    "start",
                ]
            ),
            "pg_ctl start",
        )
        self._pg_started = True
        self._run(
            [sys.executable, "-m", "pypgstac.pypgstac", "migrate", "--dsn", self.dsn], "pypgstac migrate"
        )
        env = {
            **os.environ,
            "PGHOST": "127.0.0.1",
            "PGPORT": str(self.pg_port),
            "PGUSER": "postgres",
            "PGPASSWORD": "unused",  # trust auth; stac-fastapi-pgstac requires a value
            "PGDATABASE": "postgres",
        }
        log = open(self.root / "api.log", "w")  # closed in stop(), after the process
        self._api_log = log
        self._api = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "uvicorn",
                "stac_fastapi.pgstac.app:create_app",
                "--factory",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.api_port),
                "--log-level",
                "warning",
            ],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self._api.poll() is not None:
                raise RuntimeError(f"uvicorn exited: {(self.root / 'api.log').read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{self.url}/_mgmt/ping", timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                time.sleep(0.2)
        raise RuntimeError("stac-fastapi-pgstac did not answer within 60 s")

    def load(self, collections: Iterable[dict], items: Iterable[dict]) -> None:
        """``pypgstac load`` collections then items (ndjson files in the temp folder)."""
        for kind, docs in (("collections", collections), ("items", items)):
            path = self.root / f"{kind}.ndjson"
            path.write_text("".join(json.dumps(d) + "\n" for d in docs))
            os.chmod(path, 0o644)
            self._run(
                [
                    sys.executable,
                    "-m",
                    "pypgstac.pypgstac",
                    "load",
                    kind,
                    str(path),
                    "--dsn",
                    self.dsn,
                    "--method",
                    "upsert",
                ],
                f"pypgstac load {kind}",
            )

    def stop(self) -> None:
        if self._api is not None:
            self._api.terminate()
            try:
                self._api.wait(10)
            except subprocess.TimeoutExpired:
                self._api.kill()
                self._api.wait(10)
            self._api_log.close()
            self._api = None
        if self._pg_started:
            with contextlib.suppress(Exception):
                self._run(
                    self._as_pg(
                        [
                            str(self.bin / "pg_ctl"),
                            "-D",
                            str(self.root / "data"),
                            "-m",
                            "immediate",
                            "-w",
                            "stop",
                        ]
                    ),
                    "pg_ctl stop",
                    timeout=60,
                )
            self._pg_started = False
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> PgstacServer:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc: object) -> None:
        self.stop()


def stac_docs_from_static(catalog: str | Path) -> tuple[list[dict], list[dict]]:
    """(collections, items) of a static catalog as plain dicts with ``file://`` asset hrefs, for pgstac."""
    root = pystac.read_file(str(catalog))
    colls, items = [], []
    for c in root.get_children():
        d = c.to_dict(include_self_link=False, transform_hrefs=False)
        d["links"] = []
        colls.append(d)
        for it in c.get_items():
            it.make_asset_hrefs_absolute()
            for a in it.assets.values():
                # a bare path would be resolved against the API's URL by clients: serve file:// URIs
                a.href = Path(a.href).as_uri()
            di = it.to_dict(include_self_link=False, transform_hrefs=False)
            di["links"] = []
            di["collection"] = c.id
            items.append(di)
    return colls, items


# ------------------------------------------------------------------------------------------ small servers


class _Server:
    """A ThreadingHTTPServer on 127.0.0.1 in a daemon thread; subclasses set ``handle``."""

    def __init__(self) -> None:
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:  # keep test output clean
                pass

            def do_GET(self) -> None:
                owner._dispatch(self, "GET", None)

            def do_POST(self) -> None:
                n = int(self.headers.get("Content-Length") or 0)
                owner._dispatch(self, "POST", self.rfile.read(n) if n else b"")

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.requests: list[tuple[str, str, Any]] = []
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def _dispatch(self, h: BaseHTTPRequestHandler, method: str, body: bytes | None) -> None:
        parsed = json.loads(body) if body else None
        self.requests.append((method, h.path, parsed))
        status, payload, delay = self.handle(method, h.path, parsed)
        if delay:
            time.sleep(delay)
        raw = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        try:
            h.send_response(status)
            h.send_header("Content-Type", "application/json")
            h.send_header("Content-Length", str(len(raw)))
            h.end_headers()
            h.wfile.write(raw)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (timeout test)

    def handle(self, method: str, path: str, body: Any) -> tuple[int, Any, float]:
        raise NotImplementedError

    def __enter__(self) -> _Server:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def read_cassette(path: str | Path) -> list[dict]:
    """Interactions of a vcrpy cassette: request (method, uri, json body) and response (status, json)."""
    doc = yaml.safe_load(Path(path).read_text()) or {}
    out = []
    for it in doc.get("interactions", []):
        req, resp = it["request"], it["response"]
        raw = resp["body"]["string"]
        if isinstance(raw, bytes) and raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
        out.append(
            {
                "method": req["method"],
                "uri": req["uri"],
                "body": json.loads(req["body"]) if req.get("body") else None,
                "status": resp["status"]["code"],
                "json": json.loads(raw),
            }
        )
    return out


def _rewrite(obj: Any, old: str, new: str) -> Any:
    return json.loads(json.dumps(obj).replace(old, new))


class ReplayServer(_Server):
    """Replays recorded STAC API searches; ``landing`` is the API landing page (hrefs rewritten)."""

    def __init__(self, interactions: list[dict], api_root: str, landing: dict | None = None) -> None:
        super().__init__()
        self.api_root = api_root.rstrip("/")
        self.interactions = interactions
        self.landing = _rewrite(
            landing
            or {
                "type": "Catalog",
                "id": "replay",
                "description": "recorded STAC API",
                "stac_version": "1.0.0",
                "conformsTo": [
                    "https://api.stacspec.org/v1.0.0/core",
                    "https://api.stacspec.org/v1.0.0/item-search",
                    "https://api.stacspec.org/v1.0.0/item-search#query",
                    "https://api.stacspec.org/v1.0.0/item-search#fields",
                ],
                "links": [{"rel": "search", "href": f"{self.api_root}/search", "method": "POST"}],
            },
            self.api_root,
            self.url,
        )

    def handle(self, method: str, path: str, body: Any) -> tuple[int, Any, float]:
        if method == "GET" and path.rstrip("/") in ("", "/"):
            return 200, self.landing, 0
        if path.startswith("/search"):
            sent = {k: v for k, v in (body or {}).items() if k not in ("limit",)}
            for it in self.interactions:
                rec = {k: v for k, v in (it["body"] or {}).items() if k not in ("limit",)}
                if rec == sent:
                    return it["status"], _rewrite(it["json"], self.api_root, self.url), 0
            return 400, {"code": "NotRecorded", "description": f"no recorded search for {sent}"}, 0
        return 404, {"code": "NotFound", "description": path}, 0


class ScriptedServer(_Server):
    """Answers from a script: ``script(method, path, body, n)`` -> (status, json, delay s)."""

    def __init__(self, script: Callable[[str, str, Any, int], tuple[int, Any, float]]) -> None:
        super().__init__()
        self.script = script

    def handle(self, method: str, path: str, body: Any) -> tuple[int, Any, float]:
        return self.script(method, path, body, len(self.requests))


class TokenServer(_Server):
    """Planetary Computer SAS token endpoint: GET /{account}/{container} -> token + expiry."""

    def __init__(self, lifetime: dt.timedelta = dt.timedelta(hours=1)) -> None:
        super().__init__()
        self.lifetime = lifetime

    def handle(self, method: str, path: str, body: Any) -> tuple[int, Any, float]:
        parts = path.strip("/").split("/")
        if len(parts) != 2:
            return 404, {"detail": "expected /{account}/{container}"}, 0
        account, container = parts
        expiry = dt.datetime.now(dt.timezone.utc) + self.lifetime
        n = len(self.requests)
        token = f"sv=2021-06-08&se={expiry:%Y-%m-%dT%H:%M:%SZ}&sr=c&sp=rl&sig=test{account}{container}{n}"
        return 200, {"msft:expiry": expiry.strftime("%Y-%m-%dT%H:%M:%SZ"), "token": token}, 0


# ---------------------------------------------------------------------------------------- MODIS test COGs


def modis_pattern(shape: tuple[int, int], asset: str) -> np.ndarray:
    """Deterministic raw values for a MODIS asset on its full tile grid (what the tests expect back)."""
    rows, cols = np.indices(shape)
    if asset.endswith("_NDVI") or asset.endswith("_EVI"):
        return (1000 + (cols * 8000) // shape[1] + (rows % 7)).astype("int16")
    if asset.endswith("red_reflectance"):
        return np.full(shape, 500, "int16")
    if asset.endswith("NIR_reflectance"):
        return (2000 + (rows * 2000) // shape[0]).astype("int16")
    if asset.endswith("VI_Quality"):
        qa = np.zeros(shape, "uint16")
        qa[:, (cols[0] % 50) >= 45] = 2  # MODLAND 'probably cloudy' stripes
        qa[(rows[:, 0] % 40) >= 38, :] |= 1 << 15  # possible shadow rows
        return qa
    raise KeyError(asset)


def write_modis_cogs(item: pystac.Item, folder: Path, assets: Iterable[str]) -> pystac.Item:
    """Write ``assets`` of a recorded MODIS item as tiled GeoTIFFs on the item's own sinusoidal grid
    (CRS from ``proj:wkt2``, transform and shape from the projection fields); returns the item with those
    hrefs rewritten to the local files (other assets keep their recorded hrefs)."""
    import rasterio
    from affine import Affine

    folder.mkdir(parents=True, exist_ok=True)
    out = item.clone()
    props = out.properties
    shape = tuple(props["proj:shape"])
    transform = Affine(*props["proj:transform"][:6])
    for key in assets:
        path = folder / f"{item.id}_{key}.tif"
        if not path.exists():
            data = modis_pattern(shape, key)
            profile = {
                "driver": "GTiff",
                "width": shape[1],
                "height": shape[0],
                "count": 1,
                "dtype": data.dtype.name,
                "crs": rasterio.crs.CRS.from_wkt(props["proj:wkt2"]),
                "transform": transform,
                "tiled": True,
                "blockxsize": 512,
                "blockysize": 512,
                "compress": "deflate",
            }
            tmp = path.with_suffix(".part.tif")
            with rasterio.open(tmp, "w", **profile) as dst:
                dst.write(data, 1)
            os.replace(tmp, path)
        out.assets[key].href = str(path)
    return out
