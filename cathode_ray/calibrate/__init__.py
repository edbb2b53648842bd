"""Calibration stage: aggregation, conformal intervals, OOD gates, backbone fallback, triage, metrics.

Pure numpy / scikit-learn (no torch, no ray). Energies in eV/atom.
"""

from cathode_ray.calibrate.aggregate import Aggregated, aggregate
from cathode_ray.calibrate.calibrator import RESULT_COLUMNS, Calibrator, CalibratorConfig, Estimate
from cathode_ray.calibrate.conformal import ConformalParams, fit_conformal
from cathode_ray.calibrate.fallback import ZeroShotFallback
from cathode_ray.calibrate.ood import OODConfig, OODModel, OODResult
from cathode_ray.calibrate.triage import TriageConfig, choose_thresholds, triage

__all__ = [
    "RESULT_COLUMNS", "Aggregated", "Calibrator", "CalibratorConfig", "ConformalParams", "Estimate",
    "OODConfig", "OODModel", "OODResult", "TriageConfig", "aggregate", "choose_thresholds",
    "ZeroShotFallback", "fit_conformal", "triage",
]
