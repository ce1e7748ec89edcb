"""Bring one session into the work folder: its selected series as role-named NIfTI + sidecars.

DICOM input: each selected series' files (exactly those of its SeriesInstanceUID, even when a
folder holds several series) are linked into a scratch folder and converted with dcm2niix
(anonymised sidecars). BIDS input: the NIfTI + JSON pairs are copied. Names inside the session
folder (``sub-<S>_ses-<V>_T1w.nii.gz``, ``_T2w``, ``_FLAIR``, and
``_acq-<series>_echo-<n>_MEGRE`` for multi-echo GRE magnitude) are what later steps read.
Every converted image passes :func:`check_structure` (slice count, matrix, voxel size,
NaN/empty images; :data:`MIN_SLICES`, :data:`MIN_MATRIX`, :data:`MAX_VOXEL_MM`), so a session
that cannot be processed ends here with one line naming the series, its role and the reason.
The session folder appears only when everything converted (atomic rename); its mode follows
the umask. Messages name a series by its number and id (``series 3 (0003a1b2c3)``), never by
its archive folder, whose name may identify the patient.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from ..errors import InputError, QmriflowError
from ..io import make_temp_dir, sidecar_path, write_json
from .convert import ConvertedImage, dcm2niix_version, run_dcm2niix

ROLE_SUFFIX = {"t1w": "T1w", "t2w": "T2w", "flair": "FLAIR"}
REQUIRED_ROLES = ("t1w", "t2w", "flair")
ROLE_NAME = {**ROLE_SUFFIX, "megre": "multi-echo GRE"}

# Structural minimums, checked on every converted image (:func:`check_structure`) so that a
# session that cannot be processed fails at conversion, naming the series, its role and the
# reason, instead of passing parameter checks and registration and failing late elsewhere.
MIN_SLICES = 3
"""Slices a weighted brain series (T1w, T2w, FLAIR; 2D or 3D) needs: fewer cannot be
registered in 3D or bias-corrected, and no clinical brain protocol has fewer (a localiser or a
single-slice test scan selected by mistake). Not applied to multi-echo GRE, whose fat/water
fit works slice by slice."""
MIN_MATRIX = 32
"""Smallest in-plane matrix (both in-plane axes), any role: below it the image is a thumbnail,
a secondary capture or a localiser, not a diagnostic series."""
MAX_VOXEL_MM = 10.0
"""Largest voxel edge (mm, any axis, any role). Voxel sizes must also be finite and positive:
anything else is a broken header (a missing slice spacing, centimetres for millimetres)."""


def check_structure(nifti: Path, role: str, ref: str) -> dict[str, Any]:
    """Refuse a converted image that no later step can use, with a one-line
    :class:`~qmriflow.errors.InputError` naming the series (``ref``) and its role: fewer than
    :data:`MIN_SLICES` slices (T1w/T2w/FLAIR), an in-plane matrix below :data:`MIN_MATRIX`,
    voxel sizes not finite, not positive or above :data:`MAX_VOXEL_MM`, any non-finite voxel
    value (NaN, inf), or an empty (all zero) or constant image. Returns the image's shape and
    voxel sizes (for the conversion summary)."""
    import nibabel as nib
    import numpy as np

    what = ROLE_NAME.get(role, role)

    def fail(reason: str) -> None:
        raise InputError(f"{what}: {reason}", path=ref)

    try:
        img = nib.load(str(nifti))
        shape = tuple(int(n) for n in img.shape)
        zooms = [float(z) for z in img.header.get_zooms()[:3]]
    except Exception as exc:
        raise InputError(f"{what}: converted image unreadable ({type(exc).__name__})",
                         path=ref) from None
    if len(shape) < 2:
        fail(f"{len(shape)}-dimensional image")
    slices = shape[2] if len(shape) >= 3 else 1
    if role != "megre" and slices < MIN_SLICES:
        fail(f"{slices} slice(s); a brain {what} series needs at least {MIN_SLICES}")
    if min(shape[:2]) < MIN_MATRIX:
        fail(f"in-plane matrix {shape[0]} x {shape[1]}; at least {MIN_MATRIX} x {MIN_MATRIX} "
             f"needed")
    if not all(np.isfinite(z) and z > 0 for z in zooms):
        fail(f"voxel size {' x '.join(f'{z:g}' for z in zooms)} mm is not finite and positive")
    if max(zooms) > MAX_VOXEL_MM:
        fail(f"voxel size {' x '.join(f'{z:g}' for z in zooms)} mm; at most {MAX_VOXEL_MM:g} "
             f"mm per axis")
    data = np.asanyarray(img.dataobj)
    if data.dtype.kind in "fc":
        bad = int(np.count_nonzero(~np.isfinite(data)))
        if bad:
            fail(f"{bad} of {data.size} voxels are not finite numbers (NaN or inf)")
    lo, hi = data.min(), data.max()
    if lo == hi:
        fail("empty image: every voxel is 0" if hi == 0
             else f"constant image: every voxel is {float(hi):g}")
    return {"shape": list(shape), "voxel_mm": [round(z, 6) for z in zooms]}


def session_label(subject: str, session: str) -> str:
    return f"sub-{subject}_ses-{session}"


def _is_magnitude(meta: dict[str, Any]) -> bool:
    it = [str(x).upper() for x in meta.get("ImageType", [])]
    return not any(x in ("P", "PHASE", "REAL", "IMAGINARY") for x in it)


def _move_pair(img: ConvertedImage | Path, dest_nifti: Path) -> None:
    src = img.nifti if isinstance(img, ConvertedImage) else Path(img)
    os.replace(src, dest_nifti)
    os.replace(sidecar_path(src), sidecar_path(dest_nifti))


def _echo_number(meta: dict[str, Any], default: int) -> int:
    try:
        return int(meta.get("EchoNumber", default))
    except (TypeError, ValueError):
        return default


def ingest_session(
    subject: str,
    session: str,
    sessions_rows: list[dict[str, str]],
    series_rows: list[dict[str, str]],
    input_dir: Path,
    out_dir: Path,
    *,
    input_format: str = "dicom",
    anonymise: bool = True,
    timeout_s: float = 600,
    salt: str | None = None,
) -> dict[str, Any]:
    """Convert (or copy) the session's selected series into ``out_dir``; return a summary.
    ``salt``: the discovery's pseudonym salt (it hashed the series folders in the table)."""

    label = session_label(subject, session)
    rows = [r for r in sessions_rows if r["subject"] == subject and r["session"] == session]
    if not rows:
        raise InputError("session not in the sessions table", session=label)
    srow = rows[0]
    status = srow.get("status", "ok")
    if status != "ok":
        raise InputError(status, session=label)
    series_by_id = {r["series_id"]: r for r in series_rows
                    if r["subject"] == subject and r["session"] == session}
    wanted: list[tuple[str, str]] = [(role, srow[role]) for role in REQUIRED_ROLES]
    wanted += [("megre", sid) for sid in (srow.get("megre") or "").split(";") if sid]

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = make_temp_dir(f".{label}.", out_dir.parent)
    images: list[dict[str, Any]] = []
    try:
        for role, sid in wanted:
            row = series_by_id.get(sid)
            if row is None:
                raise InputError(f"series {sid} for {role} missing from the series table",
                                 session=label)
            try:
                images += _ingest_series(label, role, row, input_dir, tmp, input_format,
                                         anonymise, timeout_s, salt)
            except QmriflowError as exc:
                raise exc.with_context(session=label) from None
        summary = {
            "session": label,
            "input_format": input_format,
            "tool": "dcm2niix" if input_format == "dicom" else "copy",
            "version": dcm2niix_version() if input_format == "dicom" else None,
            "anonymised": anonymise,
            "images": images,
        }
        write_json(tmp / "conversion.json", summary)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
        return summary
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _ingest_series(
    label: str, role: str, row: dict[str, str], input_dir: Path, dest: Path,
    input_format: str, anonymise: bool, timeout_s: float, salt: str | None = None,
) -> list[dict[str, Any]]:
    from .discover import series_files

    sid = row["series_id"]
    ref = series_ref(row)
    if input_format == "bids":
        from .discover import bids_metadata

        pairs = series_files(input_dir, row)  # MEGRE: magnitude echoes in echo order
        if not pairs:
            raise InputError("BIDS image is missing", path=row["folder"])
        out = []
        for k, p in enumerate(pairs, start=1):
            if not p.is_file():
                raise InputError("BIDS image is missing", path=p.relative_to(input_dir))
            name = _target_name(label, role, sid, k)
            shutil.copyfile(p, dest / name)
            # sidecar with BIDS inheritance (metadata may live higher up the tree)
            write_json(sidecar_path(dest / name), bids_metadata(p, input_dir))
            out.append({"role": role, "series_id": sid, "nifti": name,
                        **check_structure(dest / name, role, ref)})
        return out

    files = series_files(input_dir, row, salt)
    if not files:
        raise InputError("no DICOM files found for the series", path=ref)
    with tempfile.TemporaryDirectory(prefix=".series-", dir=dest) as link_dir, \
            tempfile.TemporaryDirectory(prefix=".conv-", dir=dest) as conv_dir:
        for i, f in enumerate(files):
            os.symlink(Path(f).resolve(), Path(link_dir) / f"{i:05d}.dcm")
        try:
            conv = run_dcm2niix(link_dir, conv_dir, anonymise=anonymise, timeout_s=timeout_s)
        except QmriflowError as exc:
            # name the series, not the scratch folder of links (nor the archive folder)
            raise type(exc)(exc.reason.replace(str(link_dir), ref), path=ref) from None
        mags = [c for c in conv if _is_magnitude(c.metadata)]
        if not mags:
            raise InputError("series has no magnitude image", path=ref)
        if role != "megre" and len(mags) > 1:
            # dcm2niix split the series (e.g. echoes or repeated acquisitions): keep echo 1
            mags = [min(mags, key=lambda c: _echo_number(c.metadata, 1))]
        out = []
        for k, c in enumerate(sorted(mags, key=lambda c: _echo_number(c.metadata, 0)), start=1):
            name = _target_name(label, role, sid, _echo_number(c.metadata, k) if role == "megre"
                                else k)
            _move_pair(c, dest / name)
            out.append({"role": role, "series_id": sid, "nifti": name,
                        "echo_time_s": c.metadata.get("EchoTime"),
                        **check_structure(dest / name, role, ref)})
        return out


def series_ref(row: dict[str, Any]) -> str:
    """How messages name a series: its number and id, e.g. ``series 3 (0003a1b2c3)``."""
    return f"series {row.get('series_number', '?')} ({row['series_id']})"


def _target_name(label: str, role: str, series_id: str, echo: int) -> str:
    if role == "megre":
        return f"{label}_acq-{series_id}_echo-{echo}_MEGRE.nii.gz"
    return f"{label}_{ROLE_SUFFIX[role]}.nii.gz"


def converted_sidecars(session_dir: Path) -> dict[str, list[Path]]:
    """Role -> sidecar paths of an ingested session (``megre:<series>`` per multi-echo series)."""
    summary = json.loads((session_dir / "conversion.json").read_text())
    out: dict[str, list[Path]] = {}
    for im in summary["images"]:
        key = im["role"] if im["role"] != "megre" else f"megre:{im['series_id']}"
        out.setdefault(key, []).append(sidecar_path(session_dir / im["nifti"]))
    return out
