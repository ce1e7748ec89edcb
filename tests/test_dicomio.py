"""write_dicom_series: geometry tags, quantisation, header, UIDs, multi-echo, safety."""

from __future__ import annotations

import time

import numpy as np
import pydicom
import pytest
from pydicom.uid import UID, ExplicitVRLittleEndian, MRImageStorage

from qmriflow.phantom.dicomio import (
    PHILIPS_PRIVATE_CREATOR,
    DicomSeriesInfo,
    PhilipsScaling,
    read_philips_scaling,
    write_dicom_series,
)

LPS = np.diag([-1.0, -1.0, 1.0])


def rotation(ax_deg: float, ay_deg: float) -> np.ndarray:
    a, b = np.deg2rad(ax_deg), np.deg2rad(ay_deg)
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    return rx @ ry


def oblique_affine(spacing=(0.9, 1.2, 4.0), origin=(-21.5, 14.25, -30.0)) -> np.ndarray:
    aff = np.eye(4)
    aff[:3, :3] = rotation(10.0, -12.0) @ np.diag(spacing)
    aff[:3, 3] = origin
    return aff


HEADER = {
    "PatientName": "Test^Phantom",
    "PatientID": "P0001",
    "PatientBirthDate": "19700101",
    "PatientSex": "O",
    "StudyDate": "20240315",
    "StudyTime": "101500.00",
    "SeriesDescription": "T2W_TSE",
    "ProtocolName": "T2W_TSE",
    "SeriesNumber": 401,
    "Manufacturer": "Philips",
    "ManufacturerModelName": "Ingenia Elition X",
    "MagneticFieldStrength": 3,
    "MRAcquisitionType": "2D",
    "ScanningSequence": "SE",
    "SequenceVariant": "SK",
    "RepetitionTime": 4200.0,
    "EchoTime": 90.0,
    "InversionTime": None,
    "FlipAngle": 90.0,
    "EchoTrainLength": 15,
    "PixelBandwidth": 220.5,
    "SoftwareVersions": "5.7.1",
    "InstitutionName": "Test Hospital",
}


def _volume(shape, seed=0, scale=1234.5):
    rng = np.random.default_rng(seed)
    return rng.random(shape) * scale


def _read(info: DicomSeriesInfo) -> list[pydicom.Dataset]:
    return [pydicom.dcmread(f) for f in info.files]


def test_geometry_tags_follow_affine(tmp_path):
    aff = oblique_affine()
    vol = _volume((20, 24, 6))
    info = write_dicom_series(tmp_path / "s", vol, aff, header=HEADER, uid_seed="geo")
    assert [f.name for f in info.files] == [f"IM_{n:04d}.dcm" for n in range(1, 7)]
    lps = LPS @ aff[:3, :4]
    row = lps[:, 0] / 0.9
    col = lps[:, 1] / 1.2
    normal = np.cross(row, col)
    for k, ds in enumerate(_read(info)):
        assert ds.Rows == 24 and ds.Columns == 20
        np.testing.assert_allclose([float(v) for v in ds.PixelSpacing], [1.2, 0.9], atol=1e-12)
        assert float(ds.SpacingBetweenSlices) == pytest.approx(4.0)
        assert float(ds.SliceThickness) == pytest.approx(4.0)
        iop = np.array([float(v) for v in ds.ImageOrientationPatient])
        np.testing.assert_allclose(iop[:3], row, atol=1e-12)
        np.testing.assert_allclose(iop[3:], col, atol=1e-12)
        ipp = np.array([float(v) for v in ds.ImagePositionPatient])
        np.testing.assert_allclose(ipp, lps @ [0, 0, k, 1], atol=1e-9)
        assert float(ds.SliceLocation) == pytest.approx(ipp @ normal, abs=1e-9)
        # DICOM's own voxel -> patient mapping reproduces the NIfTI affine (in LPS)
        for i, j in [(0, 0), (19, 0), (0, 23), (7, 11)]:
            p = ipp + i * 0.9 * iop[:3] + j * 1.2 * iop[3:]
            np.testing.assert_allclose(p, lps @ [i, j, k, 1], atol=1e-9)
        # pixel_array[r, c] == volume[c, r, k]
        np.testing.assert_allclose(ds.pixel_array * info.rescale_slope,
                                   info.dequantised[:, :, k].T, rtol=0, atol=1e-9)


def test_quantisation_uses_one_series_slope(tmp_path):
    vol = _volume((16, 12, 5), scale=873.25)
    vol[3, 4, 2] = 2000.0  # series max on one slice only
    info = write_dicom_series(tmp_path / "q", vol, np.eye(4), header={}, uid_seed="q")
    assert info.rescale_slope == pytest.approx(2000.0 / 4095, rel=1e-12)
    assert info.rescale_intercept == 0.0
    assert np.max(np.abs(info.dequantised - vol)) <= info.rescale_slope / 2 + 1e-9
    stored_max = 0
    for ds in _read(info):
        assert float(ds.RescaleSlope) == info.rescale_slope
        assert float(ds.RescaleIntercept) == 0.0
        assert (ds.BitsAllocated, ds.BitsStored, ds.HighBit) == (16, 12, 11)
        assert ds.PixelRepresentation == 0 and ds.PhotometricInterpretation == "MONOCHROME2"
        assert ds.pixel_array.dtype == np.uint16
        stored_max = max(stored_max, int(ds.pixel_array.max()))
    assert stored_max == 4095
    # stored * slope is exactly the returned dequantised volume
    stored = np.stack([ds.pixel_array.T for ds in _read(info)], axis=-1)
    np.testing.assert_array_equal(stored * info.rescale_slope, info.dequantised)


def test_philips_scaling_stores_fp_with_private_scale_slope(tmp_path):
    """SV = round(FP·SS); DV = SV·RS + RI; FP = DV / (RS·SS) with SS in (2005,100E)."""
    fp = _volume((14, 10, 4), scale=517.3) + 3.0
    info = write_dicom_series(tmp_path / "p", fp, oblique_affine(), header=HEADER,
                              uid_seed="p", philips=PhilipsScaling(rescale_slope=2.37, fill=0.8))
    ss = info.scale_slope
    assert ss == pytest.approx(0.8 * 4095 / fp.max(), rel=1e-6)
    assert ss == float(np.float32(ss))  # what the FL element holds
    assert (info.rescale_slope, info.rescale_intercept) == (2.37, 0.0)
    stored = np.stack([d.pixel_array.T for d in _read(info)], axis=-1)
    assert stored.max() == round(0.8 * 4095)
    np.testing.assert_array_equal(stored * 2.37, info.dequantised)  # DV
    np.testing.assert_allclose(info.floating, stored / ss, rtol=1e-15)
    assert np.abs(info.floating - fp).max() <= 0.5 / ss + 1e-9  # FP to half a stored step
    for ds in _read(info):
        assert ds[0x2005, 0x0010].value == PHILIPS_PRIVATE_CREATOR
        assert ds[0x2005, 0x100E].VR == "FL" and ds[0x2005, 0x100E].value == ss
        rs, ri, ss_read = read_philips_scaling(ds)
        assert (rs, ri, ss_read) == (2.37, 0.0, ss)
        dv = ds.pixel_array * rs + ri
        np.testing.assert_allclose(dv / (rs * ss_read),
                                   info.floating[:, :, int(ds.InstanceNumber) - 1].T)
    # an explicit scale slope is used as given; the default writes no private scale slope
    info2 = write_dicom_series(tmp_path / "p2", fp, np.eye(4), header={},
                               philips=PhilipsScaling(rescale_slope=1.0, scale_slope=4.0))
    assert info2.scale_slope == 4.0
    plain = write_dicom_series(tmp_path / "p3", fp, np.eye(4), header={})
    assert plain.scale_slope is None and plain.floating is None
    assert read_philips_scaling(pydicom.dcmread(plain.files[0]))[2] is None


@pytest.mark.parametrize(
    ("scaling", "match"),
    [
        (PhilipsScaling(rescale_slope=0.0), "rescale slope"),
        (PhilipsScaling(rescale_slope=1.0, fill=1.5), "fill"),
        (PhilipsScaling(rescale_slope=1.0, scale_slope=-1.0), "scale slope"),
        (PhilipsScaling(rescale_slope=1.0, scale_slope=100.0), "max_stored"),
    ],
)
def test_philips_scaling_rejects_bad_values(tmp_path, scaling, match):
    with pytest.raises(ValueError, match=match):
        write_dicom_series(tmp_path / "bad", np.full((4, 4, 2), 50.0), np.eye(4), header={},
                           philips=scaling)
    assert list(tmp_path.iterdir()) == []


def test_all_zero_volume_and_custom_max_stored(tmp_path):
    info = write_dicom_series(tmp_path / "z", np.zeros((8, 8, 3)), np.eye(4), header={})
    assert info.rescale_slope > 0
    assert not info.dequantised.any()
    assert all(not ds.pixel_array.any() for ds in _read(info))

    info = write_dicom_series(tmp_path / "m", _volume((8, 8, 3)), np.eye(4), header={},
                              max_stored=1023)
    ds = _read(info)[0]
    assert (ds.BitsStored, ds.HighBit) == (10, 9)
    assert max(int(d.pixel_array.max()) for d in _read(info)) == 1023


def test_header_and_scanner_defaults(tmp_path):
    vol = _volume((10, 12, 3))
    info = write_dicom_series(tmp_path / "h", vol, oblique_affine(), uid_seed="h",
                              header={**HEADER, "SliceThickness": 3.0})
    raw = info.files[0].read_bytes()
    assert raw[:128] == b"\0" * 128 and raw[128:132] == b"DICM"
    ds = pydicom.dcmread(info.files[0])
    assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert ds.file_meta.MediaStorageSOPClassUID == MRImageStorage
    assert ds.SOPClassUID == MRImageStorage
    assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    assert str(ds.PatientName) == "Test^Phantom" and ds.PatientID == "P0001"
    assert ds.SeriesNumber == 401 and ds.SeriesDescription == "T2W_TSE"
    assert float(ds.RepetitionTime) == 4200.0 and float(ds.EchoTime) == 90.0
    assert float(ds.FlipAngle) == 90.0 and ds.EchoTrainLength == 15
    assert float(ds.PixelBandwidth) == 220.5
    assert ds.ManufacturerModelName == "Ingenia Elition X"
    assert "InversionTime" not in ds
    assert float(ds.SliceThickness) == 3.0  # caller's value wins
    assert float(ds.SpacingBetweenSlices) == pytest.approx(4.0)
    assert float(ds.ImagingFrequency) == pytest.approx(42.577478 * 3, abs=1e-6)
    assert ds.Modality == "MR" and ds.PatientPosition == "HFS" and ds.ImagedNucleus == "1H"
    assert list(ds.ImageType) == ["ORIGINAL", "PRIMARY", "M_SE", "M", "SE"]
    assert ds.EchoNumbers == 1 and ds.InstanceNumber == 1 and ds.AcquisitionNumber == 1
    for kw in ("SeriesDate", "AcquisitionDate", "ContentDate"):
        assert ds[kw].value == "20240315"
    for kw in ("SeriesTime", "AcquisitionTime", "ContentTime"):
        assert ds[kw].value == "101500.00"
    # an inversion-recovery header: InversionTime present, IR image type
    info = write_dicom_series(tmp_path / "ir", vol, np.eye(4), header={
        **HEADER, "ScanningSequence": ["SE", "IR"], "InversionTime": 2500.0})
    ds = pydicom.dcmread(info.files[0])
    assert float(ds.InversionTime) == 2500.0
    assert list(ds.ImageType)[2] == "M_IR"


def test_uids_are_valid_and_deterministic(tmp_path):
    vol = _volume((8, 10, 4))
    a = write_dicom_series(tmp_path / "a", vol, np.eye(4), header=HEADER, uid_seed="sub-01")
    b = write_dicom_series(tmp_path / "b", vol, np.eye(4), header=HEADER, uid_seed="sub-01")
    assert [f.read_bytes() for f in a.files] == [f.read_bytes() for f in b.files]
    ds = _read(a)
    uids = {d.SOPInstanceUID for d in ds}
    assert len(uids) == 4
    for uid in [*uids, a.series_instance_uid, a.study_instance_uid, ds[0].FrameOfReferenceUID]:
        assert UID(uid).is_valid
    assert {d.SeriesInstanceUID for d in ds} == {a.series_instance_uid}
    assert {d.StudyInstanceUID for d in ds} == {a.study_instance_uid}
    # another series of the same study: same study and frame, new series UID
    c = write_dicom_series(tmp_path / "c", vol, np.eye(4), uid_seed="sub-01",
                           header={**HEADER, "SeriesNumber": 501, "SeriesDescription": "T1"})
    assert c.study_instance_uid == a.study_instance_uid
    assert c.series_instance_uid != a.series_instance_uid
    assert pydicom.dcmread(c.files[0]).FrameOfReferenceUID == ds[0].FrameOfReferenceUID
    d = write_dicom_series(tmp_path / "d", vol, np.eye(4), header=HEADER, uid_seed="sub-02")
    assert d.study_instance_uid != a.study_instance_uid
    assert d.series_instance_uid != a.series_instance_uid
    # a caller's StudyInstanceUID is used as given
    e = write_dicom_series(tmp_path / "e", vol, np.eye(4), uid_seed="x",
                           header={**HEADER, "StudyInstanceUID": "1.2.3.4.5"})
    assert e.study_instance_uid == "1.2.3.4.5"


def test_multi_echo_series(tmp_path):
    tes = [1.15, 2.3, 3.45]
    vol = np.stack([_volume((10, 8, 4), seed=s) * np.exp(-t / 20) for s, t in enumerate(tes)],
                   axis=-1)
    info = write_dicom_series(tmp_path / "me", vol, np.eye(4), header=HEADER,
                              echo_times_ms=tes, uid_seed="me")
    assert info.dequantised.shape == vol.shape
    ds = _read(info)
    assert len(ds) == 12
    assert sorted(d.InstanceNumber for d in ds) == list(range(1, 13))
    assert {d.SeriesInstanceUID for d in ds} == {info.series_instance_uid}
    assert len({d.SOPInstanceUID for d in ds}) == 12
    for d in ds:
        e = int(d.EchoNumbers) - 1
        assert float(d.EchoTime) == tes[e]
        k = round(float(d.ImagePositionPatient[2]))
        np.testing.assert_allclose(d.pixel_array.T * info.rescale_slope,
                                   info.dequantised[:, :, k, e], atol=1e-9)
    assert sorted({int(d.EchoNumbers) for d in ds}) == [1, 2, 3]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"volume": -np.ones((4, 4, 2))}, "non-negative"),
        ({"volume": np.full((4, 4, 2), np.nan)}, "NaN"),
        ({"volume": np.ones((4, 4, 2, 3))}, "echo_times_ms"),
        ({"volume": np.ones((4, 4, 2, 2)), "echo_times_ms": [1.0, -2.0]}, "positive"),
        ({"header": {"PixelSpacing": [1, 1]}}, "computed"),
        ({"header": {"NotADicomKeyword": 1}}, "unknown"),
        ({"affine": np.array([[1, 0.2, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1.0]])},
         "orthogonal"),
    ],
)
def test_rejects_bad_input(tmp_path, kwargs, match):
    args = {"volume": np.ones((4, 4, 2)), "affine": np.eye(4), "header": {}, **kwargs}
    with pytest.raises(ValueError, match=match):
        write_dicom_series(tmp_path / "bad", args.pop("volume"), args.pop("affine"), **args)
    assert not (tmp_path / "bad").exists()
    assert list(tmp_path.iterdir()) == []


def test_rewrite_replaces_series_and_leaves_no_staging(tmp_path):
    out = tmp_path / "series"
    write_dicom_series(out, _volume((6, 6, 12)), np.eye(4), header={})
    info = write_dicom_series(out, _volume((6, 6, 3)), np.eye(4), header={})
    assert sorted(p.name for p in out.iterdir()) == ["IM_0001.dcm", "IM_0002.dcm",
                                                     "IM_0003.dcm"]
    assert [p.name for p in tmp_path.iterdir()] == ["series"]
    assert info.files == sorted(out.iterdir())
    (out / "notes.txt").write_text("not ours")
    with pytest.raises(FileExistsError):
        write_dicom_series(out, _volume((6, 6, 3)), np.eye(4), header={})
    assert (out / "notes.txt").exists()


def test_large_series_is_fast(tmp_path):
    vol = _volume((256, 256, 180), scale=3000.0).astype(np.float32)
    t0 = time.perf_counter()
    info = write_dicom_series(tmp_path / "big", vol, np.eye(4), header=HEADER, uid_seed="big")
    elapsed = time.perf_counter() - t0
    assert len(info.files) == 180
    assert elapsed < 10.0, f"writing 180 slices of 256x256 took {elapsed:.1f} s"
