"""Pinning the free scales (issue 8): the MAP calibration, moving maps along the degenerate
family, the uncertainty maps, and their use in the loss and the pack."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from qmriflow import physics
from qmriflow.model import calibration as cal
from qmriflow.phantom.protocols import CLUSTERS

T1TR, T1TE, T2TR, T2TE, FLTR, FLTE, FLTI = CLUSTERS[0]
PROTOS = {
    "T1w": physics.Protocol("gre", T1TR, T1TE, fa_deg=10.0),
    "T2w": physics.Protocol("tse", T2TR, T2TE),
    "FLAIR": physics.Protocol("flair", FLTR, FLTE, ti_ms=FLTI),
}
GAIN = {"T1w": 3.0, "T2w": 0.5, "FLAIR": 7.0}


def _medians(truth: dict) -> dict:
    return {t: {c: GAIN[c] * float(physics.signal(PROTOS[c], *[truth[t][p] for p in cal.PARAMS]))
                for c in PROTOS} for t in truth}


def test_calibration_is_exact_when_the_tissues_match_the_priors():
    truth = {"WM": dict(physics.WM_REFERENCE), "GM": dict(cal.GM_REFERENCE),
             "CSF": dict(cal.CSF_REFERENCE)}
    r = cal.calibrate_scales(PROTOS, _medians(truth))
    for c in PROTOS:
        assert r.scales[c] == pytest.approx(GAIN[c], rel=1e-6), c
    for t in truth:
        for p in cal.PARAMS:
            assert r.tissues[t][p] == pytest.approx(truth[t][p], rel=1e-6), (t, p)


def test_calibration_follows_the_data_not_the_reference():
    # WM and GM 5-10 % away from the priors, CSF = water: the WM reference of the seed puts the
    # scales 19-38 % off; the calibration stays within 4.5 % and recovers WM T1 within 6 %
    truth = {"WM": {"pd": 0.77, "t1_s": 0.765, "t2_s": 0.077},
             "GM": {"pd": 0.76, "t1_s": 1.485, "t2_s": 0.081}, "CSF": dict(cal.CSF_REFERENCE)}
    r = cal.calibrate_scales(PROTOS, _medians(truth))
    for c, p in PROTOS.items():
        wm = float(physics.signal(p, *[truth["WM"][k] for k in cal.PARAMS]))
        seed_err = abs(physics.wm_reference_scale(p) * wm - 1)  # mode-normalised WM = 1
        assert seed_err > 0.18, c
        assert abs(r.scales[c] / GAIN[c] - 1) < 0.045, c
    assert r.tissues["WM"]["t1_s"] == pytest.approx(0.765, rel=0.06)
    assert r.tissues["WM"]["t2_s"] == pytest.approx(0.077, rel=0.02)
    assert r.tissues["CSF"]["pd"] == pytest.approx(1.0, rel=0.002)
    # CSF pins the T2w scale best; FLAIR (no anchor: CSF near its null) stays the softest
    assert r.log_sd["T2w"] < r.log_sd["T1w"] < r.log_sd["FLAIR"]
    cov = np.asarray(r.log_cov)
    np.testing.assert_allclose(np.sqrt(np.diag(cov)), [r.log_sd[c] for c in PROTOS])


def test_calibration_without_csf_or_wm_is_refused():
    with pytest.raises(ValueError, match="WM or CSF"):
        cal.calibrate_scales(PROTOS, {"GM": {"T1w": 1.0, "T2w": 1.0, "FLAIR": 1.0}})


def test_tissue_medians_erode_and_skip_small_tissues():
    seg = np.zeros((3, 20, 20), np.int16)
    seg[:, 2:18, 2:10] = 2
    seg[:, 2:18, 10:18] = 1
    seg[:, 9:11, 9:11] = 3  # 12 CSF voxels: too few
    img = np.zeros((3, 2, 20, 20), np.float32)
    img[:, 0][seg == 2] = 1.0
    img[:, 0][seg == 1] = 0.8
    img[:, 1] = 2.0
    img[:, 0, :, 9] = 5.0  # an edge column of WM, removed by the erosion
    med, n = cal.tissue_medians(img, seg, contrasts=("T1w", "T2w"), min_voxels=20)
    assert set(med) == {"WM", "GM"} and n["CSF"] == 12
    assert med["WM"] == {"T1w": 1.0, "T2w": 2.0}
    assert med["GM"]["T1w"] == pytest.approx(0.8)
    # two voxels eroded off each side in-plane (and around the CSF: 2 more per slice)
    assert n["WM"] == 3 * (12 * 4 - 2)


def _family_member(maps: np.ndarray, shift: np.ndarray) -> np.ndarray:
    protos = list(PROTOS.values())
    moved, info = cal.pin_maps(maps, np.ones(maps.shape[:-1], bool), protos, shift)
    assert info["max_residual"] < 1e-6
    return moved


def test_csf_t1w_partial_volume_is_not_taken_as_exact():
    # the purest CSF voxels still read bright in the T1w (tissue is ~3x brighter there): +15 %
    # on the CSF T1w median moves the T1w scale half as far with the default extra SD as when
    # that median is trusted like the others
    truth = {"WM": dict(physics.WM_REFERENCE), "GM": dict(cal.GM_REFERENCE),
             "CSF": dict(cal.CSF_REFERENCE)}
    med = _medians(truth)
    med["CSF"]["T1w"] *= 1.15
    assert cal.Priors().extra_rel_noise == {"CSF": {"T1w": 0.15}}
    soft = cal.calibrate_scales(PROTOS, med)
    exact = cal.calibrate_scales(PROTOS, med, cal.Priors(extra_rel_noise={}))
    err = {k: abs(r.scales["T1w"] / GAIN["T1w"] - 1) for k, r in (("soft", soft),
                                                                   ("exact", exact))}
    assert err["exact"] > 0.02
    assert err["soft"] < 0.5 * err["exact"]
    wm = {k: abs(r.tissues["WM"]["t1_s"] / truth["WM"]["t1_s"] - 1)
          for k, r in (("soft", soft), ("exact", exact))}
    assert wm["soft"] < 0.5 * wm["exact"]
    # an extra SD of 0 is the plain noise model: same result as no entry at all
    zero = cal.calibrate_scales(PROTOS, med, cal.Priors(extra_rel_noise={"CSF": {"T1w": 0.0}}))
    assert zero.scales == pytest.approx(exact.scales, rel=1e-9)


def _two_tissue_maps(n: int = 400, seed: int = 5, gm_like_wm: bool = False
                     ) -> tuple[np.ndarray, np.ndarray, dict]:
    """(2n, 3) maps: n WM and n GM voxels with ±5 % variation, and tissue masks (GM 10 %
    above WM with ``gm_like_wm``, so that both have nearly the same open directions)."""
    rng = np.random.default_rng(seed)
    wm = np.array([physics.WM_REFERENCE[p] for p in cal.PARAMS])
    gm = wm * 1.1 if gm_like_wm else np.array([cal.GM_REFERENCE[p] for p in cal.PARAMS])
    maps = np.concatenate([wm * np.exp(rng.normal(0, 0.05, (n, 3))),
                           gm * np.exp(rng.normal(0, 0.05, (n, 3)))])
    masks = {"WM": np.arange(2 * n) < n, "GM": np.arange(2 * n) >= n}
    return maps, np.ones(2 * n, bool), masks


@pytest.mark.parametrize("kept", [("T1w", "FLAIR"), ("T2w", "FLAIR"), ("T1w", "T2w"), ("T2w",)])
def test_anchor_sets_the_open_directions_from_the_tissue_values(kept):
    truth, mask, masks = _two_tissue_maps()
    protos = [PROTOS[c] for c in kept]
    x = np.log(truth)
    _, jac = cal._log_jacobian(protos, x)
    proj = np.eye(3)[None] - np.linalg.pinv(jac) @ jac
    # the network's guess: every voxel moved along its own open directions
    guess = np.exp(x + proj @ np.array([0.12, -0.15, 0.2]))
    targets = {t: {p: float(np.exp(x[m, k].mean())) for k, p in enumerate(cal.PARAMS)}
               for t, m in masks.items()}
    out, info = cal.anchor_free_directions(guess, mask, protos, masks, targets)
    assert info["applied"] and info["tissues"] == ["WM", "GM"]
    # the levels come back to the tissue values (second-order residue only) ...
    for m in masks.values():
        np.testing.assert_allclose(np.log(out[m]).mean(0), x[m].mean(0), atol=0.01)
    # ... along the open directions only: the inputs' signals are those of the guess
    for p in protos:
        np.testing.assert_allclose(np.asarray(physics.signal(p, *out.T)),
                                   np.asarray(physics.signal(p, *guess.T)), rtol=0.02)
    # the spatial pattern stays (one move for the whole session, not per voxel)
    assert np.corrcoef(np.log(out[:, 1]), x[:, 1])[0, 1] > 0.99


def test_anchor_per_tissue_corrects_the_network_s_tissue_contrast():
    # the guess is off along the open direction by different amounts in WM and GM, whose open
    # directions are nearly the same: one β for the session cannot undo both, a β per tissue
    # (blended by soft weights) can
    truth, mask, masks = _two_tissue_maps(gm_like_wm=True)
    protos = [PROTOS["T1w"], PROTOS["FLAIR"]]
    x = np.log(truth)
    _, jac = cal._log_jacobian(protos, x)
    proj = np.eye(3)[None] - np.linalg.pinv(jac) @ jac
    off = np.where(masks["WM"][:, None], [0.15, 0.1, -0.2], [-0.1, 0.05, 0.25])
    guess = np.exp(x + (proj @ off[..., None])[..., 0])
    targets = {t: {p: float(np.exp(x[m, k].mean())) for k, p in enumerate(cal.PARAMS)}
               for t, m in masks.items()}
    weights = {t: m.astype(float) for t, m in masks.items()}
    one, _ = cal.anchor_free_directions(guess, mask, protos, masks, targets)
    per, info = cal.anchor_free_directions(guess, mask, protos, masks, targets, weights)
    assert info["per_tissue"] == ["GM", "WM"] and set(info["beta_log"]) == {"session", "WM", "GM"}

    def worst(maps: np.ndarray) -> float:
        return max(float(np.abs(np.log(maps[m]).mean(0) - x[m].mean(0)).max())
                   for m in masks.values())

    assert worst(guess) > 0.1
    assert worst(per) < 0.015  # second-order residue of the curved family
    assert worst(one) > 4 * worst(per)
    for p in protos:  # still along the open directions only
        np.testing.assert_allclose(np.asarray(physics.signal(p, *per.T)),
                                   np.asarray(physics.signal(p, *guess.T)), rtol=0.03)
    # soft weights: between the tissues the move blends
    w = cal.tissue_weights(np.array([[[2, 2, 2, 1, 1, 1]]]), sigma=1.0)
    assert w["WM"][0, 0, 0] > 0.99 and w["GM"][0, 0, -1] > 0.99
    np.testing.assert_allclose(w["WM"] + w["GM"], 1.0)
    assert 0.3 < w["WM"][0, 0, 2] < 0.7


def test_shift_to_tissues_by_hand():
    # WM voxels 0-2 (medians PD 0.6, T1 1.0 s, T2 0.08 s), GM voxel 3; voxel 4 unweighted,
    # voxel 5 outside the mask
    maps = np.array([[0.5, 0.9, 0.07], [0.6, 1.0, 0.08], [0.7, 1.2, 0.09],
                     [0.8, 1.3, 0.1], [0.9, 2.0, 0.2], [0.4, 0.5, 0.05]])
    mask = np.array([1, 1, 1, 1, 1, 0], bool)
    voxels = {"WM": np.array([1, 1, 1, 0, 0, 0], bool), "GM": np.array([0, 0, 0, 1, 0, 0], bool)}
    weights = {"WM": np.array([1.0, 0.5, 1.0, 0.0, 0.0, 1.0]),
               "GM": np.array([0.0, 0.5, 0.0, 1.0, 0.0, 0.0])}
    targets = {"WM": {"pd": 0.66, "t1_s": 0.8, "t2_s": 0.08},
               "GM": {"pd": 0.8, "t1_s": 1.43, "t2_s": 0.09}}
    out, info = cal.shift_to_tissues(maps, mask, voxels, targets, weights)
    d_wm = np.log([0.66 / 0.6, 0.8 / 1.0, 0.08 / 0.08])
    d_gm = np.log([0.8 / 0.8, 1.43 / 1.3, 0.09 / 0.1])
    np.testing.assert_allclose(out[0], maps[0] * np.exp(d_wm), rtol=1e-12)
    np.testing.assert_allclose(out[1], maps[1] * np.exp(0.5 * d_wm + 0.5 * d_gm), rtol=1e-12)
    np.testing.assert_allclose(out[3], [0.8, 1.43, 0.09], rtol=1e-12)
    np.testing.assert_array_equal(out[4], maps[4])  # no weight: unchanged
    np.testing.assert_array_equal(out[5], maps[5])  # outside the mask: unchanged
    assert info["log_shift"]["WM"]["t1_s"] == pytest.approx(math.log(0.8))
    # bounded to the maps' limits
    big, _ = cal.shift_to_tissues(maps, mask, voxels, {**targets, "GM": {
        "pd": 2.0, "t1_s": 1.3, "t2_s": 0.1}}, weights)
    assert big[3, 0] == pytest.approx(cal.LIMITS["pd"][1])


def test_anchor_leaves_three_contrasts_and_masked_voxels_alone():
    truth, mask, masks = _two_tissue_maps(50)
    targets = {"WM": {"pd": 0.6, "t1_s": 1.0, "t2_s": 0.06}}
    out, info = cal.anchor_free_directions(truth, mask, list(PROTOS.values()), masks, targets)
    assert not info["applied"]
    np.testing.assert_array_equal(out, truth)
    part = np.zeros_like(mask)
    part[:25] = True
    out, info = cal.anchor_free_directions(truth, part, [PROTOS["T1w"], PROTOS["FLAIR"]],
                                           masks, targets)
    assert info["applied"] and info["tissues"] == ["WM"]
    np.testing.assert_array_equal(out[25:], truth[25:])
    assert np.abs(np.log(out[:25, 1]).mean() - math.log(1.0)) < \
        np.abs(np.log(truth[:25, 1]).mean() - math.log(1.0))


def test_pin_maps_moves_along_the_family_and_back():
    rng = np.random.default_rng(3)
    n = 2000
    truth = np.stack([rng.uniform(0.6, 0.9, n), rng.uniform(0.7, 1.8, n),
                      rng.uniform(0.05, 0.12, n)], axis=1)
    shift = np.array([0.08, -0.1, 0.12])
    other = _family_member(truth, shift)
    protos = list(PROTOS.values())
    # the moved maps' signals are the truth's times exp(shift), per contrast
    for c, p in enumerate(protos):
        ratio = (np.asarray(physics.signal(p, *other.T)) / np.asarray(physics.signal(p, *truth.T)))
        np.testing.assert_allclose(ratio, math.exp(shift[c]), rtol=1e-5)
    assert np.abs(other[:, 1] / truth[:, 1] - 1).max() > 0.05  # really a different member
    back = _family_member(other, -shift)
    np.testing.assert_allclose(back, truth, rtol=1e-5)
    # no shift, no move; masked voxels untouched
    same, _ = cal.pin_maps(truth, np.ones(n, bool), protos, [0.0, 0.0, 0.0])
    np.testing.assert_allclose(same, truth, rtol=1e-9)
    mask = np.zeros(n, bool)
    untouched, _ = cal.pin_maps(truth, mask, protos, shift)
    np.testing.assert_array_equal(untouched, truth)


def test_log_jacobian_pd_column_is_exact_and_the_rest_matches_central_differences():
    # every signal model is proportional to PD: d log S / d log PD is 1 (0 below the floor);
    # T1 and T2 by forward differences, checked against central differences
    from qmriflow.model.calibration import pinning

    rng = np.random.default_rng(5)
    x = np.log(np.stack([rng.uniform(0.5, 1.0, 500), rng.uniform(0.6, 4.0, 500),
                         rng.uniform(0.04, 2.0, 500)], axis=1))
    protos = list(PROTOS.values())
    _, jac = cal._log_jacobian(protos, x)
    assert jac.shape == (500, 3, 3)
    np.testing.assert_array_equal(jac[:, :, 0], 1.0)
    for k in (1, 2):
        up, down = x.copy(), x.copy()
        up[:, k] += 1e-4
        down[:, k] -= 1e-4
        central = (pinning._log_signals(protos, up) - pinning._log_signals(protos, down)) / 2e-4
        # the FLAIR's null makes a few voxels steep: compare where the curvature is mild
        ok = np.abs(central) < 50
        assert ok.mean() > 0.95
        np.testing.assert_allclose(jac[:, :, k][ok], central[ok], atol=2e-3, rtol=1e-3)
    # a signal below the floor has no PD derivative
    tiny = np.array([[np.log(1e-12), 0.0, np.log(0.08)]])
    _, jt = cal._log_jacobian(protos, tiny)
    np.testing.assert_array_equal(jt[0, :, 0], 0.0)


def test_solve_normal_matches_lapack_also_near_singular():
    # the closed-form 3 x 3 solve of the per-voxel Gauss-Newton / LM steps against LAPACK,
    # for well-conditioned systems and for rank-deficient ones (one or two contrasts, a
    # tiny damping), which go to LAPACK
    from qmriflow.model.calibration import pinning

    rng = np.random.default_rng(7)
    for c, diag in ((3, 1e-3), (2, 1e-6), (1, 1e-9), (3, 0.0)):
        n = 4000
        jac = rng.normal(size=(3, c, n))
        res = rng.normal(size=(c, n))
        extra = rng.normal(size=(3, n)) * 0.1
        d = np.full(n, diag) if diag else 0.0
        step = pinning._solve_normal(jac, res, d, extra)
        j = np.transpose(jac, (2, 1, 0))  # (n, C, 3)
        a = np.swapaxes(j, 1, 2) @ j + diag * np.eye(3)
        g = (np.swapaxes(j, 1, 2) @ res.T[..., None])[..., 0] + extra.T
        if c == 3:
            ref = -np.linalg.solve(a, g[..., None])[..., 0]
            np.testing.assert_allclose(step.T, ref, rtol=1e-6, atol=1e-8 * np.abs(ref).max())
        else:
            # rank deficient: the damped step's component in the row space of J is
            # determined; it must solve the normal equations to working precision
            assert np.all(np.isfinite(step))
            resid = (a @ step.T[..., None])[..., 0] + g
            rel = np.linalg.norm(resid, axis=1) / np.linalg.norm(g, axis=1)
            assert np.median(rel) < 1e-6


def test_sym3_adjugate_inverts_symmetric_matrices_for_numpy_and_torch():
    # the one closed-form 3 x 3 solve of the calibration (NumPy) and the fat/water fit (torch)
    from qmriflow.sym3 import sym3_adjugate, sym3_apply

    rng = np.random.default_rng(13)
    j = rng.normal(size=(500, 4, 3))
    a = np.swapaxes(j, 1, 2) @ j + 0.1 * np.eye(3)
    b = rng.normal(size=(500, 3))
    ref = np.linalg.solve(a, b[..., None])[..., 0]
    entries = [a[:, 0, 0], a[:, 0, 1], a[:, 0, 2], a[:, 1, 1], a[:, 1, 2], a[:, 2, 2]]
    cof, det = sym3_adjugate(*entries)
    np.testing.assert_allclose(det, np.linalg.det(a), rtol=1e-10)
    x = np.stack(sym3_apply(cof, *b.T), axis=1) / det[:, None]
    np.testing.assert_allclose(x, ref, rtol=1e-8, atol=1e-10)
    tcof, tdet = sym3_adjugate(*(torch.from_numpy(e) for e in entries))
    tx = torch.stack(sym3_apply(tcof, *torch.from_numpy(b).T), dim=1) / tdet[:, None]
    np.testing.assert_array_equal(tx.numpy(), x)


def test_pin_maps_retires_voxels_held_at_the_limits_with_the_same_result():
    # voxels pushed against the bounds stop being iterated once their step no longer moves
    # them; the result equals a plain iteration of every voxel to the end
    rng = np.random.default_rng(11)
    n = 1500
    maps = np.stack([rng.uniform(0.5, 0.9, n), rng.uniform(0.7, 1.8, n),
                     rng.uniform(0.05, 0.12, n)], axis=1)
    maps[:300, 0] = 1.0  # PD at its upper limit, asked to grow: cannot reach the target
    protos = list(PROTOS.values())
    moved, info = cal.pin_maps(maps, np.ones(n, bool), protos, [0.4, 0.4, 0.4])
    assert info["max_residual"] > 0.1  # some voxels cannot reach their targets
    # reference: the same Levenberg-Marquardt iteration on every voxel, written out plainly
    x = np.log(maps)
    target = cal._log_jacobian(protos, x)[0] + 0.4
    lo = np.log([cal.LIMITS[p][0] for p in cal.PARAMS])
    hi = np.log([cal.LIMITS[p][1] for p in cal.PARAMS])
    for _ in range(30):
        f, jac = cal._log_jacobian(protos, x)
        r = f - target
        live = np.abs(r).max(axis=1) > 1e-7
        jt = np.swapaxes(jac, 1, 2)
        step = -np.linalg.solve(jt @ jac + 1e-6 * np.eye(3), (jt @ r[..., None]))[..., 0]
        x = np.where(live[:, None], np.clip(x + np.clip(step, -0.5, 0.5), lo, hi), x)
    np.testing.assert_allclose(moved, np.exp(x), rtol=1e-6)


def test_scale_sensitivity_is_the_linearised_move():
    maps = np.array([[0.7, 0.85, 0.07], [0.8, 1.35, 0.09], [0.75, 1.1, 0.08]])
    protos = list(PROTOS.values())
    eps = 1e-3
    for c in range(3):
        cov = np.zeros((3, 3))
        cov[c, c] = 0.05 ** 2
        sd = cal.scale_sensitivity(maps, np.ones(3, bool), protos, cov)
        shift = np.zeros(3)
        shift[c] = -eps  # a larger scale means smaller maps' signals
        moved = _family_member(maps, shift)
        fd = np.abs(moved - maps) / eps * 0.05
        np.testing.assert_allclose(sd, fd, rtol=2e-3, atol=1e-5)
    assert not cal.scale_sensitivity(maps, np.ones(3, bool), protos, np.zeros((3, 3))).any()


def test_model_error_adds_like_independent_scale_errors():
    # a relative signal-model error sigma per contrast moves the maps exactly as independent
    # scale errors of that size: the same SDs as a diagonal scale covariance of sigma^2, added
    # in quadrature to the scales' own covariance
    maps = np.array([[0.7, 0.85, 0.07], [0.8, 1.35, 0.09], [0.75, 1.1, 0.08]])
    protos = list(PROTOS.values())
    mask = np.ones(3, bool)
    scales_cov = np.diag([0.02, 0.03, 0.04]) ** 2
    with_model = cal.scale_sensitivity(maps, mask, protos, scales_cov, model_log_sd=0.05)
    by_hand = cal.scale_sensitivity(maps, mask, protos, scales_cov + 0.05 ** 2 * np.eye(3))
    np.testing.assert_allclose(with_model, by_hand, rtol=1e-6)
    alone = cal.scale_sensitivity(maps, mask, protos, 0.05 ** 2 * np.eye(3))
    scales_only = cal.scale_sensitivity(maps, mask, protos, scales_cov)
    np.testing.assert_allclose(with_model ** 2, alone ** 2 + scales_only ** 2, rtol=1e-5)
    assert np.all(with_model > scales_only)
    np.testing.assert_array_equal(
        cal.scale_sensitivity(maps, mask, protos, scales_cov, model_log_sd=0.0), scales_only)


def test_calibrated_loss_uses_the_scale_as_given():
    from qmriflow.model.losses import LossWeights, physics_loss, protocol_row

    maps = torch.tensor([0.7, 0.85, 0.07]).view(1, 3, 1, 1).expand(2, 3, 8, 8).clone()
    rows = torch.tensor([[protocol_row(p) for p in PROTOS.values()]] * 2)
    rows[:, :, 5] *= 1.5  # a calibrated scale 50 % above the reference: outside the ±20 %
    images = torch.ones(2, 3, 8, 8)
    head = torch.ones(2, 1, 8, 8, dtype=torch.bool)
    _, seed = physics_loss(maps, images, head, rows, weights=LossWeights())
    _, calib = physics_loss(maps, images, head, rows, weights=LossWeights(scaling="calibrated"))
    for c in range(3):
        assert calib[f"scale_rel_{c}"] == pytest.approx(1.0, abs=1e-6)
        assert seed[f"scale_rel_{c}"] == pytest.approx(0.8, rel=1e-5)  # LS 1/1.5, clamped
    # exact: calibrated synthesised WM = 1.5 × 1 → L1 = 0.5 in every contrast
    assert calib["l1"] == pytest.approx(0.5, rel=1e-5)


def test_refine_maps_fits_the_data_with_the_calibrated_scales():
    rng = np.random.default_rng(0)
    n = 3000
    truth = np.stack([rng.uniform(0.6, 0.9, n), rng.uniform(0.7, 1.8, n),
                      rng.uniform(0.05, 0.12, n)], axis=1)
    protos = list(PROTOS.values())
    scales = np.array([30.0, 4.0, 12.0])
    images = np.stack([scales[c] * np.asarray(physics.signal(p, *truth.T))
                       for c, p in enumerate(protos)], axis=1)
    start = truth * np.exp(rng.normal(0.0, 0.15, truth.shape))
    mask = np.ones(n, bool)
    # a weak prior: the exact per-voxel solution
    exact, _ = cal.refine_maps(start, mask, protos, images, scales, prior_log_sd=100.0)
    np.testing.assert_allclose(exact, truth, rtol=2e-3)
    # the default prior (0.3 in log) costs little where the data determine the maps
    default, info = cal.refine_maps(start, mask, protos, images, scales)
    assert np.median(np.abs(default / truth - 1)) < 0.005 and info["voxels"] == n
    # converged voxels retire early: the same answer as iterating every voxel to the end
    full, info_full = cal.refine_maps(start, mask, protos, images, scales, tol=0.0)
    assert info["still_moving"] < info_full["still_moving"]
    np.testing.assert_allclose(default, full, rtol=1e-5)
    # with the FLAIR withheld, the direction the two contrasts leave open keeps the prior's
    # value: the T1w and T2w are fitted exactly, yet the maps stay nearer the start
    two, _ = cal.refine_maps(start, mask, protos[:2], images[:, :2], scales[:2],
                             prior_log_sd=100.0)
    for c in range(2):
        fit = scales[c] * np.asarray(physics.signal(protos[c], *two.T))
        np.testing.assert_allclose(fit, images[:, c], rtol=5e-3)
    assert np.median(np.abs(two / truth - 1)) > 5 * np.median(np.abs(exact / truth - 1))


def test_refine_maps_restarts_voxels_stalled_at_the_limits():
    # a network value pinned at the limits (PD 1, T1 5 s; as seen at a brain edge): the
    # descent from there stalls far from the data; restarted from tissue values it fits them
    protos = list(PROTOS.values())
    scales = np.array([30.0, 4.0, 12.0])
    truth = np.array([[0.75, 1.15, 0.087], [0.8, 1.35, 0.09]])
    images = np.stack([scales[c] * np.asarray(physics.signal(p, *truth.T))
                       for c, p in enumerate(protos)], axis=1)
    stuck = np.array([[1.0, 5.0, 0.34], [0.8, 1.3, 0.095]])  # voxel 1 starts near its truth
    mask = np.ones(2, bool)
    plain, info = cal.refine_maps(stuck, mask, protos, images, scales)
    assert info["restarted"] == 0
    misfit = np.abs(scales * np.stack([np.asarray(physics.signal(p, *plain.T)) for p in protos],
                                      axis=1) / images - 1)
    assert misfit[0].max() > 0.2 and misfit[1].max() < 0.01
    starts = [tuple(physics.WM_REFERENCE[p] for p in cal.PARAMS),
              tuple(cal.CSF_REFERENCE[p] for p in cal.PARAMS)]
    fixed, info = cal.refine_maps(stuck, mask, protos, images, scales, starts=starts)
    assert info["restarted"] == 1 and info["restart_improved"] == 1
    # (the stalled network value is still the prior: it pulls a little, within 3 %)
    np.testing.assert_allclose(fixed[0], truth[0], rtol=0.03)
    refit = scales * np.stack([np.asarray(physics.signal(p, *fixed.T)) for p in protos], axis=1)
    assert np.abs(refit[0] - images[0]).max() < 0.03  # within one noise SD of the data
    np.testing.assert_array_equal(fixed[1], plain[1])  # a voxel that fits is not restarted


def test_smooth_maps_weights_by_hand():
    """Joint-bilateral smoothing of the log-maps: exact weights on a 1×3 row with a flat guide,
    no leak across an edge of the guide, nothing outside the mask."""
    maps = np.full((1, 1, 3, 3), 0.5)
    maps[..., 1] = 1.0
    maps[..., 2] = 0.08
    maps[0, 0, 1, 0] *= math.exp(0.3)  # PD of the middle voxel +0.3 (log)
    mask = np.ones((1, 1, 3), dtype=bool)
    flat = np.zeros((1, 1, 3, 2))
    assert np.array_equal(cal.smooth_maps(maps, mask, flat, radius=0), maps)
    out = cal.smooth_maps(maps, mask, flat, radius=1, sigma_space=1.0, sigma_range=0.1)
    e = math.exp(-0.5)  # spatial weight of a neighbour at distance 1, σ_s = 1
    d = np.log(out[0, 0, :, 0] / 0.5)
    assert d[1] == pytest.approx(0.3 / (1 + 2 * e), rel=1e-12)
    assert d[0] == pytest.approx(0.3 * e / (1 + e), rel=1e-12)
    assert d[2] == pytest.approx(d[0], rel=1e-12)
    assert np.allclose(out[..., 1:], maps[..., 1:], rtol=1e-12)  # flat T1, T2 stay
    # an edge in the guide: the right voxel is another tissue in the images
    edge = flat.copy()
    edge[0, 0, 2] = 1.0
    out = cal.smooth_maps(maps, mask, edge, radius=1, sigma_space=1.0, sigma_range=0.1)
    w = math.exp(-2.0 / (2 * 0.1 ** 2))  # guide distance² = 2 (two channels of 1)
    d = np.log(out[0, 0, :, 0] / 0.5)
    assert d[0] == pytest.approx(0.3 * e / (1 + e), rel=1e-12)
    assert d[1] == pytest.approx(0.3 / (1 + e + e * w), rel=1e-12)
    assert d[2] == pytest.approx(0.3 * e * w / (1 + e * w), rel=1e-12)
    # no guide: the maps steer themselves (their own log-distance 0.3 = 3 σ_r)
    out = cal.smooth_maps(maps, mask, radius=1, sigma_space=1.0, sigma_range=0.1)
    v = math.exp(-0.09 / (2 * 0.1 ** 2))
    assert np.log(out[0, 0, 1, 0] / 0.5) == pytest.approx(0.3 / (1 + 2 * e * v), rel=1e-12)
    # with the value term: a neighbour 0.3 (log) away weighs exp(-0.5) less; an outlier at the
    # T1 limit (log-distance 1.7 ≫ σ_v) does not spread into its neighbours
    out = cal.smooth_maps(maps, mask, flat, radius=1, sigma_space=1.0, sigma_range=0.1,
                          sigma_value=0.3)
    d = np.log(out[0, 0, :, 0] / 0.5)
    assert d[1] == pytest.approx(0.3 / (1 + 2 * e * e), rel=1e-12)
    assert d[0] == pytest.approx(0.3 * e * e / (1 + e * e), rel=1e-12)
    spike = np.broadcast_to(np.array([0.7, 0.9, 0.07]), maps.shape).copy()
    spike[0, 0, 1, 1] = 5.0
    out = cal.smooth_maps(spike, mask, flat, radius=1, sigma_space=1.0, sigma_range=0.1,
                          sigma_value=0.3)
    assert np.abs(np.log(out[0, 0, [0, 2], 1] / 0.9)).max() < 1e-6
    assert cal.smooth_maps(spike, mask, flat, radius=1, sigma_space=1.0,
                           sigma_range=0.1)[0, 0, 0, 1] > 1.5 * 0.9  # it does without
    # outside the mask: neither changed nor used
    mask3 = np.array([[[True, True, False]]])
    maps3 = maps.copy()
    maps3[0, 0, 2, 0] = 0.9
    out = cal.smooth_maps(maps3, mask3, flat, radius=1, sigma_space=1.0, sigma_range=0.1)
    assert out[0, 0, 2, 0] == 0.9
    assert np.log(out[0, 0, 1, 0] / 0.5) == pytest.approx(0.3 / (1 + e), rel=1e-12)
    # a constant map is kept exactly
    const = np.broadcast_to(np.array([0.7, 0.9, 0.07]), maps.shape).copy()
    assert np.allclose(cal.smooth_maps(const, mask, flat, radius=2), const, rtol=1e-12)
    with pytest.raises(ValueError, match="positive"):
        cal.smooth_maps(maps, mask, flat, radius=1, sigma_range=0.0)


def test_smoothing_settings():
    assert cal.DEFAULT_SMOOTHING == cal.Smoothing(3, 2.0, 0.1, 0.3, "images")
    for bad in ({"radius": -1}, {"radius": 1.5}, {"sigma_space": 0.0}, {"sigma_value": 0.0},
                {"guide": "t1w"}):
        with pytest.raises(ValueError):
            cal.Smoothing(**bad)


def test_tissue_start_table_and_branch_t2_by_hand():
    targets = {"WM": {"pd": 0.7, "t1_s": 0.85, "t2_s": 0.07},
               "GM": {"pd": 0.8, "t1_s": 1.35, "t2_s": 0.09},
               "CSF": {"pd": 1.0, "t1_s": 4.3, "t2_s": 2.0}}
    assert cal.csf_branch_t2(targets) == pytest.approx(math.sqrt(0.09 * 2.0), rel=1e-12)
    assert cal.csf_branch_t2({"WM": targets["WM"]}) is None  # no CSF
    assert cal.csf_branch_t2({"CSF": targets["CSF"]}) is None  # no tissue
    st = cal.tissue_start_table(targets)  # rows: dseg labels 0 (background), 1 GM, 2 WM, 3 CSF
    assert st.shape == (4, 3)
    np.testing.assert_array_equal(st[1], [0.8, 1.35, 0.09])
    np.testing.assert_array_equal(st[2], [0.7, 0.85, 0.07])
    assert np.isnan(st[0]).all() and np.isnan(st[3]).all()  # background, CSF: no start
    only_wm = cal.tissue_start_table({"WM": targets["WM"]})
    assert np.isnan(only_wm[1]).all() and not np.isnan(only_wm[2]).any()


def test_refine_maps_moves_tissue_voxels_off_the_csf_like_branch():
    # the FLAIR is two-valued in T1, so a GM voxel with CSF partial volume can fit the inputs
    # on a CSF-like branch, where a CSF-like network value (the prior) holds it; the
    # segmentation then chooses the tissue branch, unless the data prefer the CSF-like one
    protos = list(PROTOS.values())
    scales = np.array([30.0, 4.0, 12.0])
    gm, csf = np.array([0.8, 1.35, 0.09]), np.array([1.0, 4.3, 2.0])

    def sig(theta: np.ndarray) -> np.ndarray:
        t = np.atleast_2d(theta)
        return np.stack([scales[c] * np.asarray(physics.signal(p, *t.T))
                         for c, p in enumerate(protos)], axis=1)

    mixed = 0.3 * sig(gm) + 0.7 * sig(csf)
    images = np.concatenate([mixed, sig(csf), mixed, sig(gm)])
    net = np.array([[0.7, 3.0, 1.0], [1.0, 4.4, 1.9], [0.7, 3.0, 1.0], [0.78, 1.4, 0.1]])
    dseg = np.array([1, 1, 0, 1])  # GM, except voxel 2: no tissue label
    tissues = {"GM": dict(zip(cal.PARAMS, gm, strict=True)),
               "CSF": dict(zip(cal.PARAMS, csf, strict=True))}
    mask = np.ones(4, bool)
    t2_branch = math.sqrt(0.09 * 2.0)
    plain, info = cal.refine_maps(net, mask, protos, images, scales)
    assert info["branch_checked"] == 0 and info["branch_t2_s"] is None
    assert plain[0, 2] > t2_branch and plain[1, 2] > t2_branch  # CSF-like T2
    chosen, info = cal.refine_maps(net, mask, protos, images, scales, dseg=dseg,
                                   tissues=tissues)
    assert info["branch_t2_s"] == t2_branch
    assert info["branch_checked"] == 2 and info["branch_switched"] == 1
    # voxel 0 moved to the tissue branch, which fits the data better than the CSF-like one
    assert chosen[0, 2] < 0.25 and chosen[0, 1] < plain[0, 1]
    chi = (((sig(chosen) - images) / 0.03) ** 2).sum(1)
    chi_plain = (((sig(plain) - images) / 0.03) ** 2).sum(1)
    assert chi[0] < chi_plain[0] - 3.0 and chi[0] < 9.0
    # pure CSF signals in a GM-labelled voxel: the data prefer the CSF-like branch, it stays
    np.testing.assert_array_equal(chosen[1], plain[1])
    # no tissue label, or a tissue T2 already: untouched
    np.testing.assert_array_equal(chosen[2:], plain[2:])
    assert plain[2, 2] > t2_branch  # voxel 2 would be checked if it had a tissue label
    # a label the table does not hold is no tissue label either
    other, info = cal.refine_maps(net, mask, protos, images, scales, dseg=np.array([1, 1, 9, 1]),
                                  tissues=tissues)
    assert info["branch_checked"] == 2
    np.testing.assert_array_equal(other, chosen)
    # without CSF values there is no threshold, so no branch choice
    _, info = cal.refine_maps(net, mask, protos, images, scales, dseg=dseg,
                              tissues={"GM": tissues["GM"]})
    assert info["branch_checked"] == 0 and info["branch_t2_s"] is None
