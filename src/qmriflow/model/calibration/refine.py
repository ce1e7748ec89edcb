"""Per-voxel refinement of the maps against the data (damped Gauss-Newton with restarts and
the CSF-branch check)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ... import physics
from .pinning import (
    _HI_T,
    _LO_T,
    _log_jacobian_t,
    _log_signals_t,
    _solve_normal,
    _to_log,
    csf_branch_t2,
    tissue_start_table,
)
from .scales import (
    _LOG_HI,
    _LOG_LO,
)

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
    # voxels in the last axis (pinning module: "structure of arrays")
    x0 = np.ascontiguousarray(_to_log(out[sel]).T)  # (3, N)
    r = np.ascontiguousarray(np.asarray(images, dtype=np.float64)[sel].T)  # (C, N)
    sc = np.asarray(scales, dtype=np.float64)[:, None]
    w = 1.0 / prior_log_sd
    n_vox = x0.shape[1]

    def misfit(logs: np.ndarray, idx: np.ndarray | slice = slice(None)) -> np.ndarray:
        """Data χ² Σ_c ((r_c − s_c·S_c) / noise)² of the voxels ``idx`` from their
        log-signals (C, n)."""
        return (((r[:, idx] - sc * np.exp(logs)) / noise) ** 2).sum(0)

    def cost(xv: np.ndarray, idx: np.ndarray | slice, prior: np.ndarray
             ) -> tuple[np.ndarray, np.ndarray]:
        """(cost, log-signals) at log-parameters ``xv`` (3, n) of the voxels ``idx``, whose
        log-priors are ``prior`` (aligned with ``xv``)."""
        logs = _log_signals_t(protocols, xv)
        return misfit(logs, idx) + ((w * (xv - prior)) ** 2).sum(0), logs

    def descend(x: np.ndarray, rows: np.ndarray, prior: np.ndarray
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray, int, np.ndarray]:
        """LM from ``x`` (3, len(rows)) for the voxels ``rows``, whose log-priors are
        ``prior`` (3, len(rows)): (x, cost, log-signals at x, steps, per-voxel status
        (:data:`REFINE_STATUS`: 1 converged, 2 still moving, 3 stalled))."""
        lam = np.full(x.shape[1], 1e-3)
        c_now, logf_now = cost(x, rows, prior)
        state = np.full(x.shape[1], 2, dtype=np.uint8)
        steps = 0
        for _ in range(iterations):
            # only voxels still moving: an accepted step below `tol` (or a hopeless damping)
            # retires a voxel, which leaves its result unchanged to within `tol`
            idx = np.flatnonzero(state == 2)
            if idx.size == 0:
                break
            steps += 1
            xa = x[:, idx]
            # the signals at x are known from the last cost evaluation
            logf, jac = _log_jacobian_t(protocols, xa, f0=logf_now[:, idx])
            f = sc * np.exp(logf)
            jac *= f[None] / noise  # d residual / d log θ
            res = (f - r[:, rows[idx]]) / noise
            la = lam[idx]
            step = _solve_normal(jac, res, w * w + la, (w * w) * (xa - prior[:, idx]))
            cand = np.clip(xa + np.clip(step, -0.5, 0.5), _LO_T, _HI_T)
            c_new, logf_new = cost(cand, rows[idx], prior[:, idx])
            ok = c_new <= c_now[idx]
            acc = idx[ok]
            x[:, acc] = cand[:, ok]
            logf_now[:, acc] = logf_new[:, ok]
            c_now[acc] = c_new[ok]
            la = np.where(ok, la * 0.3, la * 10.0)
            lam[idx] = la
            state[idx[ok & (np.abs(cand - xa).max(axis=0) < tol)]] = 1
            state[idx[(la > 1e10) & (state[idx] == 2)]] = 3
        return x, c_now, logf_now, steps, state

    everyone = np.arange(n_vox)
    x, c_best, logf, steps, state = descend(x0.copy(), everyone, x0)
    moving = int((state == 2).sum())
    restarted = 0
    won = np.zeros(n_vox, dtype=bool)
    if len(starts):
        rows = np.flatnonzero(misfit(logf) / r.shape[0] > RESTART_CHI ** 2)
        restarted = int(rows.size)
        for st in starts:
            if rows.size == 0:
                break
            start = np.clip(np.log(np.asarray(st, np.float64)), _LOG_LO, _LOG_HI)
            xs = np.repeat(start[:, None], rows.size, axis=1)
            xs, cs, _, _, st_s = descend(xs, rows, x0[:, rows])
            better = cs < c_best[rows]
            won[rows[better]] = True
            x[:, rows[better]] = xs[:, better]
            state[rows[better]] = st_s[better]
            c_best[rows[better]] = cs[better]
    branch = {"checked": 0, "switched": 0}
    branch_t2 = csf_branch_t2(tissues) if dseg is not None and tissues is not None else None
    if branch_t2 is not None:
        table = tissue_start_table(tissues)
        rows = np.flatnonzero(x[2] > np.log(branch_t2))
        lab = np.asarray(dseg)[sel][rows]
        known = (lab >= 0) & (lab < table.shape[0]) & (lab == np.floor(lab))
        rows, lab = rows[known], lab[known].astype(np.intp)
        ts = table[lab]
        good = np.all(np.isfinite(ts), axis=1) & np.all(ts > 0, axis=1)
        rows, ts = rows[good], ts[good]
        branch["checked"] = int(rows.size)
        if rows.size:
            xt = np.clip(np.ascontiguousarray(np.log(ts).T), _LO_T, _HI_T)
            xs, _, logs, _, st_b = descend(xt.copy(), rows, xt)
            chi_csf = misfit(_log_signals_t(protocols, x[:, rows]), rows)
            take = ((misfit(logs, rows) <= chi_csf + BRANCH_CHI2)
                    & (xs[2] < np.log(branch_t2)))
            x[:, rows[take]] = xs[:, take]
            state[rows[take]] = st_b[take]
            branch["switched"] = int(take.sum())
    x, x0 = x.T, x0.T
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


