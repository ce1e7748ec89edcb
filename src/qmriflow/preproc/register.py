"""Rigid registration of the T1w and FLAIR to the T2w, and resampling onto the analysis grid.

Geometry conventions
--------------------
* NIfTI affines (nibabel) map voxel indices to **RAS** world mm. ANTs/ITK physical space is
  **LPS**: ``x_lps = F @ x_ras`` with ``F = diag(-1, -1, 1)``. Images are handed to ANTs by
  :func:`to_ants` (origin ``F @ t``, direction ``F @ R``, spacing = column norms of the affine),
  so the world position of every voxel is exactly the one nibabel reports; nothing depends on
  how ITK would have read the header.
* An ANTs transform written by ``antsRegistration`` maps points of the **fixed** image's space
  to the **moving** image's space (that is what resampling needs: for each output voxel, where
  to read the moving image). :func:`read_rigid_ras` returns it as a 4×4 RAS matrix
  ``T_ras = F @ T_lps @ F``; for a T1w → T2w registration it maps a T2w-world point to the
  T1w-world point of the same anatomy (the inverse of the phantom's ``world_to_t2w_world``).

Target grid (:func:`target_grid`)
---------------------------------
The T2w's slice axis (its coarsest voxel axis; axis 2 for dcm2niix output) and its slice
planes are kept (same slice centres, same number of slices, same slice step vector). In-plane
the grid has ``inplane_mm`` voxels along the T2w's two in-plane direction cosines and exactly
``size × size`` voxels, centred on the centre of mass of the T2w's foreground (Otsu) mask. The
grid's affine is rounded to float32 once, so the array in memory and the sform/qform written
by :func:`qmriflow.io.save_nifti` describe the same geometry.

Every moving image is resampled once, from its own voxels, through the composed transform
(registration matrix, then the moving image's own geometry): no intermediate image.

Long because registration, resampling onto the 224 x 224 grid and the checks of both share one
set of geometry helpers; the step is one rule.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputError, ToolError
from ..io import atomic_path, save_nifti

__all__ = [
    "REGISTRATION_SETTINGS",
    "TargetGrid",
    "ants_version",
    "foreground_mask",
    "load_volume",
    "read_rigid_ras",
    "register_rigid",
    "register_session",
    "resample_to_grid",
    "set_threads",
    "target_grid",
    "to_ants",
]

#: RAS <-> LPS flip (its own inverse).
FLIP = np.diag([-1.0, -1.0, 1.0])
MAX_VOXELS = 1_000_000_000

#: antsRegistration settings of :func:`register_rigid` (see the module's tests and the
#: bench for the measurements behind them).
REGISTRATION_SETTINGS: dict[str, Any] = {
    "initialisation": "centres of mass of the two head (Otsu foreground) masks",
    "metric": "MI",  # Mattes mutual information
    "bins": 32,
    "sampling": "Regular",
    "sampling_rate": 0.25,
    "gradient_step": 0.1,
    "iterations": (1000, 500, 250, 100),
    "shrink_factors": (8, 4, 2, 1),
    "smoothing_sigmas_vox": (3, 2, 1, 0),
    "convergence_threshold": 1e-6,
    "convergence_window": 10,
    "winsorize": (0.005, 0.995),
    "use_histogram_matching": False,
    "fixed_mask": "dilated head mask of the fixed image, all levels",
    # a short full-resolution stage with twice the samples: the 25 % regular sample set of the
    # multi-resolution stage leaves ~0.3 mm (up to 0.6 mm) of error on the phantom; this
    # stage brings it to ~0.2 mm (max 0.3 mm) for ~1.5 s more
    "refine": {
        "gradient_step": 0.05,
        "sampling": "Regular",
        "sampling_rate": 0.5,
        "iterations": (10,),
        "convergence_threshold": 1e-7,
        "convergence_window": 5,
        "shrink_factors": (1,),
        "smoothing_sigmas_vox": (0,),
    },
}

# Sanity limits beyond which a rigid head-to-head registration is declared failed.
_MAX_ROTATION_DEG = 45.0
_MAX_TRANSLATION_MM = 80.0
_MIN_HEAD_DICE = 0.80

_INTERPOLATORS = {
    "linear": "linear",
    "bspline": "bSpline",
    "bSpline": "bSpline",
    "nearest": "nearestNeighbor",
    "nearestNeighbor": "nearestNeighbor",
    "genericLabel": "genericLabel",
    "label": "genericLabel",
}


# ---------------------------------------------------------------------------------------------
# small helpers
# ---------------------------------------------------------------------------------------------


def set_threads(threads: int) -> int:
    """Set ``ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS`` (and the BLAS/OpenMP variables).

    ITK reads the variable when its global thread pool is first used, so it governs the first
    ANTs call of the process; a pipeline step runs one session per process.
    """
    threads = max(1, int(threads))
    for var in ("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", "OMP_NUM_THREADS"):
        os.environ[var] = str(threads)
    return threads


def ants_version() -> str:
    import ants

    return str(getattr(ants, "__version__", "unknown"))


def _ants():
    try:
        import ants
    except ImportError as exc:  # pragma: no cover - antspyx is a dependency
        raise ToolError(f"ANTsPy (antspyx) is not importable: {exc}") from None
    return ants


def load_volume(path: str | Path, what: str = "image") -> tuple[Any, np.ndarray]:
    """Load a 3D NIfTI as ``(nibabel image, float32 array)``, refusing bad input.

    Raises :class:`InputError` naming the file for: a missing or unreadable file, a
    non-3D image (a trailing singleton 4th dimension is accepted), more than 10⁹ voxels, a
    singular or non-finite affine, NaN/inf voxels, or an all-zero volume.
    """
    import nibabel as nib

    path = Path(path)
    if not path.is_file():
        raise InputError(f"{what}: file not found", path=path)
    try:
        img = nib.load(str(path))
    except Exception as exc:  # nibabel raises many types for corrupt files
        raise InputError(f"{what}: unreadable NIfTI ({type(exc).__name__}: {exc})",
                         path=path) from None
    shape = tuple(int(s) for s in img.shape)
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    if len(shape) != 3:
        raise InputError(f"{what}: expected a 3D volume, got shape {tuple(img.shape)}",
                         path=path)
    nvox = math.prod(shape)
    if nvox > MAX_VOXELS:
        raise InputError(f"{what}: absurd size {shape} ({nvox:.3g} voxels > 1e9)", path=path)
    if min(shape) < 1:
        raise InputError(f"{what}: empty shape {shape}", path=path)
    affine = np.asarray(img.affine, dtype=np.float64)
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-9:
        raise InputError(f"{what}: singular or non-finite affine", path=path)
    vox = np.linalg.norm(affine[:3, :3], axis=0)
    if vox.min() < 0.01 or vox.max() > 50.0:
        raise InputError(f"{what}: absurd voxel size {np.round(vox, 4).tolist()} mm", path=path)
    try:
        data = np.asarray(img.dataobj, dtype=np.float32).reshape(shape)
    except Exception as exc:
        raise InputError(f"{what}: unreadable NIfTI data ({type(exc).__name__}: {exc})",
                         path=path) from None
    check_volume(data, path, what)
    img = nib.Nifti1Image(data, affine)
    return img, data


def check_volume(data: np.ndarray, path: str | Path | None, what: str = "image") -> None:
    """NaN/inf or all-zero data -> :class:`InputError`."""
    finite = np.isfinite(data)
    if not finite.all():
        n = int(data.size - np.count_nonzero(finite))
        raise InputError(f"{what}: {n} NaN/inf voxels", path=path)
    if not np.any(data):
        raise InputError(f"{what}: empty volume (all zeros)", path=path)


def _spacing_direction(affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    rz = np.asarray(affine, dtype=np.float64)[:3, :3]
    spacing = np.linalg.norm(rz, axis=0)
    return spacing, rz / spacing


def to_ants(data: np.ndarray, affine: np.ndarray):
    """NumPy array + RAS affine -> ANTsImage (float32) with the same world geometry."""
    ants = _ants()
    spacing, direction = _spacing_direction(affine)
    origin = FLIP @ np.asarray(affine, dtype=np.float64)[:3, 3]
    return ants.from_numpy(np.ascontiguousarray(data, dtype=np.float32),
                           origin=tuple(float(v) for v in origin),
                           spacing=tuple(float(v) for v in spacing),
                           direction=FLIP @ direction)


def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold of a 1D sample (between-class variance maximum)."""
    values = np.asarray(values, dtype=np.float64).ravel()
    lo, hi = float(values.min()), float(values.max())
    if hi <= lo:
        return lo
    hist, edges = np.histogram(values, bins=bins, range=(lo, hi))
    centres = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist).astype(np.float64)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * centres)
    mu0 = m0 / np.maximum(w0, 1)
    mu1 = (m0[-1] - m0) / np.maximum(w1, 1)
    between = w0 * w1 * (mu0 - mu1) ** 2
    return float(edges[int(np.argmax(between[:-1])) + 1])


def axial_axis(affine: np.ndarray) -> int:
    """The voxel axis closest to the world superior-inferior direction."""
    _, direction = _spacing_direction(affine)
    return int(np.argmax(np.abs(direction[2])))


def _hull_fill_2d(sl: np.ndarray) -> np.ndarray:
    """Filled convex hull of the True pixels of a 2D mask (scan-line rasterisation)."""
    from scipy.spatial import ConvexHull, QhullError

    pts = np.argwhere(sl)
    if len(pts) < 4:
        return sl
    lo, hi = pts.min(0), pts.max(0)
    if np.any(hi - lo < 1):
        return sl
    try:
        hull = ConvexHull(pts)
    except QhullError:
        return sl
    eq = hull.equations  # a*x + b*y + c <= 0 inside
    rows = np.arange(lo[0], hi[0] + 1, dtype=np.float64)
    rhs = -eq[:, 2][None, :] - eq[:, 0][None, :] * rows[:, None] + 1e-6
    b = eq[:, 1][None, :]
    with np.errstate(divide="ignore", invalid="ignore"):
        bound = rhs / b
    upper = np.where(b > 1e-12, bound, np.inf).min(axis=1)
    lower = np.where(b < -1e-12, bound, -np.inf).max(axis=1)
    ok = np.all(np.where(np.abs(b) <= 1e-12, rhs >= 0, True), axis=1)
    out = sl.copy()
    cols = np.arange(sl.shape[1])
    for r, lo_c, up_c, good in zip(rows.astype(int), lower, upper, ok, strict=True):
        if good and up_c >= lo_c:
            out[r] |= (cols >= math.ceil(lo_c)) & (cols <= math.floor(up_c))
    return out


def foreground_mask(data: np.ndarray, spacing: Sequence[float] | None = None,
                    hull_axis: int | None = 2, closing_mm: float = 4.0,
                    work_mm: float = 2.0) -> np.ndarray:
    """Head (foreground) mask of a magnitude image.

    Otsu threshold of the intensities (clipped at the 99.5th percentile of the positive
    ones); the large components are kept (scalp and brain are separated by the dark skull); a
    closing with a ball of ``closing_mm`` (voxel ``spacing`` in mm, default 1) and 3D hole
    filling; then each slice along ``hull_axis`` (should be the axial one, see
    :func:`axial_axis`; ``None``: skip) is replaced by its filled convex hull, which closes
    the head where the skull, the neck or the field of view leaves it open. The largest
    connected component is returned; empty when nothing is above the threshold. Axes finer
    than ``work_mm`` are block-averaged to about ``work_mm`` first (speed) and the mask is
    brought back to the full grid.
    """
    from scipy import ndimage as ndi

    data = np.asarray(data)
    sp = np.ones(3) if spacing is None else np.asarray(spacing, dtype=np.float64)
    factors = np.maximum(1, np.floor(work_mm / sp)).astype(int) if work_mm > 0 else np.ones(3, int)
    if np.any(factors > 1) and all(n >= 4 * f for n, f in zip(data.shape, factors, strict=True)):
        n = [s_ // f for s_, f in zip(data.shape, factors, strict=True)]
        crop = data[: n[0] * factors[0], : n[1] * factors[1], : n[2] * factors[2]]
        small = np.asarray(crop, dtype=np.float32).reshape(
            n[0], factors[0], n[1], factors[1], n[2], factors[2]).mean(axis=(1, 3, 5))
        m = foreground_mask(small, sp * factors, hull_axis, closing_mm, work_mm=0)
        for ax, f in enumerate(factors):
            m = np.repeat(m, f, axis=ax)
        pad = [(0, full - got) for full, got in zip(data.shape, m.shape, strict=True)]
        return np.pad(m, pad, mode="edge")

    d = np.nan_to_num(np.asarray(data, dtype=np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    pos = d[d > 0]
    if pos.size < 16:
        return np.zeros(d.shape, dtype=bool)
    step = max(1, d.size // 4_000_000)
    hi = float(np.percentile(pos[:: max(1, pos.size // 1_000_000)], 99.5))
    thr = otsu_threshold(np.minimum(d.ravel()[::step], hi))
    mask = d > thr
    if not mask.any():
        return mask
    labels, n = ndi.label(mask)
    if n == 0:
        return np.zeros(d.shape, dtype=bool)
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    keep = sizes >= 0.05 * sizes.max()
    keep[0] = False
    mask = keep[labels]
    if closing_mm > 0:
        # closing by distance transforms (anisotropic ball) on a canvas padded by more than
        # the radius, so a head cut by the field of view is not eroded at the array border
        pad = np.ceil(closing_mm / sp).astype(int) + 1
        big = np.pad(mask, [(int(p), int(p)) for p in pad])
        dilated = ndi.distance_transform_edt(~big, sampling=sp) <= closing_mm
        closed = ndi.distance_transform_edt(dilated, sampling=sp) > closing_mm
        mask |= closed[pad[0]:pad[0] + mask.shape[0], pad[1]:pad[1] + mask.shape[1],
                       pad[2]:pad[2] + mask.shape[2]]
    mask = ndi.binary_fill_holes(mask)
    if hull_axis is not None:
        moved = np.moveaxis(mask, hull_axis, 0)
        for k in range(moved.shape[0]):
            if moved[k].any():
                moved[k] = _hull_fill_2d(moved[k])
    labels, n = ndi.label(mask)
    if n > 1:
        sizes = np.bincount(labels.ravel())
        sizes[0] = 0
        mask = labels == int(np.argmax(sizes))
    return mask


def head_mask_of(data: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """:func:`foreground_mask` with the voxel size and axial axis taken from ``affine``."""
    spacing, _ = _spacing_direction(affine)
    return foreground_mask(data, spacing=spacing, hull_axis=axial_axis(affine))


# ---------------------------------------------------------------------------------------------
# target grid
# ---------------------------------------------------------------------------------------------


@dataclass
class TargetGrid:
    """Shape and RAS affine of the analysis grid (``size × size × n_slices``)."""

    shape: tuple[int, int, int]
    affine: np.ndarray

    def to_ants_reference(self):
        return to_ants(np.zeros(self.shape, np.float32), self.affine)

    def describe(self) -> dict[str, Any]:
        spacing, _ = _spacing_direction(self.affine)
        return {"shape": list(self.shape), "affine": np.asarray(self.affine).tolist(),
                "voxel_mm": [round(float(s), 6) for s in spacing]}


def _slice_axis(spacing: np.ndarray) -> int:
    """The T2w's slice axis: axis 2 unless another axis is clearly coarser."""
    big = int(np.argmax(spacing))
    return big if spacing[big] > 1.05 * spacing[2] else 2


def target_grid(t2w_img: Any, inplane_mm: float = 1.0, size: int = 224, *,
                mask: np.ndarray | None = None) -> TargetGrid:
    """Analysis grid of a session from its T2w (nibabel image): T2w slice planes and slice
    step, ``inplane_mm`` in-plane, ``size × size`` voxels centred on the head's centre of mass
    (of ``mask`` if given, else of the T2w's :func:`head_mask_of`).
    """
    if not (inplane_mm > 0 and math.isfinite(inplane_mm)):
        raise InputError(f"in-plane voxel size must be positive, got {inplane_mm}")
    if int(size) < 8:
        raise InputError(f"in-plane matrix must be at least 8, got {size}")
    size = int(size)
    affine = np.asarray(t2w_img.affine, dtype=np.float64)
    shape = tuple(int(n) for n in t2w_img.shape[:3])
    if mask is None:
        data = np.asarray(t2w_img.dataobj, dtype=np.float32).reshape(shape)
        mask = head_mask_of(data, affine)
    if mask.sum() < 27:
        path = getattr(t2w_img, "get_filename", lambda: None)()
        raise InputError("T2w: no head found (empty foreground mask)", path=path)
    com_vox = np.array(np.nonzero(mask), dtype=np.float64).mean(axis=1)
    com = affine[:3, :3] @ com_vox + affine[:3, 3]
    spacing, direction = _spacing_direction(affine)
    s = _slice_axis(spacing)
    a0, a1 = (ax for ax in range(3) if ax != s)
    u, v = direction[:, a0], direction[:, a1]
    w = affine[:3, s]  # full slice step vector (keeps slice positions exactly)
    normal = np.cross(u, v)
    p0 = affine[:3, 3]  # centre of voxel (0, 0, 0): on the plane of slice 0
    t = float(normal @ (com - p0)) / float(normal @ w)
    q = com - t * w  # head centre projected along the slice step onto slice 0's plane
    m = np.eye(4)
    m[:3, 0] = u * inplane_mm
    m[:3, 1] = v * inplane_mm
    m[:3, 2] = w
    mid = (size - 1) / 2.0
    m[:3, 3] = q - m[:3, :2] @ np.array([mid, mid])
    m = m.astype(np.float32).astype(np.float64)  # exactly what the NIfTI header will hold
    m[3] = [0, 0, 0, 1]
    return TargetGrid(shape=(size, size, shape[s]), affine=m)


# ---------------------------------------------------------------------------------------------
# registration
# ---------------------------------------------------------------------------------------------


def read_rigid_ras(path: str | Path) -> np.ndarray:
    """4×4 RAS matrix of an ANTs/ITK linear transform file (maps fixed-space points to
    moving-space points, world mm)."""
    ants = _ants()
    try:
        tx = ants.read_transform(str(path))
    except Exception as exc:
        raise ToolError(f"cannot read ANTs transform ({exc})", path=path) from None
    params = np.asarray(tx.parameters, dtype=np.float64)
    centre = np.asarray(tx.fixed_parameters, dtype=np.float64)[:3]
    if params.size != 12:
        raise ToolError(f"unexpected transform type {tx.type} ({params.size} parameters)",
                        path=path)
    mat = params[:9].reshape(3, 3)
    trans = params[9:12]
    lps = np.eye(4)
    lps[:3, :3] = mat
    lps[:3, 3] = trans + centre - mat @ centre
    big = np.diag([-1.0, -1.0, 1.0, 1.0])
    return big @ lps @ big


def _rigid_summary(t_ras: np.ndarray) -> dict[str, Any]:
    """Rotation angle/axis-angle (deg) and translation (mm) of a 4×4 rigid matrix."""
    r = t_ras[:3, :3]
    u, _, vt = np.linalg.svd(r)
    rot = u @ vt
    angle = math.degrees(math.acos(max(-1.0, min(1.0, (np.trace(rot) - 1) / 2))))
    # Euler angles for R = Rz Ry Rx (degrees)
    ry = math.degrees(math.asin(max(-1.0, min(1.0, -rot[2, 0]))))
    rx = math.degrees(math.atan2(rot[2, 1], rot[2, 2]))
    rz = math.degrees(math.atan2(rot[1, 0], rot[0, 0]))
    return {"rotation_deg": round(angle, 4), "euler_zyx_deg": [round(rx, 4), round(ry, 4),
                                                                round(rz, 4)],
            "translation_mm": [round(float(x), 4) for x in t_ras[:3, 3]],
            "max_scale_deviation": float(np.abs(np.linalg.svd(r, compute_uv=False) - 1).max())}


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    s = int(a.sum()) + int(b.sum())
    return float(2.0 * np.logical_and(a, b).sum() / s) if s else 0.0


def _registration_args(fixed_s: str, moving_s: str, fmask_s: str, fcom_s: str, mcom_s: str,
                       prefix: str, warped_s: str, inv_s: str, seed: int,
                       settings: Mapping[str, Any]) -> list[str]:
    st = settings
    its = "x".join(str(i) for i in st["iterations"])
    args = [
        "--dimensionality", "3",
        "--float", "1",
        "--collapse-output-transforms", "1",
        "--output", f"[{prefix},{warped_s},{inv_s}]",
        "--interpolation", "Linear",
        "--use-histogram-matching", "1" if st["use_histogram_matching"] else "0",
        "--winsorize-image-intensities", f"[{st['winsorize'][0]},{st['winsorize'][1]}]",
        "--initial-moving-transform", f"[{fcom_s},{mcom_s},1]",
        "--transform", f"Rigid[{st['gradient_step']}]",
        "--metric", f"{st['metric']}[{fixed_s},{moving_s},1,{st['bins']},"
                    f"{st['sampling']},{st['sampling_rate']}]",
        "--convergence", f"[{its},{st['convergence_threshold']},{st['convergence_window']}]",
        "--shrink-factors", "x".join(str(i) for i in st["shrink_factors"]),
        "--smoothing-sigmas", "x".join(str(i) for i in st["smoothing_sigmas_vox"]) + "vox",
        "--masks", f"[{fmask_s},NA]",
    ]
    refine = st.get("refine")
    if refine:
        its2 = "x".join(str(i) for i in refine["iterations"])
        args += [
            "--transform", f"Rigid[{refine['gradient_step']}]",
            "--metric", f"{st['metric']}[{fixed_s},{moving_s},1,{st['bins']},"
                        f"{refine['sampling']},{refine['sampling_rate']}]",
            "--convergence", f"[{its2},{refine['convergence_threshold']},"
                             f"{refine['convergence_window']}]",
            "--shrink-factors", "x".join(str(i) for i in refine["shrink_factors"]),
            "--smoothing-sigmas", "x".join(str(i) for i in refine["smoothing_sigmas_vox"])
            + "vox",
            "--masks", f"[{fmask_s},NA]",
        ]
    if int(seed) < 1:
        # antsRegistration reads --random-seed 0 as "no seed": it then seeds its sampling
        # from the clock and two runs give different transforms
        raise ValueError(f"registration seed must be >= 1 (ANTs treats 0 as unseeded), "
                         f"got {seed}")
    return [*args,
        "--random-seed", str(int(seed)),
        "--verbose", "0",
    ]


def register_rigid(fixed: Path, moving: Path, out_transform: Path, *, threads: int = 1,
                   seed: int = 1, settings: Mapping[str, Any] | None = None) -> dict:
    """Rigidly register ``moving`` to ``fixed`` (ANTs, Mattes MI, multi-resolution, head
    centre-of-mass initialisation); write the ANTs ``.mat`` to ``out_transform`` (atomically).

    The transform maps fixed-space points to moving-space points, as ANTs does: use it with
    :func:`resample_to_grid` to bring ``moving`` onto any grid in the fixed image's world.
    Returns provenance: settings, the transform (4×4 RAS, rotation, translation), the MI
    before (after the centre-of-mass initialisation) and after, the head-mask Dice, timing.
    """
    set_threads(threads)
    st = dict(REGISTRATION_SETTINGS)
    st.update(settings or {})
    fixed, moving, out_transform = Path(fixed), Path(moving), Path(out_transform)
    t0 = time.perf_counter()
    fimg, fdata = load_volume(fixed, "fixed image")
    mimg, mdata = load_volume(moving, "moving image")
    fmask = head_mask_of(fdata, fimg.affine)
    mmask = head_mask_of(mdata, mimg.affine)
    if fmask.sum() < 27:
        raise InputError("fixed image: no head found (empty foreground mask)", path=fixed)
    if mmask.sum() < 27:
        raise InputError("moving image: no head found (empty foreground mask)", path=moving)
    result = _register_arrays(fdata, fimg.affine, fmask, mdata, mimg.affine, mmask,
                              out_transform, seed=seed, settings=st, moving_path=moving)
    result.update({
        "fixed": str(fixed), "moving": str(moving), "transform_file": str(out_transform),
        "threads": threads, "seconds": round(time.perf_counter() - t0, 3),
    })
    return result


def _register_arrays(fdata: np.ndarray, faff: np.ndarray, fmask: np.ndarray,
                     mdata: np.ndarray, maff: np.ndarray, mmask: np.ndarray,
                     out_transform: Path, *, seed: int, settings: Mapping[str, Any],
                     moving_path: Path) -> dict[str, Any]:
    from scipy import ndimage as ndi

    ants = _ants()
    from ants.internal import get_lib_fn, get_pointer_string, process_arguments

    t0 = time.perf_counter()
    fixed_i = to_ants(fdata, faff)
    moving_i = to_ants(mdata, maff)
    fspacing, _ = _spacing_direction(faff)
    # metric mask: the fixed head mask dilated by ~5 mm (keeps the scalp edge in)
    dil = np.maximum(1, np.round(5.0 / fspacing)).astype(int)
    fmask_dil = ndi.binary_dilation(fmask, structure=np.ones(tuple(2 * d + 1 for d in dil),
                                                             bool))
    fmask_i = to_ants(fmask_dil.astype(np.float32), faff)
    fcom_i = to_ants(fmask.astype(np.float32), faff)
    mcom_i = to_ants(mmask.astype(np.float32), maff)
    warped = fixed_i.clone()
    inv = moving_i.clone()
    tmpdir = Path(tempfile.mkdtemp(prefix=".antsreg-", dir=out_transform.parent
                                   if out_transform.parent.exists() else None))
    try:
        prefix = str(tmpdir / "reg_")
        args = _registration_args(
            get_pointer_string(fixed_i), get_pointer_string(moving_i),
            get_pointer_string(fmask_i), get_pointer_string(fcom_i),
            get_pointer_string(mcom_i), prefix, get_pointer_string(warped),
            get_pointer_string(inv), seed, settings)
        try:
            rc = get_lib_fn("antsRegistration")(process_arguments(args))
        except Exception as exc:
            raise ToolError(f"antsRegistration failed: {type(exc).__name__}: {exc}",
                            path=moving_path) from None
        mat = Path(prefix + "0GenericAffine.mat")
        if rc != 0 or not mat.is_file():
            raise ToolError(f"antsRegistration failed (exit {rc})", path=moving_path)
        t_ras = read_rigid_ras(mat)
        t_reg = time.perf_counter() - t0
        if not np.all(np.isfinite(t_ras)):
            raise ToolError("registration failed: non-finite transform", path=moving_path)
        summary = _rigid_summary(t_ras)
        # quality: MI after the initialisation alone vs after the registration, head Dice
        init = _com_translation_ras(fmask, faff, mmask, maff)
        mi_init = _mi(fixed_i, _warp(fixed_i, moving_i, init, tmpdir), fmask_i)
        mi_final = _mi(fixed_i, warped, fmask_i)
        if not math.isfinite(mi_final):
            # (a 1-slice or empty image gives nan): no evidence that the images were aligned
            raise ToolError(f"registration failed: the Mattes mutual information after "
                            f"registration is not a finite number ({mi_final})",
                            path=moving_path)
        mmask_w = ants.apply_transforms(fixed=fcom_i, moving=mcom_i, transformlist=[str(mat)],
                                        interpolator="linear").numpy() > 0.5
        dice = _dice(fmask, mmask_w)
        if (summary["rotation_deg"] > _MAX_ROTATION_DEG
                or float(np.linalg.norm(t_ras[:3, 3] - init[:3, 3])) > _MAX_TRANSLATION_MM
                or dice < _MIN_HEAD_DICE):
            raise ToolError(
                f"registration failed: implausible result (rotation "
                f"{summary['rotation_deg']:.1f} deg, head-mask Dice {dice:.3f})",
                path=moving_path)
        out_transform.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(out_transform) as tmp:
            shutil.copyfile(mat, tmp)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    return {
        "tool": "ANTsPy antsRegistration", "ants_version": ants_version(),
        "transform_type": "Rigid",
        "transform_direction": "maps fixed (T2w) world points to moving world points "
                               "(ITK convention); RAS mm",
        "settings": _jsonable(settings),
        "random_seed": int(seed),
        "fixed_to_moving_ras": t_ras.tolist(),
        "moving_to_fixed_ras": np.linalg.inv(t_ras).tolist(),
        **summary,
        "metric": {"name": "Mattes mutual information (ANTs sign: lower is better)",
                   "after_initialisation": mi_init, "final": mi_final},
        "head_mask_dice": round(dice, 4),
        "registration_seconds": round(t_reg, 3),
    }


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    return obj


def _com_translation_ras(fmask: np.ndarray, faff: np.ndarray, mmask: np.ndarray,
                         maff: np.ndarray) -> np.ndarray:
    def com(mask: np.ndarray, aff: np.ndarray) -> np.ndarray:
        c = np.array(np.nonzero(mask), dtype=np.float64).mean(axis=1)
        return aff[:3, :3] @ c + aff[:3, 3]

    t = np.eye(4)
    t[:3, 3] = com(mmask, maff) - com(fmask, faff)
    return t


def _write_ras_transform(t_ras: np.ndarray, path: Path) -> Path:
    ants = _ants()
    big = np.diag([-1.0, -1.0, 1.0, 1.0])
    lps = big @ t_ras @ big
    tx = ants.create_ants_transform(transform_type="AffineTransform", precision="float",
                                    dimension=3, matrix=lps[:3, :3], translation=lps[:3, 3])
    ants.write_transform(tx, str(path))
    return path


def _warp(fixed_i, moving_i, t_ras: np.ndarray, tmpdir: Path):
    ants = _ants()
    p = _write_ras_transform(t_ras, tmpdir / "init.mat")
    return ants.apply_transforms(fixed=fixed_i, moving=moving_i, transformlist=[str(p)],
                                 interpolator="linear")


def _mi(fixed_i, warped_i, mask_i) -> float:
    ants = _ants()
    try:
        return round(float(ants.image_similarity(fixed_i, warped_i, "MattesMutualInformation",
                                                 fixed_mask=mask_i)), 6)
    except Exception:  # not measurable: nan, which the final metric refuses
        return float("nan")


# ---------------------------------------------------------------------------------------------
# resampling
# ---------------------------------------------------------------------------------------------


def _antialias_sigmas(spacing: np.ndarray, target_mm: float) -> np.ndarray:
    """Gaussian sigmas (voxels) that low-pass axes finer than the target voxel (FWHM rule)."""
    fwhm_mm = np.sqrt(np.maximum(target_mm**2 - spacing**2, 0.0))
    sig = fwhm_mm / (2.0 * math.sqrt(2.0 * math.log(2.0))) / spacing
    return np.where(sig >= 0.25, sig, 0.0)


def resample_to_grid(image: Path, grid: TargetGrid, transforms: Sequence[Path] | None = None,
                     interpolation: str = "linear", *, antialias: bool = False,
                     data: tuple[Any, np.ndarray] | None = None) -> np.ndarray:
    """Resample ``image`` onto ``grid`` in one interpolation step; float32 array.

    ``transforms``: ANTs transform files mapping grid-world points to the image's world (as
    written by :func:`register_rigid` with the image as moving); none = identity. Outside the
    image's field of view the result is 0; negative values (B-spline overshoot) are clamped
    to 0 except for label interpolation. ``antialias`` low-passes, in the image's own voxel
    axes, any axis finer than the grid's in-plane voxel before interpolating (the 0.45 mm
    T2w going to 1 mm). ``data`` passes an already loaded ``load_volume`` result.
    """
    ants = _ants()
    if interpolation not in _INTERPOLATORS:
        raise ValueError(f"interpolation must be one of {sorted(_INTERPOLATORS)}")
    interp = _INTERPOLATORS[interpolation]
    img, arr = data if data is not None else load_volume(image, "image")
    transforms = [Path(t) for t in (transforms or [])]
    for t in transforms:
        if not t.is_file():
            raise InputError("transform file not found", path=t)
    if antialias and interp not in ("nearestNeighbor", "genericLabel"):
        from scipy import ndimage as ndi

        gspacing, _ = _spacing_direction(grid.affine)
        sig = _antialias_sigmas(_spacing_direction(img.affine)[0], float(gspacing[:2].min()))
        if np.any(sig > 0):
            arr = ndi.gaussian_filter(arr, sigma=sig, mode="nearest", truncate=3.0)
    moving_i = to_ants(arr, img.affine)
    try:
        out = ants.apply_transforms(fixed=grid.to_ants_reference(), moving=moving_i,
                                    transformlist=[str(t) for t in transforms],
                                    interpolator=interp, defaultvalue=0)
    except Exception as exc:
        raise ToolError(f"antsApplyTransforms failed: {type(exc).__name__}: {exc}",
                        path=image) from None
    res = np.asarray(out.numpy(), dtype=np.float32)
    if interp not in ("nearestNeighbor", "genericLabel"):
        np.maximum(res, 0.0, out=res)
    return res


# ---------------------------------------------------------------------------------------------
# one session
# ---------------------------------------------------------------------------------------------


def write_outputs_atomically(items: Sequence[tuple[Path, Any]]) -> None:
    """Write ``(path, writer)`` pairs; if any fails, remove the ones this call already wrote.

    ``writer(path)`` writes one final file atomically. Used so a step never leaves a partial
    set of outputs behind.
    """
    done: list[Path] = []
    try:
        for path, writer in items:
            writer(Path(path))
            done.append(Path(path))
    except BaseException:
        for p in done:
            with contextlib.suppress(OSError):
                p.unlink()
        raise


def register_session(t2w: Path, t1w: Path, flair: Path, outputs: Mapping[str, Path],
                     work_dir: Path, *, inplane_mm: float = 1.0, size: int = 224,
                     threads: int = 1, interpolation: str = "linear", seed: int = 1,
                     antialias: bool = True, deterministic: bool = True) -> dict:
    """Register T1w and FLAIR to the T2w and resample all three onto the session grid.

    ``outputs`` keys: ``T1w``, ``T2w``, ``FLAIR`` (NIfTI on the :func:`target_grid`),
    ``T1w_xfm``, ``FLAIR_xfm`` (ANTs ``.mat``: T2w-world -> T1w/FLAIR-world). Nothing is
    written to ``outputs`` until everything has been computed. Returns provenance.

    ``deterministic`` (default): ITK runs single-threaded, so that the same inputs give
    bit-identical outputs on every run and machine (with several threads the mutual
    information sums are added in a varying order and the transforms differ by ~0.05 deg /
    0.02 mm from run to run; the fixed seed alone does not prevent that).
    """
    t_start = time.perf_counter()
    if deterministic:
        threads = 1
    set_threads(threads)
    missing = [k for k in ("T1w", "T2w", "FLAIR", "T1w_xfm", "FLAIR_xfm") if k not in outputs]
    if missing:
        raise ValueError(f"register_session: outputs lacks {missing}")
    t2w, t1w, flair, work_dir = Path(t2w), Path(t1w), Path(flair), Path(work_dir)
    loaded = {"T2w": load_volume(t2w, "T2w"), "T1w": load_volume(t1w, "T1w"),
              "FLAIR": load_volume(flair, "FLAIR")}
    paths = {"T2w": t2w, "T1w": t1w, "FLAIR": flair}
    masks = {}
    for name, (_img, arr) in loaded.items():
        masks[name] = head_mask_of(arr, _img.affine)
        if masks[name].sum() < 27:
            raise InputError(f"{name}: no head found (empty foreground mask)", path=paths[name])
    timing: dict[str, float] = {}
    t0 = time.perf_counter()
    t2_img, t2_arr = loaded["T2w"]
    grid = target_grid(t2_img, inplane_mm=inplane_mm, size=size, mask=masks["T2w"])
    com_vox = np.array(np.nonzero(masks["T2w"]), dtype=np.float64).mean(axis=1)
    head_centre = t2_img.affine[:3, :3] @ com_vox + t2_img.affine[:3, 3]
    resampled: dict[str, np.ndarray] = {}
    resampled["T2w"] = resample_to_grid(t2w, grid, None, interpolation=interpolation,
                                        antialias=antialias, data=loaded["T2w"])
    grid_mask = head_mask_of(resampled["T2w"], grid.affine)
    if grid_mask.sum() < 27:
        raise InputError("T2w: no head on the analysis grid", path=t2w)
    timing["grid_and_T2w"] = round(time.perf_counter() - t0, 3)

    created_work_dir = not work_dir.exists()
    work_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".register-", dir=work_dir))
    try:
        reg: dict[str, Any] = {}
        xfm: dict[str, Path] = {}
        st = dict(REGISTRATION_SETTINGS)
        for name in ("T1w", "FLAIR"):
            # fixed = the T2w on the analysis grid (1 mm in-plane): the same answer in world
            # coordinates as the native T2w, at a cost independent of the T2w's matrix
            t0 = time.perf_counter()
            img, arr = loaded[name]
            xfm[name] = tmp / f"{name}_to_T2w.mat"
            info = _register_arrays(resampled["T2w"], grid.affine, grid_mask, arr, img.affine,
                                    masks[name], xfm[name], seed=seed, settings=st,
                                    moving_path=paths[name])
            info.update({"fixed": str(t2w), "fixed_grid": "the analysis grid",
                         "moving": str(paths[name]),
                         "seconds": round(time.perf_counter() - t0, 3)})
            reg[name] = info
            timing[f"register_{name}"] = info["seconds"]
        for name in ("T1w", "FLAIR"):
            t0 = time.perf_counter()
            resampled[name] = resample_to_grid(
                paths[name], grid, [xfm[name]], interpolation=interpolation,
                antialias=antialias, data=loaded[name])
            timing[f"resample_{name}"] = round(time.perf_counter() - t0, 3)
        for name in ("T2w", "T1w", "FLAIR"):
            if not np.any(resampled[name] > 0):
                raise ToolError(f"{name}: nothing of the image falls on the target grid",
                                path=paths[name])

        def nifti_writer(arr: np.ndarray):
            return lambda p: save_nifti(p, arr, grid.affine)

        def copy_writer(src: Path):
            def write(p: Path) -> None:
                with atomic_path(p) as t:
                    shutil.copyfile(src, t)
            return write

        write_outputs_atomically([
            (Path(outputs["T1w_xfm"]), copy_writer(xfm["T1w"])),
            (Path(outputs["FLAIR_xfm"]), copy_writer(xfm["FLAIR"])),
            (Path(outputs["T2w"]), nifti_writer(resampled["T2w"])),
            (Path(outputs["T1w"]), nifti_writer(resampled["T1w"])),
            (Path(outputs["FLAIR"]), nifti_writer(resampled["FLAIR"])),
        ])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if created_work_dir:
            with contextlib.suppress(OSError):
                work_dir.rmdir()  # only if empty
    timing["total"] = round(time.perf_counter() - t_start, 3)
    spacing, _ = _spacing_direction(t2_img.affine)
    return {
        "step": "register",
        "tool": "ANTsPy", "ants_version": ants_version(),
        "inputs": {k: str(v) for k, v in paths.items()},
        "outputs": {k: str(v) for k, v in outputs.items()},
        "grid": {**grid.describe(), "t2w_shape": list(t2_arr.shape),
                 "t2w_voxel_mm": [round(float(s), 6) for s in spacing],
                 "slice_axis_in_t2w": _slice_axis(spacing),
                 "head_centre_ras_mm": [round(float(x), 3) for x in head_centre],
                 "centring": "in-plane centre = T2w foreground (Otsu) centre of mass; "
                             "slice planes = the T2w's"},
        "resampling": {"tool": "antsApplyTransforms", "interpolation": interpolation,
                       "negative_values": "clamped to 0", "outside_fov": 0,
                       "antialias": ("Gaussian low-pass of axes finer than the in-plane voxel "
                                     "(FWHM = sqrt(target^2 - source^2))") if antialias
                       else False,
                       "single_interpolation": True},
        "registration": reg,
        "threads": threads, "deterministic": deterministic, "random_seed": seed,
        "timing_s": timing,
    }
