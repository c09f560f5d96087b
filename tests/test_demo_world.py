"""The generated world's towers see the footprints the pipeline computes from their records."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from geoflux.config import FootprintSpec
from geoflux.demo import WORLD_SIZES, generate_fields, place_towers, synthesize_tower
from geoflux.extract import tower_footprints


@pytest.mark.parametrize("source_area", ["ffp", "rotated"])
def test_tower_footprints_are_the_pipelines(source_area):
    """synthesize_tower computes footprints on its own thread: the same weights as the pipeline's
    :func:`geoflux.extract.tower_footprints` on the tower's file columns (and, for a rotated source area,
    on the wind turned by ``rotate_deg``)."""
    spec = replace(WORLD_SIZES["tiny"], n_towers=2, source_area=source_area)
    fields = generate_fields(spec)
    site = place_towers(spec, fields).iloc[0]
    df, truth = synthesize_tower(site, fields, spec, np.random.default_rng(0))

    wind = df[["USTAR", "WS", "WD", "SW_IN_F", "MO_LENGTH", "V_SIGMA"]].rename(columns={"SW_IN_F": "SW_IN"})
    wind = wind.assign(site=site.name)
    wind.attrs["resolution"] = "HH"
    fp = FootprintSpec(radius=spec.footprint_radius)
    one = site.to_frame().T
    expected = {"footprint": tower_footprints(one, spec.geobox, fp, records=wind)[str(site.name)]}
    if source_area == "rotated":
        turned = wind.assign(WD=np.mod(wind["WD"] + spec.rotate_deg, 360.0))
        turned.attrs = dict(wind.attrs)
        expected["true_footprint"] = tower_footprints(one, spec.geobox, fp, records=turned)[str(site.name)]
        assert not np.array_equal(expected["true_footprint"].weights, expected["footprint"].weights)
    else:
        expected["true_footprint"] = expected["footprint"]
    for key, want in expected.items():
        got = truth[key]
        assert got.method == want.method == "ffp", key
        assert (got.row_off, got.col_off, got.coverage) == (want.row_off, want.col_off, want.coverage), key
        np.testing.assert_array_equal(got.weights, want.weights, err_msg=key)
