"""Write a synthetic volume as a classic (one file per image) MR DICOM series.

The files look like what a Philips 3 T scanner exports: uint16 pixels with 12 stored bits,
one series-wide ``RescaleSlope``, magnitude ``ImageType``, MR Image Storage SOP class,
Explicit VR Little Endian with a proper preamble.

Intensity scaling. By default the volume is the displayed value and is quantised with one
series-wide ``RescaleSlope`` = max / 4095. With :class:`PhilipsScaling` the volume is the
scanner's floating-point value instead and the three Philips scalings are written as a Philips
console does (Chenevert et al., Transl. Oncol. 2014, PMC3998685; dcm2niix's Philips notes)::

    DV = SV · RS + RI          RS, RI: RescaleSlope (0028,1053), RescaleIntercept (0028,1052)
    FP = DV / (RS · SS)        SS: private ScaleSlope (2005,100E, VR FL), private creator
                               "Philips MR Imaging DD 001" at (2005,0010)

with SV the stored uint16 value, DV the value the console displays and FP the floating-point
value that is comparable between the series of one examination. Geometry follows the DICOM patient
coordinate system (LPS) and is derived from a NIfTI/nibabel affine (RAS+), so that
``dcm2niix`` turns the series back into a NIfTI whose affine places every voxel where the
input affine did.

Conventions (``volume[i, j, k]`` with ``affine`` mapping ``(i, j, k)`` to RAS+ mm):

* one file per slice ``k`` (and per echo);
* ``pixel_array[r, c] == stored[c, r, k]``: DICOM columns run along ``i``, rows along ``j``;
* ``ImageOrientationPatient`` = LPS direction of ``i`` (row cosine) then of ``j`` (column
  cosine); ``ImagePositionPatient`` = LPS position of voxel ``(0, 0, k)``;
* ``PixelSpacing`` = ``[spacing along j, spacing along i]`` (row spacing first).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid
from pydicom.valuerep import format_number_as_ds

__all__ = [
    "GYROMAGNETIC_MHZ_PER_T",
    "PHILIPS_PRIVATE_CREATOR",
    "DicomSeriesInfo",
    "PhilipsScaling",
    "read_philips_scaling",
    "write_dicom_series",
]

#: Proton gyromagnetic ratio / 2π in MHz/T (ImagingFrequency = this × B0).
GYROMAGNETIC_MHZ_PER_T = 42.577478

_LPS_FROM_RAS = np.diag([-1.0, -1.0, 1.0])
_FILE_RE = re.compile(r"^IM_\d+\.dcm$")
_PIXEL_DATA_TAG = 0x7FE00010

#: Private creator of the Philips MR block that holds ScaleIntercept (2005,100D) and
#: ScaleSlope (2005,100E) when reserved at (2005,0010), as Philips classic MR DICOM does.
PHILIPS_PRIVATE_CREATOR = "Philips MR Imaging DD 001"
_PHILIPS_GROUP = 0x2005
_PHILIPS_SCALE_INTERCEPT = 0x0D  # element offset in the private block: (2005,xx0D)
_PHILIPS_SCALE_SLOPE = 0x0E  # (2005,xx0E)

# Elements whose value this module computes; the caller may not supply them.
_RESERVED = frozenset({
    "Rows", "Columns", "PixelData", "ImagePositionPatient", "ImageOrientationPatient",
    "PixelSpacing", "SpacingBetweenSlices", "SliceLocation", "InstanceNumber",
    "SamplesPerPixel", "PhotometricInterpretation", "BitsAllocated", "BitsStored", "HighBit",
    "PixelRepresentation", "RescaleSlope", "RescaleIntercept", "RescaleType",
    "SOPInstanceUID", "SOPClassUID", "SeriesInstanceUID", "EchoNumbers",
})

# What a Philips 3 T console writes when the caller does not say otherwise. A caller's
# ``None`` removes the element altogether.
_DEFAULTS: dict[str, Any] = {
    "SpecificCharacterSet": "ISO_IR 100",
    "Modality": "MR",
    "Manufacturer": "Philips",
    "ManufacturerModelName": "Ingenia",
    "MagneticFieldStrength": 3.0,
    "PatientName": "",
    "PatientID": "",
    "PatientBirthDate": "",
    "PatientSex": "",
    "StudyDate": "20000101",
    "StudyTime": "120000.00",
    "StudyID": "",
    "AccessionNumber": "",
    "ReferringPhysicianName": "",
    "SeriesNumber": 1,
    "AcquisitionNumber": 1,
    "PatientPosition": "HFS",
    "ImagedNucleus": "1H",
    "PositionReferenceIndicator": "",
}


@dataclass(frozen=True)
class PhilipsScaling:
    """Write the Philips stored/displayed/floating-point scalings (see the module docstring).

    ``rescale_slope``: RS, displayed value per stored unit (dimensionless, > 0); Philips
    consoles write values of order 0.5–5 that differ between series. ``fill``: the largest
    floating-point value of the series is stored as ``fill · max_stored`` (0 < fill ≤ 1), which
    sets the private scale slope SS = fill · max_stored / max(FP). ``scale_slope``: SS given
    explicitly instead (``fill`` is then ignored); the volume must fit, max(FP)·SS ≤
    max_stored. RescaleIntercept is always 0 (magnitude images).
    """

    rescale_slope: float
    fill: float = 1.0
    scale_slope: float | None = None


@dataclass
class DicomSeriesInfo:
    """What :func:`write_dicom_series` wrote.

    ``dequantised`` is the displayed value (DV) the DICOM pixels represent
    (``stored * rescale_slope + rescale_intercept``), same shape as the input volume.
    With Philips scaling, ``scale_slope`` is the private ScaleSlope SS (as stored, float32)
    and ``floating`` the floating-point value FP = DV / (RS · SS) the pixels represent;
    without it both are ``None``.
    """

    files: list[Path]
    rescale_slope: float
    rescale_intercept: float
    dequantised: np.ndarray
    series_instance_uid: str
    study_instance_uid: str
    scale_slope: float | None = None
    floating: np.ndarray | None = None


def _ds(value: float) -> str:
    """A float as a valid DS string (at most 16 characters)."""
    return format_number_as_ds(float(value))


def _coerce(keyword: str, value: Any) -> Any:
    """Make a Python value acceptable for ``keyword``'s VR (DS strings must fit 16 chars)."""
    vr = dictionary_VR(tag_for_keyword(keyword))
    if vr == "DS":
        if isinstance(value, str):
            return value
        if isinstance(value, Sequence | np.ndarray):
            return [_ds(v) if not isinstance(v, str) else v for v in value]
        return _ds(value)
    if vr == "IS" and isinstance(value, float | np.floating):
        if not float(value).is_integer():
            raise ValueError(f"DICOM header {keyword} needs an integer, got {value!r}")
        return int(value)
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return value


def _image_type(header: Mapping[str, Any]) -> list[str]:
    """Philips-style magnitude ImageType from the scanning sequence."""
    seq = header.get("ScanningSequence") or ""
    if not isinstance(seq, str):
        seq = "\\".join(str(s) for s in seq)
    seq = seq.upper()
    if "IR" in seq:
        kind = "IR"
    elif "GR" in seq:
        kind = "FFE"
    elif "SE" in seq:
        kind = "SE"
    else:
        kind = "FFE"
    return ["ORIGINAL", "PRIMARY", f"M_{kind}", "M", kind]


def _geometry(affine: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """From a RAS affine: LPS 3x4 matrix, unit row/col cosines, and voxel spacings."""
    aff = np.asarray(affine, dtype=np.float64)
    if aff.shape != (4, 4) or not np.all(np.isfinite(aff)):
        raise ValueError(f"affine must be a finite 4x4 matrix, got shape {aff.shape}")
    lps = _LPS_FROM_RAS @ aff[:3, :4]
    axes = lps[:, :3]
    spacing = np.linalg.norm(axes, axis=0)
    if np.any(spacing <= 0):
        raise ValueError("affine has a zero-length voxel axis")
    unit = axes / spacing
    row, col, slc = unit[:, 0], unit[:, 1], unit[:, 2]
    if abs(row @ col) > 1e-4 or abs(row @ slc) > 1e-4 or abs(col @ slc) > 1e-4:
        raise ValueError("affine voxel axes are not orthogonal; DICOM cannot represent shear")
    return lps, row, col, spacing


def _prepare_out_dir(out_dir: Path) -> None:
    """Refuse to replace a folder that holds anything but a previous series of ours."""
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise FileExistsError(f"{out_dir} exists and is not a folder")
    foreign = [p.name for p in out_dir.iterdir() if not _FILE_RE.match(p.name)]
    if foreign:
        raise FileExistsError(
            f"{out_dir} holds files that are not part of a DICOM series written here "
            f"(e.g. {sorted(foreign)[0]!r}); refusing to replace it"
        )


def _swap_into_place(staging: Path, out_dir: Path) -> None:
    """Rename the finished staging folder onto ``out_dir`` (replacing an old series)."""
    if not out_dir.exists():
        os.replace(staging, out_dir)
        return
    trash = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old.", dir=out_dir.parent))
    trash.rmdir()
    os.replace(out_dir, trash)
    try:
        os.replace(staging, out_dir)
    except BaseException:
        os.replace(trash, out_dir)
        raise
    shutil.rmtree(trash, ignore_errors=True)


def write_dicom_series(
    out_dir: str | Path,
    volume: np.ndarray,
    affine: np.ndarray,
    *,
    header: Mapping[str, Any],
    echo_times_ms: Sequence[float] | None = None,
    max_stored: int = 4095,
    uid_seed: str = "",
    philips: PhilipsScaling | None = None,
) -> DicomSeriesInfo:
    """Write ``volume`` as one MR DICOM series in ``out_dir`` (``IM_0001.dcm``, ...).

    Parameters
    ----------
    out_dir
        Folder for this one series. Created if needed; an existing folder that only holds
        ``IM_*.dcm`` files (an earlier run) is replaced as a whole, anything else raises
        ``FileExistsError``. The series is written into a hidden staging folder beside
        ``out_dir`` and renamed into place, so a crash never leaves a half-written series.
    volume
        Non-negative float array ``(i, j, k)`` or ``(i, j, k, echo)``.
    affine
        4x4 voxel-to-RAS+ (mm) matrix, nibabel convention. Any orientation, any voxel size;
        the voxel axes must be orthogonal.
    header
        DICOM keywords -> values (``PatientName``, ``RepetitionTime`` in ms, ...). Every key
        is written; a value of ``None`` leaves the element out (also one this module would
        otherwise fill in, e.g. ``Manufacturer``). Geometry, pixel and UID-per-image
        elements are computed here and may not be supplied. ``SliceThickness`` defaults to
        the spacing along ``k``.
    echo_times_ms
        Required for a 4-D volume: one echo time per echo; each image gets its
        ``EchoTime`` and ``EchoNumbers``. For a 3-D volume it may hold one value, which
        then overrides ``header["EchoTime"]``.
    max_stored
        Largest stored pixel value (4095: 12 bits stored, as on Philips scanners).
    uid_seed
        UIDs are derived deterministically from this seed and the header (and, for the
        series, the image content), so the same inputs always give the same archive.
        ``StudyInstanceUID`` / ``FrameOfReferenceUID`` in ``header`` take precedence;
        series written with the same seed and same patient/study header share one study.
    philips
        ``None`` (default): ``volume`` is the displayed value, stored with RescaleSlope =
        max / ``max_stored``. A :class:`PhilipsScaling`: ``volume`` is the floating-point value
        FP; the series is stored as SV = round(FP · SS) with the given RS, RI = 0 and the
        private ScaleSlope SS (2005,100E) under its private creator, as a Philips scanner does.
    """
    out_dir = Path(out_dir)
    vol = np.asarray(volume)
    if vol.ndim not in (3, 4):
        raise ValueError(f"volume must be 3-D or 4-D, got shape {vol.shape}")
    if vol.size == 0:
        raise ValueError("volume is empty")
    vol = vol.astype(np.float64, copy=False)
    if not np.all(np.isfinite(vol)):
        raise ValueError("volume contains NaN or infinite values")
    if vol.min() < 0:
        raise ValueError(f"volume must be non-negative (minimum {vol.min():g})")
    four_d = vol.ndim == 4
    vol4 = vol if four_d else vol[..., np.newaxis]
    ni, nj, nk, ne = vol4.shape

    if four_d:
        if echo_times_ms is None or len(echo_times_ms) != ne:
            raise ValueError(f"a 4-D volume with {ne} echoes needs {ne} echo_times_ms")
    elif echo_times_ms is not None and len(echo_times_ms) != 1:
        raise ValueError("a 3-D volume takes at most one echo time")
    tes = None if echo_times_ms is None else [float(t) for t in echo_times_ms]
    if tes is not None and not all(np.isfinite(t) and t > 0 for t in tes):
        raise ValueError(f"echo times must be positive, got {tes}")

    max_stored = int(max_stored)
    if not 1 <= max_stored <= 65535:
        raise ValueError(f"max_stored must be in 1..65535, got {max_stored}")
    bits_stored = max(max_stored.bit_length(), 1)

    bad = sorted(_RESERVED.intersection(header))
    if bad:
        raise ValueError(f"header may not set computed DICOM elements: {', '.join(bad)}")
    unknown = sorted(k for k in header if tag_for_keyword(k) is None)
    if unknown:
        raise ValueError(f"unknown DICOM keywords in header: {', '.join(unknown)}")

    lps, row, col, spacing = _geometry(affine)
    normal = np.cross(row, col)

    # --- quantisation: one series-wide slope, intercept 0 --------------------------------
    vmax = float(vol4.max())
    scale_slope: float | None = None
    floating: np.ndarray | None = None
    if philips is None:
        slope_str = _ds(vmax / max_stored) if vmax > 0 else "1.0"
        slope = float(slope_str)
        stored = np.clip(np.rint(vol4 / slope), 0, max_stored).astype("<u2")
    else:
        slope_str, scale_slope = _philips_slopes(philips, vmax, max_stored)
        slope = float(slope_str)
        stored = np.clip(np.rint(vol4 * scale_slope), 0, max_stored).astype("<u2")
        floating = stored.astype(np.float64) / scale_slope
        if not four_d:
            floating = floating[..., 0]
    dequantised = stored.astype(np.float64) * slope
    if not four_d:
        dequantised = dequantised[..., 0]
    # (echo, k, j, i): each [e, k] block is one image in DICOM row-major order.
    pixels = np.ascontiguousarray(stored.transpose(3, 2, 1, 0))

    # --- header ---------------------------------------------------------------------------
    merged: dict[str, Any] = dict(_DEFAULTS)
    merged.update(header)
    merged = {k: v for k, v in merged.items() if v is not None}
    if "ImageType" not in header:
        merged["ImageType"] = _image_type(merged)
    if "SliceThickness" not in header:
        merged["SliceThickness"] = float(spacing[2])
    b0 = merged.get("MagneticFieldStrength")
    if "ImagingFrequency" not in header and b0 is not None:
        merged["ImagingFrequency"] = round(GYROMAGNETIC_MHZ_PER_T * float(b0), 6)
    for key in ("SeriesDate", "AcquisitionDate", "ContentDate"):
        if key not in header and "StudyDate" in merged:
            merged[key] = merged["StudyDate"]
    for key in ("SeriesTime", "AcquisitionTime", "ContentTime"):
        if key not in header and "StudyTime" in merged:
            merged[key] = merged["StudyTime"]

    study_uid = str(merged.get("StudyInstanceUID") or generate_uid(entropy_srcs=[
        "qmriflow-study", uid_seed, str(merged.get("PatientID", "")),
        str(merged.get("StudyDate", "")), str(merged.get("StudyTime", "")),
    ]))
    merged["StudyInstanceUID"] = study_uid
    if "FrameOfReferenceUID" not in merged:
        merged["FrameOfReferenceUID"] = generate_uid(entropy_srcs=["qmriflow-frame", study_uid])
    content = hashlib.sha256(pixels.tobytes())
    content.update(np.asarray(affine, dtype=np.float64).tobytes())
    series_uid = str(generate_uid(entropy_srcs=[
        "qmriflow-series", uid_seed, study_uid, str(merged.get("SeriesNumber", "")),
        str(merged.get("SeriesDescription", "")), str(merged.get("ProtocolName", "")),
        repr(tes), content.hexdigest(),
    ]))

    ds = Dataset()
    for keyword, value in merged.items():
        setattr(ds, keyword, _coerce(keyword, value))
    ds.SOPClassUID = MRImageStorage
    ds.SeriesInstanceUID = series_uid
    ds.ImageOrientationPatient = [_ds(v) for v in (*row, *col)]
    ds.PixelSpacing = [_ds(spacing[1]), _ds(spacing[0])]
    ds.SpacingBetweenSlices = _ds(spacing[2])
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = nj
    ds.Columns = ni
    ds.BitsAllocated = 16
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 0
    ds.RescaleIntercept = "0"
    ds.RescaleSlope = slope_str
    ds.RescaleType = "US"
    if scale_slope is not None:
        block = ds.private_block(_PHILIPS_GROUP, PHILIPS_PRIVATE_CREATOR, create=True)
        block.add_new(_PHILIPS_SCALE_INTERCEPT, "FL", 0.0)
        block.add_new(_PHILIPS_SCALE_SLOPE, "FL", scale_slope)

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MRImageStorage
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta

    # --- write ----------------------------------------------------------------------------
    _prepare_out_dir(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp",
                                    dir=out_dir.parent))
    n_images = nk * ne
    width = max(4, len(str(n_images)))
    names: list[str] = []
    try:
        instance = 0
        for e in range(ne):
            if tes is not None:
                ds.EchoTime = _ds(tes[e])
            ds.EchoNumbers = e + 1
            for k in range(nk):
                instance += 1
                position = lps @ np.array([0.0, 0.0, float(k), 1.0])
                sop_uid = generate_uid(entropy_srcs=[series_uid, str(instance)])
                ds.InstanceNumber = instance
                ds.SOPInstanceUID = sop_uid
                meta.MediaStorageSOPInstanceUID = sop_uid
                ds.ImagePositionPatient = [_ds(v) for v in position]
                ds.SliceLocation = _ds(position @ normal)
                ds[_PIXEL_DATA_TAG] = DataElement(_PIXEL_DATA_TAG, "OW", pixels[e, k].tobytes())
                name = f"IM_{instance:0{width}d}.dcm"
                ds.save_as(staging / name, enforce_file_format=True)
                names.append(name)
        _swap_into_place(staging, out_dir)
    except BaseException:
        with contextlib.suppress(OSError):
            shutil.rmtree(staging)
        raise

    return DicomSeriesInfo(
        files=[out_dir / n for n in names],
        rescale_slope=slope,
        rescale_intercept=0.0,
        dequantised=dequantised,
        series_instance_uid=series_uid,
        study_instance_uid=study_uid,
        scale_slope=scale_slope,
        floating=floating,
    )


def _philips_slopes(philips: PhilipsScaling, fp_max: float, max_stored: int) -> tuple[str, float]:
    """(RS as its DS string, SS as stored in a float32 FL element) for a series whose largest
    floating-point value is ``fp_max``."""
    rs = float(philips.rescale_slope)
    if not (np.isfinite(rs) and rs > 0):
        raise ValueError(f"Philips rescale slope must be positive, got {philips.rescale_slope!r}")
    rs_str = _ds(rs)
    if philips.scale_slope is not None:
        ss = float(np.float32(philips.scale_slope))
        if not (np.isfinite(ss) and ss > 0):
            raise ValueError(f"Philips scale slope must be positive, got {philips.scale_slope!r}")
        if fp_max * ss > max_stored + 0.5:
            raise ValueError(f"Philips scale slope {ss:g} stores the maximum {fp_max:g} as "
                             f"{fp_max * ss:.0f}, above max_stored {max_stored}")
        return rs_str, ss
    fill = float(philips.fill)
    if not 0 < fill <= 1:
        raise ValueError(f"Philips fill must be in (0, 1], got {philips.fill!r}")
    ss = float(np.float32(fill * max_stored / fp_max)) if fp_max > 0 else 1.0
    return rs_str, ss


def read_philips_scaling(ds: Dataset) -> tuple[float, float, float | None]:
    """(RS, RI, SS) of one image: RescaleSlope, RescaleIntercept and the private Philips
    ScaleSlope (``None`` when the image has none). FP = (SV · RS + RI) / (RS · SS)."""
    rs = float(ds.get("RescaleSlope", 1.0))
    ri = float(ds.get("RescaleIntercept", 0.0))
    try:
        block = ds.private_block(_PHILIPS_GROUP, PHILIPS_PRIVATE_CREATOR)
        ss: float | None = float(block[_PHILIPS_SCALE_SLOPE].value)
    except KeyError:
        ss = None
    return rs, ri, ss
