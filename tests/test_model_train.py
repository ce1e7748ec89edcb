"""Packing, training (loss goes down, exact resume), inference and the CLI of the relaxometry
model, on tiny synthetic sessions (64×64×4) written in the preprocessing layout.

The sessions are drawn here directly with ``qmriflow.physics.signal`` from simple elliptical
head maps (scalp fat, skull, GM, WM, ventricles) with the phantom's protocol draws, an arbitrary
global scale and Rician noise: fast, and with known truth. Accuracy on the full phantom is a
benchmark (bench/bench_model_accuracy.py), not a test.
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from qmriflow import physics
from qmriflow.errors import ConfigError, InputError
from qmriflow.io import save_nifti, write_json
from qmriflow.model.data import PackedSlices, load_session, pack_sessions
from qmriflow.model.train import TrainConfig, train
from qmriflow.phantom.protocols import draw_session_protocols
from qmriflow.phantom.tissues import BY_NAME

SIZE = 64
N_SLICES = 4
SUBJECTS = ("A01", "B02", "C03", "D04", "E05")


def _ellipse(shape: tuple[int, int], c: tuple[float, float], r: tuple[float, float]
             ) -> np.ndarray:
    y, x = np.indices(shape, dtype=np.float64)
    return ((y - c[0]) / r[0]) ** 2 + ((x - c[1]) / r[1]) ** 2 <= 1.0


def tiny_truth(rng: np.random.Generator, size: int = SIZE, n_slices: int = N_SLICES
               ) -> dict[str, np.ndarray]:
    """Label volume (H, W, S) and PD/T1/T2 maps of a small elliptical head."""
    from scipy import ndimage as ndi

    lab = np.zeros((size, size, n_slices), np.uint8)
    names = {1: "GM", 2: "WM", 3: "CSF", 7: "bone", 9: "fat"}
    cy, cx = size / 2 + rng.normal(0, 1.5), size / 2 + rng.normal(0, 1.5)
    ry, rx = size * 0.42 * rng.uniform(0.9, 1.0), size * 0.36 * rng.uniform(0.9, 1.0)
    for k in range(n_slices):
        s = 1.0 - 0.04 * abs(k - n_slices / 2)
        sl = np.zeros((size, size), np.uint8)
        sl[_ellipse(sl.shape, (cy, cx), (ry * s, rx * s))] = 9
        sl[_ellipse(sl.shape, (cy, cx), (ry * s - 3, rx * s - 3))] = 7
        sl[_ellipse(sl.shape, (cy, cx), (ry * s - 5, rx * s - 5))] = 1
        sl[_ellipse(sl.shape, (cy, cx), (ry * s - 9, rx * s - 9))] = 2
        for side in (-1, 1):
            sl[_ellipse(sl.shape, (cy - 2, cx + side * 4), (6 * s, 2.5))] = 3
        sl[_ellipse(sl.shape, (cy + 5, cx + rng.normal(0, 3)), (3, 4))] = 1  # deep GM
        lab[..., k] = sl
    maps = {}
    for key, attr in (("pd", "pd"), ("t1", "t1_s"), ("t2", "t2_s")):
        arr = np.zeros(lab.shape)
        for v, n in names.items():
            arr[lab == v] = getattr(BY_NAME[n], attr) * (1 + rng.normal(0, 0.02))
        maps[key] = ndi.gaussian_filter(arr, (0.6, 0.6, 0))  # partial volume
    maps["dseg"] = np.where(np.isin(lab, (1, 2, 3)), lab, 0).astype(np.uint8)
    maps["brain"] = np.isin(lab, (1, 2, 3)).astype(np.uint8)
    return maps


def write_tiny_session(root: Path, subject: str, session: str, seed: int,
                       snr: float = 40.0, size: int = SIZE, n_slices: int = N_SLICES) -> Path:
    """A session folder in the preprocessing layout (images, brain mask, params JSON)."""
    rng = np.random.default_rng(seed)
    t = tiny_truth(rng, size, n_slices)
    _, series = draw_session_protocols(rng)
    label = f"sub-{subject}_ses-{session}"
    d = root / f"sub-{subject}" / f"ses-{session}"
    anat = d / "anat"
    aff = np.diag([-1.0, -1.0, 4.0, 1.0])
    aff[:3, 3] = [size / 2, size / 2, -2.0 * n_slices]
    params: dict = {"session": label}
    for sp in series[:3]:
        p = sp.protocol
        assert p is not None
        s = np.asarray(physics.signal(p, t["pd"], t["t1"], t["t2"]))
        scale = float(np.exp(rng.uniform(np.log(300), np.log(3000))))
        sigma = scale * float(s[t["brain"] > 0].mean()) / snr
        img = np.sqrt((scale * s + rng.normal(0, sigma, s.shape)) ** 2
                      + rng.normal(0, sigma, s.shape) ** 2)
        name = {"t1w": "T1w", "t2w": "T2w", "flair": "FLAIR"}[sp.role]
        save_nifti(anat / f"{label}_space-T2w_desc-preproc_{name}.nii.gz", img, aff)
        params[sp.role] = {"role": sp.role, **p.as_dict(), "field_strength_t": 3.0}
    save_nifti(anat / f"{label}_space-T2w_desc-brain_mask.nii.gz", t["brain"], aff,
               dtype=np.uint8)
    save_nifti(anat / f"{label}_space-T2w_dseg.nii.gz", t["dseg"], aff, dtype=np.uint8)
    for key in ("pd", "t1", "t2"):
        save_nifti(d / "truth" / f"{key}.nii.gz", t[key], aff)
    write_json(d / f"{label}_desc-protocol_params.json", params)
    return d


@pytest.fixture(scope="module")
def tiny_sessions(tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("tiny") / "results"
    dirs = []
    for i, sub in enumerate(SUBJECTS):
        for j in range(2 if i < 2 else 1):
            dirs.append(write_tiny_session(root, sub, f"V{j + 1:02d}", seed=100 * i + j))
    return dirs


@pytest.fixture(scope="module")
def packed(tiny_sessions, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pack")
    pack_sessions(tiny_sessions, out)
    return out


# ---------------------------------------------------------------------------------------------
# packing
# ---------------------------------------------------------------------------------------------


def test_pack_layout_and_normalisation(packed, tiny_sessions):
    p = PackedSlices(packed)
    idx = p.index
    assert len(idx["sessions"]) == len(tiny_sessions)
    assert p.images.dtype == np.float16 and p.images.shape == (len(p), 3, SIZE, SIZE)
    assert isinstance(p.images, np.memmap)
    assert p.masks.shape == (len(p), SIZE, SIZE)
    assert len(idx["slice_session"]) == len(idx["slice_z"]) == len(p)
    assert not list(packed.glob(".*tmp*"))  # no temporary files left
    # per-slice subject and protocol are one look-up away
    first = idx["sessions"][0]
    assert first["subject"] == SUBJECTS[0]
    assert set(first["protocols"]) == {"T1w", "T2w", "FLAIR"}
    assert first["protocols"]["T2w"]["te_correction_factor"] == pytest.approx(0.9)
    b = p.batch(np.array([3, 0, 5]))
    assert b["images"].shape == (3, 3, SIZE, SIZE) and b["protocols"].shape == (3, 3, 6)
    np.testing.assert_array_equal(b["groups"], p.slice_session[[3, 0, 5]])
    np.testing.assert_array_equal(b["images"][1], p.images[0].astype(np.float32))
    # mode normalisation puts white matter near 1 in every contrast (loosely: in this toy head
    # WM is a small share of the head, so the T2w mode sits between WM and scalp), and the
    # head mask contains the brain
    sd = load_session(tiny_sessions[0])
    dseg = np.moveaxis(nib.load(str(sd.files.dseg)).get_fdata(), 2, 0)
    for c in range(3):
        wm = float(np.median(sd.images[:, c][dseg == 2]))
        assert 0.65 < wm < 1.35, (c, wm)
    assert np.all(sd.head[sd.brain])


def test_pack_errors(tiny_sessions, tmp_path):
    with pytest.raises(InputError, match="no sessions"):
        pack_sessions([], tmp_path / "p0")
    bad = tmp_path / "results" / "sub-Z" / "ses-1"
    (bad / "anat").mkdir(parents=True)
    with pytest.raises(InputError, match="T2w is missing"):
        pack_sessions([tiny_sessions[0], bad], tmp_path / "p1")
    assert not (tmp_path / "p1" / "index.json").exists()
    idx = pack_sessions([tiny_sessions[0], bad], tmp_path / "p2", skip_incomplete=True)
    assert len(idx["sessions"]) == 1 and len(idx["skipped"]) == 1
    assert "sub-Z_ses-1" in idx["skipped"][0]["reason"]


def test_pack_stores_the_calibrated_scales(packed, tiny_sessions, tmp_path):
    import shutil

    idx = PackedSlices(packed).index
    calibrated = PackedSlices(packed, "calibrated")
    for si, s in enumerate(idx["sessions"]):
        c = s["calibration"]
        assert set(c["scales"]) == {"T1w", "T2w", "FLAIR"}
        assert c["n_voxels"]["CSF"] >= 50 and c["n_voxels"]["WM"] >= 50
        np.testing.assert_allclose(calibrated.protocols[si, :, 5],
                                   [c["scales"][k] for k in ("T1w", "T2w", "FLAIR")], rtol=1e-6)
        np.testing.assert_array_equal(calibrated.protocols[si, :, :5],
                                      PackedSlices(packed).protocols[si, :, :5])
    # a session without a segmentation packs, but cannot train with calibrated scales
    src = tiny_sessions[0]
    copy = tmp_path / "results" / src.parent.name / src.name
    shutil.copytree(src, copy)
    next(copy.glob("anat/*_dseg.nii.gz")).unlink()
    pack_sessions([copy], tmp_path / "p")
    assert PackedSlices(tmp_path / "p", "seed").index["sessions"][0]["calibration"] is None
    with pytest.raises(InputError, match="needs a tissue segmentation"):
        PackedSlices(tmp_path / "p", "calibrated")


# ---------------------------------------------------------------------------------------------
# training: loss goes down, exact resume, checkpoints and artefacts
# ---------------------------------------------------------------------------------------------

CFG = dict(width=8, epochs=3, batch_size=4, device="cpu", threads=1, val_max_slices=8)


@pytest.fixture(scope="module")
def trained(packed, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("model")
    summary = train(packed, out, TrainConfig(**CFG), progress=False)
    return out, summary


def test_training_lowers_the_loss(trained, packed):
    out, summary = trained
    hist = summary["history"]
    assert [h["epoch"] for h in hist] == [1, 2, 3]
    assert hist[-1]["train_loss"] < 0.95 * hist[0]["train_loss"]
    assert hist[-1]["val_loss"] < hist[0]["val_loss"]
    assert summary["finished"]
    for name in ("model.pt", "last.pt", "hyperparameters.json", "split.json", "history.tsv",
                 "training_curve.png"):
        assert (out / name).is_file(), name
    assert (out / "training_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    hp = json.loads((out / "hyperparameters.json").read_text())
    assert hp["hyperparameters"]["lr"] == 1e-3 and hp["hyperparameters"]["init"] == "kaiming"
    assert hp["hyperparameters"]["lambda_tv"] == 0.01 and hp["hyperparameters"]["lambda_pd"] == 0.1
    split = json.loads((out / "split.json").read_text())["subjects"]
    assert sorted(split) == sorted(SUBJECTS)
    assert {v for v in split.values()} == {"train", "val", "test"}
    best = torch.load(out / "model.pt", weights_only=True)
    assert best["val_loss"] == pytest.approx(min(h["val_loss"] for h in hist))


def test_model_folder_json_holds_no_path_of_this_machine(trained, packed):
    """hyperparameters.json sits with the maps (derivatives/model): the pack, in the work
    folder, is named, not located (issue 24 finding 8)."""
    out, summary = trained
    hp = json.loads((out / "hyperparameters.json").read_text())
    assert hp["pack_dir"] == packed.name
    assert str(packed.parent) not in (out / "hyperparameters.json").read_text()
    assert str(summary["pack_dir"]) == str(packed)  # the step's own record keeps it


def test_interrupted_training_resumes_exactly(trained, packed, tmp_path):
    ref_out, _ = trained
    out = tmp_path / "resumed"
    s1 = train(packed, out, TrainConfig(**CFG), progress=False, max_epochs_this_run=1)
    assert not s1["finished"] and [h["epoch"] for h in s1["history"]] == [1]
    (out / "model.pt").unlink()  # as a workflow manager does with a failed job's outputs
    s2 = train(packed, out, TrainConfig(**CFG), progress=False)
    assert s2["finished"] and [h["epoch"] for h in s2["history"]] == [1, 2, 3]
    ref = torch.load(ref_out / "last.pt", weights_only=True)["state_dict"]
    got = torch.load(out / "last.pt", weights_only=True)["state_dict"]
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=1e-5, atol=1e-6, msg=k)
    ref_best = torch.load(ref_out / "model.pt", weights_only=True)
    got_best = torch.load(out / "model.pt", weights_only=True)
    assert got_best["epoch"] == ref_best["epoch"]
    # other hyper-parameters cannot silently continue a run
    with pytest.raises(ConfigError, match="other hyper-parameters"):
        train(packed, out, TrainConfig(**{**CFG, "lr": 1e-4}), progress=False)
    # but more epochs can
    s3 = train(packed, out, TrainConfig(**{**CFG, "epochs": 4}), progress=False)
    assert [h["epoch"] for h in s3["history"]] == [1, 2, 3, 4]


# ---------------------------------------------------------------------------------------------
# inference and the CLI
# ---------------------------------------------------------------------------------------------


def test_infer_writes_maps_with_affine_units_and_hash(trained, tiny_sessions, tmp_path):
    from qmriflow.model.checkpoint import sha256_file
    from qmriflow.model.infer import infer_session, map_paths

    out, _ = trained
    sdir = tiny_sessions[-1]
    info = infer_session(sdir, out / "model.pt", tmp_path / "maps", device="cpu", threads=1)
    label = sdir.parent.name + "_" + sdir.name
    paths = map_paths(tmp_path / "maps", label)
    ref = nib.load(str(sdir / "anat" / f"{label}_space-T2w_desc-preproc_T2w.nii.gz"))
    brain = nib.load(str(sdir / "anat" / f"{label}_space-T2w_desc-brain_mask.nii.gz")
                     ).get_fdata() > 0
    for key, units in (("T1map", "s"), ("T2map", "s"), ("PDmap", "arbitrary")):
        img = nib.load(str(paths[key]))
        np.testing.assert_allclose(img.affine, ref.affine, atol=1e-5)
        assert img.shape == ref.shape
        data = img.get_fdata()
        assert np.all(data[~brain] == 0) and np.all(np.isfinite(data))
        side = json.loads(paths[key].with_name(paths[key].name[:-7] + ".json").read_text())
        assert side["Units"] == units
        assert side["ModelCheckpointSHA256"] == sha256_file(out / "model.pt")
        assert side["InputContrasts"] == ["T1w", "T2w", "FLAIR"]
    t1 = nib.load(str(paths["T1map"])).get_fdata()[brain]
    assert 0 < np.median(t1) < 5  # seconds, not milliseconds
    for c in ("T1w", "T2w", "FLAIR"):
        assert paths[f"synth_{c}"].is_file() and paths[f"synthdiff_{c}"].is_file()
    assert info["n_slices"] == N_SLICES
    # drop a contrast: still maps, sidecar names the inputs used
    infer_session(sdir, out / "model.pt", tmp_path / "maps2", contrasts=("T1w", "FLAIR"),
                  device="cpu", threads=1, synth=False)
    side = json.loads((tmp_path / "maps2" / f"{label}_space-T2w_T1map.json").read_text())
    assert side["InputContrasts"] == ["T1w", "FLAIR"]


def test_calibrated_inference_pins_the_maps_and_writes_uncertainty(trained, tiny_sessions,
                                                                    tmp_path):
    from qmriflow.model.calibration import Smoothing, csf_branch_t2
    from qmriflow.model.data import session_calibration, session_seg
    from qmriflow.model.infer import infer_session, map_paths

    out, _ = trained
    assert json.loads((out / "hyperparameters.json").read_text()
                      )["hyperparameters"]["scaling"] == "calibrated"
    sdir = tiny_sessions[-1]
    label = sdir.parent.name + "_" + sdir.name
    # the network's own maps (published method: nothing moved) ...
    infer_session(sdir, out / "model.pt", tmp_path / "s", device="cpu", threads=1, synth=False,
                  scaling="seed")
    assert not map_paths(tmp_path / "s", label)["sd_T1map"].exists()
    # ... and moved onto the calibrated scales (without the smoothing, checked below)
    info = infer_session(sdir, out / "model.pt", tmp_path / "c", device="cpu", threads=1,
                         synth=False, smoothing=Smoothing(radius=0))
    assert info["scaling"] == "calibrated"
    paths = map_paths(tmp_path / "c", label)
    keys = ("PDmap", "T1map", "T2map")
    maps = [nib.load(str(paths[k])).get_fdata() for k in keys]
    raw = [nib.load(str(map_paths(tmp_path / "s", label)[k])).get_fdata() for k in keys]
    sd = load_session(sdir)
    calib = session_calibration(sd)
    assert info["calibration"]["scales"] == pytest.approx(calib.scales)
    pin = json.loads(paths["T1map"].with_name(paths["T1map"].name[:-7] + ".json").read_text()
                     )["Scaling"]["pinning"]
    brain = np.moveaxis(sd.brain, 0, 2) & (maps[0] > 0)
    assert pin["max_residual"] >= 0 and pin["refine"]["voxels"] == int(brain.sum())
    # the branch choice ran with the calibration's threshold, on WM/GM voxels only
    assert pin["refine"]["branch_t2_s"] == pytest.approx(csf_branch_t2(calib.tissues))
    seg = np.moveaxis(session_seg(sd), 0, 2)
    assert 0 <= pin["refine"]["branch_switched"] <= pin["refine"]["branch_checked"] <= int(
        (brain & ((seg == 1) | (seg == 2))).sum())
    # the maps re-synthesise every input with the calibrated scale: inside the brain, away from
    # the maps' limits, to well below the noise (SNR 40) — the network's own maps do not
    free = brain & (maps[0] < 0.999) & (maps[1] > 0.051) & (maps[1] < 4.99) & (maps[2] < 2.99)
    assert free.sum() > 0.3 * brain.sum()
    for ci, c in enumerate(sd.contrasts):
        img = np.moveaxis(sd.images[:, ci], 0, 2)[free]
        fit = calib.scales[c] * np.asarray(physics.signal(sd.protocols[c], *maps))[free]
        net = np.asarray(physics.signal(sd.protocols[c], *raw))[free]
        net *= physics.ls_global_scale(net, img)
        assert np.median(np.abs(fit / img - 1)) < 0.02, c
        assert np.median(np.abs(net / img - 1)) > 2 * np.median(np.abs(fit / img - 1)), c
    for k in ("T1map", "T2map", "PDmap"):
        u = nib.load(str(paths[f"sd_{k}"])).get_fdata()
        assert np.all(u[brain] > 0) and np.all(u[~brain] == 0)
        side = json.loads(paths[k].with_name(paths[k].name[:-7] + ".json").read_text())
        assert side["Scaling"]["method"] == "calibrated"
        assert side["Scaling"]["calibration"]["scales"]["T2w"] == pytest.approx(
            calib.scales["T2w"])
        assert side["Scaling"]["pinning"]["refine"]["smoothing"]["radius"] == 0
    # the default: edge-preserving smoothing of the data-consistent maps, guided by the
    # inputs (here through the CLI): recorded, the rough maps made smoother, tissue medians kept
    from qmriflow.cli import main as cli_main

    sub, ses = sdir.parent.name[4:], sdir.name[4:]
    common = ["--checkpoint", str(out / "model.pt"), "--subject", sub, "--session", ses,
              "--device", "cpu", "--threads", "1", "--no-synth"]
    assert cli_main(["infer", str(sdir), "--out-dir", str(tmp_path / "g"), *common]) == 0
    gpaths = map_paths(tmp_path / "g", label)
    side = json.loads(gpaths["PDmap"].with_name(gpaths["PDmap"].name[:-7] + ".json").read_text())
    assert side["Scaling"]["pinning"]["refine"]["smoothing"] == {
        "radius": 3, "sigma_space_voxels": 2.0, "sigma_range_log": 0.1, "sigma_value_log": 0.3,
        "guide": "log of the mode-normalised inputs T1w+T2w+FLAIR"}
    smooth = [nib.load(str(gpaths[k])).get_fdata() for k in keys]

    def roughness(v: np.ndarray) -> float:
        inner = brain & np.roll(brain, 1, 0) & np.roll(brain, 1, 1)
        return float(np.median(np.abs(v - np.roll(v, 1, 0))[inner]
                               + np.abs(v - np.roll(v, 1, 1))[inner]))

    assert roughness(smooth[0]) < 0.9 * roughness(maps[0])
    from scipy import ndimage

    from qmriflow.model.data import session_files

    dseg = nib.load(str(session_files(sdir).dseg)).get_fdata()
    for name, lab in (("WM", 2), ("GM", 1)):  # tissue medians kept (away from edges; the
        # means are not: a few voxels the data consistency left at the T1 limit are averaged)
        tissue = ndimage.binary_erosion(dseg == lab, np.ones((3, 3, 1))) & brain
        assert tissue.sum() > 20
        for a, b in zip(smooth, maps, strict=True):
            assert np.median(a[tissue]) == pytest.approx(np.median(b[tissue]), rel=0.02), name
    # guided by the network's maps instead: recorded as such
    assert cli_main(["infer", str(sdir), "--out-dir", str(tmp_path / "n"), *common,
                     "--smoothing", "1,1,0.2,0.5", "--smoothing-guide", "network"]) == 0
    npath = map_paths(tmp_path / "n", label)["T2map"]
    assert json.loads(npath.with_name(npath.name[:-7] + ".json").read_text())["Scaling"][
        "pinning"]["refine"]["smoothing"] == {"radius": 1, "sigma_space_voxels": 1.0,
                                              "sigma_range_log": 0.2, "sigma_value_log": 0.5,
                                              "guide": "log of the network's maps"}
    with pytest.raises(SystemExit):
        cli_main(["infer", str(sdir), "--out-dir", str(tmp_path / "h"), *common,
                  "--smoothing", "1.5,1,0.1,0.3"])


def test_withheld_contrast_is_used_for_nothing_but_its_resynthesis(trained, tiny_sessions,
                                                                   tmp_path):
    """Inference without the T2w: calibration, pinning and data consistency use the T1w and
    FLAIR only, so changing the T2w image on disk leaves the maps exactly as they were."""
    import shutil

    from qmriflow.model.infer import infer_session, map_paths

    out, _ = trained
    src = tiny_sessions[-1]
    label = src.parent.name + "_" + src.name
    sdir = tmp_path / "copy" / src.parent.name / src.name
    shutil.copytree(src, sdir)
    keep = ("T1w", "FLAIR")
    a = infer_session(sdir, out / "model.pt", tmp_path / "a", contrasts=keep, device="cpu",
                      threads=1)
    assert tuple(a["calibration"]["contrasts"]) == keep
    assert set(a["calibration"]["scales"]) == set(keep)
    t2 = sdir / "anat" / f"{label}_space-T2w_desc-preproc_T2w.nii.gz"
    img = nib.load(str(t2))
    data = img.get_fdata()
    save_nifti(t2, data[::-1] * 0.5 + 0.3 * data.mean(), img.affine)
    b = infer_session(sdir, out / "model.pt", tmp_path / "b", contrasts=keep, device="cpu",
                      threads=1)
    pa, pb = map_paths(tmp_path / "a", label), map_paths(tmp_path / "b", label)
    for k in ("PDmap", "T1map", "T2map", "sd_T1map"):
        np.testing.assert_array_equal(nib.load(str(pa[k])).get_fdata(),
                                      nib.load(str(pb[k])).get_fdata())
    # the level along the direction T1w and FLAIR leave open comes from the calibration's
    # WM/GM values (recorded), not from the network's guess; with all three there is none
    anchor = json.loads(pb["T1map"].with_name(pb["T1map"].name[:-7] + ".json").read_text()
                        )["Scaling"]["pinning"]["anchor"]
    assert anchor["applied"] and anchor["tissues"] == ["WM", "GM"] and anchor["contrasts"] == 2
    assert anchor["per_tissue"] == ["GM", "WM"]
    assert set(anchor["beta_log"]) == {"session", "WM", "GM"}
    infer_session(sdir, out / "model.pt", tmp_path / "all", device="cpu", threads=1, synth=False)
    pall = map_paths(tmp_path / "all", label)["T1map"]
    assert json.loads(pall.with_name(pall.name[:-7] + ".json").read_text())["Scaling"][
        "pinning"]["anchor"] == {"applied": False, "contrasts": 3}
    # the withheld T2w is still re-synthesised, with a fitted scale, and marked as not used
    side = json.loads(pb["synth_T2w"].with_name(pb["synth_T2w"].name[:-7] + ".json").read_text())
    assert side["InputUsedForMaps"] is False and side["InputContrasts"] == list(keep)
    assert b["scale_relative_to_reference"]["T2w"] > 0


def test_calibrated_inference_refuses_a_missing_or_csf_free_segmentation(trained, tiny_sessions,
                                                                          tmp_path):
    import shutil

    from qmriflow.model.infer import infer_session

    out, _ = trained
    src = tiny_sessions[-1]
    sdir = tmp_path / "results" / src.parent.name / src.name
    shutil.copytree(src, sdir)
    dseg = next(sdir.glob("anat/*_dseg.nii.gz"))
    img = nib.load(str(dseg))
    no_csf = np.where(img.get_fdata() == 3, 2, img.get_fdata()).astype(np.uint8)
    save_nifti(dseg, no_csf, img.affine, dtype=np.uint8)
    with pytest.raises(InputError, match=r"sub-E05_ses-V01.*too few CSF voxels \(0\)"):
        infer_session(sdir, out / "model.pt", tmp_path / "m1", device="cpu", threads=1)
    dseg.unlink()
    with pytest.raises(InputError, match=r"sub-E05_ses-V01.*dseg.*is missing"):
        infer_session(sdir, out / "model.pt", tmp_path / "m2", device="cpu", threads=1)
    assert not (tmp_path / "m1").exists() and not (tmp_path / "m2").exists()


def test_cli_pack_train_infer_and_errors(tiny_sessions, trained, tmp_path, capsys):
    from qmriflow.cli import main

    results = tiny_sessions[0].parent.parent
    assert main(["pack", str(tmp_path / "pack"), "--results-dir", str(results)]) == 0
    assert main(["train", str(tmp_path / "pack"), str(tmp_path / "m"), "--width", "4",
                 "--epochs", "1", "--batch-size", "4", "--steps-per-epoch", "1",
                 "--device", "cpu", "--threads", "1", "--no-progress"]) == 0
    assert (tmp_path / "m" / "model.pt").is_file()
    sdir = tiny_sessions[1]
    sub, ses = sdir.parent.name[4:], sdir.name[4:]
    prov = tmp_path / "prov.json"
    assert main(["infer", str(sdir), "--checkpoint", str(tmp_path / "m" / "model.pt"),
                 "--out-dir", str(tmp_path / "maps"), "--subject", sub, "--session", ses,
                 "--device", "cpu", "--threads", "1", "--provenance", str(prov)]) == 0
    assert prov.is_file()
    capsys.readouterr()
    # a missing checkpoint: exit 1, one line naming session and file, a failure record,
    # and no maps written (never random weights)
    fails = tmp_path / "failures"
    rc = main(["infer", str(sdir), "--checkpoint", str(tmp_path / "missing.pt"),
               "--out-dir", str(tmp_path / "maps3"), "--subject", sub, "--session", ses,
               "--failures", str(fails)])
    err = capsys.readouterr().err.strip()
    assert rc == 1 and "\n" not in err
    assert f"sub-{sub}_ses-{ses}" in err and "missing.pt" in err and "not found" in err
    assert not (tmp_path / "maps3").exists() or not list((tmp_path / "maps3").iterdir())
    assert list(fails.rglob("*"))
    # a corrupt checkpoint, same
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"PK\x03\x04 not really a zip")
    rc = main(["infer", str(sdir), "--checkpoint", str(bad), "--out-dir",
               str(tmp_path / "maps4"), "--subject", sub, "--session", ses])
    err = capsys.readouterr().err.strip()
    assert rc == 1 and "corrupt" in err and "\n" not in err
    rc = main(["infer", str(sdir), "--checkpoint", str(bad), "--out-dir",
               str(tmp_path / "maps4"), "--subject", sub, "--session", ses,
               "--contrasts", "T1w,PD"])
    assert rc == 1


def test_training_writes_epoch_lines_to_a_log_and_no_bar(packed, tmp_path, capsys):
    """Under Snakemake the trainer's output goes to a log file: one line per epoch there (the
    rule no longer passes --no-progress), and no progress bar, which is for terminals only."""
    train(packed, tmp_path / "m", TrainConfig(**{**CFG, "epochs": 2}), progress=True)
    out, err = capsys.readouterr()
    lines = [ln for ln in out.splitlines() if ln.startswith("epoch ")]
    assert [ln.split(":")[0] for ln in lines] == ["epoch 1/2", "epoch 2/2"]
    assert "batch/s" not in err and "it/s" not in err and "%|" not in err
    assert "--no-progress" not in (Path(__file__).parents[1] / "rules" / "model.smk").read_text()


# ---------------------------------------------------------------------------------------------
# distillation towards the network-free maps (issue 22: the fast path is calibrated)
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def packed_targets(tiny_sessions, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pack_targets")
    pack_sessions(tiny_sessions, out, targets=True)
    return out


def test_pack_targets_are_the_network_free_maps(packed_targets, tiny_sessions):
    from qmriflow.model.data import session_calibration, session_seg
    from qmriflow.model.infer import network_free_maps

    p = PackedSlices(packed_targets, "calibrated")
    assert p.targets is not None and p.targets.shape == (len(p), 3, SIZE, SIZE)
    assert all(s["targets"] for s in p.index["sessions"])
    # the first session's slices, against the estimator run here on the loaded session
    sd = load_session(tiny_sessions[0])
    want = network_free_maps(sd, session_calibration(sd), session_seg(sd))
    z = np.asarray(p.index["slice_z"])[p.slice_session == 0]
    got = np.asarray(p.targets[np.flatnonzero(p.slice_session == 0)])
    np.testing.assert_allclose(got, want[z], rtol=1e-6)
    brain = (np.asarray(p.masks) & 2).astype(bool)
    t = np.asarray(p.targets)
    assert np.all(t[:, :, ~brain.any(0)] == 0)  # nothing outside every brain
    # inside the brain: plausible, calibrated values (WM T1 of the tiny phantom ~0.6-1.3 s)
    inside = np.moveaxis(t, 1, -1)[brain]
    assert np.all(inside > 0)
    assert 0.4 < np.median(inside[:, 1]) < 2.0
    # a pack without --targets has none (and a repack removes them)
    assert PackedSlices(packed_targets).batch(np.arange(2))["targets"].shape == (2, 3, SIZE, SIZE)


def test_pack_targets_narrow_a_head_mask_as_inference_does(tiny_sessions, tmp_path):
    # a head-sized "brain" mask (the published example's): the targets are the network-free
    # maps exactly as `infer --estimator network-free` makes them (mask narrowed to the
    # segmented brain), and the packed brain mask is the narrowed one
    import shutil

    from qmriflow.model.data import session_calibration, session_seg
    from qmriflow.model.infer import narrow_head_mask, network_free_maps

    src = tiny_sessions[0]
    copy = tmp_path / "results" / src.parent.name / src.name
    shutil.copytree(src, copy)
    mask_path = next(copy.glob("anat/*_desc-brain_mask.nii.gz"))
    img = nib.load(mask_path)
    t2w = np.asarray(nib.load(next(copy.glob("anat/*_desc-preproc_T2w.nii.gz"))).dataobj)
    head = (t2w > 0.05 * t2w.max()).astype(np.uint8)
    assert head.sum() > 1.3 * np.asarray(img.dataobj).sum()
    save_nifti(mask_path, head, img.affine, dtype=np.uint8)
    pack_sessions([copy], tmp_path / "p", targets=True)
    p = PackedSlices(tmp_path / "p", "calibrated")
    sd = load_session(copy)
    seg = session_seg(sd)
    assert narrow_head_mask(sd, seg) is not None  # really head-sized
    want = network_free_maps(sd, session_calibration(sd, seg=seg), seg)
    z = np.asarray(p.index["slice_z"])
    np.testing.assert_allclose(np.asarray(p.targets), want[z], rtol=1e-6)
    np.testing.assert_array_equal((np.asarray(p.masks) & 2) > 0, sd.brain[z])


def test_distill_l1_by_hand():
    from qmriflow.model.losses import distill_l1

    maps = torch.full((1, 3, 2, 2), 1.0)
    targets = torch.full((1, 3, 2, 2), float(np.e))
    targets[0, :, 1, 1] = 0.0  # no target there
    brain = torch.ones(1, 1, 2, 2, dtype=torch.bool)
    brain[0, 0, 0, 0] = False
    # two voxels count (|log 1 - log e| = 1 in each of the three maps)
    assert float(distill_l1(maps, targets, brain)) == pytest.approx(1.0)
    maps[0, 1, 0, 1] = float(np.e) ** 2  # T1 off by one more log-unit in one voxel
    assert float(distill_l1(maps, targets, brain)) == pytest.approx((6 + 0) / 6.0)
    assert float(distill_l1(maps, targets, torch.zeros_like(brain))) == 0.0


def test_distillation_needs_targets_and_calibrated_scaling(packed, tmp_path):
    with pytest.raises(ConfigError, match="pack with `qmriflow pack --targets`"):
        train(packed, tmp_path / "m", TrainConfig(**{**CFG, "epochs": 1}, scaling="calibrated",
                                                 distill=1.0), progress=False)
    with pytest.raises(ConfigError, match="distill needs scaling: calibrated"):
        TrainConfig(**CFG, scaling="seed", distill=1.0)
    with pytest.raises(ConfigError, match="distill must be >= 0"):
        TrainConfig(**CFG, scaling="calibrated", distill=-1.0)
    # off: the recorded hyper-parameters are the published loss's, as before
    assert "distill" not in TrainConfig(**CFG).hyperparameters()
    assert TrainConfig(**CFG, scaling="calibrated", distill=0.5).hyperparameters()["distill"] == 0.5


def test_distillation_brings_the_networks_maps_to_the_network_free_ones(packed_targets,
                                                                       tmp_path):
    # same seed, same steps: with the distillation term the network's own maps (the fast
    # path) come much closer to the network-free estimate than with the physics loss alone
    from qmriflow.model.checkpoint import load_model
    from qmriflow.model.infer import predict_maps

    p = PackedSlices(packed_targets, "calibrated")
    idx = np.arange(len(p))
    b = p.batch(idx)
    brain = b["brain"][:, 0] & (b["targets"] > 0).all(1)
    gaps = {}
    for w in (0.0, 2.0):
        out = tmp_path / f"d{w:g}"
        cfg = TrainConfig(**{**CFG, "epochs": 4}, steps_per_epoch=25, scaling="calibrated",
                          distill=w)
        train(packed_targets, out, cfg, progress=False)
        model, _ = load_model(out / "model.pt", torch.device("cpu"))
        maps = predict_maps(model, b["images"], device=torch.device("cpu"), precision="fp32")
        err = np.abs(np.log(np.maximum(maps, 1e-3)) - np.log(np.maximum(b["targets"], 1e-3)))
        gaps[w] = float(np.median(np.moveaxis(err, 1, -1)[brain]))
    assert gaps[2.0] < 0.6 * gaps[0.0], gaps
