"""Phantom archive acceptance: dcm2niix reads it as written, truth and physics agree."""

from __future__ import annotations

import gzip
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from qmriflow import physics
from qmriflow.archive.convert import run_dcm2niix
from qmriflow.phantom import protocols
from qmriflow.phantom.generate import CANARY, CANARY_BIRTH_DATE


def _truth(archive: Path, row: dict, key: str) -> nib.Nifti1Image:
    return nib.load(str(archive / row["truth"][key]))


@pytest.fixture(scope="module")
def converted(phantom_archive, manifest, tmp_path_factory):
    """Every series converted once with the pipeline's dcm2niix wrapper."""
    out = tmp_path_factory.mktemp("converted")
    res = {}
    for i, row in enumerate(manifest["series"]):
        res[row["dicom_dir"]] = run_dcm2niix(phantom_archive / row["dicom_dir"], out / str(i))
    return res


def test_archive_structure(phantom_archive, manifest):
    rows = manifest["series"]
    by_session: dict[tuple[str, str], list[str]] = {}
    for r in rows:
        by_session.setdefault((r["subject"], r["session"]), []).append(r["role"])
        assert (phantom_archive / r["dicom_dir"]).is_dir()
        assert len(list((phantom_archive / r["dicom_dir"]).glob("*.dcm"))) == r["n_files"]
        for f in r["truth"].values():
            assert (phantom_archive / f).is_file()
    assert len(by_session) == 4
    for (subject, _), roles in by_session.items():
        assert {"t1w", "t2w", "flair", "megre"} <= set(roles)
        # the tumour subject gets a post-gadolinium T1w (which the pipeline must exclude)
        tumour = any(r["lesion"] == "tumour" for r in rows if r["subject"] == subject)
        assert ("t1w_gd" in roles) == tumour
    assert {r["scanner_model"] for r in rows} <= {s[0] for s in protocols.SCANNERS}
    assert (phantom_archive / "manifest.tsv").read_text().count("\n") == len(rows) + 1


def test_protocols_within_seed_table1(manifest):
    for r in manifest["series"]:
        p = r["protocol"]
        if r["role"] in ("t1w", "t1w_gd"):
            assert 5.03 <= p["tr_ms"] <= 5.40 and 2.247 <= p["te_ms"] <= 2.493
            assert p["fa_deg"] == 10 and r["MRAcquisitionType"] == "3D"
        elif r["role"] == "t2w":
            assert 3848 <= p["tr_ms"] <= 4557 and p["te_ms"] == 80 and p["fa_deg"] == 90
            assert r["MRAcquisitionType"] == "2D" and p["te_correction_factor"] == 0.90
        elif r["role"] == "flair":
            assert p["tr_ms"] == 4800 and 280 <= p["te_ms"] <= 370 and p["ti_ms"] == 1650
            assert p["te_correction_factor"] == 0.42
        else:
            assert p["echo_times_ms"] == pytest.approx([1.15 * k for k in range(1, 7)])


def test_protocol_draw_is_deterministic():
    a = protocols.draw_session_protocols(np.random.default_rng(5), cse=True)
    b = protocols.draw_session_protocols(np.random.default_rng(5), cse=True)
    assert a[0] == b[0]
    assert [s.manifest() for s in a[1]] == [s.manifest() for s in b[1]]


def test_dcm2niix_sidecars_equal_manifest(manifest, converted):
    for r in manifest["series"]:
        images = converted[r["dicom_dir"]]
        tes = r["protocol"].get("echo_times_ms") or [r["EchoTime_ms"]]
        assert len(images) == len(tes)
        for img, te in zip(images, tes, strict=True):
            m = img.metadata
            assert m["RepetitionTime"] * 1000 == pytest.approx(r["RepetitionTime_ms"], abs=1e-6)
            assert m["EchoTime"] * 1000 == pytest.approx(te, abs=1e-6)
            if r["InversionTime_ms"] is None:
                assert "InversionTime" not in m
            else:
                assert m["InversionTime"] * 1000 == pytest.approx(r["InversionTime_ms"])
            assert m["FlipAngle"] == pytest.approx(r["FlipAngle_deg"])
            assert m["Manufacturer"] == r["Manufacturer"] == "Philips"
            assert m["ManufacturersModelName"] == r["ManufacturerModelName"]
            assert m["MRAcquisitionType"] == r["MRAcquisitionType"]
            assert m["MagneticFieldStrength"] == 3


def test_nifti_affine_places_truth_maps(phantom_archive, manifest, converted):
    """dcm2niix's image and the truth maps coincide in world space (< 0.5 mm)."""
    for r in manifest["series"]:
        if r["role"] == "megre":
            continue
        conv = nib.as_closest_canonical(nib.load(str(converted[r["dicom_dir"]][0].nifti)))
        truth_img = _truth(phantom_archive, r, "noisefree")
        truth = nib.as_closest_canonical(truth_img)
        assert conv.shape == truth.shape
        # world coordinates of the voxel grids (corners and centre) agree
        corners = np.array(np.meshgrid(*[[0, n - 1] for n in conv.shape], indexing="ij"))
        ijk = np.c_[corners.reshape(3, -1).T, np.ones(8)]
        d = (conv.affine @ ijk.T - truth.affine @ ijk.T)[:3]
        assert np.abs(d).max() < 0.5, r["series"]
        # and the image content is the truth's (scale · bias · noise-free) plus noise
        bias = nib.as_closest_canonical(_truth(phantom_archive, r, "bias")).get_fdata()
        clean = r["global_scale"] * bias * truth.get_fdata()
        img = conv.get_fdata()
        brain = nib.as_closest_canonical(_truth(phantom_archive, r, "brainmask")).get_fdata() > 0
        resid = (img - clean)[brain]
        assert np.corrcoef(img[brain], clean[brain])[0, 1] > 0.95
        # residual inside the brain is the Rician noise of the manifest's sigma (± 15 %)
        assert resid.std() == pytest.approx(r["noise_sigma"], rel=0.15)
        # world centre of mass of the truth brain mask, measured in both images' frames
        com = np.array(np.nonzero(brain)).mean(1)
        assert np.abs(conv.affine[:3, :3] @ com - truth.affine[:3, :3] @ com).max() < 0.5


def test_registration_truth_transform_aligns_truth_maps(phantom_archive, manifest):
    """Resampling a series' truth through world_to_t2w_world reproduces the T2w's truth."""
    from scipy import ndimage

    for r in manifest["series"]:
        if r["role"] not in ("t1w", "flair"):
            continue
        t2 = next(s for s in manifest["series"] if s["role"] == "t2w"
                  and (s["subject"], s["session"]) == (r["subject"], r["session"]))
        assert np.allclose(t2["world_to_t2w_world"], np.eye(4))
        src = _truth(phantom_archive, r, "brainmask")
        dst = _truth(phantom_archive, t2, "brainmask")
        # T2w voxel -> T2w world -> series world -> series voxel
        m = np.linalg.inv(src.affine) @ np.linalg.inv(np.array(r["world_to_t2w_world"])) \
            @ dst.affine
        moved = ndimage.affine_transform(src.get_fdata(), m, order=1, output_shape=dst.shape)
        a, b = moved > 0.5, dst.get_fdata() > 0
        dice = 2 * (a & b).sum() / (a.sum() + b.sum())
        assert dice > 0.9, (r["series"], dice)
        # without the transform (identity in world) the masks agree clearly less well
        m0 = np.linalg.inv(src.affine) @ dst.affine
        moved0 = ndimage.affine_transform(src.get_fdata(), m0, order=1, output_shape=dst.shape)
        a0 = moved0 > 0.5
        assert 2 * (a0 & b).sum() / (a0.sum() + b.sum()) < dice


def test_truth_world_coordinates_match_original_affine(phantom_archive, manifest):
    for r in manifest["series"]:
        img = _truth(phantom_archive, r, "dseg")
        np.testing.assert_allclose(img.affine, np.array(r["affine"]), atol=1e-4)


def test_resynthesis_reproduces_noisefree_image_exactly(phantom_archive, manifest):
    """One physics, used both ways: physics.signal(truth maps) == the phantom's image."""
    for r in manifest["series"]:
        nf = _truth(phantom_archive, r, "noisefree").get_fdata(dtype=np.float32)
        if r["role"] == "megre":
            pdff, r2s, s0 = (_truth(phantom_archive, r, k).get_fdata() for k in
                             ("PDFF", "R2starmap", "S0map"))
            got = physics.cse_magnitude(s0 / r["global_scale"], pdff, r2s,
                                        r["protocol"]["echo_times_ms"], 3.0)
            np.testing.assert_allclose(got, nf, rtol=1e-5, atol=1e-6)
            assert pdff.min() == 0 and pdff.max() == 1 and r2s.max() == 500
            continue
        t1, t2, pd = (_truth(phantom_archive, r, k).get_fdata() for k in
                      ("T1map", "T2map", "PDmap"))
        protocol = physics.Protocol.from_dict(r["protocol"])
        got = np.asarray(physics.signal(protocol, pd, t1, t2)).astype(np.float32)
        assert np.array_equal(got, nf), r["series"]
        assert np.isfinite(nf).all() and nf.max() > 0


def test_truth_tissue_values(phantom_archive, manifest):
    """WM/GM/CSF truth maps carry the subject's tissue values (pure-tissue voxels)."""
    import json

    for r in manifest["series"]:
        if r["role"] != "t1w":
            continue
        tissues = json.loads((phantom_archive / "truth" / r["subject"] / "subject.json")
                             .read_text())["tissues"]
        seg = _truth(phantom_archive, r, "dseg").get_fdata()
        t1 = _truth(phantom_archive, r, "T1map").get_fdata()
        for name, lab in (("GM", 1), ("WM", 2)):
            med = np.median(t1[seg == lab])
            assert med == pytest.approx(tissues[name]["T1_s"], rel=0.12), (name, r["series"])
        brain = _truth(phantom_archive, r, "brainmask").get_fdata() > 0
        assert 0.9e6 < brain.sum() * np.prod(_truth(phantom_archive, r, "dseg")
                                              .header.get_zooms()) < 2.2e6  # mm³, adult brain
        # skull and scalp exist outside the brain, so skull stripping is a real task
        assert ((seg >= 7) & (seg <= 11)).sum() > 0.3 * brain.sum()


def test_bias_field_is_substantial(phantom_archive, manifest):
    for r in manifest["series"]:
        if r["role"] == "megre":
            continue
        b = _truth(phantom_archive, r, "bias").get_fdata()
        brain = _truth(phantom_archive, r, "brainmask").get_fdata() > 0
        cv = b[brain].std() / b[brain].mean()
        assert 0.01 < cv < 0.6


def test_canary_present_in_dicom_but_not_in_converted_output(phantom_archive, manifest,
                                                             converted):
    first = sorted((phantom_archive / manifest["series"][0]["dicom_dir"]).glob("*.dcm"))[0]
    assert CANARY.encode() in first.read_bytes()  # the test can fail: the canary is there
    assert CANARY_BIRTH_DATE.encode() in first.read_bytes()
    for images in converted.values():
        for im in images:
            for f in (im.nifti, im.sidecar):
                data = f.read_bytes()
                if f.name.endswith(".gz"):
                    data = gzip.decompress(data)
                assert CANARY.encode() not in data and CANARY.lower().encode() not in data
                assert CANARY_BIRTH_DATE.encode() not in data
                assert CANARY not in f.name
