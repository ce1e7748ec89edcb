"""Pinning the free global scales of the relaxometry problem (issue 8).

Why: each weighted series comes with an unknown receiver gain, and the seed normalises each
image by its white-matter (WM) histogram mode. Per voxel the three contrasts give three
equations for PD, T1 and T2, so the three per-contrast scales are a 3-dimensional family of
exact solutions; the seed's objective picks one through a WM *reference* (PD 0.70,
T1 0.85 s, T2 70 ms) with ±20 % freedom, i.e. the absolute level comes from the assumption,
not from the data.

What pins it here (``scaling: calibrated``): a maximum-a-posteriori fit at the *tissue* level,
before and independently of the network. Unknowns: the three log-scales and the (PD, T1, T2)
of WM, grey matter (GM) and cerebrospinal fluid (CSF) — 12 numbers; data: the robust median of
every mode-normalised contrast in eroded WM, GM and CSF — 9 numbers; priors:

* CSF is (close to) pure water at 37 °C — physics, not assumption: PD = 1 (definition of PD),
  T1 ≈ 4.3 s and T2 ≈ 2 s at 3 T (literature); tight priors. Through the T1w and T2w images this
  fixes two of the three scales. CSF is dark in the T1w and tissue about three times
  brighter, so even the purest CSF voxels read too bright there (partial volume: +6 to +23 %
  on the phantom); that median carries an extra 15 % SD (``Priors.extra_rel_noise``) instead
  of being trusted like the others, which took the WM T1 bias from +6 % to +1 % on the
  reference phantom;
* WM and GM: literature values with wide priors (log-SD 0.15, i.e. ±15 %). FLAIR nulls (or
  nearly nulls) CSF, so its scale has no physical anchor; the WM/GM priors pick the member of
  the remaining one-dimensional family closest to literature values *in all six tissue
  parameters together*, which spreads the error instead of putting it all on one parameter.

The posterior standard deviations of the log-scales are returned too; the inference step turns
them into per-voxel uncertainty maps (the sensitivity of each map to the scales, times their
posterior SD) so users see where values are soft.

:func:`pin_maps` then moves the network's maps along the degenerate family, voxel by voxel,
until they re-synthesise the data with the calibrated scales (Newton's method on the 3×3
system of :func:`qmriflow.physics.signal`): the network supplies the spatial regularisation
and the per-voxel solution, the calibration the absolute level. With a contrast withheld,
each voxel keeps a direction the inputs do not determine; :func:`anchor_free_directions`
sets the maps' level along it per tissue from the same calibration, instead of leaving it to
the network's guess.

The stages, one module each, in the order inference runs them: :mod:`.scales` (priors,
tissue medians, :func:`calibrate_scales`), :mod:`.pinning` (:func:`pin_maps`, the scale
sensitivity behind the uncertainty maps, tissue targets, :func:`anchor_free_directions`),
:mod:`.refine` (:func:`refine_maps`) and :mod:`.smooth` (:func:`smooth_maps`); this package
exports their public names.
"""

from __future__ import annotations

from .pinning import (
    _log_jacobian,  # noqa: F401 (tests/test_calibration.py checks the Jacobian)
                      anchor_free_directions,
                      csf_branch_t2,
                      pin_maps,
                      scale_sensitivity,
                      shift_to_tissues,
                      tissue_start_table,
                      tissue_value_maps,
                      tissue_weights,
)
from .refine import BRANCH_CHI2, REFINE_STATUS, RESTART_CHI, refine_maps
from .scales import (
                      CSF_REFERENCE,
                      DEFAULT_ESTIMATOR,
                      DEFAULT_METHOD,
                      DEFAULT_MODEL_ERROR,
                      DEFAULT_MODEL_ERROR_CLUSTER,
                      DSEG_LABEL,
                      ESTIMATORS,
                      GM_REFERENCE,
                      LIMITS,
                      METHODS,
                      PARAMS,
                      TISSUES,
                      Calibration,
                      Priors,
                      calibrate_scales,
                      tissue_masks,
                      tissue_medians,
)
from .smooth import DEFAULT_SMOOTHING, SMOOTHING_GUIDES, Smoothing, smooth_maps

__all__ = [
    "BRANCH_CHI2",
    "CSF_REFERENCE",
    "DEFAULT_ESTIMATOR",
    "DEFAULT_METHOD",
    "DEFAULT_MODEL_ERROR",
    "DEFAULT_MODEL_ERROR_CLUSTER",
    "DEFAULT_SMOOTHING",
    "DSEG_LABEL",
    "ESTIMATORS",
    "GM_REFERENCE",
    "LIMITS",
    "METHODS",
    "PARAMS",
    "REFINE_STATUS",
    "RESTART_CHI",
    "SMOOTHING_GUIDES",
    "TISSUES",
    "Calibration",
    "Priors",
    "Smoothing",
    "anchor_free_directions",
    "calibrate_scales",
    "csf_branch_t2",
    "pin_maps",
    "refine_maps",
    "scale_sensitivity",
    "shift_to_tissues",
    "smooth_maps",
    "tissue_masks",
    "tissue_medians",
    "tissue_start_table",
    "tissue_value_maps",
    "tissue_weights",
]
