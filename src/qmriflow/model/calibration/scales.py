"""Calibrated contrast scales: priors, tissue medians and the MAP fit of the per-contrast
scales at the tissue level (see the package docstring)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from scipy import ndimage, optimize

from ... import physics

METHODS = ("seed", "calibrated")
"""``seed``: the published bounded least-squares scale around the WM reference (±20 %);
``calibrated``: fixed per-session scales from :func:`calibrate_scales`."""

DEFAULT_METHOD = "calibrated"
"""The default (measured best: bench/bench_model_accuracy.py, bench/RESULTS.md)."""

ESTIMATORS = {
    "refined": "the network's maps moved onto the session's calibrated scales, made consistent "
               "with the input images voxel by voxel (the network's maps as the prior) and "
               "smoothed edge-preservingly",
    "network-only": "the network's maps exactly as it outputs them (times the brain mask): no "
                    "pinning, no data consistency, no smoothing",
    "network-free": "no network: the session calibration's WM, GM and CSF values blended by "
                    "smoothed dseg weights, made consistent with the input images voxel by voxel "
                    "(those values as the prior) and smoothed edge-preservingly",
}
"""How the maps are estimated at inference (``qmriflow infer --estimator``): name → one-sentence
description (recorded in the sidecars). ``network-free`` needs ``scaling: calibrated``; with
``scaling: seed`` ``refined`` leaves the network's maps as they are (nothing to refine
against)."""

DEFAULT_ESTIMATOR = "refined"
"""The default estimator (the others are the baselines it is benchmarked against)."""

CSF_REFERENCE = {"pd": 1.0, "t1_s": 4.3, "t2_s": 2.0}
"""CSF ≈ water at 37 °C, 3 T (PD = 1 by definition; T1, T2 from the literature)."""
GM_REFERENCE = {"pd": 0.80, "t1_s": 1.35, "t2_s": 0.090}
"""Cortical grey matter at 3 T (literature midpoints; see phantom.tissues)."""
TISSUES = ("WM", "GM", "CSF")
DSEG_LABEL = {"GM": 1, "WM": 2, "CSF": 3}
PARAMS = ("pd", "t1_s", "t2_s")
UNUSED = {("CSF", "flair"), ("CSF", "irgre")}
"""Tissue medians left out of the fit: CSF near the inversion null, where the magnitude signal
depends steeply (and two-valuedly) on CSF T1 and, in real scans, on inflow and partial volume."""
LIMITS = {"pd": (1e-3, 1.0), "t1_s": (0.05, 5.0), "t2_s": (0.005, 3.0)}
"""Ranges of the maps (the network's output ranges)."""
DEFAULT_MODEL_ERROR = 0.12
"""Relative error (log-SD) of each contrast's signal model that the uncertainty maps add to
the calibrated scales' covariance (:func:`~qmriflow.model.calibration.scale_sensitivity`)
when a session's scales come from the session alone (per-session calibration);
``qmriflow infer --model-error``, ``model.model_error``. Chosen on the yardstick's tuning
seed 41 (gains not comparable between sessions, 6 sessions) as the smallest of 0.05, 0.10,
0.12, 0.15 whose stated SDs cover the true error of the session means in at least 68 % of
sessions for WM/GM T1, T2 and PD (0.10: GM T1 4 of 6); held-out results in
bench/results-pages/accuracy.md. Physically of the size of what the estimator's equations
leave out (B1+ ±15 % moves the T1w WM/GM signals by 8-11 %, MT the T2w WM signal by 15 %)."""
DEFAULT_MODEL_ERROR_CLUSTER = 0.12
"""The same for scales from a protocol cluster (its fit or a join;
``qmriflow infer --model-error-cluster``, ``model.model_error_cluster``). Kept equal to
:data:`DEFAULT_MODEL_ERROR`: 0.03, chosen on tuning seed 32 (the smallest of 0, 0.03, 0.06,
0.09 with coverage of at least 68 % for all six figures), held on held-out seed 2121 (70-100 %,
SDs about the size of the errors) but not on held-out seed 2123 (GM T1 60 %, WM T2 55 %),
where the cohort prior set the clusters' level 8-10 % off: about one stated SD of the level
(6-11 %), shared by every session of a cluster, so coverage there is decided by two level
draws. With 0.12 the stated SDs are 2-5 times the errors but cover them
(bench/results-pages/accuracy.md)."""
_LOG_LO = np.log([LIMITS[p][0] for p in PARAMS])
_LOG_HI = np.log([LIMITS[p][1] for p in PARAMS])
"""The ranges in log-parameters (PD, T1, T2 order), the bounds of every move of the maps."""


@dataclass(frozen=True)
class Priors:
    """Log-normal priors of the tissue parameters (centre, log-SD) and the data noise."""

    centres: Mapping[str, Mapping[str, float]] = field(default_factory=lambda: {
        "WM": dict(physics.WM_REFERENCE), "GM": dict(GM_REFERENCE), "CSF": dict(CSF_REFERENCE)})
    log_sd: Mapping[str, Mapping[str, float]] = field(default_factory=lambda: {
        "WM": {"pd": 0.15, "t1_s": 0.15, "t2_s": 0.15},
        "GM": {"pd": 0.15, "t1_s": 0.15, "t2_s": 0.15},
        "CSF": {"pd": 0.03, "t1_s": 0.15, "t2_s": 0.25}})
    rel_noise: float = 0.02
    """Relative error of a tissue median (partial volume, residual bias field, segmentation)."""
    abs_noise: float = 0.01
    """Absolute error floor of a tissue median (units of the mode-normalised image)."""
    extra_rel_noise: Mapping[str, Mapping[str, float]] = field(
        default_factory=lambda: {"CSF": {"T1w": 0.15}})
    """Further relative error of particular medians: tissue → contrast → SD. CSF is dark in
    the T1w and tissue about three times brighter, so a little partial volume raises the CSF
    T1w median a lot: +6 to +23 % (mean +15 %) on the phantom even in the purest CSF voxels.
    Treated as exact it overestimates the T1w scale (and so WM T1, by about 6 %); an SD of
    that size lets the T2w, FLAIR and tissue priors share the T1w scale."""


@dataclass
class Calibration:
    """Result of :func:`calibrate_scales` (scales multiply synthesised signals, like the
    seed's global scale; ``None`` entries for contrasts that were not given)."""

    contrasts: tuple[str, ...]
    scales: dict[str, float]
    log_sd: dict[str, float]
    log_cov: list[list[float]]
    """Posterior covariance of the log-scales (order of ``contrasts``)."""
    tissues: dict[str, dict[str, float]]
    medians: dict[str, dict[str, float]]
    n_voxels: dict[str, int]
    method: str = "calibrated"
    origin: dict[str, Any] = field(default_factory=dict)
    """Where the scales come from (per-session calibration, a protocol cluster's fit, a join;
    see :func:`qmriflow.model.clusters.session_calibration`)."""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _erode(mask: np.ndarray, iterations: int) -> np.ndarray:
    """In-plane erosion of a (slices, H, W) mask."""
    if iterations <= 0:
        return mask
    st = np.zeros((3, 3, 3), bool)
    st[1] = ndimage.generate_binary_structure(2, 1)
    return ndimage.binary_erosion(mask, st, iterations=iterations)


def tissue_masks(images: np.ndarray, dseg: np.ndarray, brain: np.ndarray | None = None,
                 contrasts: Sequence[str] = ("T1w", "T2w", "FLAIR"),
                 min_voxels: int = 50, csf_purity: float = 75.0) -> dict[str, np.ndarray]:
    """The voxels whose medians calibrate the scales: eroded WM, GM and purest CSF.

    ``images`` (S, C, H, W) in the order of ``contrasts``; ``dseg`` (S, H, W) with 1 GM, 2 WM,
    3 CSF. WM and CSF are eroded by two voxels in-plane (one, or none, when fewer than
    ``min_voxels`` voxels remain), GM is not (it is thin). Partial volume with tissue lowers
    the T2w signal of CSF voxels and raises their T1w signal, so CSF is further restricted to
    its purest voxels: those at or above the ``csf_purity`` percentile of the T2w (when the
    T2w is among the contrasts). Every tissue is returned, also one with too few voxels.
    """
    out: dict[str, np.ndarray] = {}
    inside = np.ones(dseg.shape, bool) if brain is None else brain.astype(bool)
    for t in TISSUES:
        m = (dseg == DSEG_LABEL[t]) & inside
        if t != "GM":
            for it in (2, 1, 0):
                e = _erode(m, it)
                if e.sum() >= min_voxels:
                    m = e
                    break
        if t == "CSF" and "T2w" in contrasts and csf_purity > 0 and m.any():
            t2 = images[:, list(contrasts).index("T2w")]
            pure = m & (t2 >= np.percentile(t2[m], csf_purity))
            if pure.sum() >= min_voxels:
                m = pure
        out[t] = m
    return out


def tissue_medians(images: np.ndarray, dseg: np.ndarray, brain: np.ndarray | None = None,
                   contrasts: Sequence[str] = ("T1w", "T2w", "FLAIR"),
                   min_voxels: int = 50, csf_purity: float = 75.0,
                   ) -> tuple[dict[str, dict[str, float]], dict[str, int]]:
    """Median of each mode-normalised contrast in the voxels of :func:`tissue_masks`; a tissue
    with fewer than ``min_voxels`` voxels is left out (its count is still returned)."""
    out: dict[str, dict[str, float]] = {}
    counts: dict[str, int] = {}
    for t, m in tissue_masks(images, dseg, brain, contrasts, min_voxels, csf_purity).items():
        counts[t] = int(m.sum())
        if counts[t] < min_voxels:
            continue
        vals = {}
        for ci, c in enumerate(contrasts):
            v = images[:, ci][m]
            v = v[np.isfinite(v)]
            vals[c] = float(np.median(v)) if v.size else math.nan
        out[t] = vals
    return out, counts


def _signals(protocols: Mapping[str, physics.Protocol], theta: np.ndarray,
             contrasts: Sequence[str]) -> np.ndarray:
    """(len(contrasts),) signals of one tissue with log-parameters ``theta``."""
    pd, t1, t2 = np.exp(theta)
    return np.array([float(physics.signal(protocols[c], pd, t1, t2)) for c in contrasts])


def calibrate_scales(protocols: Mapping[str, physics.Protocol],
                     medians: Mapping[str, Mapping[str, float]],
                     priors: Priors | None = None) -> Calibration:
    """Maximum-a-posteriori per-contrast scales from tissue medians (see the module docstring).

    ``protocols``: contrast → protocol of the contrasts to calibrate; ``medians``: tissue
    ("WM", "GM", "CSF") → contrast → median of the mode-normalised image. Returns the scales
    (synthesised signal × scale ≈ normalised image) and their posterior log-SDs.
    """
    pri = priors or Priors()
    contrasts = tuple(protocols)
    tissues = [t for t in TISSUES if t in medians]
    if "CSF" not in tissues and "WM" not in tissues:
        raise ValueError("calibration needs at least WM or CSF voxels")
    nc = len(contrasts)
    centre = np.array([[math.log(pri.centres[t][p]) for p in PARAMS] for t in tissues])
    sd = np.array([[pri.log_sd[t][p] for p in PARAMS] for t in tissues])
    obs = []  # (tissue index, contrast index, value, sigma)
    for ti, t in enumerate(tissues):
        for ci, c in enumerate(contrasts):
            if (t, protocols[c].sequence) in UNUSED:
                continue
            v = medians[t].get(c, math.nan)
            if math.isfinite(v) and v > 0:
                extra = pri.extra_rel_noise.get(t, {}).get(c, 0.0)
                obs.append((ti, ci, v, (pri.rel_noise + extra) * v + pri.abs_noise))
    # start: tissues at their prior centres, scales by least squares on those
    s0 = np.zeros(nc)
    for ci in range(nc):
        num = den = 0.0
        for ti, c2, v, _ in obs:
            if c2 == ci:
                f = _signals(protocols, centre[ti], contrasts)[ci]
                num += f * v
                den += f * f
        s0[ci] = math.log(num / den) if den > 0 and num > 0 else 0.0
    x0 = np.concatenate([s0, centre.ravel()])

    def residuals(x: np.ndarray) -> np.ndarray:
        ls = x[:nc]
        th = x[nc:].reshape(len(tissues), 3)
        sig = [_signals(protocols, th[ti], contrasts) for ti in range(len(tissues))]
        r_data = [(v - math.exp(ls[ci]) * sig[ti][ci]) / s for ti, ci, v, s in obs]
        r_prior = ((th - centre) / sd).ravel()
        return np.concatenate([np.asarray(r_data), r_prior])

    lo = np.concatenate([np.full(nc, -np.inf), np.tile(_LOG_LO, len(tissues))])
    hi = np.concatenate([np.full(nc, np.inf), np.tile(_LOG_HI, len(tissues))])
    x0 = np.clip(x0, lo + 1e-9, hi - 1e-9)
    res = optimize.least_squares(residuals, x0, bounds=(lo, hi), x_scale=1.0, method="trf",
                                 xtol=1e-10, ftol=1e-10, gtol=1e-10, max_nfev=2000)
    jac = res.jac
    try:
        cov = np.linalg.inv(jac.T @ jac)[:nc, :nc]
    except np.linalg.LinAlgError:
        cov = np.full((nc, nc), math.nan)
    log_sd = np.sqrt(np.clip(np.diag(cov), 0.0, None))
    th = res.x[nc:].reshape(len(tissues), 3)
    return Calibration(
        contrasts=contrasts,
        scales={c: float(math.exp(res.x[ci])) for ci, c in enumerate(contrasts)},
        log_sd={c: float(log_sd[ci]) for ci, c in enumerate(contrasts)},
        log_cov=cov.tolist(),
        tissues={t: {p: float(math.exp(th[ti, k])) for k, p in enumerate(PARAMS)}
                 for ti, t in enumerate(tissues)},
        medians={t: dict(medians[t]) for t in tissues},
        n_voxels={},
    )


