"""End to end: the `cse` rule on the phantom's multi-echo GRE series, through Snakemake.

One phantom session (small, with its 6-echo GRE slab of known PDFF/R2*) is discovered,
converted and fitted by the workflow's `all_cse` target with the default (dual network)
method; the PDFF map must agree with the truth in the phantom's tissue region.
"""

from __future__ import annotations

import shutil
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import yaml

from .conftest import REPO, assert_no_identifiers, tool_env

pytestmark = pytest.mark.slow


def test_cse_rule_maps_match_truth(phantom_archive, manifest, tmp_path):
    archive = tmp_path / "archive"
    shutil.copytree(phantom_archive / "dicom" / "S001" / "V01", archive / "S001" / "V01")
    cfg = {"input_dir": str(archive), "output_dir": str(tmp_path / "results"),
           "work_dir": str(tmp_path / "work"), "pseudonym_salt": "cse-test-salt"}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg))
    res = subprocess.run(
        [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"),
         "--configfile", str(tmp_path / "config.yaml"), "--cores", "2", "all_cse"],
        cwd=tmp_path, capture_output=True, text=True, env=tool_env())
    assert res.returncode == 0, res.stderr[-3000:]
    maps = sorted((tmp_path / "results").rglob("*_desc-dual_PDFFmap.nii.gz"))
    assert len(maps) == 1, maps
    row = next(s for s in manifest["series"]
               if s.get("role") == "megre" and s["subject"] == "S001" and s["session"] == "V01")
    truth = nib.load(phantom_archive / row["truth"]["PDFF"])
    est = nib.load(maps[0])
    assert est.shape == truth.shape
    # dcm2niix may store the voxels in another order (e.g. flipped in-plane): compare the two
    # at the same world positions, through the affines
    m = np.linalg.inv(truth.affine) @ est.affine
    assert np.allclose(np.abs(m[:3, :3]), np.eye(3), atol=1e-3), m
    ijk = np.indices(est.shape).reshape(3, -1)
    src = np.rint(m[:3, :3] @ ijk + m[:3, 3:4]).astype(int)
    assert (src >= 0).all() and all((src[k] < est.shape[k]).all() for k in range(3))

    def on_est_grid(img: nib.Nifti1Image) -> np.ndarray:
        return img.get_fdata()[tuple(src)].reshape(est.shape)

    t = on_est_grid(truth)
    s0 = on_est_grid(nib.load(phantom_archive / row["truth"]["S0map"]))
    fg = s0 > 0.2 * np.percentile(s0, 99)
    err = np.abs(est.get_fdata()[fg] - t[fg])
    # the reference: the two-start maximum-likelihood fit of the same converted series (at
    # high R2* even the exact likelihood optimum is on the wrong side for some voxels)
    echo1 = sorted((tmp_path / "work" / "nifti").rglob("*_echo-1_MEGRE.nii.gz"))
    assert len(echo1) == 1
    res = subprocess.run([sys.executable, "-m", "qmriflow", "cse-fit", str(echo1[0]),
                          "--out", str(tmp_path / "fit"), "--method", "fit"],
                         capture_output=True, text=True, env=tool_env())
    assert res.returncode == 0, res.stderr[-2000:]
    fit = nib.load(next((tmp_path / "fit").glob("*_desc-fit_PDFFmap.nii.gz"))).get_fdata()
    err_fit = np.abs(fit[fg] - t[fg])
    swaps, swaps_fit = float(np.mean(err > 0.3)), float(np.mean(err_fit > 0.3))
    print(f"PDFF |error| median dual {np.median(err):.4f} / fit {np.median(err_fit):.4f}; "
          f"swaps (|error| > 0.3) dual {swaps:.2%} / fit {swaps_fit:.2%} of {fg.sum()} voxels")
    assert np.median(err) < 0.03
    assert swaps <= swaps_fit + 0.02
    assert_no_identifiers(tmp_path / "results", tmp_path / "work")
