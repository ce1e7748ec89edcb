"""Tissue segmentation and WM/GM erosion near CSF.

Phantom inputs come from tests/test_skullstrip.py (registered T1w/T2w/FLAIR on the T2w slice
grid, 1 x 1 x 4 mm, bias removed with the truth field to stand for N4). Scoring: Dice of WM
(truth label 2) and GM (label 1) against the truth dseg resampled onto the same grid, with the
lesion voxels (labels 4 WMH, 5 tumour, 6 oedema) left out of both sides: the segmentation has
no lesion class, so these voxels are neither right nor wrong. (Counting WMH and oedema as WM
instead changes WM Dice by < 0.005; printed for reference.) The truth brain mask is used, so
the numbers measure segmentation alone.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from qmriflow.errors import ConfigError, InputError, ToolError
from qmriflow.io import save_nifti, sidecar_path
from qmriflow.preproc import skullstrip
from qmriflow.preproc.segment import OUTPUT_KEYS, SEG_BACKENDS, erode_near_csf, segment

from .test_skullstrip import SESSIONS, dice, get_session

LESIONS = (4, 5, 6)


@pytest.fixture(scope="session")
def session_inputs(phantom_archive, manifest, tmp_path_factory):
    """Same (cached) phantom inputs as tests/test_skullstrip.py."""
    root = tmp_path_factory.getbasetemp() / "preproc_inputs"
    return lambda subject, session: get_session(phantom_archive, manifest, subject, session,
                                                root)


def outputs_in(d: Path) -> dict[str, Path]:
    return {k: d / f"sub_{k}.nii.gz" for k in OUTPUT_KEYS}


def scores(dseg: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    valid = ~np.isin(truth, LESIONS)
    out = {name: dice((dseg == lab) & valid, (truth == lab) & valid)
           for name, lab in (("GM", 1), ("WM", 2), ("CSF", 3))}
    out["WM_incl_WMH_oedema"] = dice(dseg == 2, np.isin(truth, (2, 4, 6)))
    return out


def _one_line(exc: BaseException) -> str:
    msg = str(exc)
    assert msg and "\n" not in msg
    return msg


# ---------------------------------------------------------------------------------------------
# phantom


@pytest.mark.parametrize("subject,session", SESSIONS, ids=[f"{a}_{b}" for a, b in SESSIONS])
def test_atropos_dice_and_erosion(session_inputs, tmp_path, subject, session):
    s = session_inputs(subject, session)
    outs = outputs_in(tmp_path)
    prov = segment(s["t1w"], s["truth_mask_file"], outs,
                   extra={"T2w": s["t2w"], "FLAIR": s["flair"]}, threads=2)
    dseg_img = nib.load(str(outs["dseg"]))
    dseg = np.asarray(dseg_img.dataobj)
    sc = scores(dseg, s["truth_dseg"])
    print(f"atropos+PV T1w+T2w+FLAIR {subject}_{session}: "
          + ", ".join(f"{k} {v:.4f}" for k, v in sc.items()) + f"; {prov['timing_s']}")
    assert sc["WM"] >= 0.85 and sc["GM"] >= 0.85
    assert sc["CSF"] >= 0.75
    # outputs: labels, mask, probabilities, geometry, provenance
    mask = s["truth_brainmask"] > 0
    assert dseg_img.get_data_dtype() == np.uint8
    assert np.allclose(dseg_img.affine, nib.load(str(s["t1w"])).affine, atol=1e-4)
    assert set(np.unique(dseg)) == {0, 1, 2, 3}
    assert ((dseg > 0) == mask).all()
    probs = np.stack([np.asarray(nib.load(str(outs[f"probseg_{n}"])).dataobj)
                      for n in ("GM", "WM", "CSF")])
    assert probs.min() >= 0.0 and probs.max() <= 1.0
    assert np.allclose(probs.sum(0)[mask], 1.0, atol=1e-5)
    assert (probs[:, ~mask] == 0).all()
    assert (np.array([1, 2, 3])[probs.argmax(0)][mask] == dseg[mask]).all()
    assert prov["backend"] == "atropos" and prov["package"] == "antspyx"
    assert prov["version"] and prov["device"] == "cpu" and prov["seed"] == 0
    assert prov["parameters"]["channels"] == ["T1w", "T2w", "FLAIR"]
    assert prov["class_mean_T1w"]["CSF"] < prov["class_mean_T1w"]["GM"] < \
        prov["class_mean_T1w"]["WM"]
    assert {"load", "segmentation", "total"} <= set(prov["timing_s"])
    side = json.loads(sidecar_path(outs["dseg"]).read_text())
    assert side["Labels"]["1"] == "GM" and side["GeneratedBy"]["backend"] == "atropos"
    assert not list(tmp_path.glob(".*"))
    # erosion of this segmentation: strict subsets, and nothing left within 2 mm of CSF
    zooms = tuple(float(z) for z in dseg_img.header.get_zooms()[:3])
    wm_e, gm_e = erode_near_csf(dseg, zooms, 2.0)
    wm, gm = dseg == 2, dseg == 1
    assert (wm_e <= wm).all() and (gm_e <= gm).all()
    assert wm_e.sum() < wm.sum() and gm_e.sum() < gm.sum()
    assert 0.5 * wm.sum() < wm_e.sum() and gm_e.sum() > 0.1 * gm.sum()
    from scipy import ndimage

    dist = ndimage.distance_transform_edt(dseg != 3, sampling=zooms)
    assert dist[wm_e | gm_e].min() > 2.0
    assert dist[(wm & ~wm_e) | (gm & ~gm_e)].max() <= 2.0 + 1e-9


def test_atropos_t1_only_repeatable(session_inputs, tmp_path, monkeypatch):
    """T1w alone (no extra channels): lower but usable Dice, and identical on a rerun; nothing
    is left in the temp folder (ANTsPy's atropos leaves its probability images there)."""
    s = session_inputs(*SESSIONS[0])
    a, b = outputs_in(tmp_path / "a"), outputs_in(tmp_path / "b")
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    pa = segment(s["t1w"], s["truth_mask_file"], a, threads=2, seed=3)
    segment(s["t1w"], s["truth_mask_file"], b, threads=2, seed=3)
    assert list(tmp.iterdir()) == []
    assert tempfile.gettempdir() == str(tmp)
    da = np.asarray(nib.load(str(a["dseg"])).dataobj)
    db = np.asarray(nib.load(str(b["dseg"])).dataobj)
    assert (da == db).all()
    sc = scores(da, s["truth_dseg"])
    print(f"atropos+PV T1w only {SESSIONS[0]}: " + ", ".join(f"{k} {v:.4f}"
                                                          for k, v in sc.items()))
    assert sc["WM"] >= 0.83 and sc["GM"] >= 0.84  # measured 0.859 / 0.867
    assert pa["parameters"]["channels"] == ["T1w"] and pa["seed"] == 3


# ---------------------------------------------------------------------------------------------
# synthetic volumes: fast checks


def _brain(tmp_path: Path, *, noise=3.0, seed=0):
    """2 x 2 x 4 mm ellipsoidal 'brain' (~1.6 l): WM core, GM shell, CSF shell + ventricles."""
    shape = (80, 96, 40)
    aff = np.diag([2.0, 2.0, 4.0, 1.0])
    ijk = np.indices(shape, dtype=np.float64)
    r = np.sqrt(((ijk[0] - 40) / 34) ** 2 + ((ijk[1] - 48) / 42) ** 2 + ((ijk[2] - 20) / 17) ** 2)
    truth = np.zeros(shape, np.uint8)
    truth[r < 1.0] = 3
    truth[r < 0.85] = 1
    truth[r < 0.6] = 2
    truth[(np.abs(ijk[0] - 40) < 3) & (np.abs(ijk[1] - 48) < 10) & (np.abs(ijk[2] - 20) < 4)] = 3
    rng = np.random.default_rng(seed)
    t1 = np.choose(truth, [5.0, 70.0, 100.0, 30.0]) + rng.normal(0, noise, shape)
    paths = {
        "t1w": save_nifti(tmp_path / "t1w.nii.gz", np.abs(t1), aff),
        "mask": save_nifti(tmp_path / "mask.nii.gz", (truth > 0).astype(np.uint8), aff,
                           dtype=np.uint8),
    }
    return paths, truth, aff


def test_synthetic_brain(tmp_path):
    paths, truth, _ = _brain(tmp_path)
    outs = outputs_in(tmp_path / "out")
    prov = segment(paths["t1w"], paths["mask"], outs)
    dseg = np.asarray(nib.load(str(outs["dseg"])).dataobj)
    for lab in (1, 2, 3):
        assert dice(dseg == lab, truth == lab) > 0.97
    assert prov["volumes_ml"]["WM"] > 0 and prov["parameters"]["partial_volume"]["model"]


def test_synthetic_hard_labels(tmp_path):
    paths, truth, _ = _brain(tmp_path)
    outs = outputs_in(tmp_path / "out")
    prov = segment(paths["t1w"], paths["mask"], outs, partial_volume=False, mrf=0.2)
    dseg = np.asarray(nib.load(str(outs["dseg"])).dataobj)
    assert dice(dseg == 2, truth == 2) > 0.97
    assert prov["parameters"]["partial_volume"] is False
    assert prov["parameters"]["mrf"] == "[0.2,1x1x1]"


def test_fast_without_fsl(tmp_path, monkeypatch):
    monkeypatch.delenv("FSLDIR", raising=False)
    paths, _, _ = _brain(tmp_path)
    outs = outputs_in(tmp_path / "out")
    with pytest.raises(ToolError) as ei:
        segment(paths["t1w"], paths["mask"], outs, backend="fast")
    assert _one_line(ei.value) == "FSL not found (FSLDIR unset)"
    assert not any(p.exists() for p in outs.values())


def test_fast_with_broken_fsl(tmp_path, monkeypatch):
    """FSLDIR set but no FAST there: one-line ToolError, nothing written."""
    (tmp_path / "no-fsl" / "bin").mkdir(parents=True)
    monkeypatch.setenv("FSLDIR", str(tmp_path / "no-fsl"))
    paths, _, _ = _brain(tmp_path)
    outs = outputs_in(tmp_path / "out")
    with pytest.raises(ToolError) as ei:
        segment(paths["t1w"], paths["mask"], outs, backend="fast")
    assert "FAST" in _one_line(ei.value)
    assert not any(p.exists() for p in outs.values())


def test_bad_inputs(tmp_path):
    paths, truth, aff = _brain(tmp_path)
    outs = outputs_in(tmp_path / "out")
    zero = save_nifti(tmp_path / "zero.nii.gz", np.zeros(truth.shape), aff)
    nan = np.abs(np.asarray(nib.load(str(paths["t1w"])).dataobj, np.float32))
    nan[10, 10, 10] = np.nan
    nanf = save_nifti(tmp_path / "nan.nii.gz", nan, aff)
    small = save_nifti(tmp_path / "small.nii.gz", (truth == 2) & (np.indices(truth.shape)[2] < 12),
                       aff, dtype=np.uint8)
    empty = save_nifti(tmp_path / "empty.nii.gz", np.zeros(truth.shape), aff, dtype=np.uint8)
    shifted = aff.copy()
    shifted[0, 3] += 5.0
    moved = save_nifti(tmp_path / "moved.nii.gz", truth > 0, shifted, dtype=np.uint8)
    cases = [
        (tmp_path / "missing.nii.gz", paths["mask"], None, "not found"),
        (zero, paths["mask"], None, "empty"),
        (nanf, paths["mask"], None, "NaN"),
        (paths["t1w"], empty, None, "empty"),
        (paths["t1w"], small, None, "plausible"),
        (paths["t1w"], moved, None, "grid"),
        (paths["t1w"], paths["mask"], {"FLAIR": nanf}, "NaN"),
        (paths["t1w"], paths["mask"], {"FLAIR": tmp_path / "nofl.nii.gz"}, "not found"),
    ]
    for t1, mask, extra, words in cases:
        with pytest.raises(InputError) as ei:
            segment(t1, mask, outs, extra=extra)
        msg = _one_line(ei.value)
        assert words in msg, msg
        assert str(t1) in msg or str(mask) in msg or any(str(v) in msg
                                                         for v in (extra or {}).values())
        assert not (tmp_path / "out").exists()


def test_bad_arguments(tmp_path):
    paths, _, _ = _brain(tmp_path)
    with pytest.raises(ConfigError):
        segment(paths["t1w"], paths["mask"], {"dseg": tmp_path / "d.nii.gz"})
    with pytest.raises(ToolError) as ei:
        segment(paths["t1w"], paths["mask"], outputs_in(tmp_path), backend="spm")
    assert ", ".join(SEG_BACKENDS) in _one_line(ei.value)


def test_outputs_all_or_nothing(tmp_path, monkeypatch):
    """A failure while writing the 3rd output leaves none of the four (and no temp files)."""
    paths, _, _ = _brain(tmp_path)
    outdir = tmp_path / "out"
    outs = outputs_in(outdir)
    real = skullstrip.save_nifti
    calls = []

    def flaky(path, *a, **k):
        calls.append(path)
        if len(calls) == 3:
            raise OSError("disk full")
        return real(path, *a, **k)

    monkeypatch.setattr(skullstrip, "save_nifti", flaky)
    with pytest.raises(OSError):
        segment(paths["t1w"], paths["mask"], outs)
    assert len(calls) == 3
    assert not any(p.exists() for p in outs.values())
    assert not list(outdir.glob("*"))


# ---------------------------------------------------------------------------------------------
# erosion


def test_erode_exact_anisotropic():
    """WM slab beside CSF, 1 x 1 x 4 mm voxels: in-plane voxels at <= 2 mm go, the next slice
    (4 mm through-plane) stays."""
    d = np.zeros((12, 5, 5), np.uint8)
    d[:6] = 3  # CSF for i < 6
    d[6:] = 2  # WM for i >= 6: distances 1, 2, 3, ... mm along i
    wm, gm = erode_near_csf(d, (1.0, 1.0, 4.0), 2.0)
    assert not gm.any()
    assert not wm[6:8].any() and wm[8:].all()  # 1 and 2 mm removed, 3 mm kept
    # through-plane: CSF only in slice k = 0; WM in k = 1 (4 mm away) and k = 2 (8 mm)
    d = np.full((6, 6, 3), 2, np.uint8)
    d[:, :, 0] = 3
    wm, _ = erode_near_csf(d, (1.0, 1.0, 4.0), 2.0)
    assert wm[:, :, 1:].all()
    wm, _ = erode_near_csf(d, (1.0, 1.0, 4.0), 4.0)
    assert not wm[:, :, 1].any() and wm[:, :, 2].all()
    # diagonal: in-plane offset (1, 1) -> sqrt(2) mm removed; (2, 1) -> sqrt(5) mm kept
    d = np.full((7, 7, 1), 1, np.uint8)
    d[3, 3, 0] = 3
    _, gm = erode_near_csf(d, (1.0, 1.0, 4.0), 2.0)
    assert not gm[2, 2, 0] and not gm[1, 3, 0] and gm[1, 2, 0] and gm[3, 0, 0]
    assert gm.sum() == 49 - 1 - 12  # 12 voxels within 2 mm: 4 at 1, 4 at sqrt2, 4 at 2


def test_erode_edge_cases():
    d = np.full((4, 4, 4), 2, np.uint8)
    wm, gm = erode_near_csf(d, (1.0, 1.0, 1.0))
    assert wm.all() and not gm.any()  # no CSF: nothing removed
    d[0] = 3
    wm, _ = erode_near_csf(d, (1.0, 1.0, 1.0), 0.0)
    assert wm.sum() == 48  # distance 0: nothing but CSF itself
    with pytest.raises(InputError):
        erode_near_csf(d[0], (1.0, 1.0, 1.0))
    with pytest.raises(InputError):
        erode_near_csf(d, (1.0, 0.0, 1.0))
    with pytest.raises(ConfigError):
        erode_near_csf(d, (1.0, 1.0, 1.0), -1.0)
