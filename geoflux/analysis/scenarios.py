"""Scenarios: documented driver perturbations, re-prediction and the share of pixels leaving the area of
applicability. NEE in gC m-2 d-1.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from geoflux.analysis.attribution import _features, _regions
from geoflux.config import VariableSpec
from geoflux.errors import GeofluxError
from geoflux.model import TrainedModel


def _esat(t: np.ndarray) -> np.ndarray:
    """Saturation vapour pressure (hPa) at t (degC), Magnus formula."""
    return 6.1078 * np.exp(17.27 * t / (t + 237.3))


@dataclass(frozen=True)
class Scenario:
    """A documented driver perturbation.

    ``changes`` maps a driver to ``(op, value)``: ``("add", v)`` adds v (driver units), ``("scale", f)``
    multiplies by f, ``("vpd_at_constant_rh", dT)`` recomputes VPD (hPa) for air temperature ``ta`` (degC)
    raised by dT at unchanged relative humidity. Drivers absent from the run are ignored (and listed).
    """

    name: str
    description: str
    changes: tuple[tuple[str, str, float], ...]

    def _change(self, var: str, op: str, value: float, col: Any, ta: Any) -> Any:
        if op == "add":
            return col + value
        if op == "scale":
            return col * value
        if op == "vpd_at_constant_rh":
            if ta is None:
                raise GeofluxError(f"scenario {self.name}: {var} at constant humidity needs the driver 'ta'")
            return col * _esat(ta + value) / _esat(ta)
        raise GeofluxError(f"scenario {self.name}: unknown operation '{op}'")

    def apply(self, sample: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
        """The perturbed copy of a driver table and the drivers of the scenario it does not have."""
        out = sample.copy()
        skipped = []
        ta = sample["ta"] if "ta" in sample else None
        for var, op, value in self.changes:
            if var not in out:
                skipped.append(var)
                continue
            out[var] = self._change(var, op, value, out[var], ta)
        return out, skipped

    def apply_features(self, x: np.ndarray, features: Sequence[str]) -> np.ndarray:
        """The perturbed copy of a (n, n_features) feature array (e.g. one map chunk), same column order.

        For scenario maps: ``model.predict_bands(scenario.apply_features(x, model.features))`` per chunk.
        """
        out = np.array(x, dtype=np.float64, copy=True)
        idx = {f: i for i, f in enumerate(features)}
        ta = x[:, idx["ta"]].astype(np.float64) if "ta" in idx else None
        for var, op, value in self.changes:
            if var in idx:
                out[:, idx[var]] = self._change(var, op, value, out[:, idx[var]], ta)
        return out.astype(np.asarray(x).dtype)


SCENARIOS: tuple[Scenario, ...] = (
    Scenario(
        "warming_2K",
        "+2 K air temperature with land-surface temperature following and VPD at constant relative humidity",
        (("ta", "add", 2.0), ("lst", "add", 2.0), ("vpd", "vpd_at_constant_rh", 2.0)),
    ),
    Scenario("ta_plus_2K", "+2 K air temperature only (other drivers unchanged)", (("ta", "add", 2.0),)),
    Scenario(
        "drying_20pct",
        "-20 % precipitation and relative soil moisture",
        (("precip", "scale", 0.8), ("sm", "scale", 0.8)),
    ),
)


def scenario_projection(
    model: TrainedModel,
    sample: pd.DataFrame,
    variables: Sequence[VariableSpec],
    scenarios: Sequence[Scenario] = SCENARIOS,
) -> pd.DataFrame:
    """Re-predict a pixel sample under each scenario and flag predictions leaving the area of applicability.

    Returns
    -------
    One row per scenario and region: mean NEE before/after and the change (gC m-2 d-1), the fraction of
    pixel-steps inside the AOA before and after, and the fraction that leave it (inside before, outside
    after) — changes there are extrapolations the towers cannot vouch for.
    """
    s = sample.loc[sample["valid"]].reset_index(drop=True)
    x0 = _features(s, variables)
    b0 = model.predict_bands(x0)
    has_aoa = "AOA" in model.bands
    a_idx = model.bands.index("AOA") if has_aoa else None
    rows = []
    for sc in scenarios:
        s1, skipped = sc.apply(s)
        b1 = model.predict_bands(_features(s1, variables))
        for region, m in _regions(s, variables).items():
            if not m.any():
                continue
            row: dict[str, Any] = {
                "scenario": sc.name,
                "region": region,
                "nee_base": float(b0[m, 0].mean()),
                "nee_scenario": float(b1[m, 0].mean()),
                "delta_nee": float((b1[m, 0] - b0[m, 0]).mean()),
                "skipped_drivers": ",".join(skipped),
                "description": sc.description,
            }
            if has_aoa:
                in0, in1 = b0[m, a_idx] == 1, b1[m, a_idx] == 1
                row |= {
                    "aoa_base": float(in0.mean()),
                    "aoa_scenario": float(in1.mean()),
                    "left_aoa": float((in0 & ~in1).mean()),
                    "delta_nee_inside_aoa": float((b1[m, 0] - b0[m, 0])[in1].mean()) if in1.any() else np.nan,
                }
            rows.append(row)
    return pd.DataFrame(rows)
