"""run_dcm2niix against the real dcm2niix, fed by write_dicom_series."""

from __future__ import annotations

import gzip
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from qmriflow.archive.convert import (
    ConvertedImage,
    dcm2niix_version,
    run_dcm2niix,
    sidecar_times_ms,
)
from qmriflow.errors import ConfigError, InputError, QmriflowError, ToolError
from qmriflow.phantom.dicomio import write_dicom_series


def rotation(ax_deg: float, ay_deg: float) -> np.ndarray:
    a, b = np.deg2rad(ax_deg), np.deg2rad(ay_deg)
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    return rx @ ry


# (columns = RAS directions of voxel axes i, j, k), voxel sizes, matrix
CASES = {
    # i->R, j->A, k->S
    "axial": (np.eye(3), (0.9, 1.2, 4.0), (48, 40, 12)),
    # i->A, j->S, k->L (left-handed)
    "sagittal": (np.array([[0, 0, -1], [1, 0, 0], [0, 1, 0]], float), (1.1, 0.9, 3.5),
                 (40, 46, 10)),
    # i->R, j->S, k->P
    "coronal": (np.array([[1, 0, 0], [0, 0, -1], [0, 1, 0]], float), (0.9, 0.8, 4.0),
                (44, 50, 11)),
    # axial tilted 10 deg about x and -12 deg about y
    "oblique": (rotation(10.0, -12.0), (0.9, 1.2, 4.0), (46, 38, 9)),
}

BASE_HEADER = {
    "PatientName": "Test^Phantom",
    "PatientID": "P0001",
    "PatientBirthDate": "19700101",
    "StudyDate": "20240315",
    "StudyTime": "101500.00",
    "Manufacturer": "Philips",
    "ManufacturerModelName": "Ingenia Elition X",
    "MagneticFieldStrength": 3,
    "MRAcquisitionType": "2D",
    "ScanningSequence": "SE",
    "SequenceVariant": "SK",
    "RepetitionTime": 3000.0,
    "EchoTime": 80.0,
    "FlipAngle": 90.0,
    "SeriesNumber": 301,
    "SeriesDescription": "T2W TSE",
    "ProtocolName": "T2W_TSE",
}


def make_affine(directions, spacing, shape, centre=(3.0, -12.0, 20.0)) -> np.ndarray:
    aff = np.eye(4)
    aff[:3, :3] = directions @ np.diag(spacing)
    half = (np.array(shape) - 1) / 2
    aff[:3, 3] = np.asarray(centre) - aff[:3, :3] @ half
    return aff


def world(aff: np.ndarray, shape) -> np.ndarray:
    ijk = np.indices(shape).reshape(3, -1)
    return (aff[:3, :3] @ ijk + aff[:3, 3:4]).T.reshape(*shape, 3)


def blob_volume(aff: np.ndarray, shape) -> np.ndarray:
    """Two off-centre Gaussian blobs (peaks 1000 and 500), cut off so they stay apart."""
    xyz = world(aff, shape)
    ext = np.abs(aff[:3, :3]) @ (np.array(shape) - 1)
    centre = aff[:3, :3] @ ((np.array(shape) - 1) / 2) + aff[:3, 3]
    vol = np.zeros(shape)
    for peak, offset, sigma in [(1000.0, (-0.22, 0.18, -0.15), 4.0),
                                (500.0, (0.2, -0.2, 0.17), 5.0)]:
        c = centre + np.asarray(offset) * ext
        d2 = np.sum((xyz - c) ** 2, axis=-1)
        g = peak * np.exp(-d2 / (2 * sigma**2))
        g[d2 > (2.5 * sigma) ** 2] = 0
        vol += g
    return vol


def blob_centres_mm(data: np.ndarray, aff: np.ndarray) -> list[np.ndarray]:
    """World centre of mass of each connected blob, brightest blob first."""
    labels, n = ndimage.label(data > 1.0)
    assert n == 2
    peaks = ndimage.maximum(data, labels, range(1, n + 1))
    coms = ndimage.center_of_mass(data, labels, range(1, n + 1))
    order = np.argsort(peaks)[::-1]
    return [aff[:3, :3] @ np.asarray(coms[i]) + aff[:3, 3] for i in order]


def values_on_input_grid(img: nib.Nifti1Image, in_aff: np.ndarray, shape) -> np.ndarray:
    """Output data at the input voxels; the grids must coincide up to flips/permutations."""
    m = np.linalg.inv(img.affine) @ in_aff
    assert np.allclose(m[:3, :3], np.round(m[:3, :3]), atol=1e-4)
    rot = np.round(m[:3, :3])
    assert sorted(np.abs(rot).sum(axis=0)) == [1, 1, 1]
    assert sorted(np.abs(rot).sum(axis=1)) == [1, 1, 1]
    ijk = np.indices(shape).reshape(3, -1)
    out_ijk = m[:3, :3] @ ijk + m[:3, 3:4]
    assert np.max(np.abs(out_ijk - np.round(out_ijk))) < 1e-3  # voxel centres coincide
    idx = np.round(out_ijk).astype(int)
    data = img.get_fdata()
    assert tuple(sorted(data.shape)) == tuple(sorted(shape))
    return data[idx[0], idx[1], idx[2]].reshape(shape)


def _convert_one(tmp_path, volume, aff, header, **kwargs):
    info = write_dicom_series(tmp_path / "dicom", volume, aff, header=header, uid_seed="t",
                              **kwargs)
    results = run_dcm2niix(tmp_path / "dicom", tmp_path / "nifti")
    return info, results


def test_version():
    assert re.fullmatch(r"v\d+\.\d+\.\d{8}\S*", dcm2niix_version())


@pytest.mark.parametrize("case", list(CASES))
def test_round_trip_geometry_and_values(tmp_path, case):
    directions, spacing, shape = CASES[case]
    aff = make_affine(directions, spacing, shape)
    vol = blob_volume(aff, shape)
    info, results = _convert_one(tmp_path, vol, aff, BASE_HEADER)
    assert len(results) == 1
    res = results[0]
    assert isinstance(res, ConvertedImage)
    assert res.nifti == tmp_path / "nifti" / "301_T2W_TSE.nii.gz"
    assert res.sidecar == tmp_path / "nifti" / "301_T2W_TSE.json"
    assert sorted(p.name for p in (tmp_path / "nifti").iterdir()) == [
        "301_T2W_TSE.json", "301_T2W_TSE.nii.gz"]
    img = nib.load(res.nifti)
    # voxel sizes survive (in some order)
    np.testing.assert_allclose(sorted(img.header.get_zooms()[:3]), sorted(spacing), atol=1e-4)
    # blob centres land at the same world coordinates
    for c_in, c_out in zip(blob_centres_mm(info.dequantised, aff),
                           blob_centres_mm(img.get_fdata(), img.affine), strict=True):
        assert np.linalg.norm(c_in - c_out) < 0.5, (case, c_in, c_out)
    # every voxel value survives, at the same world position
    on_grid = values_on_input_grid(img, aff, shape)
    np.testing.assert_allclose(on_grid, info.dequantised, rtol=1e-6, atol=1e-9)
    # the series-wide DICOM slope became the NIfTI scl_slope (float32)
    assert img.dataobj.slope == pytest.approx(info.rescale_slope, rel=1e-6)
    assert img.dataobj.inter == 0.0
    assert np.issubdtype(img.get_data_dtype(), np.integer)


def test_sidecar_parameters(tmp_path):
    aff = make_affine(*CASES["axial"][:2], (24, 20, 6))
    vol = blob_volume(aff, (24, 20, 6))
    header = {**BASE_HEADER, "ScanningSequence": ["SE", "IR"], "SequenceVariant": ["SK"],
              "RepetitionTime": 9000.0, "EchoTime": 120.0, "InversionTime": 2500.0,
              "FlipAngle": 110.0, "SeriesDescription": "FLAIR", "SeriesNumber": 7}
    _, (ir,) = _convert_one(tmp_path / "ir", vol, aff, header)
    meta = ir.metadata
    assert ir.nifti.name == "7_FLAIR.nii.gz"
    assert meta["RepetitionTime"] == pytest.approx(9.0)
    assert meta["EchoTime"] == pytest.approx(0.12)
    assert meta["InversionTime"] == pytest.approx(2.5)
    assert meta["FlipAngle"] == pytest.approx(110.0)
    assert meta["Manufacturer"] == "Philips"
    assert meta["ManufacturersModelName"] == "Ingenia Elition X"
    assert meta["MRAcquisitionType"] == "2D"
    assert meta["MagneticFieldStrength"] == 3
    assert sidecar_times_ms(meta) == {"RepetitionTime": 9000.0, "EchoTime": 120.0,
                                      "InversionTime": 2500.0}

    header = {**BASE_HEADER, "MRAcquisitionType": "3D", "ScanningSequence": "GR",
              "SequenceVariant": "SP", "RepetitionTime": 8.1, "EchoTime": 3.7,
              "FlipAngle": 8.0, "InversionTime": None, "SeriesDescription": "T1W_3D",
              "ManufacturerModelName": "Achieva dStream"}
    _, (t1,) = _convert_one(tmp_path / "t1", vol, aff, header)
    meta = t1.metadata
    assert meta["RepetitionTime"] == pytest.approx(0.0081)
    assert meta["EchoTime"] == pytest.approx(0.0037)
    assert "InversionTime" not in meta
    assert meta["FlipAngle"] == pytest.approx(8.0)
    assert meta["MRAcquisitionType"] == "3D"
    assert meta["ManufacturersModelName"] == "Achieva dStream"
    times = sidecar_times_ms(meta)
    assert times["RepetitionTime"] == pytest.approx(8.1)
    assert times["EchoTime"] == pytest.approx(3.7)
    assert times["InversionTime"] is None


def test_multi_echo_split(tmp_path):
    shape = (32, 28, 6)
    aff = make_affine(*CASES["oblique"][:2], shape)
    base = blob_volume(aff, shape)
    tes = [1.15 * n for n in range(1, 7)]
    vol = np.stack([base * np.exp(-te / 8.0) for te in tes], axis=-1)
    header = {**BASE_HEADER, "MRAcquisitionType": "3D", "ScanningSequence": "GR",
              "SequenceVariant": "SS", "RepetitionTime": 12.0, "FlipAngle": 12.0,
              "EchoTrainLength": 6, "SeriesNumber": 601, "SeriesDescription": "mFFE",
              "EchoTime": None}
    info, results = _convert_one(tmp_path, vol, aff, header, echo_times_ms=tes)
    assert [r.nifti.name for r in results] == [f"601_mFFE_e{n}.nii.gz" for n in range(1, 7)]
    for e, res in enumerate(results):
        assert res.metadata["EchoTime"] == pytest.approx(tes[e] / 1000, abs=1e-9)
        assert res.metadata["EchoNumber"] == e + 1
        assert sidecar_times_ms(res.metadata)["EchoTime"] == pytest.approx(tes[e])
        img = nib.load(res.nifti)
        assert img.shape == shape
        np.testing.assert_allclose(values_on_input_grid(img, aff, shape),
                                   info.dequantised[..., e], rtol=1e-6, atol=1e-9)


def _all_bytes(folder: Path) -> dict[str, bytes]:
    out = {}
    for p in folder.rglob("*"):
        if p.is_file():
            raw = p.read_bytes()
            out[str(p.relative_to(folder))] = gzip.decompress(raw) if p.suffix == ".gz" else raw
    return out


def test_anonymised_outputs_carry_no_patient_identifiers(tmp_path):
    canaries = {"PatientName": "CANARYxyz^PHI", "PatientID": "CANARY123",
                "PatientBirthDate": "19000101"}
    header = {**BASE_HEADER, **canaries, "OtherPatientIDs": "CANARY456",
              "ImageComments": "CANARYcomment", "SeriesDescription": "T1W_SE"}
    aff = make_affine(*CASES["axial"][:2], (20, 16, 4))
    vol = blob_volume(aff, (20, 16, 4))
    write_dicom_series(tmp_path / "dicom", vol, aff, header=header, uid_seed="c")
    assert b"CANARY" in (tmp_path / "dicom" / "IM_0001.dcm").read_bytes()  # canary is live
    logged: list[str] = []
    results = run_dcm2niix(tmp_path / "dicom", tmp_path / "nifti", log=logged.append)
    assert len(results) == 1 and logged
    contents = _all_bytes(tmp_path / "nifti")
    assert set(contents) == {"301_T1W_SE.nii.gz", "301_T1W_SE.json"}
    for name, data in contents.items():
        for needle in ("canary", "19000101", "1900-01-01"):
            assert needle not in name.lower()
            assert needle.encode() not in data.lower(), (name, needle)
    for line in logged:
        assert "canary" not in line.lower() and "19000101" not in line
    assert "PatientName" not in results[0].metadata


def test_identifying_filename_tokens_refused(tmp_path):
    (tmp_path / "dicom").mkdir()
    for pattern in ("%n_%s", "%i", "%f_%s", "%t_%s", "sub/%s", ""):
        with pytest.raises(ConfigError):
            run_dcm2niix(tmp_path / "dicom", tmp_path / "nifti", filename=pattern)


def _assert_one_line_failure(exc_info, series_dir: Path, out_dir: Path):
    msg = str(exc_info.value)
    assert isinstance(exc_info.value, QmriflowError)
    assert "\n" not in msg and str(series_dir) in msg
    assert not out_dir.exists()  # nothing left behind, not even the folder
    return msg


def test_random_bytes_series_fails_cleanly(tmp_path):
    series = tmp_path / "corrupt"
    series.mkdir()
    (series / "IM_0001.dcm").write_bytes(np.random.default_rng(1).bytes(5000))
    with pytest.raises(InputError) as exc_info:
        run_dcm2niix(series, tmp_path / "out")
    msg = _assert_one_line_failure(exc_info, series, tmp_path / "out")
    assert "Unable to find any DICOM images" in msg


def test_truncated_series_fails_cleanly(tmp_path):
    vol = np.random.default_rng(2).random((64, 64, 4)) * 100
    info = write_dicom_series(tmp_path / "trunc", vol, np.eye(4),
                              header={**BASE_HEADER, "PatientName": "CANARYxyz^PHI"})
    raw = info.files[2].read_bytes()
    info.files[2].write_bytes(raw[: len(raw) // 2])
    with pytest.raises(InputError) as exc_info:
        run_dcm2niix(tmp_path / "trunc", tmp_path / "out")
    msg = _assert_one_line_failure(exc_info, tmp_path / "trunc", tmp_path / "out")
    assert "IM_0003.dcm" in msg and "canary" not in msg.lower()


def test_empty_and_missing_folders(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError) as exc_info:
        run_dcm2niix(tmp_path / "empty", tmp_path / "out")
    _assert_one_line_failure(exc_info, tmp_path / "empty", tmp_path / "out")
    with pytest.raises(InputError) as exc_info:
        run_dcm2niix(tmp_path / "missing", tmp_path / "out2")
    _assert_one_line_failure(exc_info, tmp_path / "missing", tmp_path / "out2")


def test_timeout_is_a_tool_error(tmp_path):
    info = write_dicom_series(tmp_path / "dicom", np.ones((16, 16, 4)), np.eye(4), header={})
    with pytest.raises(ToolError, match="timed out") as exc_info:
        run_dcm2niix(info.files[0].parent, tmp_path / "out", timeout_s=0.001)
    _assert_one_line_failure(exc_info, tmp_path / "dicom", tmp_path / "out")


def test_sidecar_times_ms_handles_absent_and_lists():
    assert sidecar_times_ms({}) == {"RepetitionTime": None, "EchoTime": None,
                                    "InversionTime": None}
    assert sidecar_times_ms({"EchoTime": [0.00115, 0.0023], "RepetitionTime": 0.02}) == {
        "RepetitionTime": 20.0, "EchoTime": [1.15, 2.3], "InversionTime": None}


def test_patient_identifiers_are_scrubbed_from_messages_and_logs(tmp_path):
    from qmriflow.archive.convert import _phi_strings, _scrub

    header = {**BASE_HEADER, "PatientName": "CANARYxyz^PHIgiven", "PatientID": "CANARY123",
              "PatientBirthDate": "19000101"}
    write_dicom_series(tmp_path / "dicom", np.ones((8, 8, 2)), np.eye(4), header=header)
    phi = _phi_strings(tmp_path / "dicom")
    line = "Warning: CANARYxyz^PHIgiven (canary123) PHIgiven born 19000101 in IM_0001.dcm"
    scrubbed = _scrub(line, phi)
    assert "canary" not in scrubbed.lower() and "phigiven" not in scrubbed.lower()
    assert "19000101" not in scrubbed and "IM_0001.dcm" in scrubbed
    log_file = tmp_path / "logs" / "dcm2niix.log"
    log_file.parent.mkdir()
    run_dcm2niix(tmp_path / "dicom", tmp_path / "nifti", log=log_file)
    text = log_file.read_text()
    assert "running:" in text and "-ba y" in text and "Convert 2 DICOM" in text
    assert "canary" not in text.lower()


def test_free_text_identifiers_are_scrubbed_from_real_sidecars(tmp_path):
    """Real Philips data: StudyDescription repeats the PatientID; -ba y alone keeps it."""
    import pydicom

    from tests.conftest import SHARED_DATA

    series = SHARED_DATA / "dicom" / "philips_mprage_3d"
    if not series.is_dir():
        pytest.skip(f"{series} not present (shared test data)")
    first = sorted(series.iterdir())[0]
    ds = pydicom.dcmread(first, stop_before_pixels=True)
    pid = str(ds.PatientID)
    free_text = str(ds.get("StudyDescription", "")) + str(
        ds.get("PerformedProcedureStepDescription", ""))
    assert pid and pid in free_text  # the test can fail: the identifier is really there
    out = run_dcm2niix(series, tmp_path / "out")
    for im in out:
        for f in (im.nifti, im.sidecar):
            data = f.read_bytes()
            if f.name.endswith(".gz"):
                data = gzip.decompress(data)
            assert pid.encode() not in data, f.name
        assert "StudyDescription" not in im.metadata or pid not in im.metadata["StudyDescription"]
        assert im.metadata["RepetitionTime"] == pytest.approx(0.006501, abs=1e-6)
