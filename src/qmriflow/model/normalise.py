"""Input normalisation by the histogram mode of the head (seed 000, section 2.2.2).

Clinical images come in arbitrary units. Each preprocessed contrast is divided by the mode of
its intensity histogram inside the head, which — within the percentile window used by the
published implementation — is the white-matter peak. After this, white matter is ≈ 1 in every
contrast, and the bounded global scale of the loss (``physics.wm_reference_scale``) maps the
synthesised signal onto that normalised image.

The head mask is computed once per session from the T2w (the grid's reference contrast) with
:func:`qmriflow.preproc.n4.head_mask` (Otsu threshold, large components, hole filling, slice-
wise convex hull), so the normalisation and the loss are never diluted by background air.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from ..errors import InputError

__all__ = ["CONTRASTS", "PERCENTILE_WINDOWS", "head_mask", "histogram_mode", "mode_normalise"]

CONTRASTS = ("T1w", "T2w", "FLAIR")
"""Contrast names, in the channel order of packed arrays."""

PERCENTILE_WINDOWS: Mapping[str, tuple[float, float]] = {
    "T1w": (60.0, 95.0),
    "T2w": (35.0, 95.0),
    "FLAIR": (35.0, 95.0),
}
"""Intensity percentiles (within the head) that bound the histogram per contrast: WM is the
brightest large tissue in T1w and the darkest brain tissue in T2w/FLAIR, so the window keeps the
mode on WM rather than on background, bone or CSF (published implementation)."""

N_BINS = 512


def head_mask(reference: np.ndarray) -> np.ndarray:
    """Boolean head mask (3D, axis 2 = slices) of a preprocessed volume on the analysis grid."""
    from ..preproc.n4 import head_mask as _hm

    ref = np.asarray(reference, dtype=np.float32)
    if ref.ndim == 2:
        return _hm(ref[..., None])[..., 0]
    return _hm(ref)


def histogram_mode(values: np.ndarray, window: tuple[float, float] = (0.0, 100.0),
                   bins: int = N_BINS) -> float:
    """Centre of the most populated bin of a ``bins``-bin histogram of ``values``.

    Only values between the ``window`` percentiles (inclusive) enter the histogram, whose range
    is exactly that interval. Ties go to the lowest bin (``np.argmax``).
    """
    v = np.asarray(values, dtype=np.float64).ravel()
    v = v[np.isfinite(v)]
    if v.size == 0:
        raise InputError("histogram mode: no finite values inside the mask")
    lo, hi = np.percentile(v, window)
    v = v[(v >= lo) & (v <= hi)]
    if not hi > lo:
        return float(lo)
    counts, edges = np.histogram(v, bins=bins, range=(lo, hi))
    k = int(np.argmax(counts))
    return float(0.5 * (edges[k] + edges[k + 1]))


def mode_normalise(image: np.ndarray, mask: np.ndarray, contrast: str,
                   bins: int = N_BINS) -> tuple[np.ndarray, float]:
    """Divide ``image`` by its histogram mode inside ``mask``; returns ``(normalised, mode)``."""
    if contrast not in PERCENTILE_WINDOWS:
        raise InputError(f"unknown contrast {contrast!r}; expected one of {CONTRASTS}")
    img = np.asarray(image, dtype=np.float32)
    m = np.asarray(mask, dtype=bool)
    if m.shape != img.shape:
        raise InputError(f"{contrast}: mask shape {m.shape} differs from image {img.shape}")
    if not m.any():
        raise InputError(f"{contrast}: empty head mask, cannot normalise")
    mode = histogram_mode(img[m], PERCENTILE_WINDOWS[contrast], bins)
    if not (np.isfinite(mode) and mode > 0):
        raise InputError(f"{contrast}: histogram mode is {mode!r} (empty or constant image)")
    return img / np.float32(mode), mode
