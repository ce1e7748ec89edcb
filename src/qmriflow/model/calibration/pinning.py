"""Moving the maps along the degenerate family: pinning to the calibrated scales, scale
sensitivity (uncertainty), tissue targets, and anchoring the free directions of withheld
contrasts."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from scipy import ndimage

from ... import physics
from ...sym3 import sym3_adjugate, sym3_apply
from .scales import (
    _LOG_HI,
    _LOG_LO,
    DSEG_LABEL,
    PARAMS,
    TISSUES,
    Priors,
)

# ---------------------------------------------------------------------------------------------
# moving maps along the degenerate family
# ---------------------------------------------------------------------------------------------

_FLOOR = 1e-9
RCOND_ANCHOR = 0.01
"""Relative cut-off of the singular values in :func:`anchor_free_directions`' least squares."""


_LOG_FLOOR = float(np.log(_FLOOR))
_LO_T, _HI_T = np.asarray(_LOG_LO)[:, None], np.asarray(_LOG_HI)[:, None]
"""The bounds of the log-parameters as columns, for (3, N) arrays."""

# The per-voxel solvers below keep their voxels in the last axis ("structure of arrays":
# parameters (3, N), log-signals (C, N), Jacobians (3, C, N)), so that every operation runs
# over a contiguous row of N voxels and the 3 × 3 systems are solved in closed form; the
# (N, C) / (N, C, 3) forms are for callers outside the inner loops.


def _log_signals_t(protocols: Sequence[physics.Protocol], xt: np.ndarray) -> np.ndarray:
    """(C, N) log-signals of voxels with log-parameters ``xt`` (3, N), floored at
    :data:`_FLOOR`."""
    pd, t1, t2 = np.exp(xt)
    out = np.empty((len(protocols), xt.shape[1]))
    for c, p in enumerate(protocols):
        np.log(np.maximum(np.asarray(physics.signal(p, pd, t1, t2), dtype=np.float64), _FLOOR),
               out=out[c])
    return out


def _log_jacobian_t(protocols: Sequence[physics.Protocol], xt: np.ndarray,
                    f0: np.ndarray | None = None, h: float = 1e-5
                    ) -> tuple[np.ndarray, np.ndarray]:
    """(log-signals (C, N), Jacobian d log S_c / d log θ_k (3, C, N)) at ``xt`` (3, N).

    Every signal model of :func:`qmriflow.physics.signal` is proportional to PD
    (S = |PD · g(T1, T2)|), so d log S / d log PD is exactly 1 where the signal is above the
    floor (0 below it); T1 and T2 by forward differences of step ``h``."""
    f0 = _log_signals_t(protocols, xt) if f0 is None else f0
    jac = np.empty((3, *f0.shape))
    jac[0] = f0 > _LOG_FLOOR
    for k in (1, 2):
        xk = xt.copy()
        xk[k] += h
        np.subtract(_log_signals_t(protocols, xk), f0, out=jac[k])
        jac[k] /= h
    return f0, jac


def _log_signals(protocols: Sequence[physics.Protocol], x: np.ndarray) -> np.ndarray:
    """(N, C) log-signals of voxels with log-parameters ``x`` (N, 3)."""
    return _log_signals_t(protocols, np.ascontiguousarray(x.T)).T


def _log_jacobian(protocols: Sequence[physics.Protocol], x: np.ndarray,
                  f0: np.ndarray | None = None, h: float = 1e-5) -> tuple[np.ndarray, np.ndarray]:
    """(log-signals (N, C), Jacobian d log S / d log θ (N, C, 3)): :func:`_log_jacobian_t` for
    voxels in the first axis."""
    f0t, jac = _log_jacobian_t(protocols, np.ascontiguousarray(x.T),
                               None if f0 is None else np.ascontiguousarray(f0.T), h)
    return f0t.T, np.transpose(jac, (2, 1, 0))


def _solve_normal(jac: np.ndarray, res: np.ndarray, diag: np.ndarray | float,
                  extra: np.ndarray | None = None) -> np.ndarray:
    """The Gauss–Newton / Levenberg–Marquardt step −(JᵀJ + diag·I)⁻¹ (Jᵀres + extra) (3, N)
    of N voxels at once: ``jac`` (3, C, N), ``res`` (C, N), ``diag`` a scalar or (N,),
    ``extra`` (3, N) or None. The symmetric 3 × 3 systems are solved in closed form (the
    adjugate); a system too close to singular for that (|det| below 1e-12 of its scale) goes
    to LAPACK."""
    a = {(i, j): np.einsum("cn,cn->n", jac[i], jac[j]) for i in range(3) for j in range(i, 3)}
    for i in range(3):
        a[i, i] += diag
    g = np.einsum("kcn,cn->kn", jac, res)
    if extra is not None:
        g += extra
    cof, det = sym3_adjugate(a[0, 0], a[0, 1], a[0, 2], a[1, 1], a[1, 2], a[2, 2])
    step = np.empty_like(g)
    for k, y in enumerate(sym3_apply(cof, *g)):
        np.negative(y, out=step[k])
    scale = (np.abs(a[0, 0]) + np.abs(a[1, 1]) + np.abs(a[2, 2])) ** 3
    bad = ~(np.abs(det) > 1e-12 * scale)
    with np.errstate(divide="ignore", invalid="ignore"):
        step /= det
    if bad.any():
        m = np.stack([np.stack([a[min(i, j), max(i, j)][bad] for j in range(3)], -1)
                      for i in range(3)], -2)
        try:
            step[:, bad] = -np.linalg.solve(m, g[:, bad].T[..., None])[..., 0].T
        except np.linalg.LinAlgError:
            step[:, bad] = -(np.linalg.pinv(m) @ g[:, bad].T[..., None])[..., 0].T
    return step


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
    x = np.ascontiguousarray(_to_log(out[sel]).T)  # (3, N)
    target = _log_signals_t(protocols, x) + np.asarray(log_shift, np.float64)[:, None]
    resid = np.full(x.shape[1], np.inf)
    # only voxels still off their target are evaluated again: a voxel within `tol` is not
    # moved any more, so its residual stays what it was (same result, far fewer signals);
    # nor is a voxel whose step no longer changes it (held at the limits): the same position
    # would give the same step again
    todo = np.arange(x.shape[1])
    for _ in range(iterations):
        xt = x[:, todo]
        f = _log_signals_t(protocols, xt)
        r = f - target[:, todo]
        resid[todo] = np.abs(r).max(axis=0)
        move = resid[todo] > tol
        todo, xt, f, r = todo[move], xt[:, move], f[:, move], r[:, move]
        if todo.size == 0:
            break
        _, jac = _log_jacobian_t(protocols, xt, f0=f)
        step = np.clip(_solve_normal(jac, r, damping), -0.5, 0.5)
        xn = np.clip(xt + step, _LO_T, _HI_T)
        x[:, todo] = xn
        todo = todo[np.any(xn != xt, axis=0)]
    else:
        resid[todo] = np.abs(_log_signals_t(protocols, x[:, todo])
                             - target[:, todo]).max(axis=0)
    out[sel] = np.exp(x.T)
    return out.astype(maps.dtype), {"voxels": int(sel.sum()),
                                    "max_residual": float(resid.max(initial=0.0))}


def scale_sensitivity(maps: np.ndarray, mask: np.ndarray, protocols: Sequence[physics.Protocol],
                      log_cov: np.ndarray, model_log_sd: float = 0.0) -> np.ndarray:
    """Per-voxel standard deviation of PD, T1, T2 (same units as the maps, shape of ``maps``)
    implied by the posterior covariance ``log_cov`` of the log-scales: the maps move along
    the degenerate family as Δlog θ = J⁻¹·Δlog s, so Cov(log θ) = J⁺ Σ J⁺ᵀ (J = d log S /
    d log θ at the voxel, pseudo-inverse when fewer than three contrasts). 0 outside ``mask``.
    ``model_log_sd``: a relative error of every contrast's signal model (independent between
    contrasts; what the estimator's equations leave out: B1, MT, echo-train details, partial
    volume), added to Σ as ``model_log_sd² · I``: it moves the maps exactly as a scale error
    of that size does (:data:`~qmriflow.model.calibration.DEFAULT_MODEL_ERROR`).
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
    sigma = np.asarray(log_cov, dtype=np.float64)
    if model_log_sd:
        sigma = sigma + float(model_log_sd) ** 2 * np.eye(sigma.shape[0])
    cov = jinv @ sigma[None] @ np.swapaxes(jinv, 1, 2)
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


