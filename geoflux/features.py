"""Model features from driver values: one definition shared by extraction and mapping.

Continuous drivers are features as they are; a categorical driver (land cover) becomes one feature per
class holding the fraction of that class (0/1 for a pixel, the footprint-weighted fraction at a tower), so
class codes are never averaged or interpolated.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from geoflux.config import VariableSpec


def feature_names(variables: Sequence[VariableSpec]) -> list[str]:
    """Names of the model features, in column order."""
    names: list[str] = []
    for v in variables:
        if v.kind == "categorical":
            names.extend(f"{v.name}_{c}" for c in v.classes or [])
        else:
            names.append(v.name)
    return names


def class_groups(variables: Sequence[VariableSpec]) -> list[list[str]]:
    """The class-fraction feature columns of each categorical driver (one list per driver)."""
    return [[f"{v.name}_{c}" for c in v.classes] for v in variables if v.kind == "categorical" and v.classes]


def harden_class_fractions(table: pd.DataFrame, groups: Sequence[Sequence[str]]) -> pd.DataFrame:
    """Class fractions → one-hot of the dominant class, per group of columns (a copy).

    A map pixel has exact 0/1 class features; footprint fractions (FFP tails give every row small non-zero
    fractions of every class) have a distribution no pixel can have, and trees split on those tails. The
    dominant class's share is kept as ``<first column's driver>_dominant_share`` (information, not a
    feature). Rows with a missing fraction stay missing.
    """
    out = table.copy()
    for cols in groups:
        cols = list(cols)
        frac = out[cols].to_numpy(np.float64)
        known = ~np.isnan(frac).any(axis=1)
        top = np.argmax(np.nan_to_num(frac, nan=-1.0), axis=1)
        hard = np.zeros_like(frac)
        hard[np.arange(len(frac)), top] = 1.0
        hard[~known] = np.nan
        driver = cols[0].rsplit("_", 1)[0]
        out[f"{driver}_dominant_share"] = np.where(known, frac.max(axis=1, initial=0.0), np.nan)
        out[cols] = hard
    return out


def feature_units(variables: Sequence[VariableSpec]) -> dict[str, str]:
    """Units of each feature (class fractions are dimensionless)."""
    out: dict[str, str] = {}
    for v in variables:
        if v.kind == "categorical":
            out.update({f"{v.name}_{c}": "fraction" for c in v.classes or []})
        else:
            out[v.name] = v.units
    return out


def pixel_features(values: Mapping[str, np.ndarray], variables: Sequence[VariableSpec]) -> np.ndarray:
    """Stack driver values into a feature matrix.

    Parameters
    ----------
    values : per variable, an array of the same shape (any shape, e.g. a chunk (y, x)); NaN = missing.
    variables : driver definitions (order defines feature order).

    Returns
    -------
    float32 array of shape ``values.shape + (n_features,)``; a pixel with a missing driver has NaN in all
    of that driver's features (a missing land-cover pixel is NaN in every class fraction).
    """
    cols: list[np.ndarray] = []
    for v in variables:
        x = np.asarray(values[v.name], dtype=np.float32)
        if v.kind == "categorical":
            for c in v.classes or []:
                onehot = (x == c).astype(np.float32)
                onehot[np.isnan(x)] = np.nan
                cols.append(onehot)
        else:
            cols.append(x)
    return np.stack(cols, axis=-1)
