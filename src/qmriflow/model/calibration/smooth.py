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
