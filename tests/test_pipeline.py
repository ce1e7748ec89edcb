"""End to end: the whole preprocessing workflow on a phantom archive with broken sessions.

One Snakemake run (module fixture) over 2 good phantom sessions (2 subjects) plus 3 copies broken on
purpose — a corrupt DICOM file, a missing FLAIR, a FLAIR without TI. The good sessions must
complete and match the phantom's truth; each broken one fails alone with a one-line reason.
"""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import yaml
from scipy import ndimage

from qmriflow.archive.discover import pseudonym
from qmriflow.phantom.generate import CANARY

from .conftest import REPO, assert_no_identifiers, rewrite_study, tool_env

SALT = "pipeline-test-salt"
#: the phantom sessions (subject, session) copied into this test's archive
GOOD = (("S001", "V01"), ("S002", "V01"))
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def pipeline_run(phantom_archive, manifest, tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    archive = root / "archive"
    # the first session of each subject (GOOD): the preprocessing of two more sessions would
    # check nothing new and cost ~8 min of the CI run
    for subject, session in GOOD:
        shutil.copytree(phantom_archive / "dicom" / subject / session,
                        archive / subject / session)
    src = archive / "S001" / "V01"
    broken = {}
    # 1. corrupt: truncate one T2w file
    d = archive / "S001" / "X01"
    shutil.copytree(src, d)
    broken["corrupt"] = rewrite_study(d, "corrupt")
    victim = sorted((d / next(p.name for p in d.iterdir() if "T2W" in p.name)).glob("*.dcm"))[5]
    victim.write_bytes(victim.read_bytes()[:2000])
    # 2. missing FLAIR
    d = archive / "S001" / "X02"
    shutil.copytree(src, d)
    broken["noflair"] = rewrite_study(d, "noflair")
    for p in list(d.iterdir()):
        if "FLAIR" in p.name:
            shutil.rmtree(p)
    # 3. FLAIR without inversion time
    d = archive / "S001" / "X03"
    shutil.copytree(src, d)
    broken["noti"] = rewrite_study(d, "noti", drop_ti=True)

    cfg = {"input_dir": str(archive), "output_dir": str(root / "results"),
           "work_dir": str(root / "work"), "pseudonym_salt": SALT}
    (root / "config.yaml").write_text(yaml.safe_dump(cfg))
    res = subprocess.run(
        [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"),
         "--configfile", str(root / "config.yaml"), "--cores", "2", "--keep-going",
         "all_preproc"],
        cwd=root, capture_output=True, text=True, env=tool_env(),
    )
    (root / "snakemake.log").write_text(res.stdout + "\n" + res.stderr)
    return {"root": root, "result": res, "broken": broken}


def _label(row: dict) -> str:
    pid = f"{CANARY}{11:04d}{int(row['subject'][1:]):04d}"
    return f"sub-{pseudonym(pid, SALT)}_ses-{pseudonym(row['study_instance_uid'], SALT)}"


def _good_sessions(manifest):
    seen = {}
    for r in manifest["series"]:
        if (r["subject"], r["session"]) not in GOOD:
            continue
        seen.setdefault((r["subject"], r["session"]), {})[r["role"]] = r
    return seen


def _anat(root: Path, label: str) -> Path:
    sub, ses = label.split("_")
    return root / "results" / sub / ses / "anat"


def _truth_on(grid_img, truth_img, order=0):
    m = np.linalg.inv(truth_img.affine) @ grid_img.affine
    return ndimage.affine_transform(np.asarray(truth_img.dataobj, np.float32), m, order=order,
                                    output_shape=grid_img.shape[:3], cval=0.0)


def _dice(a, b):
    return 2 * (a & b).sum() / (a.sum() + b.sum())


def test_good_sessions_complete_and_broken_ones_fail_alone(pipeline_run, manifest):
    root = pipeline_run["root"]
    for (_s, _v), roles in _good_sessions(manifest).items():
        label = _label(roles["t2w"])
        anat = _anat(root, label)
        for suffix in ("desc-preproc_T1w", "desc-preproc_T2w", "desc-preproc_FLAIR",
                       "desc-brain_mask", "dseg", "label-WM_desc-eroded_mask"):
            assert (anat / f"{label}_space-T2w_{suffix}.nii.gz").is_file(), (label, suffix)
        prov = json.loads((anat.parent / f"{label}_desc-provenance.json").read_text())
        assert set(prov["steps"]) == {"convert", "params", "register", "n4", "skullstrip",
                                      "segment"}
        assert prov["steps"]["skullstrip"]["backend"] == "hd-bet"
    assert (root / "results" / "dataset_description.json").is_file()
    with (root / "results" / "failures.tsv").open() as fh:
        failures = list(csv.DictReader(fh, delimiter="\t"))
    assert len({f["session"] for f in failures}) == 3, failures
    reasons = " | ".join(f["reason"] for f in failures)
    assert "corrupt" in reasons.lower() or "truncat" in reasons.lower() or "not large" in reasons
    assert "FLAIR" in reasons
    assert "TI" in reasons or "inversion" in reasons.lower()
    for f in failures:
        assert "\n" not in f["reason"] and f["session"] in f["reason"]


def test_parameters_equal_manifest(pipeline_run, manifest):
    root = pipeline_run["root"]
    for roles in _good_sessions(manifest).values():
        label = _label(roles["t2w"])
        sub, ses = label.split("_")
        params = json.loads((root / "results" / sub / ses /
                             f"{label}_desc-protocol_params.json").read_text())
        for role in ("t1w", "t2w", "flair"):
            r, p = roles[role], params[role]
            assert p["tr_ms"] == pytest.approx(r["RepetitionTime_ms"], abs=1e-6)
            assert p["te_ms"] == pytest.approx(r["EchoTime_ms"], abs=1e-6)
            assert p["fa_deg"] == pytest.approx(r["FlipAngle_deg"])
            if r["InversionTime_ms"] is None:
                assert p.get("ti_ms") is None
            else:
                assert p["ti_ms"] == pytest.approx(r["InversionTime_ms"])
            assert p["gadolinium"] == (r["ContrastBolusAgent"] is not None)


def test_geometry_masks_and_segmentation_against_truth(pipeline_run, phantom_archive, manifest):
    root = pipeline_run["root"]
    for roles in _good_sessions(manifest).values():
        label = _label(roles["t2w"])
        anat = _anat(root, label)
        t2 = roles["t2w"]
        mask_img = nib.load(str(anat / f"{label}_space-T2w_desc-brain_mask.nii.gz"))
        assert mask_img.shape[:2] == (224, 224)
        assert np.allclose(mask_img.header.get_zooms()[:2], (1.0, 1.0), atol=1e-4)
        truth_mask = _truth_on(mask_img, nib.load(str(phantom_archive / t2["truth"]["brainmask"]))
                               ) > 0.5
        mask = np.asarray(mask_img.dataobj) > 0
        assert _dice(mask, truth_mask) >= 0.95, label
        # world centre of mass of the brain: output vs truth (< 1 mm)
        com_out = mask_img.affine @ np.r_[np.array(np.nonzero(mask)).mean(1), 1]
        tm = nib.load(str(phantom_archive / t2["truth"]["brainmask"]))
        tmd = np.asarray(tm.dataobj) > 0
        com_truth = tm.affine @ np.r_[np.array(np.nonzero(tmd)).mean(1), 1]
        # The target, < 1 mm. It depends on the skull strip's agreement with the truth
        # mask, not only on the geometry: HD-BET alone left out the CSF over the brain and
        # measured up to 1.02 mm (seed 11, tumour sessions); grown into that CSF (skullstrip
        # csf_fill_mm), 0.23-0.42 mm (bench/RESULTS.md).
        com_err = float(np.linalg.norm((com_out - com_truth)[:3]))
        print(f"{label} brain COM error {com_err:.2f} mm")
        assert com_err < 1.0, (label, com_err)
        # WM / GM Dice against truth (before erosion)
        dseg_img = nib.load(str(anat / f"{label}_space-T2w_dseg.nii.gz"))
        dseg = np.asarray(dseg_img.dataobj)
        tseg = _truth_on(dseg_img, nib.load(str(phantom_archive / t2["truth"]["dseg"])))
        # The target, 0.85. Measured on seed 11 (lesion voxels counted as truth):
        # GM 0.890-0.929, WM 0.866-0.923 (GM/WM endmembers from histogram modes; with medians
        # one WMH session's WM was 0.846; bench/RESULTS.md).
        for lab, name in ((1, "GM"), (2, "WM")):
            d = _dice(dseg == lab, tseg == lab)
            print(f"{label} {name} Dice {d:.3f}")
            assert d >= 0.85, (label, name, d)


def _ants_points(xfm: Path, pts_ras: np.ndarray) -> np.ndarray:
    """Apply an ANTs transform (fixed -> moving, LPS) to RAS points; return RAS points."""
    import ants

    tx = ants.read_transform(str(xfm))
    flip = np.array([-1.0, -1.0, 1.0])
    return np.array([np.array(tx.apply_to_point(list(p * flip))) * flip for p in pts_ras])


def test_registration_matches_truth_within_1mm(pipeline_run, phantom_archive, manifest):
    """Mean displacement over the brain between estimated and true T1w/FLAIR -> T2w maps."""
    root = pipeline_run["root"]
    rng = np.random.default_rng(0)
    for roles in _good_sessions(manifest).values():
        label = _label(roles["t2w"])
        sub, ses = label.split("_")
        reg = root / "work" / "reg" / sub / ses
        tm = nib.load(str(phantom_archive / roles["t2w"]["truth"]["brainmask"]))
        vox = np.array(np.nonzero(np.asarray(tm.dataobj) > 0)).T
        vox = vox[rng.choice(len(vox), 400, replace=False)]
        pts = (tm.affine @ np.c_[vox, np.ones(len(vox))].T).T[:, :3]  # T2w world, RAS
        for role, name in (("t1w", "T1w"), ("flair", "FLAIR")):
            est = _ants_points(reg / f"{label}_from-{name}_to-T2w_mode-image_xfm.mat", pts)
            to_t2w = np.array(roles[role]["world_to_t2w_world"])
            true = (np.linalg.inv(to_t2w) @ np.c_[pts, np.ones(len(pts))].T).T[:, :3]
            err = np.linalg.norm(est - true, axis=1)
            assert err.mean() < 1.0, (label, role, err.mean())


def test_no_identifier_anywhere(pipeline_run):
    root = pipeline_run["root"]
    assert assert_no_identifiers(root / "results", root / "work") > 100
