"""Synthetic MRI: a weighted image from T1/T2/PD maps through :mod:`qmriflow.physics`."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from . import __version__
from .errors import InputError
from .io import save_nifti
from .physics import Protocol, signal


def _load(path: Path, what: str):
    import nibabel as nib

    if not path.is_file():
        raise InputError(f"{what} map not found", path=path)
    try:
        img = nib.load(str(path))
        data = np.asarray(img.get_fdata(dtype=np.float64))
    except Exception as exc:  # nibabel raises many types for corrupt files
        raise InputError(f"cannot read {what} map: {type(exc).__name__}", path=path) from None
    if data.size == 0:
        raise InputError(f"{what} map is empty", path=path)
    return img, data


def synthesise_files(
    t1: Path, t2: Path, pd: Path, *, sequence: str, tr_ms: float, te_ms: float,
    ti_ms: float | None, fa_deg: float | None, te_correction: float | None, out: Path,
) -> Path:
    """Read BIDS T1map/T2map (seconds) and PDmap, write the synthesised image + sidecar."""
    try:
        protocol = Protocol(sequence, tr_ms, te_ms, ti_ms=ti_ms, fa_deg=fa_deg,
                            te_correction=te_correction)
    except ValueError as exc:
        raise InputError(str(exc)) from None
    for name, v in (("TR", tr_ms), ("TE", te_ms), ("TI", ti_ms)):
        if v is not None and (not np.isfinite(v) or v < 0):
            raise InputError(f"{name} must be a non-negative number of ms, got {v}")
    if fa_deg is not None and not (0 < fa_deg <= 180):
        raise InputError(f"flip angle must be in (0, 180] degrees, got {fa_deg}")
    t1_img, t1_s = _load(Path(t1), "T1")
    _, t2_s = _load(Path(t2), "T2")
    _, pd_a = _load(Path(pd), "PD")
    if not (t1_s.shape == t2_s.shape == pd_a.shape):
        raise InputError(f"map shapes differ: T1 {t1_s.shape}, T2 {t2_s.shape}, PD {pd_a.shape}")
    if np.nanmax(t1_s) > 100 or np.nanmax(t2_s) > 100:
        raise InputError("T1/T2 maps look like milliseconds; BIDS T1map/T2map are in seconds",
                         path=t1)
    bad = ~(np.isfinite(t1_s) & np.isfinite(t2_s) & np.isfinite(pd_a))
    img = signal(protocol, np.where(bad, 0, pd_a), np.where(bad, 0, t1_s),
                 np.where(bad, 0, t2_s))
    img = np.where(bad, np.nan, img)
    save_nifti(out, img, t1_img.affine, {
        "Description": "synthetic weighted image from quantitative maps (qmriflow.physics)",
        "Units": "arbitrary (PD units)",
        "Protocol": protocol.as_dict(),
        "Sources": [Path(t1), Path(t2), Path(pd)],  # relative to the dataset (save_nifti)
        "NonFiniteInputVoxels": int(bad.sum()),
        "GeneratedBy": {"Name": "qmriflow synth", "Version": __version__},
    })
    return Path(out)
