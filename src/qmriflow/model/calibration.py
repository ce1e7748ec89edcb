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
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from scipy import ndimage, optimize

from .. import physics

__all__ = [
    "CSF_REFERENCE",
    "DEFAULT_ESTIMATOR",
    "DEFAULT_METHOD",
    "DEFAULT_SMOOTHING",
    "ESTIMATORS",
    "GM_REFERENCE",
    "METHODS",
    "SMOOTHING_GUIDES",
    "Calibration",
    "Priors",
    "Smoothing",
    "anchor_free_directions",
    "calibrate_scales",
    "pin_maps",
    "refine_maps",
    "scale_sensitivity",
    "shift_to_tissues",
    "smooth_maps",
    "tissue_masks",
    "tissue_medians",
    "tissue_value_maps",
    "tissue_weights",
]

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


SMOOTHING_GUIDES = ("images", "network")
"""What steers :func:`smooth_maps`' edge-preserving weights at inference: the log of the
mode-normalised input images (the data's own edges), or the log of the network's maps."""


@dataclass(frozen=True)
class Smoothing:
    """Settings of :func:`smooth_maps` at inference (``model.map_smoothing``)."""

    radius: int = 3
    """Half-width of the in-plane window (voxels); 0 = off."""
    sigma_space: float = 2.0
    """Spatial SD of the weights (voxels)."""
    sigma_range: float = 0.1
    """SD of the guide's log-distance in the weights."""
    sigma_value: float = 0.3
    """SD of the maps' own log-distance in the weights (outliers do not spread)."""
    guide: str = "images"
    """One of :data:`SMOOTHING_GUIDES`."""

    def __post_init__(self) -> None:
        if self.radius < 0 or self.radius != int(self.radius):
            raise ValueError(f"smoothing radius must be a whole number >= 0, got {self.radius}")
        if not (self.sigma_space > 0 and self.sigma_range > 0 and self.sigma_value > 0):
            raise ValueError("smoothing sigma_space, sigma_range and sigma_value must be "
                             "positive")
        if self.guide not in SMOOTHING_GUIDES:
            raise ValueError(f"smoothing guide must be one of {SMOOTHING_GUIDES}, "
                             f"got {self.guide!r}")


DEFAULT_SMOOTHING = Smoothing()
"""Measured best (bench/RESULTS.md, "Scale degeneracy": smoothing variants, and "A wider
map smoothing"): protocol invariance of PD, and higher correlation with the truth, without
blurring the WM/GM or lesion contrast."""


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


# ---------------------------------------------------------------------------------------------
# moving maps along the degenerate family
# ---------------------------------------------------------------------------------------------

_FLOOR = 1e-9
RCOND_ANCHOR = 0.01
"""Relative cut-off of the singular values in :func:`anchor_free_directions`' least squares."""


def _log_signals(protocols: Sequence[physics.Protocol], x: np.ndarray) -> np.ndarray:
    """(N, C) log-signals of voxels with log-parameters ``x`` (N, 3)."""
    pd, t1, t2 = np.exp(x[:, 0]), np.exp(x[:, 1]), np.exp(x[:, 2])
    return np.stack([np.log(np.maximum(np.asarray(physics.signal(p, pd, t1, t2)), _FLOOR))
                     for p in protocols], axis=1)


def _log_jacobian(protocols: Sequence[physics.Protocol], x: np.ndarray,
                  f0: np.ndarray | None = None, h: float = 1e-5) -> tuple[np.ndarray, np.ndarray]:
    """(log-signals (N, C), Jacobian d log S / d log θ (N, C, 3)) by forward differences."""
    f0 = _log_signals(protocols, x) if f0 is None else f0
    jac = np.empty((x.shape[0], f0.shape[1], 3))
    for k in range(3):
        xk = x.copy()
        xk[:, k] += h
        jac[:, :, k] = (_log_signals(protocols, xk) - f0) / h
    return f0, jac


def _to_log(maps: np.ndarray) -> np.ndarray:
    return np.clip(np.log(np.maximum(maps, 1e-12)), _LOG_LO, _LOG_HI)


def pin_maps(maps: np.ndarray, mask: np.ndarray, protocols: Sequence[physics.Protocol],
             log_shift: Sequence[float], iterations: int = 30, damping: float = 1e-6,
             tol: float = 1e-7) -> tuple[np.ndarray, dict[str, float]]:
    """Move maps along the degenerate family: voxel by voxel, find (PD, T1, T2) whose signals
    are those of ``maps`` times ``exp(log_shift[c])`` for each contrast ``c``.

    ``maps`` (..., 3) PD/T1 (s)/T2 (s) in the last axis; ``mask`` (...) the voxels to move;
    ``protocols`` and ``log_shift`` per contrast (1 to 3 contrasts; with fewer than three the
    minimum-norm move is taken). Levenberg–Marquardt on log-parameters, bounded to
    :data:`LIMITS`. Returns the moved maps and a summary (largest final residual, voxels).
    """
    out = np.array(maps, dtype=np.float64, copy=True)
    sel = mask.astype(bool) & np.all(out > 0, axis=-1)
    if not sel.any():
        return out.astype(maps.dtype), {"voxels": 0, "max_residual": 0.0}
    x = _to_log(out[sel])
    target = _log_signals(protocols, x) + np.asarray(log_shift, dtype=np.float64)[None, :]
    eye = np.eye(3)
    resid = np.full(x.shape[0], np.inf)
    # only voxels still off their target are evaluated again: a voxel within `tol` is not
    # moved any more, so its residual stays what it was (same result, far fewer signals)
    todo = np.arange(x.shape[0])
    for _ in range(iterations):
        xt = x[todo]
        f = _log_signals(protocols, xt)
        r = f - target[todo]
        resid[todo] = np.abs(r).max(axis=1)
        move = resid[todo] > tol
        todo, xt, f, r = todo[move], xt[move], f[move], r[move]
        if todo.size == 0:
            break
        _, jac = _log_jacobian(protocols, xt, f0=f)
        jt = np.swapaxes(jac, 1, 2)
        a = jt @ jac + damping * eye
        g = (jt @ r[..., None])[..., 0]
        step = -np.linalg.solve(a, g[..., None])[..., 0]
        step = np.clip(step, -0.5, 0.5)
        x[todo] = np.clip(xt + step, _LOG_LO, _LOG_HI)
    else:
        resid[todo] = np.abs(_log_signals(protocols, x[todo]) - target[todo]).max(axis=1)
    out[sel] = np.exp(x)
    return out.astype(maps.dtype), {"voxels": int(sel.sum()),
                                    "max_residual": float(resid.max(initial=0.0))}


def scale_sensitivity(maps: np.ndarray, mask: np.ndarray, protocols: Sequence[physics.Protocol],
                      log_cov: np.ndarray) -> np.ndarray:
    """Per-voxel standard deviation of PD, T1, T2 (same units as the maps, shape of ``maps``)
    implied by the posterior covariance ``log_cov`` of the log-scales: the maps move along
    the degenerate family as Δlog θ = J⁻¹·Δlog s, so Cov(log θ) = J⁺ Σ J⁺ᵀ (J = d log S /
    d log θ at the voxel, pseudo-inverse when fewer than three contrasts). 0 outside ``mask``.
    """
    out = np.zeros(maps.shape, dtype=np.float32)
    sel = mask.astype(bool) & np.all(maps > 0, axis=-1)
    if not sel.any():
        return out
    m = np.asarray(maps[sel], dtype=np.float64)
    _, jac = _log_jacobian(protocols, _to_log(m))
    if jac.shape[1] == 3:
        # square: the inverse (= the pseudo-inverse, at a tenth of the SVD's cost) where the
        # Jacobian is well conditioned, the pseudo-inverse elsewhere
        jinv = np.empty_like(jac)
        det = np.abs(np.linalg.det(jac))
        scale = np.abs(jac).max(axis=(1, 2)) ** 3
        ok = det > 1e-10 * scale
        jinv[ok] = np.linalg.inv(jac[ok])
        if not ok.all():
            jinv[~ok] = np.linalg.pinv(jac[~ok])
    else:
        jinv = np.linalg.pinv(jac)  # (N, 3, C)
    cov = jinv @ np.asarray(log_cov, dtype=np.float64)[None] @ np.swapaxes(jinv, 1, 2)
    var = np.clip(np.diagonal(cov, axis1=1, axis2=2), 0.0, None)
    out[sel] = (m * np.sqrt(var)).astype(np.float32)
    return out


def tissue_weights(dseg: np.ndarray, sigma: float = 1.0,
                   tissues: Sequence[str] = ("WM", "GM")) -> dict[str, np.ndarray]:
    """Soft in-plane tissue weights (S, H, W) in [0, 1] from a ``dseg`` (1 GM, 2 WM, 3 CSF):
    each tissue's indicator smoothed by a Gaussian of SD ``sigma`` voxels within slices, so a
    per-tissue quantity blends across tissue edges instead of jumping there."""
    return {t: ndimage.gaussian_filter((dseg == DSEG_LABEL[t]).astype(np.float64),
                                       (0, sigma, sigma), mode="nearest") for t in tissues}


def tissue_value_maps(dseg: np.ndarray, targets: Mapping[str, Mapping[str, float]],
                      mask: np.ndarray, sigma: float = 1.0,
                      tissues: Sequence[str] = TISSUES) -> np.ndarray:
    """Maps (S, H, W, 3) of PD, T1 (s), T2 (s) built from tissue values alone: each voxel of
    ``mask`` (S, H, W) gets exp(Σ_t w_t·log θ_t / Σ_t w_t), the tissue values ``targets`` (tissue
    → PD, T1 s, T2 s; e.g. the calibration's) blended by the soft in-plane weights w_t of
    :func:`tissue_weights` (SD ``sigma`` voxels) of the tissues in both ``tissues`` and
    ``targets``. A voxel with no tissue weight (far from every labelled tissue) gets the
    equal-weight blend (the geometric mean of those tissues' values). Bounded to
    :data:`LIMITS`; 0 outside ``mask``. ``dseg`` (S, H, W): 1 GM, 2 WM, 3 CSF. These are the
    starting maps, and the prior, of the network-free estimator."""
    use = [t for t in tissues if t in targets]
    out = np.zeros((*dseg.shape, 3), dtype=np.float64)
    sel = mask.astype(bool)
    if not use or not sel.any():
        return out
    logs = np.log([[targets[t][p] for p in PARAMS] for t in use])  # (T, 3)
    weights = tissue_weights(dseg, sigma, use)
    w = np.stack([np.clip(weights[t][sel], 0.0, None) for t in use], axis=1)  # (N, T)
    tot = w.sum(axis=1)
    w = np.where(tot[:, None] > 1e-6, w / np.maximum(tot, 1e-300)[:, None], 1.0 / len(use))
    out[sel] = np.exp(np.clip(w @ logs, _LOG_LO, _LOG_HI))
    return out


def tissue_start_table(targets: Mapping[str, Mapping[str, float]],
                       tissues: Sequence[str] = ("WM", "GM")) -> np.ndarray:
    """The starts of :func:`refine_maps`'s branch choice by dseg label: row ``DSEG_LABEL[t]``
    of the (max label + 1, 3) table holds tissue t's values from ``targets`` (PD, T1 s, T2 s;
    e.g. the calibration's) for each t of ``tissues``; every other row (background, CSF, a
    tissue without values) is NaN. ``dseg`` labels: 1 GM, 2 WM, 3 CSF."""
    out = np.full((max(DSEG_LABEL.values()) + 1, 3), np.nan)
    for t in tissues:
        if t in targets:
            out[DSEG_LABEL[t]] = [targets[t][p] for p in PARAMS]
    return out


def csf_branch_t2(targets: Mapping[str, Mapping[str, float]]) -> float | None:
    """The T2 (s) above which a WM/GM-labelled voxel sits on the CSF-like branch: the geometric
    mean of the longer tissue T2 (WM or GM) and the CSF T2 in ``targets`` (the calibration's;
    about 0.43 s with the reference values: far above WM/GM and the phantom's lesions, ≤ 0.17
    s, far below CSF). None without CSF or tissue values."""
    tissue = [targets[t]["t2_s"] for t in ("WM", "GM") if t in targets]
    if "CSF" not in targets or not tissue:
        return None
    return float(np.sqrt(max(tissue) * targets["CSF"]["t2_s"]))


def shift_to_tissues(maps: np.ndarray, mask: np.ndarray,
                     tissue_voxels: Mapping[str, np.ndarray],
                     targets: Mapping[str, Mapping[str, float]],
                     weights: Mapping[str, np.ndarray],
                     ) -> tuple[np.ndarray, dict[str, Any]]:
    """Shift the log-maps per tissue so that each tissue's median matches the calibration.

    For every tissue t in both ``targets`` and ``weights`` with voxels in ``tissue_voxels``:
    d_t = log(target_t) − median over the tissue's voxels of log(maps) (3 numbers), and each
    voxel v of ``mask`` moves by Σ_t w_t(v)·d_t (soft weights, e.g. :func:`tissue_weights`;
    a voxel without weight stays). Bounded to :data:`LIMITS`. This is the prior handed to
    :func:`refine_maps` when a contrast is withheld: the data then take back every direction
    they determine, and along the one they do not the maps sit at the calibration's level
    instead of the network's guess. A shift of the prior, not a projection, so it cannot
    amplify: it is robust to a network whose guess is far off (measured: a training that
    plateaued guessed WM T2 three times too long; the projection alone made it worse).
    ``maps`` (..., 3) PD/T1 (s)/T2 (s).
    """
    out = np.array(maps, dtype=np.float64, copy=True)
    sel = mask.astype(bool) & np.all(out > 0, axis=-1)
    info: dict[str, Any] = {"log_shift": {}}
    if not sel.any():
        return out.astype(maps.dtype), info
    x = _to_log(out[sel])
    move = np.zeros_like(x)
    for t, w in weights.items():
        if t not in targets or t not in tissue_voxels:
            continue
        tm = np.asarray(tissue_voxels[t], bool)[sel]
        if not tm.any():
            continue
        d = np.log([targets[t][p] for p in PARAMS]) - np.median(x[tm], axis=0)
        move += np.clip(np.asarray(w, np.float64)[sel], 0.0, 1.0)[:, None] * d[None]
        info["log_shift"][t] = {p: float(d[j]) for j, p in enumerate(PARAMS)}
    out[sel] = np.exp(np.clip(x + move, _LOG_LO, _LOG_HI))
    return out.astype(maps.dtype), info


def _anchor_lstsq(eqs: Sequence[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """β (3,) of :func:`anchor_free_directions` from stacked (rows (3, 3), rhs (3,)) pairs;
    directions the tissues hardly see (singular values below :data:`RCOND_ANCHOR` of the
    largest) stay put: a large β there would move voxels whose null space differs."""
    return np.linalg.lstsq(np.concatenate([a for a, _ in eqs]),
                           np.concatenate([r for _, r in eqs]), rcond=RCOND_ANCHOR)[0]


def anchor_free_directions(maps: np.ndarray, mask: np.ndarray,
                           protocols: Sequence[physics.Protocol],
                           tissue_voxels: Mapping[str, np.ndarray],
                           targets: Mapping[str, Mapping[str, float]],
                           weights: Mapping[str, np.ndarray] | None = None,
                           priors: Priors | None = None,
                           tissues: Sequence[str] = ("WM", "GM"), iterations: int = 3,
                           ) -> tuple[np.ndarray, dict[str, Any]]:
    """With fewer than three contrasts, set the level of the maps along the directions the
    contrasts do not determine from the tissue-level calibration, not from the network.

    One or two contrasts leave each voxel a one- (two-) dimensional family of (PD, T1, T2)
    with the same signals: the null space of its log-Jacobian J (C × 3), projector
    P = I − J⁺J. Where the network was given fewer contrasts its position in that family is
    its guess, and how it guesses differs between trainings. This moves every voxel v of
    ``mask`` by P(v)·β: β is chosen by least squares so that the mean log-maps in
    ``tissue_voxels`` (the calibration's eroded WM and GM) match the calibration's tissue
    values ``targets`` (weighted by the priors' log-SDs). Without ``weights`` one β serves the
    whole session. With ``weights`` (tissue → soft weight of the shape of ``mask``, e.g.
    :func:`tissue_weights`) each tissue gets its own β_t, fitted to that tissue alone, and
    β(v) = Σ_t w_t(v)·β_t + (1 − Σ_t w_t(v))·β: the network's WM/GM contrast along the open
    directions is its guess too, and one β cannot correct it. The network keeps the spatial
    pattern; the calibration — the same MAP fit that sets the scales — sets the levels. The
    move is along the null space, so the signals change only to second order
    (:func:`refine_maps` restores them); ``iterations`` Gauss–Newton steps follow the null
    spaces as the maps move. Directions the tissues hardly see (singular values below
    :data:`RCOND_ANCHOR` of the largest) are left alone. With three contrasts (or no
    tissue) the maps are returned unchanged. ``maps`` (..., 3) PD/T1 (s)/T2 (s).
    """
    pri = priors or Priors()
    out = np.array(maps, dtype=np.float64, copy=True)
    sel = mask.astype(bool) & np.all(out > 0, axis=-1)
    info: dict[str, Any] = {"applied": False, "contrasts": len(protocols)}
    if len(protocols) >= 3 or not sel.any():
        return out.astype(maps.dtype), info
    voxels = {t: np.asarray(tissue_voxels[t], bool)[sel] for t in tissues
              if t in targets and t in tissue_voxels}
    used = [t for t, m in voxels.items() if m.any()]
    if not used:
        return out.astype(maps.dtype), info
    log_target = {t: np.log([targets[t][p] for p in PARAMS]) for t in used}
    log_sd = {t: np.array([pri.log_sd[t][p] for p in PARAMS]) for t in used}
    x = _to_log(out[sel])
    x_start = x.copy()
    w = ({t: np.clip(np.asarray(weights[t], np.float64)[sel], 0.0, 1.0) for t in used
          if t in weights} if weights is not None else {})
    rest = np.clip(1.0 - sum(w.values(), np.zeros(x.shape[0])), 0.0, 1.0)
    totals = {key: np.zeros(3) for key in ("session", *w)}
    for _ in range(iterations):  # Gauss–Newton: the null spaces move with the maps
        _, jac = _log_jacobian(protocols, x)
        proj = np.eye(3)[None] - np.linalg.pinv(jac) @ jac  # (N, 3, 3)
        # per tissue, weighted by the priors' log-SDs: mean projector (3, 3) · β should
        # close the gap between the target and the mean log-map (3,)
        eqs = {t: (proj[voxels[t]].mean(axis=0) / log_sd[t][:, None],
                   (log_target[t] - x[voxels[t]].mean(axis=0)) / log_sd[t]) for t in used}
        beta = _anchor_lstsq([eqs[t] for t in used])
        totals["session"] += beta
        b = rest[:, None] * beta[None]
        for t, wt in w.items():
            bt = _anchor_lstsq([eqs[t]])
            totals[t] += bt
            b += wt[:, None] * bt[None]
        x = np.clip(x + (proj @ b[..., None])[..., 0], _LOG_LO, _LOG_HI)
    step = x - x_start
    out[sel] = np.exp(x)
    info.update(applied=True, tissues=used, per_tissue=sorted(w),
                beta_log={k: [float(v) for v in b_] for k, b_ in totals.items()},
                median_log_move={p: float(np.median(step[:, j])) for j, p in enumerate(PARAMS)})
    return out.astype(maps.dtype), info


REFINE_STATUS = {0: "not refined (outside the mask, or a start map not positive)",
                 1: "converged (last accepted step below the tolerance)",
                 2: "stopped at the iteration limit (still moving)",
                 3: "stalled (no step lowered the cost at the largest damping)"}
"""Per-voxel status codes of :func:`refine_maps` (``status_map`` of its summary)."""

RESTART_CHI = 3.0
"""A voxel whose data misfit after :func:`refine_maps` exceeds this many noise SDs (RMS over
the contrasts) is restarted from the ``starts`` given (the calibration's tissue values)."""


BRANCH_CHI2 = 3.84
"""A WM/GM-labelled voxel on the CSF-like branch moves to its tissue's branch unless the
CSF-like branch fits the data better by more than this χ² (summed over the contrasts, noise
SDs): the 95 % point of χ² with one degree of freedom. Within it the data do not tell the
branches apart and the segmentation decides; beyond it the data win."""


def refine_maps(maps: np.ndarray, mask: np.ndarray, protocols: Sequence[physics.Protocol],
                images: np.ndarray, scales: Sequence[float], noise: float = 0.03,
                prior_log_sd: float = 0.3, iterations: int = 20, tol: float = 1e-6,
                starts: Sequence[Sequence[float]] = (),
                dseg: np.ndarray | None = None,
                tissues: Mapping[str, Mapping[str, float]] | None = None,
                ) -> tuple[np.ndarray, dict[str, Any]]:
    """Data consistency with the calibrated scales, voxel by voxel, the network as prior.

    Minimises Σ_c ((r_c − s_c·S_c(θ)) / noise)² + Σ_p ((log θ_p − log θ⁰_p) / prior_log_sd)²
    per voxel (Levenberg–Marquardt on log-parameters, bounded to :data:`LIMITS`), with r_c the
    mode-normalised images (..., C), s_c the calibrated scales and θ⁰ the (pinned) network maps
    (..., 3). Where the contrasts determine the parameters the data win (noise 0.03 ≪ 0.3);
    along directions they do not determine (a contrast withheld, CSF at the FLAIR null) the
    network's value stays. A voxel stops iterating once its accepted step is below ``tol``
    (in log-parameters). The cost is not convex: started at a network value pinned at the
    limits (PD 1, T1 5 s) the descent can stall far from the data. Voxels whose data misfit
    stays above :data:`RESTART_CHI` noise SDs are therefore descended again from each of
    ``starts`` ((PD, T1 s, T2 s), e.g. the calibration's WM, GM and CSF values) with the same
    cost, and keep the lowest.

    The FLAIR magnitude is two-valued in T1 (either side of its null), so a voxel can fit all
    the inputs on a second, CSF-like branch. Given the segmentation ``dseg`` (..., labels) and
    the tissue values ``tissues`` (e.g. the calibration's WM/GM/CSF: PD, T1 s, T2 s), where the
    dseg gives a voxel a tissue with values (:func:`tissue_start_table`) and the refined T2
    exceeds the branch threshold (:func:`csf_branch_t2`; no branch choice without CSF or
    tissue values), the voxel is descended again from its tissue's values,
    with those values as the prior (the network's value, CSF-like there, would pull the descent
    back over). The tissue-branch solution replaces the CSF-like one when its T2 is below
    the threshold and the CSF-like one does not fit the data better by more than
    :data:`BRANCH_CHI2`: the data choose where they can, the segmentation where they cannot
    (seed 004's restricted sub-spaces, chosen by likelihood). Returns the refined maps and a
    summary; its ``status_map`` (``mask``'s shape, uint8) holds every voxel's
    :data:`REFINE_STATUS` (the status of the descent whose result it kept) and
    ``status_counts`` the counts (pop the map before writing the summary as JSON).
    """
    out = np.array(maps, dtype=np.float64, copy=True)
    sel = mask.astype(bool) & np.all(out > 0, axis=-1)
    if not sel.any():
        return out.astype(maps.dtype), {"voxels": 0, "status_counts": {},
                                        "status_map": np.zeros(sel.shape, dtype=np.uint8)}
    x0 = _to_log(out[sel])
    r = np.asarray(images, dtype=np.float64)[sel]
    sc = np.asarray(scales, dtype=np.float64)[None, :]
    w = 1.0 / prior_log_sd
    eye = np.eye(3)

    def misfit(logs: np.ndarray, idx: np.ndarray | slice = slice(None)) -> np.ndarray:
        """Data χ² Σ_c ((r_c − s_c·S_c) / noise)² of the voxels ``idx`` from their
        log-signals."""
        return (((r[idx] - sc * np.exp(logs)) / noise) ** 2).sum(1)

    def cost(xv: np.ndarray, idx: np.ndarray | slice, prior: np.ndarray
             ) -> tuple[np.ndarray, np.ndarray]:
        """(cost, log-signals) at log-parameters ``xv`` of the voxels ``idx``, whose
        log-priors are ``prior`` (aligned with ``xv``)."""
        logs = _log_signals(protocols, xv)
        return misfit(logs, idx) + ((w * (xv - prior)) ** 2).sum(1), logs

    def descend(x: np.ndarray, rows: np.ndarray, prior: np.ndarray
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray, int, np.ndarray]:
        """LM from ``x`` (len(rows), 3) for the voxels ``rows``, whose log-priors are
        ``prior`` (len(rows), 3): (x, cost, log-signals at x, steps, per-voxel status
        (:data:`REFINE_STATUS`: 1 converged, 2 still moving, 3 stalled))."""
        lam = np.full(x.shape[0], 1e-3)
        c_now, logf_now = cost(x, rows, prior)
        state = np.full(x.shape[0], 2, dtype=np.uint8)
        steps = 0
        for _ in range(iterations):
            # only voxels still moving: an accepted step below `tol` (or a hopeless damping)
            # retires a voxel, which leaves its result unchanged to within `tol`
            idx = np.flatnonzero(state == 2)
            if idx.size == 0:
                break
            steps += 1
            xa = x[idx]
            # the signals at x are known from the last cost evaluation
            logf, jac = _log_jacobian(protocols, xa, f0=logf_now[idx])
            f = sc * np.exp(logf)
            jl = (f[..., None] * jac) / noise  # d residual / d log θ (sign folded below)
            res = (f - r[rows[idx]]) / noise
            jt = np.swapaxes(jl, 1, 2)
            a = jt @ jl + (w * w) * eye
            g = (jt @ res[..., None])[..., 0] + (w * w) * (xa - prior[idx])
            la = lam[idx]
            step = -np.linalg.solve(a + la[:, None, None] * eye, g[..., None])[..., 0]
            cand = np.clip(xa + np.clip(step, -0.5, 0.5), _LOG_LO, _LOG_HI)
            c_new, logf_new = cost(cand, rows[idx], prior[idx])
            ok = c_new <= c_now[idx]
            acc = idx[ok]
            x[acc] = cand[ok]
            logf_now[acc] = logf_new[ok]
            c_now[acc] = c_new[ok]
            la = np.where(ok, la * 0.3, la * 10.0)
            lam[idx] = la
            state[idx[ok & (np.abs(cand - xa).max(axis=1) < tol)]] = 1
            state[idx[(la > 1e10) & (state[idx] == 2)]] = 3
        return x, c_now, logf_now, steps, state

    everyone = np.arange(x0.shape[0])
    x, c_best, logf, steps, state = descend(x0.copy(), everyone, x0)
    moving = int((state == 2).sum())
    restarted = 0
    won = np.zeros(x0.shape[0], dtype=bool)
    if len(starts):
        rows = np.flatnonzero(misfit(logf) / r.shape[1] > RESTART_CHI ** 2)
        restarted = int(rows.size)
        for st in starts:
            if rows.size == 0:
                break
            start = np.clip(np.log(np.asarray(st, np.float64)), _LOG_LO, _LOG_HI)
            xs = np.broadcast_to(start, (rows.size, 3)).copy()
            xs, cs, _, _, st_s = descend(xs, rows, x0[rows])
            better = cs < c_best[rows]
            won[rows[better]] = True
            x[rows[better]] = xs[better]
            state[rows[better]] = st_s[better]
            c_best[rows[better]] = cs[better]
    branch = {"checked": 0, "switched": 0}
    branch_t2 = csf_branch_t2(tissues) if dseg is not None and tissues is not None else None
    if branch_t2 is not None:
        table = tissue_start_table(tissues)
        rows = np.flatnonzero(x[:, 2] > np.log(branch_t2))
        lab = np.asarray(dseg)[sel][rows]
        known = (lab >= 0) & (lab < table.shape[0]) & (lab == np.floor(lab))
        rows, lab = rows[known], lab[known].astype(np.intp)
        ts = table[lab]
        good = np.all(np.isfinite(ts), axis=1) & np.all(ts > 0, axis=1)
        rows, ts = rows[good], ts[good]
        branch["checked"] = int(rows.size)
        if rows.size:
            xt = np.clip(np.log(ts), _LOG_LO, _LOG_HI)
            xs, _, logs, _, st_b = descend(xt.copy(), rows, xt)
            chi_csf = misfit(_log_signals(protocols, x[rows]), rows)
            take = ((misfit(logs, rows) <= chi_csf + BRANCH_CHI2)
                    & (xs[:, 2] < np.log(branch_t2)))
            x[rows[take]] = xs[take]
            state[rows[take]] = st_b[take]
            branch["switched"] = int(take.sum())
    out[sel] = np.exp(x)
    moved = np.abs(x - x0).max(axis=1)
    status = np.zeros(sel.shape, dtype=np.uint8)
    status[sel] = state
    counts = {REFINE_STATUS[k].split(" (")[0]: int((state == k).sum()) for k in (1, 2, 3)}
    return out.astype(maps.dtype), {"voxels": int(sel.sum()),
                                    "status_counts": counts, "status_map": status,
                                    "median_log_change": float(np.median(moved)),
                                    "noise": noise, "prior_log_sd": prior_log_sd,
                                    "iterations": steps,
                                    "still_moving": moving,
                                    "restarted": restarted, "restart_improved": int(won.sum()),
                                    "branch_t2_s": branch_t2,
                                    "branch_checked": branch["checked"],
                                    "branch_switched": branch["switched"]}


def smooth_maps(maps: np.ndarray, mask: np.ndarray, guide: np.ndarray | None = None, *,
                radius: int = DEFAULT_SMOOTHING.radius,
                sigma_space: float = DEFAULT_SMOOTHING.sigma_space,
                sigma_range: float = DEFAULT_SMOOTHING.sigma_range,
                sigma_value: float | None = None) -> np.ndarray:
    """Edge-preserving in-plane smoothing of log-maps (a joint-bilateral filter).

    ``maps`` (S, H, W, 3): PD, T1, T2 in the last axis. Each voxel p inside ``mask`` becomes
    exp(Σ_q w_pq log maps(q) / Σ_q w_pq) over its in-plane neighbours q inside ``mask``
    (|q − p|∞ ≤ ``radius``), with w_pq = exp(−|q − p|² / 2σ_s²) · exp(−‖g(q) − g(p)‖² / 2σ_r²):
    ``guide`` g (S, H, W, K), already in log-units — at inference the log of the
    mode-normalised input images, whose tissue edges are sharp — or, if ``None``, the log of
    the maps themselves. Tissue edges are kept and the voxel noise that per-voxel inversion
    amplifies (mostly in PD) is averaged. With ``sigma_value`` the weights also carry
    exp(−‖log maps(q) − log maps(p)‖² / 2σ_v²), so a neighbour whose value is far off (a voxel
    the data consistency left at a limit) does not spread. Bounded to :data:`LIMITS`; voxels
    outside ``mask`` are neither changed nor used. ``radius`` 0 returns ``maps`` unchanged.
    """
    out = np.array(maps, dtype=np.float64, copy=True)
    if radius <= 0:
        return out.astype(maps.dtype)
    if sigma_space <= 0 or sigma_range <= 0 or (sigma_value is not None and sigma_value <= 0):
        raise ValueError("sigma_space, sigma_range and sigma_value must be positive")
    sel = mask.astype(bool) & np.all(out > 0, axis=-1)
    if not sel.any():
        return out.astype(maps.dtype)
    # work inside the mask's bounding box (same result, less arithmetic)
    zs, ys_, xs_ = (np.flatnonzero(sel.any(axis=ax)) for ax in ((1, 2), (0, 2), (0, 1)))
    box = (slice(zs[0], zs[-1] + 1), slice(ys_[0], ys_[-1] + 1), slice(xs_[0], xs_[-1] + 1))
    full, sel = out, sel[box]
    out = full[box]
    # in-place arithmetic in the (2r+1)^2 shifted passes (no temporaries per pass)
    logm = np.zeros(out.shape, dtype=np.float64)
    logm[sel] = _to_log(out[sel])
    g = logm if guide is None else np.where(sel[..., None],
                                            np.asarray(guide, np.float64)[box],
                                            np.float64(0.0)).astype(np.float64)
    r = int(radius)
    pad = ((0, 0), (r, r), (r, r))
    g_p = np.pad(g, (*pad, (0, 0)))
    v_p = np.pad(logm, (*pad, (0, 0)))
    m_p = np.pad(sel.astype(np.float64), pad)
    h, w = sel.shape[1:]
    num = np.zeros_like(logm)
    den = np.zeros(sel.shape, dtype=np.float64)
    inv_r = np.float64(1.0 / (2 * sigma_range ** 2))
    inv_v = None if sigma_value is None else np.float64(1.0 / (2 * sigma_value ** 2))
    expo = np.empty(sel.shape, dtype=np.float64)
    tmp = np.empty(g.shape, dtype=np.float64)
    tmp_v = np.empty(logm.shape, dtype=np.float64)
    for dy in range(-r, r + 1):
        for dx in range(-r, r + 1):
            ys, xs = slice(r + dy, r + dy + h), slice(r + dx, r + dx + w)
            np.subtract(g_p[:, ys, xs], g, out=tmp)
            np.square(tmp, out=tmp)
            np.sum(tmp, axis=-1, out=expo)
            expo *= inv_r
            vq = v_p[:, ys, xs]
            if inv_v is not None:
                np.subtract(vq, logm, out=tmp_v)
                np.square(tmp_v, out=tmp_v)
                expo += tmp_v.sum(-1) * inv_v
            np.negative(expo, out=expo)
            np.exp(expo, out=expo)
            expo *= m_p[:, ys, xs] * np.float64(
                math.exp(-(dy * dy + dx * dx) / (2 * sigma_space ** 2)))
            num += expo[..., None] * vq
            den += expo
    # den ≥ the voxel's own weight (1) inside the mask
    out[sel] = np.exp(np.clip(num[sel] / den[sel][:, None], _LOG_LO, _LOG_HI))  # a view into full
    return full.astype(maps.dtype)
