"""Edge-preserving smoothing of the maps at inference (``model.map_smoothing``)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .pinning import _to_log
from .scales import (
    _LOG_HI,
    _LOG_LO,
)

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
    # channels first (each channel a contiguous volume) and in-place arithmetic in the
    # (2r+1)^2 shifted passes: no reductions over a short last axis, no temporaries per pass
    logm = np.zeros((3, *sel.shape), dtype=np.float64)
    logs_sel = _to_log(out[sel])
    for k in range(3):
        logm[k][sel] = logs_sel[:, k]
    if guide is None:
        g = logm
    else:
        gb = np.asarray(guide, np.float64)[box]
        g = np.zeros((gb.shape[-1], *sel.shape), dtype=np.float64)
        for k in range(gb.shape[-1]):
            g[k][sel] = gb[..., k][sel]
    r = int(radius)
    pad = ((0, 0), (0, 0), (r, r), (r, r))
    g_p = np.pad(g, pad)
    v_p = np.pad(logm, pad)
    m_p = np.pad(sel.astype(np.float64), pad[1:])
    h, w = sel.shape[1:]
    num = np.zeros_like(logm)
    den = np.zeros(sel.shape, dtype=np.float64)
    inv_r = np.float64(1.0 / (2 * sigma_range ** 2))
    inv_v = None if sigma_value is None else np.float64(1.0 / (2 * sigma_value ** 2))
    expo = np.empty(sel.shape, dtype=np.float64)
    tmp = np.empty(sel.shape, dtype=np.float64)
    acc_v = np.empty(sel.shape, dtype=np.float64)

    def sq_dist(padded: np.ndarray, centre: np.ndarray, ys: slice, xs: slice,
                out_: np.ndarray) -> np.ndarray:
        """Σ_k (padded[k] shifted − centre[k])² into ``out_``."""
        out_[...] = 0.0
        for k in range(centre.shape[0]):
            np.subtract(padded[k, :, ys, xs], centre[k], out=tmp)
            np.square(tmp, out=tmp)
            out_ += tmp
        return out_

    for dy in range(-r, r + 1):
        for dx in range(-r, r + 1):
            ys, xs = slice(r + dy, r + dy + h), slice(r + dx, r + dx + w)
            sq_dist(g_p, g, ys, xs, expo)
            expo *= inv_r
            if inv_v is not None:
                sq_dist(v_p, logm, ys, xs, acc_v)
                acc_v *= inv_v
                expo += acc_v
            np.negative(expo, out=expo)
            np.exp(expo, out=expo)
            expo *= m_p[:, ys, xs]
            expo *= np.float64(math.exp(-(dy * dy + dx * dx) / (2 * sigma_space ** 2)))
            for k in range(3):
                np.multiply(expo, v_p[k, :, ys, xs], out=tmp)
                num[k] += tmp
            den += expo
    num = np.moveaxis(num, 0, -1)
    # den ≥ the voxel's own weight (1) inside the mask
    out[sel] = np.exp(np.clip(num[sel] / den[sel][:, None], _LOG_LO, _LOG_HI))  # a view into full
    return full.astype(maps.dtype)
