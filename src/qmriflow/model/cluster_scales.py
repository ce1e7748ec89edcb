"""Contrast scales identified per scanner-protocol cluster, not per session (issue 22).

Why: each T1w/T2w/FLAIR series has an unknown receiver gain. CSF (water) fixes the T2w scale
and, through its T1, the T1w scale; FLAIR nulls CSF, so inside one session the FLAIR scale is a
free direction that only tissue priors can fill — per session, which pulls every session's
values to the priors and erases the differences between subjects. But on one scanner with one
protocol the gain *ratios* between series are set by the protocol (coil, receiver settings,
reconstruction scaling: Philips records its scaling so floating-point values compare between
series); what changes per patient is mostly one common factor (coil loading). So the scales
of session s and contrast c are modelled as

    log k[s, c] = u[s] + r[c] + j[s, c] − log mode[s, c]

with ``u[s]`` the session's common factor, ``r[c]`` the cluster's log gain ratio (r[T2w] = 0),
``j[s, c]`` a small per-series departure (prior SD :attr:`ClusterPriors.ratio_jitter_sd`), and
``mode[s, c]`` the histogram mode the image was normalised by (its own units: Philips FP,
N4-corrected with the field's geometric mean 1 in the head). The tissue medians of every
session of a cluster are fitted *jointly* (:func:`fit_cluster`): per session the WM, GM and CSF
(PD, T1, T2), per cluster the ratios and the cohort's median WM/GM values μ. Priors: CSF is
water (tight, as in :class:`~qmriflow.model.calibration.Priors`); a session's WM/GM values
scatter about the cluster's μ with the between-subject SD τ (wide: the data decide); μ itself
has the literature prior (±15 %). The direction that remains free is then one number per
cluster — chosen by a calibration session's reference values when there is one, otherwise by
the cohort prior on μ, an assumption each sidecar states. A session's differences from the
others of its cluster survive either way.

A new session joins a fitted cluster with its ratios and μ fixed (:func:`join_cluster`): the
finished sessions are not refitted. With gains that are not comparable between series (no
vendor float scaling; :func:`gains_consistent` tests it on the data) or too few sessions, the
session falls back to the per-session calibration (:func:`calibrate_scales`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import optimize, sparse

from .. import physics
from .calibration.scales import (
    _LOG_HI,
    _LOG_LO,
    PARAMS,
    TISSUES,
    UNUSED,
    Calibration,
    Priors,
)

__all__ = [
    "REFERENCE_CONTRAST",
    "ClusterFit",
    "ClusterPriors",
    "SessionObservation",
    "fit_cluster",
    "gains_consistent",
    "join_cluster",
]

_LAST: dict[str, Any] = {}
REFERENCE_CONTRAST = "T2w"
"""The contrast whose gain ratio is 1 by definition (CSF anchors it best)."""
TISSUE_LEVEL = ("WM", "GM")
"""Tissues with a cluster-level (cohort) mean μ; CSF has its physical prior instead."""


@dataclass(frozen=True)
class SessionObservation:
    """What the cluster fit needs of one session: its protocols, its tissue medians of the
    mode-normalised images (:func:`~qmriflow.model.calibration.tissue_medians`), the log of
    each image's normalising mode in the image's own units, and optional reference values
    (tissue → "pd"/"t1_s"/"t2_s" → value) of a calibration session."""

    label: str
    protocols: Mapping[str, physics.Protocol]
    medians: Mapping[str, Mapping[str, float]]
    log_modes: Mapping[str, float]
    reference: Mapping[str, Mapping[str, float]] | None = None

    @property
    def contrasts(self) -> tuple[str, ...]:
        return tuple(self.protocols)


@dataclass(frozen=True)
class ClusterPriors:
    """Priors of the cluster model (none of them is a phantom generator value)."""

    tissue: Priors = field(default_factory=Priors)
    """Centres and log-SDs of μ (WM, GM) and of each session's CSF; data noise model."""
    between_subject_sd: float = 0.3
    """τ: log-SD of a session's WM/GM parameters about the cluster's μ — wide, so that a
    session's own data decide its values (healthy adults differ by ~10 %, disease more)."""
    ratio_jitter_sd: float = 0.05
    """Log-SD of a series' gain ratio about its cluster's: the same protocol on one scanner
    reproduces its gain ratios to a few percent (coil loading, prescan, N4's normalisation)."""
    reference_sd: float = 0.03
    """Log-SD of a calibration session's reference values (their own measurement error)."""


@dataclass
class ClusterFit:
    """Result of :func:`fit_cluster`: the cluster's log gain ratios and cohort means (with
    posterior SDs), each session's calibration, and what set the free direction."""

    contrasts: tuple[str, ...]
    log_ratios: dict[str, float]
    log_ratio_sd: dict[str, float]
    mu: dict[str, dict[str, float]]
    """Cohort tissue values μ (tissue → param → value, linear units)."""
    mu_log_sd: dict[str, dict[str, float]]
    sessions: dict[str, Calibration]
    level: str
    """"reference" (a calibration session's values set the cluster's level) or "cohort
    prior" (the literature prior on the cohort's median WM/GM values: an assumption)."""
    reference_sessions: list[str]
    jitter: dict[str, dict[str, float]]
    """Each session's fitted per-series departure j[s, c] from the cluster's ratio."""
    priors: ClusterPriors = field(default_factory=ClusterPriors)

    def as_dict(self) -> dict[str, Any]:
        return {
            "contrasts": list(self.contrasts), "log_ratios": self.log_ratios,
            "log_ratio_sd": self.log_ratio_sd, "mu": self.mu, "mu_log_sd": self.mu_log_sd,
            "level": self.level, "reference_sessions": list(self.reference_sessions),
            "jitter": self.jitter,
            "priors": {"between_subject_sd": self.priors.between_subject_sd,
                       "ratio_jitter_sd": self.priors.ratio_jitter_sd,
                       "reference_sd": self.priors.reference_sd,
                       "mu_centres": {t: dict(self.priors.tissue.centres[t])
                                      for t in TISSUE_LEVEL},
                       "mu_log_sd": {t: dict(self.priors.tissue.log_sd[t])
                                     for t in TISSUE_LEVEL}},
            "sessions": {k: v.as_dict() for k, v in self.sessions.items()},
        }


# ---------------------------------------------------------------------------------------------


def _batched_signals(protocols: Sequence[physics.Protocol], logp: np.ndarray) -> np.ndarray:
    """Signals of tissues with log-parameters ``logp`` (N, 3) under N protocols of one
    sequence (one per row), vectorised: the TE factor is applied per row."""
    p0 = protocols[0]
    if any(p.echo_train is not None for p in protocols):
        # echo-train models are tabulated per protocol: one call per distinct protocol
        out = np.empty(len(protocols))
        groups: dict[physics.Protocol, list[int]] = {}
        for i, p in enumerate(protocols):
            groups.setdefault(p, []).append(i)
        for p, rows in groups.items():
            pd, t1, t2 = np.exp(logp[rows]).T
            out[rows] = np.asarray(physics.signal(p, pd, t1, t2), dtype=np.float64)
        return out
    tr = np.array([p.tr_ms for p in protocols])
    te = np.array([p.te_ms * p.te_factor for p in protocols])
    ti = None if p0.ti_ms is None else np.array([p.ti_ms for p in protocols])
    fa = None if p0.fa_deg is None else np.array([p.fa_deg for p in protocols])
    prot = physics.Protocol(p0.sequence, tr, te, ti, fa, te_correction=1.0)  # type: ignore[arg-type]
    pd, t1, t2 = np.exp(logp).T
    out = np.asarray(physics.signal(prot, pd, t1, t2), dtype=np.float64)
    mt = np.array([p.mt_wm_loss for p in protocols])
    return out * physics.mt_factor(t1, mt) if np.any(mt) else out


@dataclass
class _Layout:
    """Parameter vector layout of the joint fit."""

    contrasts: tuple[str, ...]
    n_sessions: int
    free_ratios: tuple[str, ...]  # contrasts with a fitted ratio (all but the reference)
    fixed: bool  # ratios and μ fixed (joining a fitted cluster)

    @property
    def n_global(self) -> int:
        return 0 if self.fixed else len(self.free_ratios) + 3 * len(TISSUE_LEVEL)

    @property
    def per_session(self) -> int:
        return 1 + len(self.free_ratios) + 3 * len(TISSUES)

    def session_slice(self, s: int) -> slice:
        a = self.n_global + s * self.per_session
        return slice(a, a + self.per_session)

    @property
    def size(self) -> int:
        return self.n_global + self.n_sessions * self.per_session


def _check(sessions: Sequence[SessionObservation], need_reference: bool = True
           ) -> tuple[str, ...]:
    if not sessions:
        raise ValueError("a cluster needs at least one session")
    contrasts = sessions[0].contrasts
    for s in sessions:
        if s.contrasts != contrasts:
            raise ValueError(f"session {s.label} has contrasts {s.contrasts}, the cluster "
                             f"{contrasts}")
        if "CSF" not in s.medians:
            raise ValueError(f"session {s.label}: no CSF medians")
    if need_reference and REFERENCE_CONTRAST not in contrasts:
        raise ValueError(f"the cluster model needs the {REFERENCE_CONTRAST} (its gain ratio "
                         "is the reference)")
    return contrasts


def _solve(sessions: Sequence[SessionObservation], pri: ClusterPriors, lay: _Layout,
           fixed_ratios: Mapping[str, float] | None = None,
           fixed_mu: np.ndarray | None = None
           ) -> tuple[np.ndarray, np.ndarray, list[dict[str, Any]]]:
    """Joint MAP fit. Returns the parameters, their posterior covariance and per-session
    bookkeeping (data rows)."""
    tp = pri.tissue
    contrasts = lay.contrasts
    centre = {t: np.array([math.log(tp.centres[t][p]) for p in PARAMS]) for t in TISSUES}
    csd = {t: np.array([tp.log_sd[t][p] for p in PARAMS]) for t in TISSUES}
    # observations: (session, tissue index, contrast index, value, sigma)
    obs = []
    for si, s in enumerate(sessions):
        for ti, t in enumerate(TISSUES):
            if t not in s.medians:
                continue
            for ci, c in enumerate(contrasts):
                if (t, s.protocols[c].sequence) in UNUSED:
                    continue
                v = s.medians[t].get(c, math.nan)
                if math.isfinite(v) and v > 0:
                    extra = tp.extra_rel_noise.get(t, {}).get(c, 0.0)
                    obs.append((si, ti, ci, v, (tp.rel_noise + extra) * v + tp.abs_noise))
    if not obs:
        raise ValueError("no usable tissue medians")
    o_s = np.array([o[0] for o in obs])
    o_t = np.array([o[1] for o in obs])
    o_c = np.array([o[2] for o in obs])
    o_v = np.array([o[3] for o in obs])
    o_sig = np.array([o[4] for o in obs])
    log_mode = np.array([[s.log_modes[c] for c in contrasts] for s in sessions])
    ratio_idx = {c: i for i, c in enumerate(lay.free_ratios)}
    nr = len(lay.free_ratios)
    # protocols grouped by contrast for the vectorised signal
    protos = [[s.protocols[c] for s in sessions] for c in contrasts]
    refs = [(si, TISSUES.index(t), k, math.log(v[p]))
            for si, s in enumerate(sessions) if s.reference
            for t, v in s.reference.items() if t in TISSUES
            for k, p in enumerate(PARAMS) if p in v and v[p] > 0]

    def unpack(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray,
                                       np.ndarray]:
        if lay.fixed:
            r = np.array([(fixed_ratios or {}).get(c, 0.0) for c in contrasts])
            mu = np.asarray(fixed_mu)
        else:
            r = np.zeros(len(contrasts))
            for c, i in ratio_idx.items():
                r[contrasts.index(c)] = x[i]
            mu = x[nr:nr + 3 * len(TISSUE_LEVEL)].reshape(len(TISSUE_LEVEL), 3)
        per = x[lay.n_global:].reshape(lay.n_sessions, lay.per_session)
        u = per[:, 0]
        j = np.zeros((lay.n_sessions, len(contrasts)))
        for c, i in ratio_idx.items():
            j[:, contrasts.index(c)] = per[:, 1 + i]
        th = per[:, 1 + nr:].reshape(lay.n_sessions, len(TISSUES), 3)
        return r, mu, u, j, th

    def residuals(x: np.ndarray) -> np.ndarray:
        r, mu, u, j, th = unpack(x)
        logk = u[:, None] + r[None, :] + j - log_mode  # (S, C)
        pred = np.empty(len(obs))
        for ci in range(len(contrasts)):
            sel = o_c == ci
            if sel.any():
                sig = _batched_signals([protos[ci][k] for k in o_s[sel]], th[o_s[sel], o_t[sel]])
                pred[sel] = np.exp(logk[o_s[sel], ci]) * sig
        out = [(o_v - pred) / o_sig]
        # priors: CSF physics; WM/GM about μ (τ); μ about the literature; jitter
        out.append(((th[:, TISSUES.index("CSF")] - centre["CSF"]) / csd["CSF"]).ravel())
        for k, t in enumerate(TISSUE_LEVEL):
            out.append(((th[:, TISSUES.index(t)] - mu[k]) / pri.between_subject_sd).ravel())
            if not lay.fixed:
                out.append((mu[k] - centre[t]) / csd[t])
        out.append((j[:, [contrasts.index(c) for c in lay.free_ratios]]
                    / pri.ratio_jitter_sd).ravel())
        if refs:
            out.append(np.array([(th[si, ti, k] - lv) / pri.reference_sd
                                 for si, ti, k, lv in refs]))
        return np.concatenate(out)

    # start: tissues and μ at the prior centres, u from the T2w, ratios from per-contrast LS
    x0 = np.zeros(lay.size)
    th0 = np.stack([centre[t] for t in TISSUES])
    mu0 = np.stack([centre[t] for t in TISSUE_LEVEL]) if fixed_mu is None else fixed_mu
    logk0 = np.zeros((lay.n_sessions, len(contrasts)))
    for si in range(lay.n_sessions):
        for ci in range(len(contrasts)):
            sel = (o_s == si) & (o_c == ci)
            if sel.any():
                sig = _batched_signals([protos[ci][si]] * int(sel.sum()), th0[o_t[sel]])
                logk0[si, ci] = math.log(max(float(np.sum(sig * o_v[sel]) /
                                                   np.sum(sig * sig)), 1e-12))
    g0 = logk0 + log_mode  # log gain per session and contrast
    r0 = (np.zeros(len(contrasts)) if fixed_ratios is None and not lay.fixed else
          np.array([(fixed_ratios or {}).get(c, 0.0) for c in contrasts]))
    if not lay.fixed:
        ref_ci = contrasts.index(REFERENCE_CONTRAST)
        for c, i in ratio_idx.items():
            r0[contrasts.index(c)] = float(np.median(g0[:, contrasts.index(c)] - g0[:, ref_ci]))
            x0[i] = r0[contrasts.index(c)]
        x0[nr:nr + 3 * len(TISSUE_LEVEL)] = mu0.ravel()
    for si in range(lay.n_sessions):
        sl = lay.session_slice(si)
        per = np.zeros(lay.per_session)
        per[0] = float(np.median(g0[si] - r0))
        per[1 + nr:] = th0.ravel()
        x0[sl] = per
    # bounds: tissue log-parameters within the maps' limits
    lo = np.full(lay.size, -np.inf)
    hi = np.full(lay.size, np.inf)
    for si in range(lay.n_sessions):
        a = lay.session_slice(si).start + 1 + nr
        lo[a:a + 3 * len(TISSUES)] = np.tile(_LOG_LO, len(TISSUES))
        hi[a:a + 3 * len(TISSUES)] = np.tile(_LOG_HI, len(TISSUES))
    if not lay.fixed:
        lo[nr:nr + 3 * len(TISSUE_LEVEL)] = np.tile(_LOG_LO, len(TISSUE_LEVEL))
        hi[nr:nr + 3 * len(TISSUE_LEVEL)] = np.tile(_LOG_HI, len(TISSUE_LEVEL))
    x0 = np.clip(x0, lo + 1e-9, hi - 1e-9)
    sparsity = _sparsity(lay, len(residuals(x0)), o_s, refs)
    res = optimize.least_squares(residuals, x0, bounds=(lo, hi), method="trf",
                                 jac_sparsity=sparsity, x_scale=1.0, xtol=1e-8, ftol=1e-8,
                                 gtol=1e-8, max_nfev=500)
    _LAST["nfev"], _LAST["status"] = res.nfev, res.status
    jac = res.jac.toarray() if sparse.issparse(res.jac) else np.asarray(res.jac)
    try:
        cov = np.linalg.pinv(jac.T @ jac, rcond=1e-12)
    except np.linalg.LinAlgError:
        cov = np.full((lay.size, lay.size), math.nan)
    return res.x, cov, [{"unpack": unpack}]


def _sparsity(lay: _Layout, n_res: int, o_s: np.ndarray,
              refs: Sequence[tuple[int, int, int, float]]) -> sparse.lil_matrix:
    """Which parameters each residual depends on (rows in the order of ``residuals``)."""
    m = sparse.lil_matrix((n_res, lay.size), dtype=np.int8)
    row = 0
    nr = len(lay.free_ratios)
    for si in o_s:  # data rows: the session's parameters and the cluster's
        sl = lay.session_slice(int(si))
        m[row, sl] = 1
        if lay.n_global:
            m[row, :lay.n_global] = 1
        row += 1
    for si in range(lay.n_sessions):  # CSF priors
        a = lay.session_slice(si).start + 1 + nr + 3 * TISSUES.index("CSF")
        for k in range(3):
            m[row, a + k] = 1
            row += 1
    for kt, t in enumerate(TISSUE_LEVEL):
        for si in range(lay.n_sessions):
            a = lay.session_slice(si).start + 1 + nr + 3 * TISSUES.index(t)
            for k in range(3):
                m[row, a + k] = 1
                if not lay.fixed:
                    m[row, nr + 3 * kt + k] = 1
                row += 1
        if not lay.fixed:
            for k in range(3):
                m[row, nr + 3 * kt + k] = 1
                row += 1
    for si in range(lay.n_sessions):  # jitter priors
        a = lay.session_slice(si).start + 1
        for i in range(nr):
            m[row, a + i] = 1
            row += 1
    for si, ti, k, _ in refs:
        m[row, lay.session_slice(si).start + 1 + nr + 3 * ti + k] = 1
        row += 1
    assert row == n_res, (row, n_res)
    return m


def _calibrations(sessions: Sequence[SessionObservation], lay: _Layout, x: np.ndarray,
                  cov: np.ndarray, unpack: Any, method: str) -> dict[str, Calibration]:
    r, _mu, u, j, th = unpack(x)
    contrasts = lay.contrasts
    ratio_idx = {c: i for i, c in enumerate(lay.free_ratios)}
    out: dict[str, Calibration] = {}
    for si, s in enumerate(sessions):
        sl = lay.session_slice(si)
        # log k_c = u + r_c + j_c − log mode_c: its gradient in the parameters
        grads = []
        for c in contrasts:
            g = np.zeros(lay.size)
            g[sl.start] = 1.0
            if c in ratio_idx:
                g[sl.start + 1 + ratio_idx[c]] = 1.0
                if not lay.fixed:
                    g[ratio_idx[c]] = 1.0
            grads.append(g)
        gm = np.array(grads)
        c3 = gm @ cov @ gm.T
        logk = {c: float(u[si] + r[ci] + j[si, ci] - s.log_modes[c])
                for ci, c in enumerate(contrasts)}
        out[s.label] = Calibration(
            contrasts=contrasts,
            scales={c: math.exp(v) for c, v in logk.items()},
            log_sd={c: float(math.sqrt(max(c3[ci, ci], 0.0))) for ci, c in enumerate(contrasts)},
            log_cov=c3.tolist(),
            tissues={t: {p: float(math.exp(th[si, ti, k])) for k, p in enumerate(PARAMS)}
                     for ti, t in enumerate(TISSUES) if t in s.medians},
            medians={t: dict(v) for t, v in s.medians.items()},
            n_voxels={},
            method=method,
        )
    return out


def fit_cluster(sessions: Sequence[SessionObservation],
                priors: ClusterPriors | None = None) -> ClusterFit:
    """Joint MAP fit of a cluster's gain ratios, cohort means and every session's scales and
    tissue values (module docstring). Raises ``ValueError`` for unusable input."""
    pri = priors or ClusterPriors()
    contrasts = _check(sessions)
    free = tuple(c for c in contrasts if c != REFERENCE_CONTRAST)
    lay = _Layout(contrasts, len(sessions), free, fixed=False)
    x, cov, book = _solve(sessions, pri, lay)
    unpack = book[0]["unpack"]
    r, mu, _u, j, _th = unpack(x)
    nr = len(free)
    mu_sd = np.sqrt(np.clip(np.diag(cov)[nr:nr + 3 * len(TISSUE_LEVEL)], 0, None)).reshape(
        len(TISSUE_LEVEL), 3)
    refs = [s.label for s in sessions if s.reference]
    return ClusterFit(
        contrasts=contrasts,
        log_ratios={c: float(r[contrasts.index(c)]) for c in contrasts},
        log_ratio_sd={c: (float(math.sqrt(max(cov[free.index(c), free.index(c)], 0.0)))
                          if c in free else 0.0) for c in contrasts},
        mu={t: {p: float(math.exp(mu[k, i])) for i, p in enumerate(PARAMS)}
            for k, t in enumerate(TISSUE_LEVEL)},
        mu_log_sd={t: {p: float(mu_sd[k, i]) for i, p in enumerate(PARAMS)}
                   for k, t in enumerate(TISSUE_LEVEL)},
        sessions=_calibrations(sessions, lay, x, cov, unpack, "cluster"),
        level="reference" if refs else "cohort prior",
        reference_sessions=refs,
        jitter={s.label: {c: float(j[si, contrasts.index(c)]) for c in free}
                for si, s in enumerate(sessions)},
        priors=pri,
    )


def join_cluster(session: SessionObservation, fit: ClusterFit) -> Calibration:
    """Calibrate one session with a fitted cluster's ratios and cohort means held fixed (a new
    session joins without refitting the others, or a session's maps are made from a subset of
    its contrasts); its scale uncertainty includes the ratios'. The session's contrasts must
    be among the cluster's."""
    contrasts = _check([session], need_reference=False)
    if not set(contrasts) <= set(fit.contrasts):
        raise ValueError(f"session {session.label} has contrasts {contrasts}, the cluster "
                         f"{fit.contrasts}")
    free = tuple(c for c in contrasts if c != REFERENCE_CONTRAST)
    lay = _Layout(contrasts, 1, free, fixed=True)
    mu = np.array([[math.log(fit.mu[t][p]) for p in PARAMS] for t in TISSUE_LEVEL])
    x, cov, book = _solve([session], fit.priors, lay, fixed_ratios=fit.log_ratios,
                          fixed_mu=mu)
    cal = _calibrations([session], lay, x, cov, book[0]["unpack"], "cluster (joined)")
    out = cal[session.label]
    # the fixed ratios' own uncertainty adds to the scales'
    c3 = np.asarray(out.log_cov)
    for ci, c in enumerate(contrasts):
        c3[ci, ci] += fit.log_ratio_sd.get(c, 0.0) ** 2
    out.log_cov = c3.tolist()
    out.log_sd = {c: float(math.sqrt(max(c3[ci, ci], 0.0))) for ci, c in enumerate(contrasts)}
    return out


def gains_consistent(log_gain_ratios: Sequence[float], *, expected_sd: float = 0.2,
                     factor: float = 2.0) -> tuple[bool, float]:
    """Whether per-session estimates of one log gain ratio (e.g. T1w vs T2w from each
    session's own calibration) scatter no more than ``factor`` × ``expected_sd`` (robust SD:
    1.4826 × MAD). Returns (consistent, robust SD). Gains that the vendor does not make
    comparable between series (auto-prescan receiver gains) scatter by tens of percent."""
    v = np.asarray([x for x in log_gain_ratios if math.isfinite(x)], dtype=np.float64)
    if v.size < 2:
        return False, math.nan
    rsd = float(1.4826 * np.median(np.abs(v - np.median(v))))
    return rsd <= factor * expected_sd, rsd
