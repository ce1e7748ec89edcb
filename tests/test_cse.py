"""Fat/water branch: loading/refusals, the two-start fit, networks, pipeline outputs, CLI.

Kept small (a few thousand voxels, reduced training); the full evaluation is bench/.
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from qmriflow.cli import main
from qmriflow.cse import (
    CseOptions,
    FitOptions,
    TrainOptions,
    choose_candidates,
    estimate_sigma,
    fit_two_start,
    foreground_mask,
    grid_search,
    load_series,
    run_cse,
    voxel_nll,
    write_outputs,
)
from qmriflow.cse.evaluate import evaluate_in_silico, simulate_grid
from qmriflow.errors import InputError
from qmriflow.physics import cse_magnitude

from .conftest import SHARED_DATA

TE = 1.15 * np.arange(1, 7)
SIGMA = 1.0 / 60


def _noisy(p: np.ndarray, r: np.ndarray, s0: float | np.ndarray = 1.0, seed: int = 0,
           sigma: float = SIGMA, te: np.ndarray = TE) -> np.ndarray:
    rng = np.random.default_rng(seed)
    nu = cse_magnitude(np.broadcast_to(s0, p.shape), p, r, te, 3.0)
    return np.abs(nu + sigma * (rng.standard_normal(nu.shape)
                                + 1j * rng.standard_normal(nu.shape)))


# ---------------------------------------------------------------------------------------------
# loading and refusals
# ---------------------------------------------------------------------------------------------


def _write_4d(path: Path, data: np.ndarray, te_s: list[float], field: float | None = 3.0):
    nib.save(nib.Nifti1Image(data.astype(np.float32), np.diag([2.0, 2.0, 3.0, 1.0])), path)
    meta = {"EchoTime": te_s}
    if field is not None:
        meta["MagneticFieldStrength"] = field
    path.with_name(path.name.replace(".nii.gz", ".json")).write_text(json.dumps(meta))


def test_load_4d_and_per_echo_folder(tmp_path: Path):
    data = np.random.default_rng(0).random((5, 6, 2, 4)).astype(np.float32)
    te = [0.0012, 0.0024, 0.0036, 0.0048]
    _write_4d(tmp_path / "sub-a_MEGRE.nii.gz", data, te)
    s = load_series(tmp_path / "sub-a_MEGRE.nii.gz")
    np.testing.assert_allclose(s.te_ms, [1.2, 2.4, 3.6, 4.8])
    assert s.field_t == 3.0 and s.data.shape == (5, 6, 2, 4) and s.prefix == "sub-a"
    # per-echo folder, files listed out of order, plus a phase image that must be skipped
    d = tmp_path / "echoes"
    d.mkdir()
    for k in (3, 1, 4, 2):
        f = d / f"sub-b_acq-7_echo-{k}_MEGRE.nii.gz"
        nib.save(nib.Nifti1Image(data[..., k - 1], np.eye(4)), f)
        f.with_name(f.name.replace(".nii.gz", ".json")).write_text(json.dumps(
            {"EchoTime": te[k - 1], "EchoNumber": k, "MagneticFieldStrength": 1.5}))
    ph = d / "sub-b_acq-7_echo-1_part-phase_MEGRE.nii.gz"
    nib.save(nib.Nifti1Image(data[..., 0], np.eye(4)), ph)
    ph.with_name(ph.name.replace(".nii.gz", ".json")).write_text(json.dumps(
        {"EchoTime": te[0], "EchoNumber": 1, "ImageType": ["ORIGINAL", "PRIMARY", "P"]}))
    s2 = load_series(d)
    np.testing.assert_allclose(s2.te_ms, [1.2, 2.4, 3.6, 4.8])
    np.testing.assert_array_equal(s2.data, data)
    assert s2.field_t == 1.5 and s2.prefix == "sub-b_acq-7"
    # one echo file gathers its siblings
    assert load_series(d / "sub-b_acq-7_echo-2_MEGRE.nii.gz").n_echo == 4


@pytest.mark.parametrize(("te", "message"), [
    ([0.0012, 0.0024], "2 echo(es)"),
    ([0.0012, 0.0036, 0.0024], "not increasing"),
    ([0.0012, 0.0024, 0.0024], "duplicate"),
    ([0.0, 0.0012, 0.0024], "positive"),
    ([1.2, 2.4, 3.6], "seconds"),
])
def test_bad_echo_times_are_refused_with_one_line(tmp_path: Path, te, message):
    f = tmp_path / "x_MEGRE.nii.gz"
    _write_4d(f, np.ones((3, 3, 1, len(te))), te)
    with pytest.raises(InputError) as exc:
        load_series(f)
    assert message in str(exc.value) and "\n" not in str(exc.value)
    assert "x_MEGRE.nii.gz" in str(exc.value)


def test_two_echo_4d_refused_by_cli(tmp_path: Path, capsys):
    f = tmp_path / "dual_MEGRE.nii.gz"
    _write_4d(f, np.ones((4, 4, 2, 2)), [0.0023, 0.0046])
    rc = main(["cse-fit", str(f), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 1 and "2 echo(es)" in err and "at least 3" in err
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


def test_missing_field_strength_refused(tmp_path: Path):
    f = tmp_path / "x_MEGRE.nii.gz"
    _write_4d(f, np.ones((3, 3, 1, 3)), [0.001, 0.002, 0.003], field=None)
    with pytest.raises(InputError, match="MagneticFieldStrength"):
        load_series(f)
    assert load_series(f, field_t=3.0).field_t == 3.0


def test_real_philips_dual_echo_is_refused(tmp_path: Path):
    src = SHARED_DATA / "dicom" / "philips_dualecho_ffe"
    if not src.is_dir():
        pytest.skip(f"{src} absent (shared test data not mounted)")
    from qmriflow.archive.convert import find_dcm2niix, run_dcm2niix

    try:
        find_dcm2niix()
    except Exception as exc:
        pytest.skip(f"dcm2niix unavailable: {exc}")
    conv = tmp_path / "conv"
    run_dcm2niix(src, conv)
    with pytest.raises(InputError) as exc:
        load_series(conv)
    msg = str(exc.value)
    assert "2 echo(es)" in msg and "at least 3" in msg and str(conv) in msg


# ---------------------------------------------------------------------------------------------
# mask and noise
# ---------------------------------------------------------------------------------------------


def _phantom_series(shape=(40, 36, 3), seed=0, sigma=0.02):
    """Body ellipse: water background tissue, a fat disc, a hole (dark vessel) inside."""
    rng = np.random.default_rng(seed)
    x, y = np.meshgrid(np.linspace(-1, 1, shape[0]), np.linspace(-1, 1, shape[1]),
                       indexing="ij")
    body = (x / 0.8) ** 2 + (y / 0.7) ** 2 < 1
    fat = ((x - 0.3) ** 2 + y**2) < 0.08
    pd = np.where(fat, 0.9, 0.05)
    r2 = np.where(fat, 40.0, 60.0)
    s0 = np.where(body, 1.0, 0.0)
    nu = cse_magnitude(np.repeat(s0[..., None], shape[2], -1),
                       np.repeat(pd[..., None], shape[2], -1),
                       np.repeat(r2[..., None], shape[2], -1), TE, 3.0)
    z = nu + sigma * (rng.standard_normal(nu.shape) + 1j * rng.standard_normal(nu.shape))
    return np.abs(z).astype(np.float32), body, fat


def test_mask_and_background_sigma():
    data, body, _ = _phantom_series(sigma=0.02)
    mask = foreground_mask(data, 0.2)
    inside = np.repeat(body[..., None], 3, -1)
    assert (mask & inside).sum() / inside.sum() > 0.97
    assert (mask & ~inside).sum() < 0.01 * mask.sum()
    sigma, info = estimate_sigma(data, mask, TE, 3.0)
    assert info["method"] == "background-rayleigh-median"
    assert sigma == pytest.approx(0.02, rel=0.05)


def test_sigma_from_residuals_without_background():
    rng = np.random.default_rng(1)
    n = 6000
    p, r = rng.uniform(0, 0.3, n), rng.uniform(20, 80, n)
    data = _noisy(p, r, s0=1.0, sigma=0.01, seed=2).reshape(60, 100, 1, 6).astype(np.float32)
    sigma, info = estimate_sigma(data, np.ones((60, 100, 1), bool), TE, 3.0)
    assert info["method"] == "fit-residuals"
    assert sigma == pytest.approx(0.01, rel=0.1)


# ---------------------------------------------------------------------------------------------
# two-start fit
# ---------------------------------------------------------------------------------------------


def test_fit_recovers_truth_at_high_snr():
    p = np.array([0.0, 0.1, 0.3, 0.5, 0.7, 0.9, 1.0, 0.2])
    r = np.array([20.0, 50.0, 100.0, 30.0, 80.0, 40.0, 10.0, 300.0])
    m = cse_magnitude(np.full(8, 2.0), p, r, TE, 3.0) + 1e-7  # noise-free
    res = fit_two_start(m, TE, 3.0, 1e-3, options=FitOptions(dtype="float64"))
    np.testing.assert_allclose(res.pdff, p, atol=2e-3)
    np.testing.assert_allclose(res.r2star_per_s, r, atol=0.5)
    np.testing.assert_allclose(res.s0, 2.0, rtol=2e-3)
    np.testing.assert_array_equal(res.fat_side, (p >= 0.58).astype(np.uint8))


def test_fit_reaches_the_global_optimum_of_a_brute_force_grid():
    rng = np.random.default_rng(7)
    n = 100
    p, r = rng.uniform(0, 1, n), rng.uniform(0, 500, n)
    m = _noisy(p, r, seed=8)
    res = fit_two_start(m, TE, 3.0, SIGMA)
    nll = voxel_nll(m, res.s0, res.pdff, res.r2star_per_s, TE, 3.0, SIGMA)
    np.testing.assert_allclose(nll, res.nll, rtol=1e-5, atol=1e-4)  # reported NLL is real
    best, _ = grid_search(m, TE, 3.0, SIGMA, pdff_values=np.linspace(0, 1, 81),
                          r2star_values_per_s=np.linspace(0, 700, 101), s0_newton_steps=2)
    rel = (nll - best) / np.abs(best)
    assert np.mean(rel <= 1e-3) >= 0.99
    assert np.median(rel) < 0  # the continuous optimum beats the grid


def test_fit_on_float64_and_float32_agree():
    rng = np.random.default_rng(3)
    p, r = rng.uniform(0, 1, 500), rng.uniform(0, 500, 500)
    m = _noisy(p, r, seed=4)
    a = fit_two_start(m, TE, 3.0, SIGMA, options=FitOptions(dtype="float64"))
    b = fit_two_start(m, TE, 3.0, SIGMA, options=FitOptions(dtype="float32", threads=2,
                                                              chunk=128))
    assert np.mean(np.abs(a.nll - b.nll) <= 1e-4 * np.abs(a.nll)) > 0.99


def test_choose_candidates_with_smoothing():
    mask = np.ones((5, 5, 1), bool)
    d = np.full(25, 1.0)  # water NLL above fat everywhere: fat wins ...
    d[12] = -0.5  # ... except a single noisy voxel in the middle
    fat = choose_candidates(d, np.zeros(25), mask)
    assert fat.sum() == 24
    assert choose_candidates(d, np.zeros(25), mask, smooth=3).all()


# ---------------------------------------------------------------------------------------------
# networks (reduced grid and training; the full experiment is bench/bench_cse_eval.py)
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_eval():
    sim = simulate_grid(n_pdff=25, n_r2star=10, reps=20, seed=5)
    res = evaluate_in_silico(sim, train_options=TrainOptions(max_epochs=120, seed=1))
    return sim, res


def test_dual_network_matches_two_start_fit_in_silico(small_eval):
    _sim, res = small_eval
    dual, fit = res["methods"]["dual"], res["methods"]["fit"]
    assert fit["mean_abs_pdff_bias"] < 0.1
    assert dual["mean_abs_pdff_bias"] <= fit["mean_abs_pdff_bias"] + 0.03
    # water/fat swaps: low at low R2*, never far above the exact likelihood optimum's
    assert dual["swap_per_r2star"][0] < 0.05 and fit["swap_per_r2star"][0] < 0.03
    assert np.max(dual["swap_per_r2star"] - fit["swap_per_r2star"]) < 0.06
    # R2* of the well-determined low-PDFF, low-R2* corner is recovered
    assert np.abs(dual["r2star_bias"][:10, :4]).mean() < 15.0


def test_constrained_networks_stay_on_their_side_and_single_collapses(small_eval):
    sim, res = small_eval
    est = res["estimates"]
    assert est["water"]["pdff"].max() <= 0.58 + 1e-6
    assert est["fat"]["pdff"].min() >= 0.58 - 1e-6
    m = res["methods"]
    # water-only swaps exactly the true-fat rows, fat-only the true-water rows
    n_fat_rows = np.mean(sim.pdff_values >= 0.58)
    np.testing.assert_allclose(m["water"]["swap_per_r2star"], n_fat_rows, atol=1e-9)
    np.testing.assert_allclose(m["fat"]["swap_per_r2star"], 1 - n_fat_rows, atol=1e-9)
    # the naive network collapses onto one side: it swaps far more than the dual network
    side = m["single"]["fat_side_fraction"]
    assert side > 0.85 or side < 0.15
    assert m["single"]["swap_per_r2star"].mean() > 0.3
    assert m["single"]["swap_per_r2star"].mean() > 3 * m["dual"]["swap_per_r2star"].mean()


# ---------------------------------------------------------------------------------------------
# pipeline, outputs, CLI
# ---------------------------------------------------------------------------------------------


def test_cli_fit_writes_maps_with_affine_and_sidecars(tmp_path: Path):
    data, body, fat = _phantom_series(sigma=0.01)
    f = tmp_path / "sub-p_MEGRE.nii.gz"
    _write_4d(f, data, [t / 1000 for t in TE])
    prov = tmp_path / "prov.json"
    rc = main(["cse-fit", str(f), "--out", str(tmp_path / "out"), "--method", "fit",
               "--mask-threshold", "0.2", "--subject", "p", "--session", "1",
               "--provenance", str(prov)])
    assert rc == 0 and prov.is_file()
    out = tmp_path / "out"
    pd_img = nib.load(out / "sub-p_desc-fit_PDFFmap.nii.gz")
    np.testing.assert_allclose(pd_img.affine, np.diag([2.0, 2.0, 3.0, 1.0]))
    assert pd_img.shape == data.shape[:3]
    pdff = pd_img.get_fdata()
    inside_fat = np.repeat(fat[..., None], 3, -1)
    inside_water = np.repeat((body & ~fat)[..., None], 3, -1)
    assert np.median(pdff[inside_fat]) == pytest.approx(0.9, abs=0.02)
    assert np.median(pdff[inside_water]) == pytest.approx(0.05, abs=0.02)
    pct = nib.load(out / "sub-p_desc-fitpercent_PDFFmap.nii.gz").get_fdata()
    np.testing.assert_allclose(pct, pdff * 100, atol=1e-3)
    r2 = nib.load(out / "sub-p_desc-fit_R2starmap.nii.gz").get_fdata()
    assert np.median(r2[inside_water]) == pytest.approx(60, abs=5)
    side = json.loads((out / "sub-p_desc-fit_R2starmap.json").read_text())
    assert side["Units"] == "1/s" and side["NoiseSigma"] == pytest.approx(0.01, rel=0.1)
    assert side["NoiseSigmaEstimation"]["method"] == "background-rayleigh-median"
    choice = nib.load(out / "sub-p_desc-fit_choice.nii.gz").get_fdata()
    assert set(np.unique(choice)) <= {0, 1, 2}
    assert not list(out.glob(".*"))  # no temporary files left behind


def test_dual_pipeline_on_phantom(tmp_path: Path):
    data, body, fat = _phantom_series(shape=(48, 40, 2), sigma=0.01, seed=3)
    f = tmp_path / "ph_MEGRE.nii.gz"
    _write_4d(f, data, [t / 1000 for t in TE])
    series = load_series(f)
    res = run_cse(series, CseOptions(method="dual", mask_threshold=0.2,
                                     train=TrainOptions(max_epochs=60, min_epochs=10)))
    paths = write_outputs(res, series, tmp_path / "o")
    inside_fat = np.repeat(fat[..., None], 2, -1) & res.mask
    inside_water = np.repeat((body & ~fat)[..., None], 2, -1) & res.mask
    assert np.median(res.pdff[inside_fat]) == pytest.approx(0.9, abs=0.05)
    assert np.median(res.pdff[inside_water]) == pytest.approx(0.05, abs=0.05)
    assert np.mean(res.choice[inside_fat] == 2) > 0.95
    assert np.mean(res.choice[inside_water] == 1) > 0.95
    side = json.loads(paths["PDFFmap"].with_name(
        paths["PDFFmap"].name.replace(".nii.gz", ".json")).read_text())
    tr = side["Details"]["training"]
    assert tr["kinds"] == ["water", "fat"] and tr["epochs"] >= 10
    assert set(tr["best_val_nll"]) == {"water", "fat"}


def test_ismrm_case_dual_agrees_with_fit():
    mat = SHARED_DATA / "cse" / "ismrm2012" / "17.mat"
    if not mat.is_file():
        pytest.skip(f"{mat} absent (shared test data not mounted)")
    from qmriflow.cse.report import ismrm_agreement

    r = ismrm_agreement(mat)  # default training, as the CLI runs it
    assert r["echoes"] == 3 and r["voxels"] > 10_000
    assert r["median_abs_dpdff"] < 0.03
