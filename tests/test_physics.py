"""Signal equations against values computed by hand, their limits, and the Rician NLL."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats

from qmriflow import physics as ph

# Parameter sets (PD, T1 s, T2 s) used for hand computations.
TISSUES = [(0.70, 0.85, 0.070), (0.80, 1.35, 0.095), (1.0, 4.3, 2.0)]


def _gre_by_hand(pd, t1, t2, tr, te, fa):
    e1 = math.exp(-(tr / 1000) / (t1 + 1e-6))
    a = math.radians(fa)
    return pd * math.sin(a) * (1 - e1) / (1 - math.cos(a) * e1 + 1e-6) * math.exp(
        -(te / 1000) / (t2 + 1e-6)
    )


@pytest.mark.parametrize("pd,t1,t2", TISSUES)
def test_spoiled_gre_by_hand(pd, t1, t2):
    got = ph.spoiled_gre(pd, t1, t2, tr_ms=5.3, te_ms=2.4, fa_deg=10.0)
    assert float(got) == pytest.approx(_gre_by_hand(pd, t1, t2, 5.3, 2.4, 10.0), rel=1e-12)


def test_spoiled_gre_literal_value():
    # WM (PD .7, T1 .85 s, T2 .07 s), TR 5.3 ms, TE 2.4 ms, FA 10 deg, worked out on paper:
    # E1 = exp(-0.0053/0.850001) = 0.993784..., sin10 = 0.173648, cos10 = 0.984808
    # (1-E1)/(1-cos*E1+1e-6) = 0.0062159/0.0213147 = 0.291625; exp(-2.4/70) = 0.966295
    # S = 0.7*0.173648*0.291625*0.966295 = 0.034253
    assert float(ph.spoiled_gre(0.7, 0.85, 0.07, 5.3, 2.4, 10.0)) == pytest.approx(
        0.034253, abs=2e-6
    )


@pytest.mark.parametrize("pd,t1,t2", TISSUES)
def test_tse_by_hand_with_default_correction(pd, t1, t2):
    tr, te = 4300.0, 80.0
    want = pd * (1 - math.exp(-(tr / 1000) / (t1 + 1e-6))) * math.exp(
        -(0.90 * te / 1000) / (t2 + 1e-6)
    )
    assert float(ph.tse(pd, t1, t2, tr, te)) == pytest.approx(want, rel=1e-12)
    # correction disabled: nominal TE
    want_nominal = pd * (1 - math.exp(-(tr / 1000) / (t1 + 1e-6))) * math.exp(
        -(te / 1000) / (t2 + 1e-6)
    )
    assert float(ph.tse(pd, t1, t2, tr, te, te_correction=1.0)) == pytest.approx(
        want_nominal, rel=1e-12
    )


def test_tse_literal_value():
    # WM, TR 4300, TE 80 -> TE_eff 72 ms: (1-exp(-4.3/.85)) = 0.993647; exp(-72/70) = 0.357517
    # S = 0.7 * 0.993647 * 0.357517 = 0.248672 (the 1e-6 regulariser moves it by 1.5e-5 rel.)
    assert float(ph.tse(0.7, 0.85, 0.07, 4300.0, 80.0)) == pytest.approx(0.248672, rel=3e-5)


@pytest.mark.parametrize("pd,t1,t2", TISSUES)
@pytest.mark.parametrize("te,factor", [(300.0, 0.42), (120.0, 0.89)])
def test_flair_by_hand(pd, t1, t2, te, factor):
    tr, ti = 4800.0, 1650.0
    mz = 1 - 2 * math.exp(-(ti / 1000) / (t1 + 1e-6)) + math.exp(-(tr / 1000) / (t1 + 1e-6))
    want = abs(pd * mz * math.exp(-(factor * te / 1000) / (t2 + 1e-6)))
    assert float(ph.flair(pd, t1, t2, tr, te, ti)) == pytest.approx(want, rel=1e-12)


def test_flair_null_point():
    # exact null of the IR recovery term: 1 - 2e^{-TI/T1} + e^{-TR/T1} = 0
    t1 = 4.3
    ti_null = -1000 * t1 * math.log((1 + math.exp(-4.8 / t1)) / 2)
    assert float(ph.flair(1.0, t1, 2.0, 4800.0, 300.0, ti_null)) == pytest.approx(0, abs=1e-6)


@pytest.mark.parametrize("pd,t1,t2", TISSUES)
def test_ir_gre_by_hand(pd, t1, t2):
    tr, te, ti, fa = 2500.0, 3.8, 1004.0, 8.0
    e1 = math.exp(-(tr / 1000) / (t1 + 1e-6))
    a = math.radians(fa)
    want = (
        pd
        * (1 - 2 * math.exp(-(ti / 1000) / (t1 + 1e-6)) + e1)
        / (1 + math.cos(a) * e1)
        * math.sin(a)
        * math.exp(-(te / 1000) / (t2 + 1e-6))
    )
    assert float(ph.ir_gre(pd, t1, t2, tr, te, ti, fa)) == pytest.approx(want, rel=1e-12)


def test_spin_echo_at_90_is_textbook():
    pd, t1, t2, tr, te = 0.8, 1.35, 0.095, 500.0, 13.0
    want = pd * (1 - math.exp(-0.5 / (t1 + 1e-6))) * math.exp(-0.013 / (t2 + 1e-6))
    got = float(ph.spin_echo(pd, t1, t2, tr, te, 90.0))
    assert got == pytest.approx(want, rel=1e-5)


# --- limits -----------------------------------------------------------------------------------


def test_limits_tr_to_infinity():
    pd, t1, t2, te = 0.8, 1.35, 0.095, 80.0
    big = 1e9
    assert float(ph.tse(pd, t1, t2, big, te)) == pytest.approx(
        pd * math.exp(-(0.9 * te / 1000) / t2), rel=1e-4
    )
    assert float(ph.spoiled_gre(pd, t1, t2, big, 2.4, 30.0)) == pytest.approx(
        pd * math.sin(math.radians(30)) * math.exp(-0.0024 / t2), rel=1e-4
    )
    # FLAIR with infinite TR: |PD (1 - 2 e^{-TI/T1}) e^{-TE/T2}|
    assert float(ph.flair(pd, t1, t2, big, 300.0, 1650.0)) == pytest.approx(
        abs(pd * (1 - 2 * math.exp(-1.65 / t1)) * math.exp(-0.126 / t2)), rel=1e-4
    )


def test_limits_te_zero_and_ti_zero():
    pd, t1, t2, tr = 0.8, 1.35, 0.095, 4800.0
    assert float(ph.tse(pd, t1, t2, tr, 0.0)) == pytest.approx(
        pd * (1 - math.exp(-4.8 / t1)), rel=1e-6
    )
    # TI = 0: the inversion has not recovered at all -> |PD (-1 + e^{-TR/T1})| = PD (1 - E1)
    assert float(ph.flair(pd, t1, t2, tr, 0.0, 0.0)) == pytest.approx(
        pd * (1 - math.exp(-4.8 / t1)), rel=1e-6
    )
    # TE = 0 removes T2 dependence entirely
    a = ph.spoiled_gre(pd, t1, 0.01, 5.3, 0.0, 10.0)
    b = ph.spoiled_gre(pd, t1, 2.0, 5.3, 0.0, 10.0)
    assert float(a) == pytest.approx(float(b), rel=1e-12)


def test_background_zero_maps_are_finite():
    z = np.zeros(3)
    for p in (
        ph.Protocol("gre", 5.3, 2.4, fa_deg=10),
        ph.Protocol("tse", 4300, 80),
        ph.Protocol("flair", 4800, 300, ti_ms=1650),
        ph.Protocol("irgre", 2500, 3.8, ti_ms=1004, fa_deg=8),
        ph.Protocol("se", 500, 13, fa_deg=90),
    ):
        s = ph.signal(p, z, z, z)
        assert np.all(np.isfinite(s)) and np.all(s == 0)


# --- TE correction ----------------------------------------------------------------------------


def test_te_correction_defaults_and_override():
    assert ph.te_correction_factor("tse", 80) == 0.90
    assert ph.te_correction_factor("flair", 300) == 0.42
    assert ph.te_correction_factor("flair", 120) == 0.89
    assert ph.te_correction_factor("gre", 2.4) == 1.0
    assert ph.te_correction_factor("se", 13) == 1.0
    custom = ph.TECorrection(tse=0.8, flair=0.5, flair_short=0.95, flair_short_te_ms=150)
    assert ph.te_correction_factor("flair", 160, custom) == 0.5
    assert ph.te_correction_factor("flair", 140, custom) == 0.95
    p = ph.Protocol("flair", 4800, 300, ti_ms=1650)
    assert p.te_factor == 0.42 and p.effective_te_ms == pytest.approx(126.0)
    p_custom = p.with_te_correction(custom)
    assert float(ph.signal(p_custom, 0.7, 0.85, 0.07)) == pytest.approx(
        float(ph.flair(0.7, 0.85, 0.07, 4800, 300, 1650, te_correction=0.5)), rel=1e-12
    )
    with pytest.raises(ValueError):
        ph.TECorrection(tse=0.0)


def test_signal_dispatch_applies_correction_once():
    p = ph.Protocol("tse", 4300, 80)
    assert float(ph.signal(p, 0.7, 0.85, 0.07)) == pytest.approx(
        float(ph.tse(0.7, 0.85, 0.07, 4300, 80)), rel=1e-12
    )
    assert float(ph.signal(p, 0.7, 0.85, 0.07)) != pytest.approx(
        float(ph.tse(0.7, 0.85, 0.07, 4300, 72, te_correction=0.9)), rel=1e-6
    )


def test_per_slice_te_array_correction_matches_scalar():
    te = np.array([120.0, 300.0])
    got = ph.flair(0.7, 0.85, 0.07, 4800.0, te, 1650.0)
    want = [float(ph.flair(0.7, 0.85, 0.07, 4800.0, t, 1650.0)) for t in te]
    np.testing.assert_allclose(got, want, rtol=1e-12)
    got_t = ph.flair(
        torch.tensor(0.7, dtype=torch.float64), 0.85, 0.07, 4800.0,
        torch.tensor(te, dtype=torch.float64), 1650.0,
    )
    np.testing.assert_allclose(got_t.numpy(), want, rtol=1e-12)


def test_protocol_validation():
    with pytest.raises(ValueError, match="inversion time"):
        ph.Protocol("flair", 4800, 300)
    with pytest.raises(ValueError, match="flip angle"):
        ph.Protocol("gre", 5.3, 2.4)
    with pytest.raises(ValueError, match="unknown sequence"):
        ph.Protocol("epi", 3000, 30)
    p = ph.Protocol.from_dict({"sequence": "FLAIR", "tr_ms": 4800, "te_ms": 300, "ti_ms": 1650})
    assert p.sequence == "flair" and p.ti_ms == 1650.0


# --- torch: same numbers, batched, differentiable ----------------------------------------------


def test_torch_matches_numpy_and_is_differentiable():
    rng = np.random.default_rng(0)
    pd = rng.uniform(0.5, 1.0, (4, 1, 8, 8))
    t1 = rng.uniform(0.5, 4.0, (4, 1, 8, 8))
    t2 = rng.uniform(0.04, 2.0, (4, 1, 8, 8))
    tr = np.array([5.1, 5.2, 5.3, 5.4]).reshape(4, 1, 1, 1)
    te = np.array([2.2, 2.3, 2.4, 2.5]).reshape(4, 1, 1, 1)
    want = ph.spoiled_gre(pd, t1, t2, tr, te, 10.0)
    tt = [torch.tensor(x, dtype=torch.float64, requires_grad=True) for x in (pd, t1, t2)]
    got = ph.spoiled_gre(*tt, torch.tensor(tr), torch.tensor(te), 10.0)
    assert isinstance(got, torch.Tensor) and got.shape == (4, 1, 8, 8)
    np.testing.assert_allclose(got.detach().numpy(), want, rtol=1e-10)
    got.sum().backward()
    assert all(x.grad is not None and torch.isfinite(x.grad).all() for x in tt)
    # float32 inputs stay float32
    f32 = ph.tse(torch.ones(2), torch.ones(2), torch.ones(2) * 0.1, 4000.0, 80.0)
    assert f32.dtype == torch.float32


def test_wm_reference_and_bounded_scale():
    p = ph.Protocol("tse", 4300, 80)
    s_wm = float(ph.tse(0.70, 0.85, 0.070, 4300, 80))
    assert ph.wm_reference_signal(p) == pytest.approx(s_wm, rel=1e-12)
    ref = ph.wm_reference_scale(p)
    assert ref == pytest.approx(1 / s_wm, rel=1e-12)
    # LS scale by hand: f = [1, 2, 3], r = [2, 4, 7], m = [1, 1, 0] -> (2+8)/(1+4) = 2
    f = np.array([1.0, 2.0, 3.0])
    r = np.array([2.0, 4.0, 7.0])
    m = np.array([1.0, 1.0, 0.0])
    assert ph.ls_global_scale(f, r, m) == pytest.approx(2.0)
    assert ph.ls_global_scale(f, r, m, reference_scale=1.0) == pytest.approx(1.2)  # clamped
    assert ph.ls_global_scale(f, r, m, reference_scale=3.0) == pytest.approx(2.4)  # clamped low
    assert ph.ls_global_scale(f, r, m, reference_scale=1.8) == pytest.approx(2.0)  # inside
    assert ph.scale_bounds(2.0) == pytest.approx((1.6, 2.4))
    # per-slice in torch with gradient through the (unclamped) scale
    ft = torch.tensor(np.stack([f, 2 * f]), requires_grad=True)
    rt = torch.tensor(np.stack([r, r]))
    a = ph.ls_global_scale(ft, rt, torch.tensor(m), reference_scale=torch.tensor([[1.8], [1.0]]),
                           dims=[1])
    np.testing.assert_allclose(a.detach().numpy().ravel(), [2.0, 1.0])  # 1.0 is inside [.8,1.2]
    a.sum().backward()
    assert ft.grad is not None and float(ft.grad.abs().sum()) > 0


# --- fat/water ------------------------------------------------------------------------------


def test_fat_spectrum_frequencies_at_3t():
    f = ph.FatSpectrum().frequencies_hz(3.0)
    np.testing.assert_allclose(f, [-498.2, -447.1, -344.9, -260.6, -62.6, 63.9], atol=0.2)
    with pytest.raises(ValueError):
        ph.FatSpectrum(ppm=(-3.5,), relative_amplitudes=(0.9,))


def test_cse_magnitude_by_hand():
    te = [1.15, 2.30, 3.45]
    s0, pdff, r2s, b0 = 100.0, 0.3, 50.0, 3.0
    got = ph.cse_magnitude(s0, pdff, r2s, te, b0)
    assert got.shape == (3,)
    for k, t in enumerate(te):
        c = sum(
            a * complex(math.cos(2 * math.pi * p * 42.577478 * b0 * t / 1000),
                        math.sin(2 * math.pi * p * 42.577478 * b0 * t / 1000))
            for p, a in zip(ph.DEFAULT_FAT_PPM, ph.DEFAULT_FAT_RELATIVE_AMPLITUDES, strict=True)
        )
        want = s0 * abs((1 - pdff) + pdff * c) * math.exp(-r2s * t / 1000)
        assert got[k] == pytest.approx(want, rel=1e-12)
    # pure water: mono-exponential; pure fat at t = 0: S0
    np.testing.assert_allclose(
        ph.cse_magnitude(10.0, 0.0, 20.0, te, 3.0), 10 * np.exp(-20 * np.array(te) / 1000)
    )
    assert ph.cse_magnitude(10.0, 1.0, 0.0, [0.0], 3.0)[0] == pytest.approx(10.0)


def test_cse_magnitude_torch_batched():
    s0 = torch.tensor([[1.0, 2.0]], dtype=torch.float64, requires_grad=True)
    pdff = torch.tensor([[0.1, 0.9]], dtype=torch.float64, requires_grad=True)
    r2 = torch.tensor([[10.0, 300.0]], dtype=torch.float64, requires_grad=True)
    te = np.arange(1, 7) * 1.15
    got = ph.cse_magnitude(s0, pdff, r2, te, 3.0)
    assert got.shape == (1, 2, 6)
    want = ph.cse_magnitude(s0.detach().numpy(), pdff.detach().numpy(), r2.detach().numpy(),
                            te, 3.0)
    np.testing.assert_allclose(got.detach().numpy(), want, rtol=1e-12)
    got.sum().backward()
    assert torch.isfinite(pdff.grad).all() and float(pdff.grad.abs().sum()) > 0


# --- Rician NLL ----------------------------------------------------------------------------


@pytest.mark.parametrize("snr", [0.5, 2.0, 60.0, 2000.0])
def test_rician_nll_matches_scipy(snr):
    sigma = 1.5
    nu = snr * sigma
    m = stats.rice.rvs(nu / sigma, scale=sigma, size=500, random_state=1)
    want = -stats.rice.logpdf(m, nu / sigma, scale=sigma)
    got = ph.rician_nll(m, nu, sigma)
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-9)
    got_t = ph.rician_nll(torch.tensor(m), torch.tensor(nu, dtype=torch.float64), sigma)
    np.testing.assert_allclose(got_t.numpy(), want, rtol=1e-9, atol=1e-9)


def test_rician_nll_large_argument_is_finite_and_has_gradients():
    # m*nu/sigma^2 = 1e8: naive log(I0) overflows; log(i0e)+z does not
    m = torch.tensor([1e4], dtype=torch.float64)
    nu = torch.tensor([1e4 - 3.0], dtype=torch.float64, requires_grad=True)
    nll = ph.rician_nll(m, nu, 1.0)
    assert torch.isfinite(nll).all()
    nll.sum().backward()
    assert torch.isfinite(nu.grad).all()
    # in the Gaussian limit the NLL tends to (m - nu)^2 / 2 sigma^2 + 0.5 log(2 pi sigma^2)
    assert float(nll.detach()) == pytest.approx(4.5 + 0.5 * math.log(2 * math.pi), abs=1e-3)
    # m = 0 is floored, not -inf / nan
    assert np.isfinite(ph.rician_nll(0.0, 1.0, 1.0))


def test_log_i0_against_scipy():
    from scipy.special import i0

    z = np.array([0.0, 1e-3, 0.5, 3.0, 50.0, 500.0])
    np.testing.assert_allclose(ph.log_i0(z), np.log(i0(z)), rtol=1e-9)


def test_cse_magnitude_jacobian_matches_autograd():
    te = [1.15 * k for k in range(1, 7)]
    s0 = torch.tensor([1.0, 2.5, 0.7], dtype=torch.float64, requires_grad=True)
    p = torch.tensor([0.0, 0.4, 0.93], dtype=torch.float64, requires_grad=True)
    r = torch.tensor([0.0, 150.0, 480.0], dtype=torch.float64, requires_grad=True)
    sig, d_s0, d_p, d_r = ph.cse_magnitude_jacobian(s0, p, r, te, 3.0)
    ref = ph.cse_magnitude(s0, p, r, te, 3.0)
    torch.testing.assert_close(sig, ref)
    for e in range(len(te)):
        g = torch.autograd.grad(ref[:, e].sum(), (s0, p, r), retain_graph=True)
        torch.testing.assert_close(d_s0[:, e], g[0])
        torch.testing.assert_close(d_p[:, e], g[1])
        torch.testing.assert_close(d_r[:, e], g[2])
    # second derivatives against autograd of the first ones
    out = ph.cse_magnitude_jacobian(s0, p, r, te, 3.0, second=True)
    d_s0p, d_s0r, d_pp, d_pr, d_rr = out[4:]
    for e in range(len(te)):
        gp = torch.autograd.grad(d_p[:, e].sum(), (s0, p, r), retain_graph=True)
        gr = torch.autograd.grad(d_r[:, e].sum(), (r,), retain_graph=True)
        torch.testing.assert_close(d_s0p[:, e], gp[0])
        torch.testing.assert_close(d_pp[:, e], gp[1])
        torch.testing.assert_close(d_pr[:, e], gp[2])
        torch.testing.assert_close(d_rr[:, e], gr[0])
        gs = torch.autograd.grad(d_s0[:, e].sum(), (r,), retain_graph=True)
        torch.testing.assert_close(d_s0r[:, e], gs[0])
    # NumPy back-end gives the same numbers
    got = ph.cse_magnitude_jacobian(s0.detach().numpy(), p.detach().numpy(),
                                    r.detach().numpy(), te, 3.0)
    np.testing.assert_allclose(got[2], d_p.detach().numpy(), rtol=1e-12)


def test_rician_nll_derivatives_match_finite_differences():
    m = np.array([0.0, 0.01, 0.3, 1.0, 5.0, 40.0])
    nu = np.array([0.2, 0.02, 0.25, 1.3, 4.0, 41.0])
    sigma = 0.7
    d1, d2 = ph.rician_nll_derivatives(m, nu, sigma)
    h = 1e-5
    f = lambda v: ph.rician_nll(m, v, sigma)  # noqa: E731
    np.testing.assert_allclose(d1, (f(nu + h) - f(nu - h)) / (2 * h), rtol=1e-5, atol=1e-7)
    h2 = 1e-3
    np.testing.assert_allclose(d2, (f(nu + h2) - 2 * f(nu) + f(nu - h2)) / h2**2, rtol=1e-4,
                               atol=1e-5)
    t1, t2 = ph.rician_nll_derivatives(torch.tensor(m), torch.tensor(nu), sigma)
    np.testing.assert_allclose(t1.numpy(), d1, rtol=1e-10)
    np.testing.assert_allclose(t2.numpy(), d2, rtol=1e-10)


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_rician_nll_with_derivatives_matches_reference(backend):
    rng = np.random.default_rng(3)
    nu = np.concatenate([np.linspace(0, 3, 50), np.geomspace(3, 300, 200)])
    m = np.abs(nu + rng.standard_normal(nu.size) + 1j * rng.standard_normal(nu.size))
    m[0] = 0.0
    sigma = 1.3
    want = (ph.rician_nll(m, nu, sigma), *ph.rician_nll_derivatives(m, nu, sigma))
    if backend == "torch":
        got = [v.numpy() for v in ph.rician_nll_with_derivatives(
            torch.tensor(m), torch.tensor(nu), sigma)]
    else:
        got = ph.rician_nll_with_derivatives(m, nu, sigma)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-10, atol=1e-8)  # d1 ~ difference of O(100)
    z = m * nu / sigma**2
    assert (z > 50).sum() > 100 and (z < 50).sum() > 20  # both branches exercised


def test_mt_factor_scales_with_r1():
    """The magnetisation-transfer model available to the signal equations: the full WM loss
    at the reference WM's T1, none for free water, proportional to R1 in between."""
    f = ph.mt_factor(np.array([ph.MT_T1_WM_S, ph.MT_T1_FREE_S, 1.5, 0.3]), 0.12)
    mid = ((1 / 1.5 - 1 / ph.MT_T1_FREE_S)
           / (1 / ph.MT_T1_WM_S - 1 / ph.MT_T1_FREE_S))
    np.testing.assert_allclose(f, [0.88, 1.0, 1.0 - 0.12 * mid, 1.0 - 0.12 * 1.5], rtol=1e-5)
    p = ph.Protocol("tse", 4000.0, 80.0, mt_wm_loss=0.12)
    assert ph.signal(p, 0.7, 0.85, 0.07) == pytest.approx(
        0.88 * ph.signal(ph.Protocol("tse", 4000.0, 80.0), 0.7, 0.85, 0.07), rel=1e-5)
    assert ph.Protocol.from_dict(p.as_dict()).mt_wm_loss == 0.12
    t = ph.mt_factor(torch.tensor([0.85, 4.3]), 0.12)
    assert torch.allclose(t, torch.tensor([0.88, 1.0]), atol=1e-5)
