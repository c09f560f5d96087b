"""A fixed tiling of the target grid, per-tile grids and VRT mosaics of tile outputs.

Tiling scheme
-------------
The run's grid (``grid.crs``, ``grid.resolution``, ``grid.bbox``) is cut into square tiles of ``size``
pixels (default :data:`DEFAULT_TILE_PIXELS`, rounded down to a multiple of ``grid.chunk`` so that tile
edges fall on chunk edges). Tile ``(X, Y)`` is column ``X`` counted eastwards and row ``Y`` counted
southwards from the grid's upper-left corner, both from 0; it covers pixel rows ``Y*size ..
(Y+1)*size - 1`` and columns ``X*size .. (X+1)*size - 1``; tiles in the last row/column are cut at the
grid's edge. The scheme depends only on the grid and the tile size, so ``geoflux map --tile X Y`` names
the same pixels in every run and on every machine, and tiles can be mapped independently (e.g. one job
per tile on a batch system) and mosaicked afterwards.

Tile outputs live in ``maps/tiles-<size>/x<XXX>_y<YYY>/<band>_YYYYMMDD.tif``; the mosaic of one band and
time step is a GDAL VRT, ``maps/<band>_YYYYMMDD.vrt``, listing the finished tiles (areas of unfinished
tiles read as nodata).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from xml.sax.saxutils import escape

from odc.geo.geobox import GeoBox

from geoflux.atomic import atomic_path
from geoflux.errors import GridError

DEFAULT_TILE_PIXELS = 2048


def tile_pixels(chunk: int, size: int | None = None) -> int:
    """The tile edge (pixels): ``size`` or the default, rounded down to a multiple of ``chunk``."""
    size = DEFAULT_TILE_PIXELS if size is None else int(size)
    if size < chunk:
        raise GridError(f"tile size {size} px is smaller than the chunk ({chunk} px) (expected >= chunk)")
    return (size // chunk) * chunk


@dataclass(frozen=True)
class Tile:
    """One tile of a :class:`TileScheme`: its indices and its grid."""

    x: int
    y: int
    geobox: GeoBox
    rows: slice  # pixel rows of the tile in the full grid
    cols: slice  # pixel columns

    @property
    def id(self) -> str:
        """``x003_y012``: zero-padded column and row, sortable."""
        return f"x{self.x:03d}_y{self.y:03d}"


@dataclass(frozen=True)
class TileScheme:
    """Square tiles of ``size`` pixels over ``geobox`` (see the module docstring for the numbering)."""

    geobox: GeoBox
    size: int

    @property
    def shape(self) -> tuple[int, int]:
        """Number of tile rows and columns (ny, nx)."""
        ny, nx = self.geobox.shape
        return math.ceil(ny / self.size), math.ceil(nx / self.size)

    @property
    def folder(self) -> str:
        """Folder name of this scheme's tiles under ``maps/`` (the size is part of it)."""
        return f"tiles-{self.size}"

    def tile(self, x: int, y: int) -> Tile:
        """Tile column ``x``, row ``y``.

        Raises
        ------
        GridError
            if the tile lies outside the grid.
        """
        nty, ntx = self.shape
        if not (0 <= x < ntx and 0 <= y < nty):
            raise GridError(
                f"tile ({x}, {y}) is outside the grid's {ntx} x {nty} tiles of {self.size} px "
                f"(expected 0 <= X < {ntx}, 0 <= Y < {nty})"
            )
        ny, nx = self.geobox.shape
        rows = slice(y * self.size, min((y + 1) * self.size, ny))
        cols = slice(x * self.size, min((x + 1) * self.size, nx))
        return Tile(x, y, self.geobox[rows, cols], rows, cols)

    def tiles(self) -> list[Tile]:
        """All tiles, row by row from the upper-left."""
        nty, ntx = self.shape
        return [self.tile(x, y) for y in range(nty) for x in range(ntx)]

    def tiles_in_bbox(self, bbox: Sequence[float]) -> list[Tile]:
        """Tiles intersecting ``bbox`` = (xmin, ymin, xmax, ymax) in the grid's CRS units.

        Raises
        ------
        GridError
            if the bbox is malformed or misses the grid.
        """
        if len(bbox) != 4 or not (bbox[0] < bbox[2] and bbox[1] < bbox[3]):
            raise GridError(f"bbox {list(bbox)}: expected xmin ymin xmax ymax with xmin < xmax, ymin < ymax")
        inv = ~self.geobox.affine
        corners = [inv @ (bx, by) for bx in (bbox[0], bbox[2]) for by in (bbox[1], bbox[3])]
        cs = [c for c, _ in corners]
        rs = [r for _, r in corners]
        ny, nx = self.geobox.shape
        c0, c1 = max(0, math.floor(min(cs))), min(nx, math.ceil(max(cs)))
        r0, r1 = max(0, math.floor(min(rs))), min(ny, math.ceil(max(rs)))
        if c0 >= c1 or r0 >= r1:
            raise GridError(
                f"bbox {list(bbox)}: does not intersect the grid {tuple(self.geobox.extent.boundingbox)}"
            )
        xs = range(c0 // self.size, (c1 - 1) // self.size + 1)
        ys = range(r0 // self.size, (r1 - 1) // self.size + 1)
        return [self.tile(x, y) for y in ys for x in xs]


VRT_TYPES = {
    "float32": "Float32",
    "float64": "Float64",
    "uint8": "Byte",
    "int16": "Int16",
    "uint16": "UInt16",
}


def write_vrt(
    path: Path,
    geobox: GeoBox,
    sources: Iterable[tuple[Path, slice, slice]],
    dtype: str = "float32",
    nodata: float | None = -9999.0,
    description: str = "",
    units: str = "",
    resampling: str = "average",
) -> Path:
    """Write a single-band GDAL VRT mosaic of tile files onto ``geobox`` (atomically).

    Parameters
    ----------
    path : the ``.vrt`` to write; source paths are stored relative to its folder.
    geobox : the mosaic's grid (the full run grid).
    sources : (tile file, rows, cols) with the tile's pixel window in ``geobox``.
    dtype, nodata, description, units : of the band (as in the tiles).
    resampling : used when the VRT is read at a lower resolution (``average``, ``nearest``).
    """
    path = Path(path)
    ny, nx = geobox.shape
    a = geobox.affine
    gt = ", ".join(repr(float(v)) for v in (a.c, a.a, a.b, a.f, a.d, a.e))
    nd = "" if nodata is None else f"    <NoDataValue>{nodata!r}</NoDataValue>\n"
    lines = [
        f'<VRTDataset rasterXSize="{nx}" rasterYSize="{ny}">',
        f"  <SRS>{escape(geobox.crs.to_wkt())}</SRS>",
        f"  <GeoTransform>{gt}</GeoTransform>",
        f'  <VRTRasterBand dataType="{VRT_TYPES[dtype]}" band="1">',
        nd.rstrip("\n") if nd else None,
        f"    <Description>{escape(description)}</Description>" if description else None,
        f"    <UnitType>{escape(units)}</UnitType>" if units else None,
    ]
    for src, rows, cols in sorted(sources, key=lambda s: (s[1].start, s[2].start)):
        h, w = rows.stop - rows.start, cols.stop - cols.start
        rel = Path(src).resolve().relative_to(path.parent.resolve()).as_posix()
        lines += [
            f'    <ComplexSource resampling="{resampling}">',
            f'      <SourceFilename relativeToVRT="1">{escape(rel)}</SourceFilename>',
            "      <SourceBand>1</SourceBand>",
            f'      <SrcRect xOff="0" yOff="0" xSize="{w}" ySize="{h}" />',
            f'      <DstRect xOff="{cols.start}" yOff="{rows.start}" xSize="{w}" ySize="{h}" />',
            f"      <NODATA>{nodata!r}</NODATA>" if nodata is not None else None,
            "    </ComplexSource>",
        ]
    lines += ["  </VRTRasterBand>", "</VRTDataset>", ""]
    with atomic_path(path) as tmp:
        tmp.write_text("\n".join(x for x in lines if x is not None))
    return path
