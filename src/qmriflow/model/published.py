"""The published (seed 000) inference input path, reproduced for ``scaling: seed``.

What the authors' inference does to a subject before its network sees it (read from their
documented behaviour, NOTES.md section A; written here from that description):

1. each image is reoriented to the closest canonical (RAS+) orientation;
2. ``int(0.05·D)`` slices are dropped at each end of the slice axis (low-SNR edge slices);
3. every slice is centre-cropped or zero-padded to 224 × 224 (crop start ``(n − 224) // 2``;
   padding ``d // 2`` before and ``d − d // 2`` after);
4. a foreground mask is Otsu's threshold (ITK semantics: 128-bin histogram over
   [min, max + (max − min)/12800], threshold = upper edge of the best bin) of the
   intensity-inverted T1w (``255 − I``): the bright class of the T1w;
5. each contrast is divided by its histogram mode inside that mask: voxels at or above the
   lower percentile, then at or below the upper percentile *of those* (T1w 60/95, T2w and
   FLAIR 35/95), a 512-bin histogram between their min and max, the centre of the fullest
   bin (float32 arithmetic, as PyTorch's ``quantile``/``histc``/``linspace`` do it);
6. the normalised images are multiplied by the brain mask (every non-zero voxel is brain)
   and fed to the network; its outputs times (1, 5, 3) are PD, T1 (s) and T2 (s), times the
   brain mask.

:class:`SeedInputs` holds the result and maps the network's output back onto the input grid
(the inverse of steps 3 and 1, zeros outside the 224 × 224 field of view), so the maps keep
the input's affine — the published code writes its maps with the uncropped affine (a shift
of a few voxels), which is not reproduced. The network runs on every slice, also on the edge
slices step 2 leaves out of the normalisation (the published maps lack them); each slice's
maps depend only on that slice and the modes, so the other slices are the published ones.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import InputError

__all__ = [
    "SEED_EDGE_FRACTION",
    "SEED_MODE_BINS",
    "SEED_OTSU_BINS",
    "SEED_SIZE",
    "SEED_WINDOWS",
    "SeedInputs",
    "canonical_transform",
    "crop_pad",
    "otsu_bright_mask",
    "seed_inputs",
    "seed_mode",
]

SEED_SIZE = 224
"""In-plane size the published network sees."""
SEED_EDGE_FRACTION = 0.05
"""Fraction of slices dropped at each end before the normalisation."""
SEED_OTSU_BINS = 128
SEED_MODE_BINS = 512
SEED_WINDOWS: Mapping[str, tuple[float, float]] = {
    "T1w": (60.0, 95.0), "T2w": (35.0, 95.0), "FLAIR": (35.0, 95.0)}
"""Lower and upper percentiles of the published mode (the upper one of the voxels left
by the lower one)."""


# ---------------------------------------------------------------------------------------------
# geometry
# ---------------------------------------------------------------------------------------------


def canonical_transform(affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Orientation transforms (nibabel ``ornt`` arrays) from the array of ``affine`` to the
    closest canonical (RAS+) array, and back."""
    from nibabel.orientations import io_orientation

    fwd = io_orientation(np.asarray(affine, dtype=np.float64))
    inv = np.zeros_like(fwd)
    for i, (ax, flip) in enumerate(fwd):
        inv[int(ax)] = (i, flip)
    return fwd, inv


def _reorient(vol: np.ndarray, ornt: np.ndarray) -> np.ndarray:
    from nibabel.orientations import apply_orientation

    return np.ascontiguousarray(apply_orientation(vol, ornt))


def _window(n: int, size: int) -> tuple[slice, slice]:
    """(source, destination) slices of one axis cropped or padded centrally to ``size``."""
    if n >= size:
        start = (n - size) // 2
        return slice(start, start + size), slice(0, size)
    before = (size - n) // 2
    return slice(0, n), slice(before, before + n)


def crop_pad(vol: np.ndarray, size: int = SEED_SIZE) -> np.ndarray:
    """Centre-crop or zero-pad axes 0 and 1 of ``vol`` (H, W, ...) to ``size``."""
    (s0, d0), (s1, d1) = _window(vol.shape[0], size), _window(vol.shape[1], size)
    out = np.zeros((size, size, *vol.shape[2:]), dtype=vol.dtype)
    out[d0, d1] = vol[s0, s1]
    return out


def uncrop(vol: np.ndarray, shape: tuple[int, int], size: int = SEED_SIZE) -> np.ndarray:
    """Inverse of :func:`crop_pad`: (size, size, ...) back to ``shape`` in-plane, zeros
    where the crop cut the field of view."""
    (s0, d0), (s1, d1) = _window(shape[0], size), _window(shape[1], size)
    out = np.zeros((*shape, *vol.shape[2:]), dtype=vol.dtype)
    out[s0, s1] = vol[d0, d1]
    return out


# ---------------------------------------------------------------------------------------------
# Otsu (ITK's HistogramThresholdImageFilter with the Otsu calculator) and the mode
# ---------------------------------------------------------------------------------------------


def _itk_otsu_threshold(values: np.ndarray, bins: int = SEED_OTSU_BINS) -> float:
    """Otsu's threshold as ITK computes it: ``bins`` bins over [min, max + margin] with margin
    (max − min)/bins/100, bin centres as the class values, the first best split, returned as
    the upper edge of the last bin of the lower class."""
    v = np.asarray(values, dtype=np.float64).ravel()
    lo, hi = float(v.min()), float(v.max())
    if not hi > lo:
        return hi
    hi = hi + (hi - lo) / bins / 100.0
    width = (hi - lo) / bins
    mins = lo + np.arange(bins) * width
    idx = np.clip(np.searchsorted(mins, v, side="right") - 1, 0, bins - 1)
    freq = np.bincount(idx, minlength=bins).astype(np.float64)
    maxs = np.append(mins[1:], hi)
    centre = 0.5 * (mins + maxs)
    n = freq.sum()
    mean_t = (freq * centre).sum() / n
    w0 = np.cumsum(freq)[:-1]
    s0 = np.cumsum(freq * centre)[:-1]
    w1 = n - w0
    with np.errstate(invalid="ignore", divide="ignore"):
        m0 = np.where(w0 > 0, s0 / w0, 0.0)
        m1 = np.where(w1 > 0, (mean_t * n - s0) / w1, 0.0)
    var = (w0 * m0 * m0 + w1 * m1 * m1) / n
    k = int(np.argmax(var))
    return float(maxs[k])


def otsu_bright_mask(image: np.ndarray, invert: bool = True) -> np.ndarray:
    """The published foreground mask: Otsu (ITK) of ``255 − image`` in float32 (``invert``),
    voxels at or below the threshold, i.e. the bright class of ``image``. Without ``invert``
    (a fallback contrast whose bright class is also the head) the voxels above it."""
    img = np.asarray(image, dtype=np.float32)
    if invert:
        inv = np.float32(255.0) - img
        thr = np.float32(_itk_otsu_threshold(inv))
        return inv <= thr
    thr = np.float32(_itk_otsu_threshold(img))
    return img > thr


def seed_mode(values: np.ndarray, window: tuple[float, float],
              bins: int = SEED_MODE_BINS) -> float:
    """The published histogram mode of ``values`` (float32, PyTorch primitives): keep values
    at or above the ``window[0]`` percentile, then at or below the ``window[1]`` percentile of
    those, a ``bins``-bin ``histc`` between their min and max, the centre of the fullest
    bin."""
    import torch

    v = torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32).ravel())
    if v.numel() == 0:
        raise InputError("histogram mode: no voxels inside the Otsu mask")
    lower, upper = window
    if lower:
        v = v[v >= torch.quantile(v, lower / 100.0)]
    if upper:
        v = v[v <= torch.quantile(v, upper / 100.0)]
    lo, hi = torch.min(v), torch.max(v)
    hist = torch.histc(v, bins=bins, min=lo.item(), max=hi.item())
    edges = torch.linspace(lo, hi, steps=bins + 1)
    k = int(torch.argmax(hist))
    return float((0.5 * (edges[k] + edges[k + 1])).item())


# ---------------------------------------------------------------------------------------------
# the whole input path
# ---------------------------------------------------------------------------------------------


@dataclass
class SeedInputs:
    """One session prepared as the published inference prepares it."""

    images: np.ndarray  # (S, N, 224, 224) float32: normalised, times the brain mask
    mask: np.ndarray  # (S, 224, 224) bool: the brain mask on the network's grid
    modes: dict[str, float]  # contrast -> published mode (input units)
    otsu_from: str  # the contrast whose bright class bounds the modes
    kept_slices: tuple[int, int]  # canonical slice range [a, b) of the normalisation
    shape: tuple[int, int, int]  # input grid (H, W, S)
    canonical_shape: tuple[int, int, int]
    inverse: np.ndarray  # orientation transform canonical -> input

    def to_input_grid(self, maps: np.ndarray) -> np.ndarray:
        """Network output (S, K, 224, 224) on the canonical slices → (S, K, H, W) on the input
        grid (zeros outside the 224 × 224 field of view)."""
        vol = np.moveaxis(maps, (0, 1), (2, 3))  # (224, 224, S, K)
        vol = uncrop(vol, self.canonical_shape[:2])
        vol = _reorient(vol, self.inverse)
        return np.ascontiguousarray(np.moveaxis(vol, (2, 3), (0, 1)))

    def record(self) -> dict[str, Any]:
        """The sidecars' description of the normalisation."""
        return {"method": "published (seed 000): closest-canonical orientation, centre "
                          f"crop/pad to {SEED_SIZE}x{SEED_SIZE}, Otsu bright class of the "
                          f"{self.otsu_from}, {SEED_MODE_BINS}-bin histogram mode in the "
                          "percentile window (lower, then upper of the rest), inputs times the "
                          "brain mask",
                "modes": dict(self.modes), "windows": {c: list(SEED_WINDOWS[c])
                                                       for c in self.modes},
                "otsu_from": self.otsu_from,
                "slices_in_normalisation": list(self.kept_slices),
                "note": "maps on every slice; the published pipeline leaves out the first "
                        "and last int(0.05*slices) canonical slices"}


def seed_inputs(raw: Mapping[str, np.ndarray], brain: np.ndarray, affine: np.ndarray,
                contrasts: Sequence[str]) -> SeedInputs:
    """Prepare the images ``raw`` (contrast → (H, W, S), input units; the T1w, when present,
    bounds the modes even if not among ``contrasts``; every one gets its mode) and the
    ``brain`` mask (H, W, S; non-zero = brain) as the published inference does; the network's
    inputs are ``contrasts`` in that order."""
    fwd, inv = canonical_transform(affine)
    shape = tuple(int(s) for s in brain.shape)
    canon = {c: _reorient(np.asarray(v, np.float32), fwd) for c, v in raw.items()}
    mask_c = _reorient(np.asarray(brain) != 0, fwd)
    cshape = tuple(int(s) for s in mask_c.shape)
    d = cshape[2]
    n_edge = int(SEED_EDGE_FRACTION * d)
    if d - 2 * n_edge <= 0:
        raise InputError(f"too few slices ({d}) for the published normalisation")
    kept = slice(n_edge, d - n_edge)
    otsu_from = "T1w" if "T1w" in canon else next(c for c in ("T2w", "FLAIR") if c in canon)
    sq = {c: crop_pad(v) for c, v in canon.items()}
    fg = otsu_bright_mask(sq[otsu_from][..., kept], invert=otsu_from == "T1w")
    if not fg.any():
        raise InputError(f"the Otsu mask of the {otsu_from} is empty")
    modes: dict[str, float] = {}
    for c in canon:
        mode = seed_mode(sq[c][..., kept][fg], SEED_WINDOWS[c])
        if not (np.isfinite(mode) and mode > 0):
            raise InputError(f"{c}: the published histogram mode is {mode!r} (empty or "
                             "constant image)")
        modes[c] = mode
    m = crop_pad(mask_c)
    images = np.stack([np.moveaxis(sq[c] / np.float32(modes[c]) * m, 2, 0)
                       for c in contrasts], axis=1).astype(np.float32)
    return SeedInputs(images=images, mask=np.moveaxis(m, 2, 0), modes=modes,
                      otsu_from=otsu_from, kept_slices=(kept.start, kept.stop),
                      shape=shape,  # type: ignore[arg-type]
                      canonical_shape=cshape,  # type: ignore[arg-type]
                      inverse=inv)
