"""Vectorised two-start maximum-likelihood fit of the magnitude fat/water model (torch).

The conventional reference of seed 004 (MAGORINO-style): per voxel, the Rician negative
log-likelihood of :func:`qmriflow.physics.cse_magnitude` is minimised from a water-dominant and
a fat-dominant start and the lower optimum is kept. Here each start is confined to its half of
the PDFF axis (water ``[0, b]``, fat ``[b, 1]``, b = 0.58, the seed's degeneracy split), so
that both likelihood maxima are always visited, even where an unconstrained start would roll
into the other basin. Each half is solved with a box-constrained Levenberg–Marquardt
(projected Gauss–Newton with the exact Rician curvature, bound-active variables frozen)
running on all voxels at once; converged voxels leave the working set. The model and its
derivatives come from :mod:`qmriflow.physics` only.

Internally the signal is divided by σ (σ' = 1) and R2* is handled in 1/ms, so the 3×3 systems
are well conditioned; the reported NLL is in the units of the input signal.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from ..physics import (
    FatSpectrum,
    cse_magnitude_jacobian,
    rician_nll,
    rician_nll_with_derivatives,
)
from ..sym3 import sym3_adjugate, sym3_apply

__all__ = ["FitOptions", "FitResult", "fit_two_start", "granted_threads", "grid_search",
           "voxel_nll"]

PDFF_BOUNDARY = 0.58


@dataclass(frozen=True)
class FitOptions:
    """Settings of :func:`fit_two_start`.

    ``boundary``: PDFF split between the water and fat start (seed: 0.58).
    ``r2star_max_per_s``: upper bound of R2* (1/s; MAGORINO: 2 ms⁻¹).
    ``s0_max_factor``: S0 upper bound = factor · max echo · e^{R2*max·TE1}.
    ``max_iter``/``tol``: LM iterations and relative NLL change that counts as converged
    (default 1e-9 in float64, 1e-6 in float32 — near its resolution).
    ``init_pdff_points``/``init_r2star_points``: the coarse (PDFF, R2*) grid per half whose
    least-squares best point is the start of that half (S0 closed form; one matrix product).
    ``max_pdff_step``: trust bound on the PDFF change per iteration (keeps a step from
    jumping over a narrow basin into a worse one).
    ``dtype``: ``"float32"`` (default, ~2× faster; NLL converged to ~1e-6 relative, far
    inside the 0.1 % tolerance of the acceptance check) or ``"float64"`` (~1e-9).
    ``chunk``: voxels per batch (0: on CPU at most 32768 and at most N/threads, so that every
    worker has a chunk however small the series; 10⁶ on GPU).
    ``threads``: CPU worker threads, each fitting whole chunks with single-threaded torch ops
    (0: the CPUs available to this process; never more than those, ``os.sched_getaffinity``).
    A series of any size runs this way — no intra-op threading, which collapses when other
    jobs share the cores. ``device``: torch device string.
    """

    boundary: float = PDFF_BOUNDARY
    r2star_max_per_s: float = 2000.0
    s0_max_factor: float = 3.0
    max_iter: int = 30
    tol: float | None = None
    init_pdff_points: int = 12
    init_r2star_points: int = 16
    max_pdff_step: float = 0.1
    dtype: str = "float32"
    chunk: int = 0
    threads: int = 0
    device: str = "cpu"

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class FitResult:
    """Per-voxel maps of the two-start fit (NumPy, shape ``(N,)``).

    ``fat_side``: 1 where the fat-dominant start won. ``nll``: Rician NLL (summed over
    echoes, input units) of the winner; ``nll_water``/``nll_fat``: of each start.
    ``iterations``: LM iterations used (max over voxels and starts); ``mean_iterations``:
    mean per voxel and start. ``params_water``/``params_fat``: (N, 3) S0, PDFF, R2* (1/s) of
    each start's optimum.
    """

    s0: np.ndarray
    pdff: np.ndarray
    r2star_per_s: np.ndarray
    nll: np.ndarray
    nll_water: np.ndarray
    nll_fat: np.ndarray
    fat_side: np.ndarray
    iterations: int
    seconds: float
    mean_iterations: float = 0.0
    params_water: np.ndarray | None = None
    params_fat: np.ndarray | None = None
    threads: int = 1
    even_echo_gain: float = 1.0

    @property
    def voxels_per_s(self) -> float:
        return float(self.s0.size / max(self.seconds, 1e-12))


def _torch():
    import torch

    return torch


_PAIRS = ((0, 0), (0, 1), (0, 2), (1, 1), (1, 2), (2, 2))


def _objective(x: Any, m: Any, te_ms: np.ndarray, field_t: float, spectrum: FatSpectrum | None,
               derivatives: bool, gain: float = 1.0) -> tuple[Any, Any, Any, Any]:
    """NLL (σ = 1) per voxel and, optionally, gradient, Hessian and a positive scaling.

    ``x``: (N, 3) = S0 (σ units), PDFF, R2* (1/ms). Returns ``(f, g, h, dgn)`` with ``g``
    (N, 3), ``h`` (N, 6) the upper triangle (00, 01, 02, 11, 12, 22) of the exact Hessian
    (Rician curvature times the Jacobian outer product plus the Rician slope times the model's
    second derivatives) and ``dgn`` (N, 3) the diagonal of the Gauss–Newton Hessian with the
    curvature floored (positive: the Levenberg–Marquardt damping scale).
    """
    torch = _torch()
    r_s = x[:, 2] * 1000.0
    if not derivatives:
        sig = cse_magnitude_jacobian(x[:, 0], x[:, 1], r_s, te_ms, field_t, spectrum,
                                     even_echo_gain=gain)[0]
        return rician_nll_with_derivatives(m, sig, 1.0, derivatives=False)[0].sum(-1), \
            None, None, None
    sig, d_s0, d_p, d_r, d_s0p, d_s0r, d_pp, d_pr, d_rr = cse_magnitude_jacobian(
        x[:, 0], x[:, 1], r_s, te_ms, field_t, spectrum, second=True, even_echo_gain=gain)
    nll, d1, d2 = rician_nll_with_derivatives(m, sig, 1.0)
    f = nll.sum(-1)
    # R2* handled in 1/ms: chain rule factor 1000 per R2* derivative
    jac = (d_s0, d_p, d_r * 1000.0)
    sec = {(0, 1): d_s0p, (0, 2): d_s0r * 1000.0, (1, 1): d_pp, (1, 2): d_pr * 1000.0,
           (2, 2): d_rr * 1e6}
    g = torch.stack([(d1 * j).sum(-1) for j in jac], dim=-1)
    h = []
    for i, k in _PAIRS:
        term = d2 * jac[i] * jac[k]
        if (i, k) in sec:
            term = term + d1 * sec[(i, k)]
        h.append(term.sum(-1))
    w = torch.clamp(d2, min=0.05)
    dgn = torch.stack([(w * j * j).sum(-1) for j in jac], dim=-1)
    return f, g, torch.stack(h, dim=-1), dgn


def _lm_step(g: Any, h: Any, dgn: Any, lam: Any, x: Any, lo: Any, hi: Any,
             max_pdff_step: float = 0.1) -> tuple[Any, Any]:
    """Projected LM step: (H + λ·D) δ = −g, bound-active variables frozen.

    Returns ``(x_new, ok)``; ``ok`` is False where the damped Hessian is not positive definite
    (the caller raises λ there, as for a rejected step).
    """
    torch = _torch()
    span = hi - lo
    at_lo = (x <= lo + 1e-12 * span) & (g > 0)
    at_hi = (x >= hi - 1e-12 * span) & (g < 0)
    free = ~(at_lo | at_hi)
    fr = free.to(x.dtype)
    g = g * fr
    dscale = torch.clamp(dgn, min=1e-12)
    d = torch.stack([h[:, 0], h[:, 3], h[:, 5]], dim=-1) + lam[:, None] * dscale
    d = torch.where(free, d, torch.ones_like(d))
    a, e_, f_ = d[:, 0], d[:, 1], d[:, 2]
    b = h[:, 1] * fr[:, 0] * fr[:, 1]
    c = h[:, 2] * fr[:, 0] * fr[:, 2]
    e = h[:, 4] * fr[:, 1] * fr[:, 2]
    cof, det = sym3_adjugate(a, b, c, e_, e, f_)
    pd = (a > 0) & (cof[5] > 0) & (det > 0)  # leading minors: positive definite
    det = torch.where(pd, det, torch.ones_like(det))
    step = -torch.stack(sym3_apply(cof, g[:, 0], g[:, 1], g[:, 2]), dim=-1) / det[:, None]
    step = torch.where(pd[:, None], step * fr, torch.zeros_like(step))
    shrink = torch.clamp(max_pdff_step / step[:, 1].abs().clamp(min=1e-30), max=1.0)
    step = step * shrink[:, None]
    return torch.minimum(torch.maximum(x + step, lo), hi), pd


def _lm(x0: Any, m: Any, lo: Any, hi: Any, te_ms: np.ndarray, field_t: float,
        spectrum: FatSpectrum | None, opts: FitOptions,
        gain: float = 1.0) -> tuple[Any, Any, int, int]:
    """Box-constrained LM from ``x0`` for all voxels; returns (x, nll, iterations, work).

    ``work`` counts voxel-iterations (objective evaluations beyond the first).

    A voxel leaves the working set when an accepted step lowers its NLL by less than
    ``opts.tol`` · (1 + |NLL|) (Newton steps converge quadratically, so the remaining error is
    far below that), or when λ has grown past 1e10 (no descent direction left: a
    bound-constrained optimum).
    """
    torch = _torch()
    x = x0.clone()
    f, g, h, dg = _objective(x, m, te_ms, field_t, spectrum, True, gain)
    lam = torch.full_like(f, 1e-2)
    tol = opts.tol if opts.tol is not None else (1e-9 if x.dtype == torch.float64 else 1e-6)
    idx = torch.arange(x.shape[0], device=x.device)
    its = 0
    work = 0
    for its in range(1, opts.max_iter + 1):  # noqa: B007
        work += int(idx.numel())
        xs, ms, los, his = x[idx], m[idx], lo[idx], hi[idx]
        fs, gs, hs, dgs, lams = f[idx], g[idx], h[idx], dg[idx], lam[idx]
        x_new, pd = _lm_step(gs, hs, dgs, lams, xs, los, his, opts.max_pdff_step)
        f_new, g_new, h_new, dg_new = _objective(x_new, ms, te_ms, field_t, spectrum, True,
                                                 gain)
        ok = pd & (f_new <= fs)
        okc = ok[:, None]
        dec = fs - f_new
        x[idx] = torch.where(okc, x_new, xs)
        f[idx] = torch.where(ok, f_new, fs)
        g[idx] = torch.where(okc, g_new, gs)
        h[idx] = torch.where(okc, h_new, hs)
        dg[idx] = torch.where(okc, dg_new, dgs)
        lam[idx] = torch.where(ok, torch.clamp(lams * 0.2, min=1e-7), lams * 8.0)
        # converged: an undamped step changes the NLL by less than tol (accepted or not: near
        # the optimum a rejection is rounding noise)
        small = (dec.abs() <= tol * (1.0 + fs.abs())) & pd & (lams < 1.0)
        done = small | (lams > 1e10)
        idx = idx[~done]
        if idx.numel() == 0:
            break
    return x, f, its, work


def _as_tensor(a: Any, dtype: Any, device: Any) -> Any:
    torch = _torch()
    if isinstance(a, torch.Tensor):
        return a.to(dtype=dtype, device=device)
    return torch.as_tensor(np.asarray(a), dtype=dtype, device=device)


def _grid_table(te: np.ndarray, field_t: float, spectrum: FatSpectrum | None, plo: float,
                phi: float, opts: FitOptions, device: Any,
                gain: float = 1.0) -> tuple[Any, Any, Any, Any]:
    """Start grid of one half: unit-norm shapes (G, E), their norms, PDFF and R2* (1/ms).

    Always float32: the grid only picks a start.
    """
    torch = _torch()
    p = np.linspace(plo, phi, opts.init_pdff_points)
    r = opts.r2star_max_per_s * np.linspace(0.0, 1.0, opts.init_r2star_points) ** 2
    pp, rr = (a.ravel() for a in np.meshgrid(p, r, indexing="ij"))
    table = cse_magnitude_jacobian(np.ones_like(pp), pp, rr, te, field_t, spectrum,
                                   even_echo_gain=gain)[0]
    norm = np.sqrt((table * table).sum(-1))
    as_t = lambda a: torch.as_tensor(a, dtype=torch.float32, device=device)  # noqa: E731
    return as_t(table / norm[:, None]), as_t(norm), as_t(pp), as_t(rr / 1000.0)


def _grid_start(m: Any, grid: tuple[Any, Any, Any, Any]) -> Any:
    """Start of one half: the least-squares best point of a coarse (PDFF, R2*) grid.

    S0 is closed form for a given shape g (S0 = <m, g>/<g, g>) and the residual is
    |m|² − <m, ĝ>² with ĝ = g/|g|, so the best grid point is the argmax of <m, ĝ> (all
    entries are non-negative): one (N, E) × (E, G) product. R2* points are spaced
    quadratically (denser at low R2*). Returns (N, 3) in internal units (σ, -, 1/ms).
    """
    torch = _torch()
    tab, norm, pp, rr = grid
    dots, best = (m.to(torch.float32) @ tab.T).max(-1)
    out = torch.stack([dots / norm[best], pp[best], rr[best]], -1)
    return out.to(m.dtype)


def fit_two_start(
    signal: Any,
    te_ms: Sequence[float] | np.ndarray,
    field_t: float,
    sigma: float,
    *,
    options: FitOptions | None = None,
    spectrum: FatSpectrum | None = None,
    even_echo_gain: float = 1.0,
) -> FitResult:
    """Two-start Rician maximum-likelihood fit of S0, PDFF and R2* per voxel.

    ``signal``: (N, n_echo) magnitudes (NumPy or torch); ``te_ms``: echo times in ms;
    ``field_t``: tesla; ``sigma``: noise SD of the underlying complex Gaussian, signal units.
    ``even_echo_gain``: amplitude factor of the even echoes (bipolar readouts, see
    :func:`qmriflow.physics.cse_echo_gains`; 1 = monopolar).
    Returns :class:`FitResult` (S0 in signal units, PDFF 0–1, R2* in 1/s).
    """
    torch = _torch()
    opts = options or FitOptions()
    if not sigma > 0:
        raise ValueError(f"sigma must be > 0, got {sigma!r}")
    te = np.asarray(te_ms, dtype=np.float64)
    dtype = torch.float64 if opts.dtype == "float64" else torch.float32
    dev = torch.device(opts.device)
    t0 = time.perf_counter()
    sig_all = _as_tensor(signal, dtype, dev) / float(sigma)
    n = int(sig_all.shape[0])
    on_cpu = dev.type == "cpu"
    workers = granted_threads(opts.threads) if on_cpu else 1
    if opts.chunk > 0:
        chunk = opts.chunk
    elif on_cpu:
        chunk = max(1, min(32768, -(-n // workers)))
    else:
        chunk = 1_000_000
    starts = list(range(0, n, chunk))
    workers = max(1, min(workers, len(starts)))

    b = float(opts.boundary)
    gain = float(even_echo_gain)
    grids = [_grid_table(te, field_t, spectrum, lo_, hi_, opts, dev, gain)
             for lo_, hi_ in ((0.0, b), (b, 1.0))]

    def run(start: int) -> tuple[Any, Any, Any, Any, int, int]:
        return _fit_chunk(sig_all[start:start + chunk], te, field_t, spectrum, grids, opts,
                          gain)

    prev_threads = torch.get_num_threads()
    try:
        if on_cpu:
            # chunk-level parallelism: single-threaded ops in `workers` Python threads (torch
            # releases the GIL), much faster than intra-op threads on small, busy CPUs
            torch.set_num_threads(1)
        if workers > 1:
            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(max_workers=workers) as pool:
                parts = list(pool.map(run, starts))
        else:
            parts = [run(s) for s in starts]
    finally:
        torch.set_num_threads(prev_threads)
    if parts:
        both = torch.cat([p[0] for p in parts]).double().cpu().numpy()
        fw = torch.cat([p[1] for p in parts]).double().cpu().numpy()
        ff = torch.cat([p[2] for p in parts]).double().cpu().numpy()
        side = torch.cat([p[3] for p in parts]).cpu().numpy().astype(np.uint8)
        its = max(p[4] for p in parts)
        work = sum(p[5] for p in parts)
    else:
        both, fw, ff = np.zeros((0, 6)), np.zeros(0), np.zeros(0)
        side, its, work = np.zeros(0, np.uint8), 0, 0
    scale = np.array([float(sigma), 1.0, 1000.0])
    pw, pf = both[:, :3] * scale, both[:, 3:] * scale
    x = np.where(side[:, None].astype(bool), pf, pw)
    shift = te.size * math.log(float(sigma))  # NLL in input units = NLL(σ=1) + E·log σ
    fw, ff = fw + shift, ff + shift
    seconds = time.perf_counter() - t0
    return FitResult(s0=x[:, 0], pdff=x[:, 1], r2star_per_s=x[:, 2],
                     nll=np.where(side.astype(bool), ff, fw), nll_water=fw, nll_fat=ff,
                     fat_side=side, iterations=its, seconds=seconds,
                     mean_iterations=work / max(2 * n, 1), params_water=pw, params_fat=pf,
                     threads=workers, even_echo_gain=gain)


def _cpu_count() -> int:
    import os

    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - non-Linux
        return os.cpu_count() or 1


def granted_threads(threads: int) -> int:
    """CPU threads to use: ``threads`` (0: all CPUs this process may run on), never more than
    the CPUs of ``os.sched_getaffinity`` (a rule's ``--threads 8`` on a 2-core cgroup/SLURM
    allocation runs 2)."""
    cores = _cpu_count()
    return max(1, min(int(threads), cores) if threads and threads > 0 else cores)


def _fit_chunk(m: Any, te: np.ndarray, field_t: float, spectrum: FatSpectrum | None,
               grids: list[tuple[Any, Any, Any, Any]],
               opts: FitOptions, gain: float = 1.0) -> tuple[Any, Any, Any, Any, int, int]:
    """Both starts on one chunk of voxels (σ units); returns (x, nll_w, nll_f, fat, its, work)."""
    torch = _torch()
    b = float(opts.boundary)
    with torch.no_grad():
        m = torch.clamp(m, min=0.0)
        mmax = m.amax(-1)
        r_hi = opts.r2star_max_per_s / 1000.0
        s0_hi = torch.clamp(opts.s0_max_factor * mmax * math.exp(r_hi * te[0]), min=1e-6)
        zeros = torch.zeros_like(mmax)
        res = []
        its = work = 0
        for (plo, phi), grid in zip(((0.0, b), (b, 1.0)), grids, strict=True):
            lo = torch.stack([zeros, zeros + plo, zeros], -1)
            hi = torch.stack([s0_hi, zeros + phi, zeros + r_hi], -1)
            x0 = _grid_start(m, grid)
            x0 = torch.minimum(torch.maximum(x0, lo), hi)
            x, f, it, wk = _lm(x0, m, lo, hi, te, field_t, spectrum, opts, gain)
            its, work = max(its, it), work + wk
            res.append((x, f))
        (xw, fw), (xf, ff) = res
        fat = ff < fw
        return torch.cat([xw, xf], -1), fw, ff, fat, its, work


def voxel_nll(signal: np.ndarray, s0: np.ndarray, pdff: np.ndarray, r2star_per_s: np.ndarray,
              te_ms: Sequence[float] | np.ndarray, field_t: float, sigma: float,
              spectrum: FatSpectrum | None = None, even_echo_gain: float = 1.0) -> np.ndarray:
    """Rician NLL (float64, summed over echoes) of parameter maps given the signal, (N,)."""
    from ..physics import cse_magnitude

    nu = cse_magnitude(np.asarray(s0, np.float64), np.asarray(pdff, np.float64),
                       np.asarray(r2star_per_s, np.float64), te_ms, field_t, spectrum,
                       even_echo_gain=even_echo_gain)
    return rician_nll(np.asarray(signal, np.float64), nu, float(sigma)).sum(-1)


def grid_search(
    signal: Any,
    te_ms: Sequence[float] | np.ndarray,
    field_t: float,
    sigma: float,
    *,
    pdff_values: np.ndarray | None = None,
    r2star_values_per_s: np.ndarray | None = None,
    s0_newton_steps: int = 8,
    spectrum: FatSpectrum | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Brute-force reference: dense (PDFF, R2*) grid with S0 profiled out exactly.

    For every grid point S0 is the Rician ML value given the shape (least-squares start, then
    Newton steps on the 1-D convex-in-practice profile), so the grid is dense in the two
    non-linear parameters and exact in the linear one. Returns ``(best_nll, best_index)``,
    NLL in input units, index into the flattened ``(pdff, r2*)`` grid. Slow: for tests and
    benchmarks on a few thousand voxels.
    """
    torch = _torch()
    p_vals = np.linspace(0, 1, 201) if pdff_values is None else np.asarray(pdff_values)
    r_vals = (np.linspace(0, 2000, 401) if r2star_values_per_s is None
              else np.asarray(r2star_values_per_s))
    m = _as_tensor(signal, torch.float64, "cpu") / float(sigma)
    pp, rr = np.meshgrid(p_vals, r_vals, indexing="ij")
    pp, rr = pp.ravel(), rr.ravel()
    best = torch.full((m.shape[0],), float("inf"), dtype=torch.float64)
    best_i = torch.zeros(m.shape[0], dtype=torch.long)
    with torch.no_grad():
        for g0 in range(0, pp.size, 64):
            p = torch.as_tensor(pp[g0:g0 + 64], dtype=torch.float64)
            r = torch.as_tensor(rr[g0:g0 + 64], dtype=torch.float64)
            shape = cse_magnitude_jacobian(torch.ones_like(p), p, r, np.asarray(te_ms),
                                           field_t, spectrum)[0]  # (G, E)
            mm = m[:, None, :]  # (N, 1, E)
            sh = shape[None]
            s0 = torch.clamp((mm * sh).sum(-1) / (sh * sh).sum(-1).clamp(min=1e-30), min=0.0)
            for _ in range(s0_newton_steps):
                _, d1, d2 = rician_nll_with_derivatives(mm, s0[..., None] * sh, 1.0)
                gr = (d1 * sh).sum(-1)
                cu = (torch.clamp(d2, min=1e-3) * sh * sh).sum(-1)
                s0 = torch.clamp(s0 - gr / cu, min=0.0)
            f = rician_nll_with_derivatives(mm, s0[..., None] * sh, 1.0,
                                            derivatives=False)[0].sum(-1)  # (N, G)
            fmin, imin = f.min(-1)
            better = fmin < best
            best = torch.where(better, fmin, best)
            best_i = torch.where(better, imin + g0, best_i)
    shift = len(te_ms) * math.log(float(sigma))
    return best.numpy() + shift, best_i.numpy()
