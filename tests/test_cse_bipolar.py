"""Bipolar multi-echo readouts (issue 25 item 1): the odd/even amplitude factor in the forward
model, its estimate, the fit and the dual network's loss, and detection from the sidecar."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from qmriflow.cse import CseOptions, TrainOptions, fit_two_start, load_series, run_cse
from qmriflow.cse.bipolar import estimate_even_echo_gain, readout_from_metadata
from qmriflow.cse.evaluate import evaluate_in_silico, simulate_grid
from qmriflow.physics import cse_echo_gains, cse_magnitude, cse_magnitude_jacobian

TE = 1.15 * np.arange(1, 7)
SIGMA = 1.0 / 60


def _grid(gain: float, seed: int, n_pdff: int = 50, n_r2: int = 25, reps: int = 4):
    sim = simulate_grid(n_pdff, n_r2, reps, seed=seed)
    p, r = sim.truth
    rng = np.random.default_rng(seed + 100)
    nu = cse_magnitude(np.ones_like(p), p, r, TE, 3.0, even_echo_gain=gain)
    z = nu + SIGMA * (rng.standard_normal(nu.shape) + 1j * rng.standard_normal(nu.shape))
    sim.signal = np.abs(z).astype(np.float32)
    return sim


def _mean_abs_bias(pdff: np.ndarray, sim) -> float:
    e = pdff.reshape(sim.pdff_values.size, sim.r2star_values.size, sim.reps).mean(-1)
    return float(np.abs(e - sim.pdff_values[:, None]).mean())


def test_forward_model_gain_and_jacobian():
    g = cse_echo_gains(6, 0.9)
    np.testing.assert_allclose(g, [1, 0.9, 1, 0.9, 1, 0.9])
    a = cse_magnitude(1.2, 0.3, 80.0, TE, 3.0)
    b = cse_magnitude(1.2, 0.3, 80.0, TE, 3.0, even_echo_gain=0.9)
    np.testing.assert_allclose(b, a * g)
    # analytic derivatives of the bipolar model against finite differences
    x = np.array([1.2, 0.3, 80.0])
    jac = cse_magnitude_jacobian(*x, TE, 3.0, even_echo_gain=0.9)
    for i, h in enumerate((1e-6, 1e-7, 1e-4)):
        xp, xm = x.copy(), x.copy()
        xp[i] += h
        xm[i] -= h
        fd = (cse_magnitude(*xp, TE, 3.0, even_echo_gain=0.9)
              - cse_magnitude(*xm, TE, 3.0, even_echo_gain=0.9)) / (2 * h)
        np.testing.assert_allclose(jac[1 + i], fd, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("gain", [0.9, 1.1])
def test_bipolar_grid_bias_returns_to_the_monopolar_level(gain):
    mono = _grid(1.0, seed=21)
    bip = _grid(gain, seed=21)
    b_mono = _mean_abs_bias(fit_two_start(mono.signal, TE, 3.0, SIGMA).pdff, mono)
    naive = fit_two_start(bip.signal, TE, 3.0, SIGMA)
    est = estimate_even_echo_gain(bip.signal, TE, 3.0, SIGMA)
    assert est["gain"] == pytest.approx(gain, abs=0.015) and est["significant"]
    model = fit_two_start(bip.signal, TE, 3.0, SIGMA, even_echo_gain=est["gain"])
    b_naive, b_model = _mean_abs_bias(naive.pdff, bip), _mean_abs_bias(model.pdff, bip)
    assert abs(b_model - b_mono) <= 0.01, (b_mono, b_naive, b_model)
    # where the side is rarely in doubt (R2* <= 100 1/s) the uncorrected odd/even factor
    # biases PDFF systematically; the model removes it
    low = bip.r2star_values <= 100
    shape = (bip.pdff_values.size, bip.r2star_values.size, bip.reps)

    def low_bias(pd):
        e = pd.reshape(shape).mean(-1)[:, low]
        return float(np.abs(e - bip.pdff_values[:, None]).mean())

    assert low_bias(naive.pdff) > low_bias(model.pdff) + 0.01
    assert low_bias(model.pdff) <= low_bias(fit_two_start(mono.signal, TE, 3.0, SIGMA).pdff) \
        + 0.005


def _write_series(path: Path, gain: float, meta: dict | None = None, seed: int = 0):
    rng = np.random.default_rng(seed)
    x, y = np.meshgrid(np.linspace(-1, 1, 48), np.linspace(-1, 1, 40), indexing="ij")
    body = (x / 0.85) ** 2 + (y / 0.75) ** 2 < 1
    pd = np.clip(0.5 + 0.45 * np.sin(3 * x) * np.cos(2 * y), 0, 1)
    r2 = 40 + 60 * (y + 1)
    s0 = np.where(body, 1.0, 0.0)
    nu = cse_magnitude(np.repeat(s0[..., None], 2, -1), np.repeat(pd[..., None], 2, -1),
                       np.repeat(r2[..., None], 2, -1), TE, 3.0, even_echo_gain=gain)
    data = np.abs(nu + SIGMA * (rng.standard_normal(nu.shape)
                                + 1j * rng.standard_normal(nu.shape))).astype(np.float32)
    nib.save(nib.Nifti1Image(data, np.eye(4)), path)
    side = {"EchoTime": [t / 1000 for t in TE], "MagneticFieldStrength": 3.0, **(meta or {})}
    path.with_name(path.name.replace(".nii.gz", ".json")).write_text(json.dumps(side))
    return body, pd


def test_monopolar_series_factor_stays_one_and_maps_do_not_change(tmp_path: Path):
    f = tmp_path / "m_MEGRE.nii.gz"
    _write_series(f, 1.0)
    series = load_series(f)
    auto = run_cse(series, CseOptions(method="fit", sigma=SIGMA))
    mono = run_cse(series, CseOptions(method="fit", sigma=SIGMA, readout="monopolar"))
    assert auto.info["readout"]["EvenEchoGain"] == 1.0
    assert mono.info["readout"]["EvenEchoGain"] == 1.0
    np.testing.assert_array_equal(auto.pdff, mono.pdff)


def test_bipolar_detected_from_sidecar_and_modelled(tmp_path: Path):
    f = tmp_path / "b_MEGRE.nii.gz"
    _body, pd = _write_series(f, 0.92, {"ucReadOutMode": "0x2"})
    series = load_series(f)
    res = run_cse(series, CseOptions(method="fit", sigma=SIGMA))
    ro = res.info["readout"]
    assert ro["ReadoutPolarity"] == "bipolar" and "ucReadOutMode" in ro["source"]
    assert ro["EvenEchoGain"] == pytest.approx(0.92, abs=0.01)
    forced = run_cse(series, CseOptions(method="fit", sigma=SIGMA, readout="monopolar"))
    truth = np.repeat(pd[..., None], 2, -1)[res.mask]
    err_model = np.median(np.abs(res.pdff[res.mask] - truth))
    err_naive = np.median(np.abs(forced.pdff[res.mask] - truth))
    assert err_model < 0.01 < err_naive


@pytest.mark.parametrize(("meta", "expected"), [
    ({"ucReadOutMode": 2}, "bipolar"), ({"ucReadOutMode": "0x1"}, "monopolar"),
    ({"ReadoutPolarity": "Bipolar"}, "bipolar"), ({}, None), ({"ReadoutMode": "x"}, None),
])
def test_readout_from_metadata(meta, expected):
    assert readout_from_metadata(meta)[0] == expected


def test_dual_network_loss_models_the_bipolar_factor():
    sim = _grid(0.9, seed=5, n_pdff=25, n_r2=10, reps=20)
    opts = TrainOptions(max_epochs=60, min_epochs=10, seed=1)
    naive = evaluate_in_silico(sim, train_options=opts, methods=("dual",))
    from qmriflow.cse import networks

    nets, rep = networks.train_networks(sim.signal, TE, 3.0, SIGMA, options=opts,
                                        even_echo_gain=0.9)
    pred = networks.predict(nets, sim.signal, TE, 3.0, SIGMA, even_echo_gain=0.9)
    w, f = pred.get("water"), pred.get("fat")
    pdff = np.where(f["nll"] < w["nll"], f["pdff"], w["pdff"])
    assert min(rep.best_val_nll.values()) < min(naive["training"]["best_val_nll"].values())
    assert _mean_abs_bias(pdff, sim) < naive["methods"]["dual"]["mean_abs_pdff_bias"]


def test_cli_readout_flag(tmp_path: Path):
    from qmriflow.cli import main

    f = tmp_path / "c_MEGRE.nii.gz"
    _write_series(f, 1.08)
    rc = main(["cse-fit", str(f), "--out", str(tmp_path / "o"), "--method", "fit",
               "--readout", "bipolar", "--sigma", str(SIGMA)])
    assert rc == 0
    summary = json.loads((tmp_path / "o" / "c_desc-fit_cse.json").read_text())
    assert summary["Readout"]["ReadoutPolarity"] == "bipolar"
    assert summary["Readout"]["EvenEchoGain"] == pytest.approx(1.08, abs=0.01)
    side = json.loads((tmp_path / "o" / "c_desc-fit_PDFFmap.json").read_text())
    assert side["EvenEchoGain"] == pytest.approx(1.08, abs=0.01)


def test_messages_quote_the_users_values_and_name_the_fix(tmp_path: Path):
    """Issue 25 item 5: echo times in ms are quoted as written; the missing field strength
    names the flag and the sidecar key that supply it."""
    from qmriflow.errors import InputError

    f = tmp_path / "x_MEGRE.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((3, 3, 1, 3), np.float32), np.eye(4)), f)
    sc = tmp_path / "x_MEGRE.json"
    sc.write_text(json.dumps({"EchoTime": [1.1, 2.2, 3.3], "MagneticFieldStrength": 3}))
    with pytest.raises(InputError) as exc:
        load_series(f)
    msg = str(exc.value)
    assert "[1.1, 2.2, 3.3]" in msg and "1100" not in msg and "seconds" in msg
    sc.write_text(json.dumps({"EchoTime": [0.001, 0.002, 0.003]}))
    with pytest.raises(InputError) as exc:
        load_series(f)
    assert "--field-strength" in str(exc.value) and "MagneticFieldStrength" in str(exc.value)
