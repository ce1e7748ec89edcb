"""Phantom scanner gains, Philips scaling, protocol clusters, tissue tables, global shift.

One module-scoped archive (3 subjects × 1 session, "protocol" gain model, 2 clusters,
"independent" tissue table, ±20 % global shift, scanner forward model on); the "independent"
gain model is checked on the suite's shared default archive (conftest ``manifest``). Pure
functions are tested without an archive.
"""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest

from qmriflow.archive.convert import find_dcm2niix, run_dcm2niix
from qmriflow.errors import InputError
from qmriflow.model import calibration
from qmriflow.phantom import protocols, tissues
from qmriflow.phantom.dicomio import PhilipsScaling, read_philips_scaling, write_dicom_series
from qmriflow.phantom.generate import PhantomOptions, generate_archive, load_manifest
from qmriflow.physics import WM_REFERENCE

HEAD_ROLES = ("t1w", "t1w_gd", "t2w", "flair")
OPTS = PhantomOptions(subjects=3, sessions=1, size="small", seed=5, cse=False, workers=2,
                      clusters=2, gain_model="protocol", gain_jitter=0.03,
                      tissue_table="independent", global_shift=0.2, mismatch=True)


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("phantom_gains")
    generate_archive(out, OPTS)
    return out, load_manifest(out)


def _sessions(rows: list[dict]) -> dict[tuple[str, str], dict[str, dict]]:
    by: dict[tuple[str, str], dict[str, dict]] = {}
    for r in rows:
        by.setdefault((r["subject"], r["session"]), {})[r["role"]] = r
    return by


def _truth(root: Path, row: dict, key: str) -> np.ndarray:
    return np.asarray(nib.load(root / row["truth"][key]).dataobj, np.float64)


def _dicom_fp(folder: Path) -> tuple[np.ndarray, set[tuple[float, float, float | None]]]:
    """FP = (SV·RS + RI) / (RS·SS) of a 3-D series in its (i, j, k) voxel order, and the set of
    (RS, RI, SS) found in its files."""
    files = sorted((pydicom.dcmread(f) for f in folder.glob("*.dcm")),
                   key=lambda d: int(d.InstanceNumber))
    scalings = {read_philips_scaling(d) for d in files}
    (rs, ri, ss), = scalings
    assert ss is not None
    sv = np.stack([d.pixel_array.T.astype(np.float64) for d in files], axis=-1)
    return (sv * rs + ri) / (rs * ss), scalings


# --- pure functions ---------------------------------------------------------------------------


def test_cluster_assignment_round_robin_and_fixed_scanner():
    got = [protocols.assigned_cluster(i, j, 3, 4) for i in range(3) for j in range(3)]
    assert got == [n % 4 for n in range(9)]
    for k in range(len(protocols.CLUSTERS)):
        model, sw = protocols.cluster_scanner(k)
        s = protocols.SCANNERS[k % len(protocols.SCANNERS)]
        assert (model, sw) == (s[0], s[2])
    for bad in (0, len(protocols.CLUSTERS) + 1):
        with pytest.raises(ValueError):
            protocols.assigned_cluster(0, 0, 1, bad)


def test_cluster_gain_ratios_depend_on_seed_and_cluster_only():
    a = protocols.cluster_gain_ratios(5, 3)
    assert a == protocols.cluster_gain_ratios(5, 3)
    assert a != protocols.cluster_gain_ratios(5, 4)
    assert a != protocols.cluster_gain_ratios(6, 3)
    assert set(a) == set(HEAD_ROLES)
    assert a["t1w_gd"] == a["t1w"]
    assert protocols.GAIN_RANGE[0] <= a["t2w"] <= protocols.GAIN_RANGE[1]
    for role in ("t1w", "flair"):
        assert 0.25 <= a[role] / a["t2w"] <= 4.0


def test_independent_tissue_table_is_not_the_estimator_prior():
    ind = {t.name: t for t in tissues.TISSUE_TABLES["independent"]}
    seed = {t.name: t for t in tissues.TISSUE_TABLES["seed"]}
    assert [t.label for t in tissues.INDEPENDENT_TISSUES] == [t.label for t in tissues.TISSUES]
    # the seed table is the prior (by design); the independent one is not
    assert seed["WM"].t1_s == WM_REFERENCE["t1_s"]
    assert seed["GM"].t1_s == calibration.GM_REFERENCE["t1_s"]
    assert abs(ind["WM"].t1_s / WM_REFERENCE["t1_s"] - 1) > 0.10
    assert abs(ind["GM"].t1_s / calibration.GM_REFERENCE["t1_s"] - 1) > 0.10
    # Stanisz et al. 2005 (3 T) relaxation times
    assert (ind["WM"].t1_s, ind["WM"].t2_s, ind["GM"].t1_s, ind["GM"].t2_s) == (
        1.084, 0.069, 1.820, 0.099)
    assert (ind["CSF"].pd, ind["CSF"].t1_s, ind["CSF"].t2_s) == (1.0, 4.1, 1.8)
    # lesions keep the seed table's ratios to WM
    for name in ("WMH", "tumour", "oedema"):
        assert ind[name].t1_s / ind["WM"].t1_s == pytest.approx(
            seed[name].t1_s / seed["WM"].t1_s, rel=0.01)
    # the random draws do not depend on the table
    a = tissues.subject_tissues(np.random.default_rng(1), table="seed")
    b = tissues.subject_tissues(np.random.default_rng(1), table="independent")
    wm = tissues.BY_NAME["WM"].label
    assert a.t1_s[wm] / seed["WM"].t1_s == pytest.approx(b.t1_s[wm] / ind["WM"].t1_s)
    with pytest.raises(ValueError, match="tissue table"):
        tissues.subject_tissues(np.random.default_rng(1), table="nope")


def test_shift_brain_relaxation_spares_csf_and_extracerebral_tissue():
    st = tissues.subject_tissues(np.random.default_rng(2))
    sh = tissues.shift_brain_relaxation(st, 1.15, 0.9)
    for t in tissues.TISSUES:
        shifted = t.name in ("GM", "WM", "WMH", "tumour", "oedema")
        assert sh.t1_s[t.label] == pytest.approx(st.t1_s[t.label] * (1.15 if shifted else 1))
        assert sh.t2_s[t.label] == pytest.approx(st.t2_s[t.label] * (0.9 if shifted else 1))
        assert sh.pd[t.label] == st.pd[t.label]


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"clusters": len(protocols.CLUSTERS) + 1}, "clusters"),
        ({"clusters": -1}, "clusters"),
        ({"clusters": 1.5}, "clusters"),
        ({"gain_model": "vendor"}, "gain model"),
        ({"gain_jitter": -0.01}, "gain jitter"),
        ({"gain_jitter": math.nan}, "gain jitter"),
        ({"gain_jitter": 2.0}, "gain jitter"),
        ({"tissue_table": "priors"}, "tissue table"),
        ({"global_shift": 0.5}, "global shift"),
        ({"global_shift": -0.1}, "global shift"),
    ],
)
def test_invalid_options_are_rejected_before_writing(tmp_path, change, match):
    out = tmp_path / "archive"
    opts = PhantomOptions(subjects=1, sessions=1, workers=1, **change)
    with pytest.raises(InputError, match=match) as exc:
        generate_archive(out, opts)
    assert "\n" not in str(exc.value)
    assert not out.exists()


def test_cli_passes_and_validates_the_new_options(tmp_path, monkeypatch, capsys):
    from qmriflow import cli
    from qmriflow.phantom import generate

    seen = {}

    def fake(out, opts):
        seen["opts"] = opts
        return {"series": [], "seconds": 0.0}

    monkeypatch.setattr(generate, "generate_archive", fake)
    rc = cli.main(["phantom", str(tmp_path / "a"), "--clusters", "3", "--gain-model", "protocol",
                   "--gain-jitter", "0.05", "--tissue-table", "independent",
                   "--global-shift", "0.2"])
    assert rc == 0
    o = seen["opts"]
    assert (o.clusters, o.gain_model, o.gain_jitter, o.tissue_table, o.global_shift) == (
        3, "protocol", 0.05, "independent", 0.2)
    monkeypatch.undo()
    capsys.readouterr()
    rc = cli.main(["phantom", str(tmp_path / "b"), "--clusters", "12"])
    err = capsys.readouterr().err.strip()
    assert rc == 1 and "clusters" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "b").exists()


def test_dcm2niix_converts_philips_series_to_fp_by_default(tmp_path):
    """Noise-free check: dcm2niix (as the pipeline runs it) returns FP; with -p n, DV."""
    rng = np.random.default_rng(3)
    fp = rng.uniform(5.0, 900.0, (12, 10, 5))
    header = {"Manufacturer": "Philips", "SeriesNumber": 7, "SeriesDescription": "T2W_TSE",
              "RepetitionTime": 4000.0, "EchoTime": 80.0, "ScanningSequence": "SE"}
    info = write_dicom_series(tmp_path / "s", fp, np.eye(4), header=header, uid_seed="fp",
                              philips=PhilipsScaling(rescale_slope=3.1, fill=0.7))
    (img,) = run_dcm2niix(tmp_path / "s", tmp_path / "nii")
    got = nib.as_closest_canonical(nib.load(img.nifti)).get_fdata()
    want = nib.as_closest_canonical(nib.Nifti1Image(info.floating, np.eye(4))).get_fdata()
    np.testing.assert_allclose(got, want, rtol=1e-5)
    m = img.metadata
    assert m["UsePhilipsFloatNotDisplayScaling"] == 1
    assert m["PhilipsRescaleSlope"] == pytest.approx(3.1, rel=1e-5)
    assert m["PhilipsRescaleIntercept"] == 0
    assert m["PhilipsScaleSlope"] == pytest.approx(info.scale_slope, rel=1e-5)
    out = tmp_path / "dv"
    out.mkdir()
    subprocess.run([find_dcm2niix(), "-p", "n", "-b", "y", "-z", "y", "-f", "dv", "-o",
                    str(out), str(tmp_path / "s")], check=True, capture_output=True)
    dv = nib.as_closest_canonical(nib.load(out / "dv.nii.gz")).get_fdata()
    want_dv = nib.as_closest_canonical(nib.Nifti1Image(info.dequantised, np.eye(4))).get_fdata()
    np.testing.assert_allclose(dv, want_dv, rtol=1e-5)
    assert json.loads((out / "dv.json").read_text())["UsePhilipsFloatNotDisplayScaling"] == 0


# --- the archive ------------------------------------------------------------------------------


def test_sessions_assigned_to_clusters_round_robin(archive):
    _, man = archive
    assert man["options"]["clusters"] == 2
    for r in man["series"]:
        i = int(r["subject"][1:]) - 1
        j = int(r["session"][1:]) - 1
        k = (i * OPTS.sessions + j) % 2
        assert r["protocol_cluster"] == k
        assert r["scanner_model"] == protocols.SCANNERS[k % len(protocols.SCANNERS)][0]
        # protocol jitter stays around the cluster centroid
        if r["role"] == "t2w":
            assert abs(r["RepetitionTime_ms"] - protocols.CLUSTERS[k][2]) < 200


def test_protocol_gain_ratios_are_fixed_within_a_cluster(archive):
    _, man = archive
    jit = OPTS.gain_jitter
    sessions = _sessions(man["series"])
    by_cluster: dict[int, list[dict[str, dict]]] = {}
    for rows in sessions.values():
        by_cluster.setdefault(rows["t2w"]["protocol_cluster"], []).append(rows)
    assert len(by_cluster[0]) == 2  # subjects 1 and 3
    for k, group in by_cluster.items():
        ratios = protocols.cluster_gain_ratios(OPTS.seed, k)
        for rows in group:
            for role, r in rows.items():
                c = r["gain_components"]
                assert c["model"] == "protocol"
                assert c["cluster_ratio"] == pytest.approx(ratios[role], rel=1e-12)
                assert r["gain"] == pytest.approx(
                    c["cluster_ratio"] * c["session_gain"] * c["jitter"], rel=1e-12)
                assert r["global_scale"] == r["gain"]
                assert abs(math.log(c["jitter"])) < 4 * jit
            for role in ("t1w", "flair"):
                lr = math.log(rows[role]["gain"] / rows["t2w"]["gain"])
                assert abs(lr - math.log(ratios[role] / ratios["t2w"])) < 4 * math.sqrt(2) * jit
        session_gains = [rows["t2w"]["gain_components"]["session_gain"] for rows in group]
        assert len(set(session_gains)) == len(group)
    g0 = [rows["t2w"]["gain_components"]["session_gain"] for rows in by_cluster[0]]
    assert abs(math.log(g0[0] / g0[1])) > 0.01  # the session gains differ
    # the post-contrast T1w (tumour subject) shares the T1w's cluster ratio
    gd = [rows for rows in sessions.values() if "t1w_gd" in rows]
    assert gd and all(rows["t1w_gd"]["gain_components"]["cluster_ratio"]
                      == rows["t1w"]["gain_components"]["cluster_ratio"] for rows in gd)


def test_independent_gains_do_not_keep_ratios(manifest):
    """The shared default archive: gains independent per series, ratios not kept."""
    assert manifest["options"]["gain_model"] == "independent"
    lr = []
    for rows in _sessions(manifest["series"]).values():
        for r in rows.values():
            assert r["gain_components"] == {"model": "independent", "cluster_ratio": None,
                                            "session_gain": None, "jitter": None}
            assert r["global_scale"] == r["gain"]
        lr.append(math.log(rows["flair"]["gain"] / rows["t2w"]["gain"]))
    assert max(lr) - min(lr) > 8 * math.sqrt(2) * OPTS.gain_jitter


def test_recorded_philips_scaling_recovers_the_gain(archive):
    root, man = archive
    for r in man["series"]:
        fp, scalings = _dicom_fp(root / r["dicom_dir"])
        assert scalings == {(r["rescale_slope"], r["rescale_intercept"], r["scale_slope"])}
        assert r["rescale_intercept"] == 0.0
        assert r["display_scale"] == pytest.approx(
            r["gain"] * r["rescale_slope"] * r["scale_slope"], rel=1e-12)
        clean = _truth(root, r, "bias") * _truth(root, r, "noisefree")
        brain = _truth(root, r, "brainmask") > 0
        # noise-free-dominated brain voxels: signal > 20 noise SDs
        sel = brain & (r["gain"] * clean > 20 * r["noise_sigma"])
        assert sel.sum() > 1000, r["series"]
        assert np.median(fp[sel] / clean[sel]) == pytest.approx(r["gain"], rel=0.005)
        # stored values use most of the 12-bit range (fill 0.6 - 1.0)
        assert 0.6 * 4095 - 1 <= fp.max() * r["scale_slope"] <= 4095


def test_dcm2niix_default_conversion_matches_global_scale(archive, tmp_path):
    root, man = archive
    for n, r in enumerate(x for x in man["series"] if x["subject"] == "S001"):
        (img,) = run_dcm2niix(root / r["dicom_dir"], tmp_path / str(n))
        conv = nib.as_closest_canonical(nib.load(img.nifti)).get_fdata()

        def canon(key: str, row: dict = r) -> np.ndarray:
            return nib.as_closest_canonical(nib.load(root / row["truth"][key])).get_fdata()

        clean = canon("bias") * canon("noisefree")
        brain = canon("brainmask") > 0
        sel = brain & (r["global_scale"] * clean > 20 * r["noise_sigma"])
        assert np.median(conv[sel] / clean[sel]) == pytest.approx(r["global_scale"], rel=0.005)
        resid = (conv - r["global_scale"] * clean)[brain]
        assert resid.std() == pytest.approx(r["noise_sigma"], rel=0.15)
        m = img.metadata
        assert m["UsePhilipsFloatNotDisplayScaling"] == 1
        assert m["PhilipsRescaleSlope"] == pytest.approx(r["rescale_slope"], rel=1e-5)
        assert m["PhilipsScaleSlope"] == pytest.approx(r["scale_slope"], rel=1e-5)
        assert m["PhilipsRescaleIntercept"] == 0


def test_global_shift_scales_brain_t1_t2_not_csf(archive):
    root, man = archive
    for i in range(OPTS.subjects):
        subj = json.loads((root / "truth" / f"S{i + 1:03d}" / "subject.json").read_text())
        f1, f2 = subj["global_shift"]["T1"], subj["global_shift"]["T2"]
        assert 0.8 <= f1 <= 1.2 and 0.8 <= f2 <= 1.2
        assert subj["tissue_table"] == "independent"
        # the same draws without the shift (the subject stream's first draws)
        pre = tissues.subject_tissues(np.random.default_rng([OPTS.seed, i]),
                                      OPTS.tissue_variation, table="independent")
        for t in tissues.TISSUES:
            got = subj["tissues"][t.name]
            brain = t.name in tissues.GLOBAL_SHIFT_TISSUES
            assert got["T1_s"] == pytest.approx(pre.t1_s[t.label] * (f1 if brain else 1.0))
            assert got["T2_s"] == pytest.approx(pre.t2_s[t.label] * (f2 if brain else 1.0))
            assert got["PD"] == pytest.approx(pre.pd[t.label])
        rows = [r for r in man["series"] if r["subject"] == subj["subject"]]
        assert {(r["global_shift_t1"], r["global_shift_t2"]) for r in rows} == {(f1, f2)}
        series = json.loads((root / rows[0]["truth_dir"] / "series.json").read_text())
        assert series["global_shift_t1"] == f1 and series["gain"] == rows[0]["gain"]
    shifts = [json.loads((root / "truth" / f"S{i + 1:03d}" / "subject.json").read_text())
              ["global_shift"]["T1"] for i in range(OPTS.subjects)]
    assert len(set(shifts)) == OPTS.subjects


def test_mismatch_on_the_estimators_equation_misses_the_phantoms_t2w(archive):
    """The inverse crime is gone: physics.signal of the truth maps (what the estimator would
    re-synthesise from perfect maps) misses the scanner model's noise-free T2w by more than
    3 % in WM — not a global factor alone: the WM/GM ratio differs too."""
    from scipy import ndimage

    from qmriflow import physics

    root, man = archive
    for r in man["series"]:
        if r["role"] != "t2w":
            continue
        assert r["forward_model"]["effects"] == {"echo_train": True, "mt": True, "b1": True,
                                                 "t2star": True, "partial_volume": True}
        assert r["forward_model"]["series"]["echo_train"]["centre_te_ms"] == pytest.approx(
            r["EchoTime_ms"], abs=r["forward_model"]["series"]["echo_train"]["echo_spacing_ms"])
        seg = _truth(root, r, "dseg")
        resyn = physics.signal(physics.Protocol.from_dict(r["protocol"]),
                               _truth(root, r, "PDmap"), _truth(root, r, "T1map"),
                               _truth(root, r, "T2map"))
        nf = _truth(root, r, "noisefree")
        ratio = {}
        for name, lab in (("WM", 2), ("GM", 1)):
            m = ndimage.binary_erosion(seg == lab)
            ratio[name] = float(np.median(nf[m] / resyn[m]))
        assert abs(ratio["WM"] - 1.0) > 0.03, ratio
        assert abs(ratio["WM"] / ratio["GM"] - 1.0) > 0.03, ratio
