"""The three estimators of ``infer_session`` / ``qmriflow infer --estimator``: ``refined`` (the
default), ``network-only`` (the network's maps as they are) and ``network-free`` (the
calibration's tissue values made data-consistent, no network), on a tiny noise-free synthetic
session (64×64×4, drawn with ``qmriflow.physics.signal`` from known maps, as in
tests/test_model_train.py) and an untrained width-8 network (fast; the wiring is what is
tested here, accuracy is a benchmark)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from qmriflow import physics
from qmriflow.errors import ConfigError, InputError
from qmriflow.model.calibration import ESTIMATORS, Smoothing, tissue_value_maps
from qmriflow.model.checkpoint import FORMAT, load_model, save_checkpoint
from qmriflow.model.data import load_session, session_calibration, session_seg
from qmriflow.model.infer import _pin, infer_session, map_paths, predict_maps
from qmriflow.model.network import SharedAttnUNet
from qmriflow.model.normalise import CONTRASTS

from .test_model_train import write_tiny_session

torch.set_num_threads(1)

KEYS = ("PDmap", "T1map", "T2map")
RUN = dict(device="cpu", precision="fp32", threads=1)


@pytest.fixture(scope="module")
def session(tmp_path_factory) -> Path:
    """A noise-free tiny session (images exactly scale · physics.signal of the truth maps)."""
    return write_tiny_session(tmp_path_factory.mktemp("est") / "results", "N01", "V01", seed=3,
                              snr=np.inf)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """An untrained width-8 network, saved as trained with calibrated scaling."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "model.pt"
    save_checkpoint(path, {"format": FORMAT, "width": 8, "epoch": 0,
                           "state_dict": SharedAttnUNet(8).state_dict(),
                           "hyperparameters": {"scaling": "calibrated"}})
    return path


def _label(sdir: Path) -> str:
    return f"{sdir.parent.name}_{sdir.name}"


def _maps(out: Path, label: str) -> np.ndarray:
    """The written maps as (S, 3, H, W) float32 (PD, T1, T2), as infer_session holds them."""
    paths = map_paths(out, label)
    return np.stack([np.moveaxis(np.asarray(nib.load(str(paths[k])).dataobj), 2, 0)
                     for k in KEYS], axis=1)


def _sidecar(path: Path) -> dict:
    return json.loads(path.with_name(path.name[:-7] + ".json").read_text())


def test_network_only_is_the_raw_network_output(session, checkpoint, tmp_path):
    label = _label(session)
    model, _ = load_model(checkpoint, "cpu")
    for scaling, inputs in (("calibrated", CONTRASTS), ("seed", ("T1w", "FLAIR"))):
        out = tmp_path / scaling
        info = infer_session(session, checkpoint, out, contrasts=inputs, scaling=scaling,
                             estimator="network-only", **RUN)
        sd = load_session(session, contrasts=inputs, head_from=inputs)
        if scaling == "seed":
            # the published input path (model/published.py; its fidelity:
            # test_published_fidelity), whose Otsu mask comes from the T1w
            from qmriflow.model.published import seed_inputs

            full = load_session(session, keep_raw=True)
            brain = np.moveaxis(full.brain, 0, 2)
            prep = seed_inputs(full.raw, brain, full.affine, inputs)
            raw = prep.to_input_grid(predict_maps(
                model, prep.images, device=torch.device("cpu"), precision="fp32",
                batch_size=4, mask=prep.mask))
        else:
            raw = predict_maps(model, sd.images, device=torch.device("cpu"), precision="fp32",
                               batch_size=4, mask=sd.brain)
        np.testing.assert_array_equal(_maps(out, label), raw)
        paths = map_paths(out, label)
        assert not any(paths[f"sd_{k}"].exists() for k in KEYS)  # no uncertainty maps
        side = _sidecar(paths["T1map"])
        assert side["Estimator"] == {"Name": "network-only",
                                     "Description": ESTIMATORS["network-only"]}
        assert side["ModelCheckpointSHA256"] == info["checkpoint_sha256"]
        assert info["estimator"] == "network-only" and info["scaling"] == scaling
        # re-synthesis as today: with the calibrated scales where the scaling is calibrated
        synth = _sidecar(paths["synth_T2w"])
        if scaling == "calibrated":
            assert side["Scaling"]["pinning"] is None
            calib = session_calibration(sd, inputs)
            for c in inputs:
                assert info["scale_relative_to_reference"][c] == pytest.approx(
                    calib.scales[c] / physics.wm_reference_scale(sd.protocols[c]))
        else:
            assert "pinning" not in side["Scaling"] and synth["InputUsedForMaps"] is False


def test_network_free_runs_without_a_network_and_fits_the_inputs(session, tmp_path):
    label = _label(session)
    info = infer_session(session, None, tmp_path / "nf", estimator="network-free",
                         smoothing=Smoothing(radius=0), synth=False, threads=1)
    assert info["checkpoint"] is None and info["device"] is None
    assert info["timing_s"]["network"] is None and info["scaling"] == "calibrated"
    maps = _maps(tmp_path / "nf", label).transpose(1, 0, 2, 3)  # (3, S, H, W)
    sd = load_session(session)
    calib = session_calibration(sd)
    brain = sd.brain
    assert np.all(maps[:, ~brain] == 0) and np.all(maps[:, brain] > 0)
    # the maps re-synthesise every input with the calibrated scales (noise-free session): the
    # per-voxel misfit in the brain is far below a percent
    for ci, c in enumerate(sd.contrasts):
        fit = calib.scales[c] * np.asarray(physics.signal(sd.protocols[c],
                                                          *maps.astype(np.float64)))
        assert np.median(np.abs(fit[brain] / sd.images[:, ci][brain] - 1)) < 0.005, c
    # tissue means finite, positive and near the truth the session was drawn from
    seg = session_seg(sd)
    truth = np.stack([np.moveaxis(nib.load(str(session / "truth" / f"{k}.nii.gz")).get_fdata(),
                                  2, 0) for k in ("pd", "t1", "t2")], axis=1)
    for lab in (1, 2):  # GM, WM
        got = maps[:, seg == lab].mean(axis=1)
        want = truth.transpose(1, 0, 2, 3)[:, seg == lab].mean(axis=1)
        assert np.all(np.isfinite(got)) and np.all(got > 0)
        np.testing.assert_allclose(got, want, rtol=0.25)
    # the sidecar says so; no checkpoint; uncertainty maps as in the default path
    paths = map_paths(tmp_path / "nf", label)
    side = _sidecar(paths["T1map"])
    assert side["Estimator"] == {"Name": "network-free",
                                 "Description": ESTIMATORS["network-free"]}
    assert side["ModelCheckpoint"] is None and side["ModelCheckpointSHA256"] is None
    assert side["Scaling"]["pinning"]["pinned"] is False
    assert side["Scaling"]["pinning"]["refine"]["voxels"] == int(brain.sum())
    for k in KEYS:
        u = np.moveaxis(nib.load(str(paths[f"sd_{k}"])).get_fdata(), 2, 0)
        assert np.all(u[brain] > 0) and np.all(u[~brain] == 0)


def test_network_free_is_the_default_path_from_the_tissue_maps(session, tmp_path):
    """Same data consistency, anchoring (two inputs here), smoothing and uncertainty as the
    default path, started from the calibration's tissue-value maps instead of the network's."""
    inputs = ("T1w", "FLAIR")
    out = tmp_path / "nf2"
    info = infer_session(session, None, out, contrasts=inputs, estimator="network-free",
                         threads=1)
    sd = load_session(session, contrasts=CONTRASTS, head_from=inputs)
    seg = session_seg(sd)
    calib = session_calibration(sd, inputs, seg=seg)
    start = np.moveaxis(tissue_value_maps(seg, calib.tissues, sd.brain), -1, 1)
    want, sds, summary = _pin(start.astype(np.float32), sd, calib, inputs, seg,
                              from_network=False)
    np.testing.assert_array_equal(_maps(out, _label(session)), want)
    paths = map_paths(out, _label(session))
    np.testing.assert_array_equal(
        np.moveaxis(np.asarray(nib.load(str(paths["sd_T1map"])).dataobj), 2, 0), sds[:, 1])
    assert summary["anchor"]["applied"] and tuple(info["calibration"]["contrasts"]) == inputs
    side = _sidecar(paths["T1map"])
    assert side["Scaling"]["pinning"]["anchor"]["applied"] is True


def test_tissue_value_maps_blend_in_log_space():
    dseg = np.zeros((1, 1, 12), np.int16)
    dseg[..., :6], dseg[..., 6:10] = 2, 1  # WM | GM | two unlabelled voxels
    targets = {"WM": {"pd": 0.7, "t1_s": 0.8, "t2_s": 0.07},
               "GM": {"pd": 0.8, "t1_s": 1.3, "t2_s": 0.09}}
    mask = np.ones(dseg.shape, bool)
    mask[..., 0] = False
    got = tissue_value_maps(dseg, targets, mask, sigma=1.0)
    assert np.all(got[..., 0, :] == 0)  # outside the mask
    np.testing.assert_allclose(got[0, 0, 1], [0.7, 0.8, 0.07], rtol=1e-4)  # deep in WM
    # at the WM|GM edge: the geometric blend, weights the smoothed indicators
    from scipy import ndimage

    w = {lab: ndimage.gaussian_filter1d((dseg[0, 0] == lab).astype(float), 1.0, mode="nearest")
         for lab in (1, 2)}
    for i in (5, 6):
        a = w[2][i] / (w[1][i] + w[2][i])
        want = np.exp(a * np.log([0.7, 0.8, 0.07]) + (1 - a) * np.log([0.8, 1.3, 0.09]))
        np.testing.assert_allclose(got[0, 0, i], want, rtol=1e-9)
    # unlabelled voxels next to GM take GM; no tissue at all → the equal-weight blend
    np.testing.assert_allclose(got[0, 0, 11], [0.8, 1.3, 0.09], rtol=1e-3)
    flat = tissue_value_maps(np.zeros((1, 2, 2), np.int16), targets, np.ones((1, 2, 2), bool))
    np.testing.assert_allclose(flat[0, 0, 0], np.sqrt([0.56, 1.04, 0.0063]), rtol=1e-10)


def test_default_estimator_is_refined(session, checkpoint, tmp_path):
    label = _label(session)
    # the whole slice through the network, so that the test's own predict_maps call below
    # is the network's field of view (the default, "brain", feeds only the brain's box)
    infer_session(session, checkpoint, tmp_path / "d", synth=False, network_fov="slice", **RUN)
    infer_session(session, checkpoint, tmp_path / "r", synth=False, estimator="refined",
                  network_fov="slice", **RUN)
    got = _maps(tmp_path / "d", label)
    np.testing.assert_array_equal(got, _maps(tmp_path / "r", label))
    side = _sidecar(map_paths(tmp_path / "d", label)["T1map"])
    assert side["Estimator"] == {"Name": "refined", "Description": ESTIMATORS["refined"]}
    # the refined maps are the network's maps through the same _pin as the network-free path
    sd = load_session(session)
    seg = session_seg(sd)
    calib = session_calibration(sd, seg=seg)
    model, _ = load_model(checkpoint, "cpu")
    net = predict_maps(model, sd.images, device=torch.device("cpu"), mask=sd.brain)
    np.testing.assert_array_equal(got, _pin(net, sd, calib, CONTRASTS, seg)[0])
    assert not np.array_equal(got, net)


def test_refusals_are_one_line(session, checkpoint, tmp_path, capsys):
    with pytest.raises(ConfigError, match=r"network-free.*needs scaling 'calibrated'") as exc:
        infer_session(session, None, tmp_path / "s", estimator="network-free", scaling="seed")
    assert "\n" not in str(exc.value)
    with pytest.raises(ConfigError, match="smoothing guide 'images'"):
        infer_session(session, None, tmp_path / "s", estimator="network-free",
                      smoothing=Smoothing(guide="network"))
    with pytest.raises(ConfigError, match="estimator must be one of"):
        infer_session(session, checkpoint, tmp_path / "s", estimator="fast")
    with pytest.raises(ConfigError, match="'network-only' needs a model checkpoint"):
        infer_session(session, None, tmp_path / "s", estimator="network-only")
    copy = tmp_path / "results" / session.parent.name / session.name
    shutil.copytree(session, copy)
    next(copy.glob("anat/*_dseg.nii.gz")).unlink()
    with pytest.raises(InputError, match=r"sub-N01_ses-V01.*dseg.*is missing") as exc:
        infer_session(copy, None, tmp_path / "m", estimator="network-free")
    assert "\n" not in str(exc.value)
    assert not (tmp_path / "s").exists() and not (tmp_path / "m").exists()
    # the CLI: no --checkpoint needed for network-free, required (usage error) otherwise
    from qmriflow.cli import main

    common = ["--subject", "N01", "--session", "V01", "--threads", "1", "--no-synth"]
    assert main(["infer", str(session), "--out-dir", str(tmp_path / "c"), "--estimator",
                 "network-free", *common]) == 0
    assert "network-free maps" in capsys.readouterr().out
    assert _sidecar(map_paths(tmp_path / "c", _label(session))["T2map"])["Estimator"][
        "Name"] == "network-free"
    with pytest.raises(SystemExit) as ex:
        main(["infer", str(session), "--out-dir", str(tmp_path / "c2"), *common])
    assert ex.value.code == 2
    assert "required: --checkpoint" in capsys.readouterr().err
    rc = main(["infer", str(copy), "--out-dir", str(tmp_path / "c3"), "--estimator",
               "network-free", *common])
    err = capsys.readouterr().err.strip()
    assert rc == 1 and "\n" not in err and "sub-N01_ses-V01" in err and "dseg" in err


def test_echo_train_sessions_are_fitted_with_their_trains(tmp_path, checkpoint):
    """A session whose T2w/FLAIR were drawn with echo trains (EPG) and whose parameters say so:
    the default estimators fit the train, the sidecars say which model each contrast used, and
    ``scaling: seed`` (the published method) keeps the seed's TE factors."""
    from qmriflow.epg import EchoTrain, variable_flip_schedule
    from qmriflow.io import save_nifti, write_json

    sdir = write_tiny_session(tmp_path / "results", "E01", "V01", seed=5, snr=np.inf)
    label = _label(sdir)
    params_path = sdir / f"{label}_desc-protocol_params.json"
    params = json.loads(params_path.read_text())
    trains = {"t2w": EchoTrain(params["t2w"]["te_ms"] / 8, (140.0,) * 16, 8),
              "flair": EchoTrain(4.0, variable_flip_schedule(160, minimum_deg=35.0,
                                                             end_deg=110.0),
                                 round(params["flair"]["te_ms"] / 4.0))}
    truth = {k: np.asarray(nib.load(str(sdir / "truth" / f"{k}.nii.gz")).dataobj, np.float64)
             for k in ("pd", "t1", "t2")}
    for role, name in (("t2w", "T2w"), ("flair", "FLAIR")):
        params[role]["echo_train"] = trains[role].as_dict()
        params[role]["echo_train_source"] = f"test: {role} train given"
        proto = physics.Protocol.from_dict(params[role])
        assert proto.signal_model == "epg"
        img_path = sdir / "anat" / f"{label}_space-T2w_desc-preproc_{name}.nii.gz"
        img = nib.load(str(img_path))
        s = np.asarray(physics.signal(proto, truth["pd"], truth["t1"], truth["t2"]))
        save_nifti(img_path, 1000.0 * s, img.affine)
    write_json(params_path, params)

    out = tmp_path / "nf"
    infer_session(sdir, None, out, estimator="network-free", smoothing=Smoothing(radius=0),
                  synth=False, threads=1)
    side = _sidecar(map_paths(out, label)["T1map"])
    models = side["SignalModels"]
    assert models["T1w"] == {"model": "te-factor"}
    for c in ("T2w", "FLAIR"):
        assert models[c]["model"] == "epg" and models[c]["Source"].startswith("test:")
        assert models[c]["EchoTrain"]["echo_train_length"] == trains[c.lower()].length
    # the fit is consistent with the trains: WM/GM T2 means near the truth the images hold
    maps = _maps(out, label).transpose(1, 0, 2, 3)
    seg = session_seg(load_session(sdir))
    t = np.moveaxis(truth["t2"], 2, 0)
    for lab in (1, 2):
        assert maps[2][seg == lab].mean() == pytest.approx(t[seg == lab].mean(), rel=0.1)
    # the published method: no echo trains, the seed's TE factors (and the sidecar says so)
    seed_ckpt = tmp_path / "seed.pt"
    save_checkpoint(seed_ckpt, {"format": FORMAT, "width": 8, "epoch": 0,
                                "state_dict": SharedAttnUNet(8).state_dict(),
                                "hyperparameters": {"scaling": "seed"}})
    infer_session(sdir, seed_ckpt, tmp_path / "seed", estimator="network-only",
                  scaling="seed", synth=False, **RUN)
    models = _sidecar(map_paths(tmp_path / "seed", label)["T1map"])["SignalModels"]
    for c in ("T2w", "FLAIR"):
        assert models[c]["model"] == "te-factor" and "published method" in models[c]["Source"]
        assert models[c]["TECorrectionFactor"] == params[c.lower()]["te_correction_factor"]
