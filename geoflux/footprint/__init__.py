"""Footprint stage: where a tower's flux comes from, as weights on a raster grid.

:class:`FootprintWeights` is the plain value every method returns: a window of the target grid and the
weight of each pixel in it (the fraction of the flux footprint that falls into the pixel).
"""

from geoflux.footprint.sites import load_footprints, save_footprints, tower_footprint
from geoflux.footprint.weights import FootprintWeights, disk_weights, tower_xy

__all__ = [
    "FootprintWeights",
    "disk_weights",
    "load_footprints",
    "save_footprints",
    "tower_footprint",
    "tower_xy",
]
