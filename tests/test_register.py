"""Registration to the T2w and resampling onto the 224×224 analysis grid, on the phantom.

The phantom gives the exact answer: truth maps in every series' own space and, per series,
``world_to_t2w_world`` (series world -> T2w world, RAS mm). The checks resample truth with
SciPy and the NIfTI affines only (independent of ANTs), so a wrong affine, a flipped LPS/RAS
or an inverted transform shows up as a displacement in millimetres.
"""

from __future__ import annotations

import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage as ndi

from qmriflow.errors import InputError, ToolError
from qmriflow.preproc import register as R

N_SESSIONS = 2
THREADS = 2
ROLES = ("t1w", "t2w", "flair")
NAME = {"t1w": "T1w", "t2w": "T2w", "flair": "FLAIR"}

# ---------------------------------------------------------------------------------------------
# helpers shared with test_n4.py
# ---------------------------------------------------------------------------------------------

_CACHE: dict[str, dict] = {}


def resample_world(data: np.ndarray, src_affine: np.ndarray, grid_affine: np.ndarray,
                   grid_shape: tuple[int, ...], grid_to_src_world: np.ndarray | None = None,
                   order: int = 1) -> np.ndarray:
    """SciPy resampling of ``data`` (voxel -> world ``src_affine``) at the world positions of
    a grid's voxels, mapped by ``grid_to_src_world`` (4×4 RAS; default identity)."""
    t = np.eye(4) if grid_to_src_world is None else np.asarray(grid_to_src_world, float)
    m = np.linalg.inv(src_affine) @ t @ np.asarray(grid_affine, float)
    ijk = np.indices(grid_shape, dtype=np.float64).reshape(3, -1)
    vox = m[:3, :3] @ ijk + m[:3, 3:4]
    # snap rounding noise (a slice at index -1e-8 would read as outside the volume)
    near = np.round(vox)
    vox = np.where(np.abs(vox - near) < 1e-4, near, vox)
    out = ndi.map_coordinates(np.asarray(data, np.float64), vox, order=order, cval=0.0,
                              mode="constant", prefilter=False)
    return out.reshape(grid_shape)


def truth(root: Path, row: dict, key: str) -> nib.Nifti1Image:
    return nib.load(root / row["truth"][key])


def truth_image(root: Path, row: dict) -> tuple[np.ndarray, np.ndarray]:
    """Noise-free acquired image (scale × bias × noise-free signal) and its affine."""
    nf = truth(root, row, "noisefree")
    bias = truth(root, row, "bias").get_fdata()
    return row["global_scale"] * bias * nf.get_fdata(), nf.affine


def grid_to_series(row: dict) -> np.ndarray:
    """Truth map from T2w world to this series' world (inverse of world_to_t2w_world)."""
    return np.linalg.inv(np.asarray(row["world_to_t2w_world"], float))


def anatomy_shift_mm(out: np.ndarray, src: np.ndarray, src_affine: np.ndarray,
                     mask: np.ndarray, affine: np.ndarray,
                     grid_to_src_world: np.ndarray | None = None,
                     iterations: int = 4) -> np.ndarray:
    """World displacement ``d`` (mm) with ``out(x) ≈ a · ref(x + d)`` over ``mask``.

    ``ref`` is ``src`` resampled (SciPy) on ``out``'s grid (``affine``) through
    ``grid_to_src_world``. Gauss-Newton on the linearised model ``out ≈ a·ref + ∇ref·Δ``.
    """
    base = np.eye(4) if grid_to_src_world is None else np.asarray(grid_to_src_world, float)
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    direction = affine[:3, :3] / spacing
    d = np.zeros(3)
    for _ in range(iterations):
        t = np.eye(4)
        t[:3, 3] = d
        ref = resample_world(src, src_affine, affine, out.shape, base @ t)
        grads = [np.gradient(ref, axis=i) / spacing[i] for i in range(3)]  # along voxel axes
        g_axes = np.stack([g[mask] for g in grads], axis=1)
        g_world = g_axes @ np.linalg.inv(direction)  # d/dx_world = d/dx_axes · D^-1
        a_mat = np.column_stack([ref[mask], g_world])
        sol, *_ = np.linalg.lstsq(a_mat, out[mask], rcond=None)
        d = d + sol[1:] / sol[0]
    return d


def convert_sessions(phantom_archive: Path, manifest: dict, tmp_root: Path,
                     n_sessions: int = N_SESSIONS) -> dict:
    """dcm2niix the T1w/T2w/FLAIR of ``n_sessions`` sessions (different subjects first)."""
    from qmriflow.archive.convert import run_dcm2niix

    rows: dict[tuple[str, str], dict[str, dict]] = {}
    for r in manifest["series"]:
        if r["role"] in ROLES:
            rows.setdefault((r["subject"], r["session"]), {})[r["role"]] = r
    keys = sorted(rows)
    chosen: list[tuple[str, str]] = []
    for k in keys:
        if k[0] not in {c[0] for c in chosen}:
            chosen.append(k)
    chosen = (chosen + [k for k in keys if k not in chosen])[:n_sessions]
    sessions = {}
    for sub, ses in chosen:
        entry: dict = {"rows": rows[(sub, ses)], "nifti": {}}
        for role in ROLES:
            out = tmp_root / "nifti" / sub / ses / role
            imgs = run_dcm2niix(phantom_archive / rows[(sub, ses)][role]["dicom_dir"], out)
            assert len(imgs) == 1
            entry["nifti"][role] = imgs[0].nifti
        sessions[f"{sub}_{ses}"] = entry
    return sessions


def register_all(sessions: dict, root: Path) -> dict:
    for label, s in sessions.items():
        out = root / "reg" / label
        outputs = {"T1w": out / "T1w.nii.gz", "T2w": out / "T2w.nii.gz",
                   "FLAIR": out / "FLAIR.nii.gz", "T1w_xfm": out / "T1w_to_T2w.mat",
                   "FLAIR_xfm": out / "FLAIR_to_T2w.mat"}
        t0 = time.perf_counter()
        prov = R.register_session(s["nifti"]["t2w"], s["nifti"]["t1w"], s["nifti"]["flair"],
                                  outputs, out / ".work", threads=THREADS)
        s["seconds"] = time.perf_counter() - t0
        s["outputs"] = outputs
        s["prov"] = prov
        print(f"\n{label}: register_session {s['seconds']:.1f} s  {prov['timing_s']}")
    return sessions


def registered_sessions(phantom_archive: Path, manifest: dict, tmp_path_factory) -> dict:
    """Convert and register N_SESSIONS sessions once per test run (shared with test_n4)."""
    key = str(phantom_archive)
    if key not in _CACHE:
        root = tmp_path_factory.mktemp("register")
        _CACHE[key] = register_all(convert_sessions(phantom_archive, manifest, root), root)
    return _CACHE[key]


@pytest.fixture(scope="module")
def sessions(phantom_archive, manifest, tmp_path_factory):
    return registered_sessions(phantom_archive, manifest, tmp_path_factory)


# ---------------------------------------------------------------------------------------------
# geometry of the analysis grid
# ---------------------------------------------------------------------------------------------


def test_outputs_written_and_provenance(sessions):
    for label, s in sessions.items():
        for key, path in s["outputs"].items():
            assert Path(path).is_file(), (label, key)
        assert not (Path(s["outputs"]["T1w"]).parent / ".work").exists()
        prov = s["prov"]
        assert prov["ants_version"]
        for name in ("T1w", "FLAIR"):
            reg = prov["registration"][name]
            assert reg["transform_type"] == "Rigid"
            assert reg["metric"]["final"] < reg["metric"]["after_initialisation"]
            assert reg["head_mask_dice"] > 0.85
            assert len(reg["fixed_to_moving_ras"]) == 4
            np.testing.assert_allclose(reg["fixed_to_moving_ras"],
                                       R.read_rigid_ras(s["outputs"][f"{name}_xfm"]),
                                       atol=1e-6)


def test_grid_geometry(sessions, phantom_archive):
    for label, s in sessions.items():
        t2 = nib.load(s["nifti"]["t2w"])
        a2 = t2.affine
        for name in ("T1w", "T2w", "FLAIR"):
            img = nib.load(s["outputs"][name])
            a = img.affine
            assert img.shape == (224, 224, t2.shape[2]), (label, name, img.shape)
            np.testing.assert_allclose(np.linalg.norm(a[:3, :2], axis=0), [1.0, 1.0],
                                       atol=1e-5)
            # same slice step vector as the T2w (spacing and direction)
            np.testing.assert_allclose(a[:3, 2], a2[:3, 2], atol=1e-4)
            # sform == qform == what was computed
            np.testing.assert_allclose(img.header.get_qform(), a, atol=1e-4)
            np.testing.assert_allclose(a, s["prov"]["grid"]["affine"], atol=1e-5)
            arr = img.get_fdata()
            assert arr.min() >= 0
            if name == "T2w":  # first and last slice are read, not lost to the FOV edge
                assert arr[..., 0].max() > 0 and arr[..., -1].max() > 0
        # every output slice is the T2w's slice plane: same plane offset along the normal
        n = np.cross(a2[:3, 0], a2[:3, 1])
        n /= np.linalg.norm(n)
        a = nib.load(s["outputs"]["T2w"]).affine
        for k in range(t2.shape[2]):
            p_out = a[:3, :3] @ [111.5, 111.5, k] + a[:3, 3]
            p_t2 = a2[:3, :3] @ [0, 0, k] + a2[:3, 3]
            assert abs(float(n @ (p_out - p_t2))) < 1e-3, (label, k)
        # centred on the head: the truth head's centre of mass is near the in-plane centre
        row = s["rows"]["t2w"]
        dseg = truth(phantom_archive, row, "dseg")
        head = resample_world(dseg.get_fdata() > 0, dseg.affine, a, (224, 224, t2.shape[2]),
                              order=0) > 0.5
        com = np.array(np.nonzero(head), float).mean(axis=1)
        print(f"{label}: truth head centre of mass at output voxel {com.round(2)}")
        assert np.all(np.abs(com[:2] - 111.5) < 6.0), com
        # the head is not cropped: truth head voxels of the T2w fall inside the 224 grid
        head_t2 = dseg.get_fdata() > 0
        ijk = np.array(np.nonzero(head_t2), float)
        world = dseg.affine[:3, :3] @ ijk + dseg.affine[:3, 3:4]
        vox = np.linalg.inv(a)[:3, :3] @ world + np.linalg.inv(a)[:3, 3:4]
        inside = np.all((vox[:2] >= -0.5) & (vox[:2] <= 223.5), axis=0)
        assert inside.mean() > 0.99, inside.mean()


def test_world_position_of_anatomy_is_kept(sessions, phantom_archive):
    """The output's affine puts the anatomy where it is: brain centre of mass and an
    image-based displacement estimate (output T2w vs the noise-free truth) < 1 mm."""
    for label, s in sessions.items():
        row = s["rows"]["t2w"]
        out_img = nib.load(s["outputs"]["T2w"])
        a, shape = out_img.affine, out_img.shape
        bm = truth(phantom_archive, row, "brainmask")
        ijk = np.array(np.nonzero(bm.get_fdata() > 0), float)
        com_truth = (bm.affine[:3, :3] @ ijk + bm.affine[:3, 3:4]).mean(axis=1)
        bm_out = resample_world(bm.get_fdata(), bm.affine, a, shape, order=1)
        ijk_o = np.indices(shape, dtype=float).reshape(3, -1)
        w = bm_out.ravel()  # partial-volume weights: no threshold bias
        com_out = (a[:3, :3] @ (ijk_o @ w / w.sum()) + a[:3, 3])
        d_com = float(np.linalg.norm(com_out - com_truth))
        img, img_aff = truth_image(phantom_archive, row)
        out = out_img.get_fdata()
        mask = ndi.binary_erosion(bm_out > 0.5, iterations=2)
        mask[..., :2] = False
        mask[..., -2:] = False
        shift = anatomy_shift_mm(out, img, img_aff, mask, a)
        print(f"{label}: T2w brain centre of mass moved {d_com:.3f} mm; output-vs-truth "
              f"anatomy displacement {np.round(shift, 3)} mm (|d| = "
              f"{np.linalg.norm(shift):.3f})")
        assert d_com < 0.2
        assert np.linalg.norm(shift) < 0.5


# ---------------------------------------------------------------------------------------------
# registration accuracy against the phantom's truth
# ---------------------------------------------------------------------------------------------


def test_registration_accuracy(sessions, phantom_archive):
    for label, s in sessions.items():
        bm = truth(phantom_archive, s["rows"]["t2w"], "brainmask")
        ijk = np.array(np.nonzero(bm.get_fdata() > 0), float)
        pts = bm.affine[:3, :3] @ ijk + bm.affine[:3, 3:4]  # brain voxels, T2w world
        out_aff = nib.load(s["outputs"]["T2w"]).affine
        shape = nib.load(s["outputs"]["T2w"]).shape
        bm_out = resample_world(bm.get_fdata(), bm.affine, out_aff, shape) > 0.5
        mask = ndi.binary_erosion(bm_out, iterations=2)
        mask[..., :2] = False
        mask[..., -2:] = False
        for role in ("t1w", "flair"):
            row = s["rows"][role]
            est = R.read_rigid_ras(s["outputs"][f"{NAME[role]}_xfm"])  # T2w world -> series
            tru = grid_to_series(row)
            disp = np.linalg.norm((est[:3, :3] - tru[:3, :3]) @ pts + (est - tru)[:3, 3:4],
                                  axis=0)
            # image check: the output vs the series' noise-free truth brought by the TRUE map
            img, img_aff = truth_image(phantom_archive, row)
            out = nib.load(s["outputs"][NAME[role]]).get_fdata()
            shift = anatomy_shift_mm(out, img, img_aff, mask, out_aff, tru)
            print(f"{label} {NAME[role]}: transform error over the brain mean "
                  f"{disp.mean():.3f} mm, max {disp.max():.3f} mm; image displacement "
                  f"{np.linalg.norm(shift):.3f} mm; "
                  f"{s['prov']['registration'][NAME[role]]['registration_seconds']:.1f} s")
            assert disp.mean() < 1.0
            assert disp.max() < 2.0
            assert np.linalg.norm(shift) < 1.0


def test_t1map_through_estimated_transform_matches_t2w_truth(sessions, phantom_archive):
    """Truth T1 map of the T1w series, brought to the T2w's grid by the estimated transform,
    agrees with the T2w's own truth T1 map as well as through the true transform."""
    for label, s in sessions.items():
        t2row, t1row = s["rows"]["t2w"], s["rows"]["t1w"]
        ref = truth(phantom_archive, t2row, "T1map")
        brain = truth(phantom_archive, t2row, "brainmask").get_fdata() > 0
        src = truth(phantom_archive, t1row, "T1map")
        est = R.read_rigid_ras(s["outputs"]["T1w_xfm"])
        errs = {}
        for name, t in (("estimated", est), ("true", grid_to_series(t1row))):
            res = resample_world(src.get_fdata(), src.affine, ref.affine, ref.shape, t)
            errs[name] = float(np.mean(np.abs(res - ref.get_fdata())[brain]))
        print(f"{label}: mean |T1 difference| in the brain: estimated transform "
              f"{errs['estimated'] * 1000:.1f} ms, true transform {errs['true'] * 1000:.1f} ms")
        assert errs["estimated"] < 1.25 * errs["true"] + 0.005


# ---------------------------------------------------------------------------------------------
# unit tests of the geometry (synthetic)
# ---------------------------------------------------------------------------------------------


def _oblique_affine(voxel=(0.9, 0.9, 4.0), shape=(64, 60, 20), angles=(8.0, -5.0, 12.0),
                    centre=(3.0, -20.0, 15.0)) -> np.ndarray:
    from qmriflow.phantom.generate import rotation, series_affine

    return series_affine("axial", voxel, shape, np.asarray(centre, float), rotation(*angles))


def _blob(shape, centre, radii) -> np.ndarray:
    idx = np.indices(shape, dtype=float)
    r = sum(((idx[i] - centre[i]) / radii[i]) ** 2 for i in range(3))
    img = np.where(r <= 1.0, 100.0 + 20.0 * np.sin(idx[0] / 3.0) * np.cos(idx[1] / 4.0), 0.0)
    rng = np.random.default_rng(0)
    return (img + np.abs(rng.normal(0, 1.0, shape))).astype(np.float32)


def test_resample_identity_and_integer_shift(tmp_path):
    shape = (40, 36, 12)
    aff = _oblique_affine(shape=shape)
    data = _blob(shape, (20, 18, 6), (14, 12, 5))
    p = tmp_path / "img.nii.gz"
    nib.save(nib.Nifti1Image(data, aff), p)
    same = R.resample_to_grid(p, R.TargetGrid(shape, aff))
    np.testing.assert_allclose(same, data, rtol=1e-4, atol=1e-3)
    # a grid shifted by (3, -2, 1) voxels: output voxel (i,j,k) is input (i+3, j-2, k+1)
    shifted = aff.copy()
    shifted[:3, 3] = aff[:3, :3] @ [3, -2, 1] + aff[:3, 3]
    out = R.resample_to_grid(p, R.TargetGrid(shape, shifted))
    np.testing.assert_allclose(out[:-3, 2:, :-1], data[3:, :-2, 1:], rtol=1e-4, atol=1e-3)
    # a world translation written as an ANTs transform moves the sampling point (RAS mm)
    t = np.eye(4)
    t[:3, 3] = aff[:3, :3] @ [2, 0, 0]  # grid world -> image world: 2 voxels along i
    mat = R._write_ras_transform(t, tmp_path / "t.mat")
    np.testing.assert_allclose(R.read_rigid_ras(mat), t, atol=1e-5)
    out = R.resample_to_grid(p, R.TargetGrid(shape, aff), [mat])
    np.testing.assert_allclose(out[:-2], data[2:], rtol=1e-4, atol=1e-3)


def test_target_grid_synthetic(tmp_path):
    shape = (120, 110, 14)
    aff = _oblique_affine(shape=shape)
    data = _blob(shape, (70, 50, 7), (30, 35, 6))
    img = nib.Nifti1Image(data, aff)
    g = R.target_grid(img, inplane_mm=1.0, size=224)
    assert g.shape == (224, 224, 14)
    np.testing.assert_allclose(g.affine[:3, 2], aff[:3, 2], atol=1e-5)
    mask = R.foreground_mask(data, spacing=(0.9, 0.9, 4.0))
    com = aff[:3, :3] @ np.array(np.nonzero(mask), float).mean(axis=1) + aff[:3, 3]
    # the centre of the grid (111.5, 111.5, k) lies on the head centre's line along the slices
    c_vox = np.linalg.inv(g.affine)[:3, :3] @ com + np.linalg.inv(g.affine)[:3, 3]
    np.testing.assert_allclose(c_vox[:2], [111.5, 111.5], atol=1e-3)
    g2 = R.target_grid(img, inplane_mm=0.8, size=64)
    assert g2.shape == (64, 64, 14)
    np.testing.assert_allclose(np.linalg.norm(g2.affine[:3, :2], axis=0), 0.8, atol=1e-6)


def test_register_rigid_recovers_a_known_motion(tmp_path):
    """Same voxels, moving image's affine = M @ fixed affine: a voxel at fixed-world x is at
    moving-world M x, so the estimated fixed -> moving transform must be M (RAS)."""
    from qmriflow.phantom.generate import rigid

    shape = (72, 72, 40)
    aff = _oblique_affine(voxel=(2.0, 2.0, 2.0), shape=shape, angles=(3.0, 2.0, -4.0))
    idx = np.indices(shape, dtype=float)
    r = np.sqrt(((idx[0] - 36) / 28) ** 2 + ((idx[1] - 34) / 30) ** 2 + ((idx[2] - 20) / 16) ** 2)
    data = np.where(r < 1, 80 + 40 * (idx[0] > 40) + 30 * np.sin(idx[1] / 3.0) * (idx[2] > 18)
                    + 25 * (np.hypot(idx[0] - 30, idx[1] - 40) < 8), 0.0).astype(np.float32)
    centre = aff[:3, :3] @ [36, 34, 20] + aff[:3, 3]
    m = rigid((4.0, -3.0, 5.0), (6.0, -4.0, 3.0), centre)
    fixed, moving = tmp_path / "fixed.nii.gz", tmp_path / "moving.nii.gz"
    nib.save(nib.Nifti1Image(data, aff), fixed)
    nib.save(nib.Nifti1Image(data, m @ aff), moving)
    prov = R.register_rigid(fixed, moving, tmp_path / "x.mat", threads=THREADS)
    est = R.read_rigid_ras(tmp_path / "x.mat")
    ijk = np.array(np.nonzero(r < 1), float)
    pts = aff[:3, :3] @ ijk + aff[:3, 3:4]
    err = np.linalg.norm((est - m)[:3, :3] @ pts + (est - m)[:3, 3:4], axis=0)
    print(f"synthetic rigid: error mean {err.mean():.3f} mm, max {err.max():.3f} mm "
          f"(rotation {prov['rotation_deg']:.2f} deg)")
    assert err.mean() < 0.5
    np.testing.assert_allclose(prov["fixed_to_moving_ras"], est, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------------


def _outputs(d: Path) -> dict[str, Path]:
    return {"T1w": d / "T1w.nii.gz", "T2w": d / "T2w.nii.gz", "FLAIR": d / "FLAIR.nii.gz",
            "T1w_xfm": d / "t1.mat", "FLAIR_xfm": d / "flair.mat"}


def _assert_one_line_naming(exc: Exception, path: Path) -> None:
    msg = str(exc)
    assert "\n" not in msg
    assert str(path) in msg


@pytest.fixture(scope="module")
def small_session(tmp_path_factory):
    """A tiny synthetic 'session' (fast) for the bad-input tests."""
    d = tmp_path_factory.mktemp("bad")
    shape = (48, 48, 10)
    aff = _oblique_affine(voxel=(2.0, 2.0, 4.0), shape=shape)
    data = _blob(shape, (24, 24, 5), (16, 18, 4))
    paths = {}
    for name in ("t1w", "t2w", "flair"):
        paths[name] = d / f"{name}.nii.gz"
        nib.save(nib.Nifti1Image(data, aff), paths[name])
    return d, paths, aff, shape


@pytest.mark.parametrize("kind", ["zeros", "nan", "missing", "garbage", "huge", "4d"])
def test_bad_input_one_line_error_and_no_outputs(small_session, tmp_path, kind):
    _d, paths, aff, shape = small_session
    bad = tmp_path / f"bad_{kind}.nii.gz"
    if kind == "zeros":
        nib.save(nib.Nifti1Image(np.zeros(shape, np.float32), aff), bad)
    elif kind == "nan":
        arr = np.ones(shape, np.float32)
        arr[3, 4, 5] = np.nan
        nib.save(nib.Nifti1Image(arr, aff), bad)
    elif kind == "garbage":
        bad.write_bytes(b"this is not a nifti file at all" * 10)
    elif kind == "huge":
        bad = tmp_path / "huge.nii"
        hdr = nib.Nifti1Header()
        hdr.set_data_shape((2000, 2000, 300))
        hdr.set_data_dtype(np.float32)
        hdr.set_sform(aff, code=1)
        with open(bad, "wb") as fh:
            fh.write(hdr.binaryblock + b"\x00" * 4 + b"\x00" * 1024)  # header, no data
    elif kind == "4d":
        nib.save(nib.Nifti1Image(np.ones((*shape, 2), np.float32), aff), bad)
    out = tmp_path / "out"
    with pytest.raises(InputError) as ei:
        R.register_session(paths["t2w"], bad, paths["flair"], _outputs(out), out / ".work")
    _assert_one_line_naming(ei.value, bad)
    print(f"{kind}: {ei.value}")
    assert not out.exists() or not any(out.rglob("*"))


def test_empty_head_is_input_error(small_session, tmp_path):
    _d, paths, aff, shape = small_session
    flat = tmp_path / "flat.nii.gz"
    arr = np.zeros(shape, np.float32)
    arr[0, 0, 0] = 1.0  # not all zeros, but no head
    nib.save(nib.Nifti1Image(arr, aff), flat)
    out = tmp_path / "out"
    with pytest.raises(InputError) as ei:
        R.register_session(flat, paths["t1w"], paths["flair"], _outputs(out), out / ".work")
    _assert_one_line_naming(ei.value, flat)
    assert "no head" in str(ei.value)
    assert not out.exists() or not any(out.rglob("*"))


def test_registration_failure_is_tool_error(small_session, tmp_path, monkeypatch):
    """A registration whose result fails the sanity checks ends in a one-line ToolError and
    writes nothing (the head-overlap check is made impossible to pass here)."""
    _d, paths, _aff, _shape = small_session
    monkeypatch.setattr(R, "_MIN_HEAD_DICE", 1.01)
    out = tmp_path / "out"
    with pytest.raises(ToolError) as ei:
        R.register_session(paths["t2w"], paths["t1w"], paths["flair"], _outputs(out),
                           out / ".work", threads=THREADS, size=64)
    _assert_one_line_naming(ei.value, paths["t1w"])
    print(ei.value)
    assert not out.exists() or not any(p.is_file() for p in out.rglob("*"))


def test_non_finite_registration_metric_is_refused(small_session, tmp_path, monkeypatch):
    """Issue 24 finding 4: a nan Mattes metric was accepted as 'registered to T2w'."""
    _d, paths, _aff, _shape = small_session
    monkeypatch.setattr(R, "_mi", lambda *a, **k: float("nan"))
    out = tmp_path / "out"
    with pytest.raises(ToolError, match=r"mutual information after registration is not a "
                                        r"finite number \(nan\)") as ei:
        R.register_session(paths["t2w"], paths["t1w"], paths["flair"], _outputs(out),
                           out / ".work", threads=THREADS, size=64)
    _assert_one_line_naming(ei.value, paths["t1w"])
    assert not out.exists() or not any(p.is_file() for p in out.rglob("*"))


def test_registration_seed_zero_is_refused():
    """antsRegistration reads --random-seed 0 as 'seed from the clock' (runs then differ)."""
    args = R._registration_args("f", "m", "fm", "fc", "mc", "p", "w", "i", 7,
                                R.REGISTRATION_SETTINGS)
    assert args[args.index("--random-seed") + 1] == "7"
    with pytest.raises(ValueError, match="seed must be >= 1"):
        R._registration_args("f", "m", "fm", "fc", "mc", "p", "w", "i", 0,
                             R.REGISTRATION_SETTINGS)
