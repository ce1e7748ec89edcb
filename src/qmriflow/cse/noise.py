"""Foreground mask and noise σ of a multi-echo magnitude series.

σ is the SD of the complex Gaussian noise behind the magnitudes (the Rician likelihood's σ).
In signal-free air the magnitude is Rayleigh distributed (Rice with ν = 0), whose median is
σ·sqrt(2 ln 2): the estimate is the median of all echoes' background magnitudes divided by
that factor — the Rician correction of background statistics, and robust to the odd ghost or
artefact voxel. The background is everything outside the foreground mask dilated by
``margin`` voxels (edge partial volume excluded), without exact zeros (zero-filled or
scanner-masked regions carry no noise).

Where too little background is left (< ``min_background`` voxels: a tight field of view or a
masked image), σ comes from the fit residuals of bright foreground voxels instead (high SNR:
Gaussian, RSS/(N_TE − 3) is unbiased for σ²); that needs ≥ 4 echoes. The method used is
returned with the value and written to the sidecars.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ..errors import InputError

__all__ = ["estimate_sigma", "foreground_mask"]

RAYLEIGH_MEDIAN = math.sqrt(2.0 * math.log(2.0))


def foreground_mask(data: np.ndarray, threshold: float = 0.1, *,
                    fill_holes: bool = True) -> np.ndarray:
    """Voxels whose first echo exceeds ``threshold`` × its 99th percentile, holes filled.

    ``data``: (x, y, z, echo). Holes are filled slice by slice (axial, last spatial axis) and
    then in 3D, so that dark tissue enclosed by the body (cortical bone, vessels with
    flow voids) is fitted too.
    """
    from scipy import ndimage

    if not 0.0 <= threshold < 1.0:
        raise ValueError(f"mask threshold must be in [0, 1), got {threshold}")
    e1 = np.asarray(data[..., 0], dtype=np.float32)
    ref = float(np.percentile(e1, 99)) if e1.size else 0.0
    mask = e1 > threshold * ref
    if fill_holes:
        for z in range(mask.shape[2]):
            mask[:, :, z] = ndimage.binary_fill_holes(mask[:, :, z])
        mask = ndimage.binary_fill_holes(mask)
    return mask


def estimate_sigma(data: np.ndarray, mask: np.ndarray, te_ms: np.ndarray, field_t: float, *,
                   margin: int = 3, min_background: int = 500,
                   path: str | None = None) -> tuple[float, dict[str, Any]]:
    """Noise σ (signal units) and a description of how it was estimated."""
    from scipy import ndimage

    grown = ndimage.binary_dilation(mask, iterations=margin) if margin > 0 else mask
    bg = ~grown
    vals = np.asarray(data[bg], dtype=np.float64).ravel()
    vals = vals[vals > 0]
    if vals.size >= min_background:
        sigma = float(np.median(vals) / RAYLEIGH_MEDIAN)
        if sigma > 0:
            return sigma, {
                "method": "background-rayleigh-median",
                "description": ("median of the background magnitudes (all echoes, outside the "
                                f"foreground mask dilated by {margin} voxels, zeros excluded) "
                                "/ sqrt(2 ln 2): Rician (Rayleigh, nu = 0) corrected"),
                "background_values": int(vals.size),
            }
    return _sigma_from_residuals(data, mask, te_ms, field_t, path)


def _sigma_from_residuals(data: np.ndarray, mask: np.ndarray, te_ms: np.ndarray,
                          field_t: float, path: str | None) -> tuple[float, dict[str, Any]]:
    from ..physics import cse_magnitude
    from .fit import fit_two_start

    n_echo = int(np.asarray(te_ms).size)
    if n_echo <= 3:
        raise InputError("too little background to estimate the noise and only 3 echoes "
                         "(no residual degrees of freedom): give sigma explicitly", path=path)
    vox = np.asarray(data[mask], dtype=np.float64)
    if vox.shape[0] < 100:
        raise InputError("too few foreground voxels to estimate the noise: give sigma "
                         "explicitly", path=path)
    # bright half of the foreground: Rician ≈ Gaussian there
    bright = vox[vox[:, 0] >= np.median(vox[:, 0])]
    rng = np.random.default_rng(0)
    sub = bright[rng.choice(bright.shape[0], min(5000, bright.shape[0]), replace=False)]
    provisional = 0.01 * float(np.percentile(sub[:, 0], 50))
    res = fit_two_start(sub, te_ms, field_t, provisional)
    pred = cse_magnitude(res.s0, res.pdff, res.r2star_per_s, te_ms, field_t)
    rss = ((sub - pred) ** 2).sum(-1) / (n_echo - 3)
    sigma = float(math.sqrt(np.mean(rss)))
    return sigma, {
        "method": "fit-residuals",
        "description": ("too little background: sqrt(mean RSS/(N_TE - 3)) of a two-start fit "
                        "of up to 5000 bright foreground voxels (high SNR, Gaussian)"),
        "voxels": int(sub.shape[0]),
    }
