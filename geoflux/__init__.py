"""geoflux: eddy-covariance flux towers to footprint-aware maps of net ecosystem exchange (NEE).

The library is a chain of stages with plain data between them (see README):
``towers`` → ``footprint`` → ``catalog`` → ``cube`` → ``extract`` → ``model`` → ``mapping`` →
``cog`` → ``validate``; :func:`geoflux.pipeline.run` is the only place that knows the order.
"""

from geoflux.errors import (
    CatalogError,
    ConfigError,
    CubeError,
    GeofluxError,
    GridError,
    ModelError,
    OutputExistsError,
    TowerFormatError,
)

__version__ = "0.1.0"

__all__ = [
    "CatalogError",
    "ConfigError",
    "CubeError",
    "GeofluxError",
    "GridError",
    "ModelError",
    "OutputExistsError",
    "TowerFormatError",
    "__version__",
]
