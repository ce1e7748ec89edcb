"""Conversion of one session (ingest_session): structural checks of every converted image.

Issue 24 finding 4: a 1-slice T2w passed discovery, conversion, parameter checks and
registration, and failed at N4 naming the T1w file. It must fail at conversion, naming the
series' role and the reason, in one line.
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from qmriflow.archive.ingest import MAX_VOXEL_MM, MIN_MATRIX, MIN_SLICES, ingest_session
from qmriflow.errors import InputError

SUB, SES = "ab12", "v1"
LABEL = f"sub-{SUB}_ses-{SES}"
META = {
    "T1w": {"RepetitionTime": 0.0052, "EchoTime": 0.0023, "FlipAngle": 10,
            "MagneticFieldStrength": 3, "ImageType": ["ORIGINAL", "PRIMARY", "M"]},
    "T2w": {"RepetitionTime": 4.0, "EchoTime": 0.08, "FlipAngle": 90,
            "MagneticFieldStrength": 3, "ImageType": ["ORIGINAL", "PRIMARY", "M"]},
    "FLAIR": {"RepetitionTime": 4.8, "EchoTime": 0.3, "InversionTime": 1.65, "FlipAngle": 90,
              "MagneticFieldStrength": 3, "ImageType": ["ORIGINAL", "PRIMARY", "M"]},
}


def _head(shape) -> np.ndarray:
    idx = np.indices(shape, dtype=float)
    c = [(n - 1) / 2 for n in shape]
    r = np.sqrt(sum(((idx[i] - c[i]) / max(c[i], 1)) ** 2 for i in range(3)))
    return np.where(r < 0.9, 300.0 + 50 * idx[0] / shape[0], 0.0).astype(np.float32)


def _bids_session(root: Path, t2w: np.ndarray | None = None,
                  t2w_voxel=(0.9, 0.9, 4.0)) -> tuple[list[dict], list[dict]]:
    """A BIDS session of T1w, T2w and FLAIR (48 x 48 x 12 unless ``t2w`` is given) and the
    discovery's rows for it."""
    anat = root / f"sub-{SUB}" / f"ses-{SES}" / "anat"
    anat.mkdir(parents=True)
    rows = []
    for k, suffix in enumerate(("T1w", "T2w", "FLAIR"), start=1):
        data = t2w if suffix == "T2w" and t2w is not None else _head((48, 48, 12))
        voxel = t2w_voxel if suffix == "T2w" else (2.0, 2.0, 2.0)
        nii = anat / f"{LABEL}_{suffix}.nii.gz"
        nib.save(nib.Nifti1Image(data, np.diag([*voxel, 1.0])), nii)
        nii.with_name(nii.name.replace(".nii.gz", ".json")).write_text(json.dumps(META[suffix]))
        rows.append({"subject": SUB, "session": SES, "series_id": f"{k:04d}abcdef",
                     "folder": nii.relative_to(root).as_posix(), "series_number": k,
                     "role": suffix.lower(), "selected": True})
    sessions = [{"subject": SUB, "session": SES, "status": "ok", "t1w": rows[0]["series_id"],
                 "t2w": rows[1]["series_id"], "flair": rows[2]["series_id"], "megre": ""}]
    return sessions, rows


def _ingest(root: Path, sessions, rows, fmt="bids"):
    return ingest_session(SUB, SES, sessions, rows, root, root / "out" / LABEL,
                          input_format=fmt, salt="s")


def test_a_good_session_converts_with_shapes(tmp_path):
    summary = _ingest(tmp_path, *_bids_session(tmp_path))
    t2w = next(im for im in summary["images"] if im["role"] == "t2w")
    assert t2w["shape"] == [48, 48, 12] and t2w["voxel_mm"] == [0.9, 0.9, 4.0]


def _nan_t2w() -> np.ndarray:
    a = _head((48, 48, 12))
    a[10:20, 10:20, 5] = np.nan
    return a


@pytest.mark.parametrize(("t2w", "voxel", "reason"), [
    (_head((48, 48, 1)), (0.9, 0.9, 4.0),
     f"T2w: 1 slice(s); a brain T2w series needs at least {MIN_SLICES}"),
    (_head((48, 48, 2)), (0.9, 0.9, 4.0), "T2w: 2 slice(s)"),
    (_nan_t2w(), (0.9, 0.9, 4.0), "T2w: 100 of 27648 voxels are not finite numbers"),
    (np.zeros((48, 48, 12), np.float32), (0.9, 0.9, 4.0),
     "T2w: empty image: every voxel is 0"),
    (np.full((48, 48, 12), 7.0, np.float32), (0.9, 0.9, 4.0),
     "T2w: constant image: every voxel is 7"),
    (_head((48, 16, 12)), (0.9, 0.9, 4.0), f"T2w: in-plane matrix 48 x 16; at least {MIN_MATRIX}"),
    (_head((48, 48, 12)), (0.9, 0.9, 40.0), f"at most {MAX_VOXEL_MM:g} mm per axis"),
])
def test_unusable_t2w_fails_at_conversion_naming_role_and_reason(tmp_path, t2w, voxel, reason):
    sessions, rows = _bids_session(tmp_path, t2w, voxel)
    with pytest.raises(InputError) as ei:
        _ingest(tmp_path, sessions, rows)
    msg = str(ei.value)
    assert msg.startswith(f"session {LABEL}: series 2 (0002abcdef): T2w: "), msg
    assert reason in msg and "\n" not in msg
    assert not (tmp_path / "out" / LABEL).exists()  # nothing half-converted left behind


def test_one_slice_dicom_t2w_fails_at_conversion(tmp_path):
    """The DICOM path (dcm2niix) checks its outputs as the BIDS copy does."""
    from qmriflow.phantom.dicomio import write_dicom_series

    header = {"Manufacturer": "Philips", "MagneticFieldStrength": 3, "MRAcquisitionType": "2D",
              "ScanningSequence": "SE", "SequenceVariant": "SK", "RepetitionTime": 4000.0,
              "EchoTime": 80.0, "FlipAngle": 90.0, "PatientID": "P1", "PatientName": "A^B"}
    rows = []
    for k, (role, shape) in enumerate((("t1w", (48, 48, 12)), ("t2w", (48, 48, 1)),
                                       ("flair", (48, 48, 12))), start=1):
        info = write_dicom_series(tmp_path / "archive" / role, _head(shape),
                                  np.diag([2.0, 2.0, 4.0, 1.0]),
                                  header={**header, "SeriesNumber": k}, uid_seed=role)
        import pydicom

        uid = str(pydicom.dcmread(info.files[0], stop_before_pixels=True).SeriesInstanceUID)
        rows.append({"subject": SUB, "session": SES, "series_id": f"{k:04d}abcdef",
                     "folder": role, "series_uid": uid, "series_number": k, "role": role})
    sessions = [{"subject": SUB, "session": SES, "status": "ok", "t1w": rows[0]["series_id"],
                 "t2w": rows[1]["series_id"], "flair": rows[2]["series_id"], "megre": ""}]
    with pytest.raises(InputError) as ei:
        ingest_session(SUB, SES, sessions, rows, tmp_path / "archive", tmp_path / "out" / LABEL)
    assert str(ei.value) == (f"session {LABEL}: series 2 (0002abcdef): T2w: 1 slice(s); a "
                             f"brain T2w series needs at least {MIN_SLICES}")
    assert not (tmp_path / "out" / LABEL).exists()
