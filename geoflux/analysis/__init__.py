"""Analysis of a trained run: multi-scale skill, what governs NEE, year-to-year budgets, scenarios.

* :mod:`.multiscale` — held-out skill per time scale.
* :mod:`.attribution` — importance, dependence and interactions, anomaly attribution.
* :mod:`.scenarios` — driver perturbations and the AOA share.
* :mod:`.budgets` — annual budgets with intervals, per pixel, class and region.
* :mod:`.analyze` — ``geoflux analyze``: all of the above for a run.
"""

from geoflux.analysis.analyze import (
    ANALYSIS_DIR,
    analyze,
)
from geoflux.analysis.attribution import (
    dependence,
    driver_groups,
    grouped_permutation_importance,
    iav_attribution,
    sample_drivers,
    shap_importance,
)
from geoflux.analysis.multiscale import (
    multiscale_frames,
    multiscale_scores,
    multiscale_table,
)
from geoflux.analysis.scenarios import (
    SCENARIOS,
    Scenario,
    scenario_projection,
)

__all__ = [
    "ANALYSIS_DIR",
    "SCENARIOS",
    "Scenario",
    "analyze",
    "dependence",
    "driver_groups",
    "grouped_permutation_importance",
    "iav_attribution",
    "multiscale_frames",
    "multiscale_scores",
    "multiscale_table",
    "sample_drivers",
    "scenario_projection",
    "shap_importance",
]
