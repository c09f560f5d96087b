"""Mapping stage: chunk-wise prediction of every model band to COGs, tiles, the time cube and STAC.

* :mod:`.predict` — one task per output chunk, the model broadcast once; COG writing and resume.
* :mod:`.scheduler` — local threads or a dask.distributed cluster.
* :mod:`.tiles` — tiling of large regions and VRT mosaics.
* :mod:`.outputs` — the CF time cube (``maps/nee.zarr``) and time-stacked VRTs.
"""

from geoflux.mapping.predict import (
    BAND_DESCRIPTIONS,
    BAND_DTYPES,
    BAND_QUANTITIES,
    BAND_UNITS,
    CATEGORICAL_BANDS,
    FLOAT_NODATA,
    UNCHECKED_TAGS,
    band_description,
    band_dtype,
    band_quantity,
    band_spec,
    band_units,
    predict_bands,
    redo_reason,
    single_threaded,
    write_maps,
    write_tiles,
)

__all__ = [
    "BAND_DESCRIPTIONS",
    "BAND_DTYPES",
    "BAND_QUANTITIES",
    "BAND_UNITS",
    "CATEGORICAL_BANDS",
    "FLOAT_NODATA",
    "UNCHECKED_TAGS",
    "band_description",
    "band_dtype",
    "band_quantity",
    "band_spec",
    "band_units",
    "predict_bands",
    "redo_reason",
    "single_threaded",
    "write_maps",
    "write_tiles",
]
