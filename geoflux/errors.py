"""One exception family per stage, all subclasses of :class:`GeofluxError`.

Messages are one line that names the culprit (file, key, column, item) and says what was expected, so the
CLI can print ``error: <message>`` and exit non-zero without a traceback.
"""

from __future__ import annotations


class GeofluxError(Exception):
    """Base class of every error geoflux raises on purpose."""


class ConfigError(GeofluxError):
    """The run configuration is malformed (unknown key, wrong type, missing value)."""


class TowerFormatError(GeofluxError):
    """A tower data file or site table cannot be read or fails a check."""


class CatalogError(GeofluxError):
    """A STAC catalog cannot be reached, searched, or lacks a configured collection/asset."""


class CubeError(GeofluxError):
    """Driver rasters cannot be loaded onto the target grid."""


class GridError(GeofluxError):
    """A target grid is invalid, or a tower lies outside it."""


class FootprintError(GeofluxError):
    """A tower's footprint cannot be computed as configured (e.g. FFP fallback with ``fallback: error``)."""


class ModelError(GeofluxError):
    """A model cannot be trained, saved or loaded (e.g. a tampered or foreign file)."""


class OutputExistsError(GeofluxError):
    """An output exists and ``overwrite`` was not requested."""


class MapReadError(GeofluxError):
    """A map file to score cannot be read (not a raster, truncated or corrupt)."""


class OutputError(GeofluxError):
    """An output folder cannot be created or written (under a file, read-only, a pseudo file system)."""
