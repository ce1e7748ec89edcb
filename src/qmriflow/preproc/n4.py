"""N4 bias-field correction and end-slice selection of a registered session.

Input: the three contrasts on the session's analysis grid (output of
:func:`qmriflow.preproc.register.register_session`, same shape and affine). Each contrast is
N4-corrected inside its own head mask; slices are then selected **once for the session**
(keep a slice only if every contrast has enough head in it) so the three stay aligned, and the
affine is shifted by the number of dropped low-index slices: output voxel ``(i, j, k)`` is
input voxel ``(i, j, k + start)``, at the same world position.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ConfigError, InputError, ToolError
from ..io import save_nifti
from .register import (
    ants_version,
    axial_axis,
    check_volume,
    foreground_mask,
    load_volume,
    set_threads,
    to_ants,
    write_outputs_atomically,
)

__all__ = [
    "N4_SETTINGS",
    "head_mask",
    "n4_correct",
    "n4_session",
    "select_slices",
    "shift_affine",
]

CONTRASTS = ("T1w", "T2w", "FLAIR")

#: N4BiasFieldCorrection settings of :func:`n4_correct` (``shrink`` is an argument).
N4_SETTINGS: dict[str, Any] = {
    # two fitting levels (B-spline mesh of ~200 mm, then ~100 mm): a smooth coil field. More
    # levels (ANTs' default 4) also flatten real anatomical intensity variation and, on the
    # phantom, removed much less of the true bias. 100 iterations per level without the
    # early stop (threshold 0): with ANTs' usual 1e-7 stop N4 was not converged and left
    # about twice the residual bias on the phantom (bench/RESULTS.md, N4)
    "iterations": (100, 100),
    "convergence_threshold": 0.0,
"spline_distance_mm": 200.0,
    "spline_order": 3,
    "histogram_sharpening": (0.15, 0.01, 200),  # FWHM, Wiener noise, bins (ANTs defaults)
    "rescale_intensities": False,
}


def head_mask(data: np.ndarray, affine: np.ndarray | None = None) -> np.ndarray:
    """Head (foreground) mask: Otsu threshold, large components, closing, hole filling and a
    slice-wise convex hull (see :func:`qmriflow.preproc.register.foreground_mask`).

    Without ``affine``: 1 mm voxels and axis 2 as the axial (slice) axis, as on the analysis
    grid. With it: the voxel size and axial axis are taken from the affine. Only voxels with a
    positive value are kept (N4 takes logarithms).
    """
    data = np.asarray(data, dtype=np.float32)
    if affine is None:
        mask = foreground_mask(data, spacing=None, hull_axis=2)
    else:
        affine = np.asarray(affine, dtype=np.float64)
        spacing = np.linalg.norm(affine[:3, :3], axis=0)
        mask = foreground_mask(data, spacing=spacing, hull_axis=axial_axis(affine))
    return mask & (data > 0)


def n4_correct(data: np.ndarray, affine: np.ndarray, mask: np.ndarray | None = None, *,
               shrink: int = 2, threads: int = 1,
               settings: Mapping[str, Any] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """N4 bias-field correction of one volume; returns ``(corrected, bias_field)`` (float32).

    ``mask``: where the field is estimated (default :func:`head_mask`; restricted to positive
    voxels). The field is evaluated everywhere and normalised to a geometric mean of 1 inside
    the mask, so ``corrected = data / bias`` keeps the image's overall intensity level.
    """
    set_threads(threads)
    st = dict(N4_SETTINGS)
    st.update(settings or {})
    data = np.asarray(data, dtype=np.float32)
    if data.ndim != 3:
        raise InputError(f"N4 needs a 3D volume, got shape {data.shape}")
    check_volume(data, None, "image")
    if int(shrink) < 1:
        raise ConfigError(f"N4 shrink factor must be >= 1, got {shrink}")
    m = head_mask(data, affine) if mask is None else np.asarray(mask, dtype=bool)
    if m.shape != data.shape:
        raise InputError(f"mask shape {m.shape} differs from image shape {data.shape}")
    m = m & (data > 0)
    if m.sum() < 100:
        raise InputError("no head found (head mask has fewer than 100 voxels)")
    try:
        from ants.internal import get_lib_fn, get_pointer_string, process_arguments
    except ImportError as exc:  # pragma: no cover - antspyx is a dependency
        raise ToolError(f"ANTsPy (antspyx) is not importable: {exc}") from None
    img = to_ants(data, affine)
    mask_i = to_ants(m.astype(np.float32), affine)
    out = img.clone()
    bias_i = img.clone()
    its = "x".join(str(int(i)) for i in st["iterations"])
    fwhm, wiener, bins = st["histogram_sharpening"]
    args = {
        "d": 3,
        "i": img,
        "x": mask_i,
        "s": str(int(shrink)),
        "c": f"[{its},{st['convergence_threshold']:.10f}]",
        "b": f"[{float(st['spline_distance_mm']):g},{int(st['spline_order'])}]",
        "t": f"[{fwhm},{wiener},{int(bins)}]",
        "r": int(bool(st["rescale_intensities"])),
        "o": f"[{get_pointer_string(out)},{get_pointer_string(bias_i)}]",
        "v": 0,
    }
    try:
        rc = get_lib_fn("N4BiasFieldCorrection")(process_arguments(args))
    except Exception as exc:
        raise ToolError(f"N4BiasFieldCorrection failed: {type(exc).__name__}: {exc}") from None
    if rc not in (0, None):
        raise ToolError(f"N4BiasFieldCorrection failed (exit {rc})")
    bias = np.asarray(bias_i.numpy(), dtype=np.float64)
    if not np.all(np.isfinite(bias)) or np.any(bias[m] <= 0):
        raise ToolError("N4BiasFieldCorrection returned a non-finite or non-positive field")
    bias /= math.exp(float(np.mean(np.log(bias[m]))))
    corrected = np.where(data > 0, data / bias, 0.0)
    return corrected.astype(np.float32), bias.astype(np.float32)


def _slice_range(masks: Sequence[np.ndarray], min_area_fraction: float,
                 drop_fraction: float) -> tuple[int, int, list[list[float]]]:
    if not masks:
        raise InputError("slice selection needs at least one volume")
    shape = masks[0].shape
    if any(mk.shape != shape for mk in masks):
        raise InputError(f"slice selection: volumes differ in shape "
                         f"{sorted({tuple(mk.shape) for mk in masks})}")
    if not (0.0 <= min_area_fraction <= 1.0):
        raise ConfigError(f"min_area_fraction must be in [0, 1], got {min_area_fraction}")
    if not (0.0 <= drop_fraction < 0.5):
        raise ConfigError(f"drop_fraction must be in [0, 0.5), got {drop_fraction}")
    n = shape[2]
    keep = np.ones(n, dtype=bool)
    fractions = []
    for mk in masks:
        area = mk.reshape(-1, n).sum(axis=0).astype(np.float64)
        if area.max() <= 0:
            raise InputError("slice selection: no head found in a volume")
        frac = area / area.max()
        fractions.append([round(float(f), 4) for f in frac])
        keep &= (frac >= min_area_fraction) & (area > 0)
    if not keep.any():
        raise InputError("slice selection: no slice has enough head in every contrast")
    idx = np.nonzero(keep)[0]
    start, stop = int(idx[0]), int(idx[-1]) + 1
    n_drop = math.floor(drop_fraction * n + 1e-9)
    start, stop = max(start, n_drop), min(stop, n - n_drop)
    if stop <= start:
        raise InputError("slice selection: drop_fraction leaves no slice")
    return start, stop, fractions


def select_slices(volumes: list[np.ndarray], *, min_area_fraction: float = 0.15,
                  drop_fraction: float = 0.0) -> tuple[int, int]:
    """Slice range ``[start, stop)`` along axis 2 kept for all ``volumes`` (same shape).

    A slice is kept when, in every volume, its head-mask area is at least
    ``min_area_fraction`` of that volume's largest slice area; the kept range runs from the
    first to the last such slice (inner slices are never dropped). ``drop_fraction`` then
    additionally drops ``floor(drop_fraction · n_slices)`` slices at each end.
    """
    masks = [head_mask(np.asarray(v, dtype=np.float32)) for v in volumes]
    start, stop, _ = _slice_range(masks, min_area_fraction, drop_fraction)
    return start, stop


def shift_affine(affine: np.ndarray, start: int) -> np.ndarray:
    """Affine of a volume cropped to start at slice ``start`` along axis 2 (same world)."""
    out = np.asarray(affine, dtype=np.float64).copy()
    out[:3, 3] = out[:3, 3] + out[:3, 2] * float(start)
    return out


def n4_session(inputs: Mapping[str, Path], outputs: Mapping[str, Path], *,
               min_area_fraction: float = 0.15, drop_fraction: float = 0.0, shrink: int = 2,
               threads: int = 1) -> dict:
    """N4-correct the session's T1w, T2w and FLAIR (analysis grid) and drop end slices.

    ``inputs``/``outputs``: keys ``T1w``, ``T2w``, ``FLAIR``. Outputs keep the in-plane grid
    and drop the same slices from all three; their affine is :func:`shift_affine` of the
    input's. Nothing is written unless all three succeed. Returns provenance.
    """
    t_start = time.perf_counter()
    threads = set_threads(threads)
    for key in CONTRASTS:
        if key not in inputs or key not in outputs:
            raise ValueError(f"n4_session: inputs and outputs need keys {CONTRASTS}")
    if int(shrink) < 1:
        raise ConfigError(f"N4 shrink factor must be >= 1, got {shrink}")
    paths = {k: Path(inputs[k]) for k in CONTRASTS}
    loaded = {k: load_volume(paths[k], k) for k in CONTRASTS}
    ref_img = loaded["T2w"][0]
    for k in CONTRASTS:
        img, arr = loaded[k]
        if arr.shape != loaded["T2w"][1].shape:
            raise InputError(f"{k}: shape {arr.shape} differs from the T2w's "
                             f"{loaded['T2w'][1].shape} (not on the session grid)", path=paths[k])
        if not np.allclose(img.affine, ref_img.affine, atol=1e-3):
            raise InputError(f"{k}: affine differs from the T2w's (not on the session grid)",
                             path=paths[k])
    affine = np.asarray(ref_img.affine, dtype=np.float64)
    timing: dict[str, float] = {}
    t0 = time.perf_counter()
    masks = {}
    for k in CONTRASTS:
        masks[k] = head_mask(loaded[k][1], affine)
        if masks[k].sum() < 100:
            raise InputError(f"{k}: no head found (empty head mask)", path=paths[k])
    timing["masks"] = round(time.perf_counter() - t0, 3)
    start, stop, fractions = _slice_range([masks[k] for k in CONTRASTS], min_area_fraction,
                                          drop_fraction)
    n = loaded["T2w"][1].shape[2]
    new_affine = shift_affine(affine, start)
    results: dict[str, np.ndarray] = {}
    per_contrast: dict[str, Any] = {}
    for k in CONTRASTS:
        t0 = time.perf_counter()
        arr = loaded[k][1][..., start:stop]
        m = masks[k][..., start:stop]
        if m.sum() < 100:
            raise InputError(f"{k}: no head left in the kept slices", path=paths[k])
        try:
            corrected, bias = n4_correct(arr, new_affine, m, shrink=shrink, threads=threads)
        except (InputError, ToolError) as exc:
            raise exc.with_context(path=paths[k]) from None
        results[k] = corrected
        b = bias[m & (arr > 0)]
        per_contrast[k] = {
            "mask_voxels": int(m.sum()),
            "bias_min": round(float(b.min()), 4), "bias_max": round(float(b.max()), 4),
            "bias_cv_in_mask": round(float(b.std() / b.mean()), 4),
            "seconds": round(time.perf_counter() - t0, 3),
        }
        timing[f"n4_{k}"] = per_contrast[k]["seconds"]
    write_outputs_atomically([
        (Path(outputs[k]), (lambda arr: lambda p: save_nifti(p, arr, new_affine))(results[k]))
        for k in CONTRASTS])
    timing["total"] = round(time.perf_counter() - t_start, 3)
    slice_dir_z = float(affine[2, 2])
    return {
        "step": "n4",
        "tool": "ANTsPy N4BiasFieldCorrection", "ants_version": ants_version(),
        "inputs": {k: str(v) for k, v in paths.items()},
        "outputs": {k: str(outputs[k]) for k in CONTRASTS},
        "n4": {"shrink_factor": int(shrink),
               "settings": {k: (list(v) if isinstance(v, tuple) else v)
                            for k, v in N4_SETTINGS.items()},
               "mask": "head mask of each contrast (Otsu foreground, filled), positive voxels",
               "bias_normalisation": "geometric mean 1 inside the mask",
               "per_contrast": per_contrast},
        "slice_selection": {
            "criterion": "keep slices whose head-mask area >= min_area_fraction x the "
                         "contrast's largest slice area in every contrast (first..last such "
                         "slice), then drop floor(drop_fraction x n) slices at each end",
            "min_area_fraction": min_area_fraction, "drop_fraction": drop_fraction,
            "n_slices_in": int(n), "start": start, "stop": stop,
            "n_slices_out": stop - start,
            "dropped_low_index": list(range(0, start)),
            "dropped_high_index": list(range(stop, n)),
            "low_index_end": "inferior" if slice_dir_z > 0 else "superior",
            "area_fraction_per_slice": dict(zip(CONTRASTS, fractions, strict=True)),
            "affine_in": affine.tolist(), "affine_out": new_affine.tolist(),
        },
        "threads": threads,
        "timing_s": timing,
    }
