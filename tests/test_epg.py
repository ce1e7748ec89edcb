"""Extended phase graphs (qmriflow.epg): hand-checkable limits of the echo-train physics."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from qmriflow import physics
from qmriflow.epg import (
    EchoTrain,
    cpmg,
    cpmg_affine,
    equivalent_te_ms,
    tse_steady_state,
    variable_flip_schedule,
)


def test_one_180_echo_is_the_monoexponential_spin_echo() -> None:
    for t1, t2, esp in ((0.85, 0.07, 80.0), (1.8, 0.099, 10.0), (4.1, 1.8, 120.0)):
        echoes, _ = cpmg(t1, t2, EchoTrain(esp, (180.0,), 1))
        assert echoes.shape == (1,)
        assert abs(echoes[0].imag) < 1e-12
        assert echoes[0].real == pytest.approx(math.exp(-esp / 1000.0 / t2), rel=1e-12)


def test_180_train_decays_monoexponentially_and_ignores_t1() -> None:
    t2 = np.array([0.05, 0.07, 0.1])
    tr = EchoTrain(9.0, (180.0,) * 12, 6)
    for t1 in (0.5, 3.0):
        echoes, _ = cpmg(t1, t2[:, None] * 0 + t2[:, None], tr)
        n = np.arange(1, 13)
        expect = np.exp(-n[None, :] * 9.0 / 1000.0 / t2[:, None])
        np.testing.assert_allclose(np.abs(echoes[:, 0, :]), expect, rtol=1e-12)


def test_reduced_refocusing_gives_stimulated_echoes_above_the_monoexponential() -> None:
    """With 120° pulses the second echo carries a stimulated echo (T1-weighted storage):
    echo 2 exceeds echo 1 (the classic CPMG oscillation) and late echoes decay more slowly
    than exp(−TE/T2) scaled by the first echo."""
    echoes, _ = cpmg(1.0, 0.07, EchoTrain(10.0, (120.0,) * 16, 8))
    a = np.abs(echoes)
    assert a[1] > a[0]
    late_ratio = a[15] / a[7]
    assert late_ratio > math.exp(-80.0 / 70.0) * 1.02


def test_b1_scales_every_flip_angle() -> None:
    sched = variable_flip_schedule(40, minimum_deg=45.0)
    tr = EchoTrain(4.0, sched, 20)
    b1 = 0.87
    scaled = EchoTrain(4.0, tuple(a * b1 for a in sched), 20, excitation_deg=90.0 * b1)
    e1, z1 = cpmg(1.1, 0.08, tr, b1=b1)
    e2, z2 = cpmg(1.1, 0.08, scaled)
    np.testing.assert_allclose(e1, e2, rtol=1e-12, atol=1e-15)
    assert z1 == pytest.approx(z2, rel=1e-12)


def test_affine_decomposition_and_broadcasting() -> None:
    tr = EchoTrain(5.0, variable_flip_schedule(30), 12)
    t1 = np.array([0.8, 1.5, 4.0])[:, None]
    t2 = np.array([0.06, 0.1])[None, :]
    c, d, a, b = cpmg_affine(t1, t2, tr, b1=0.95)
    for m in (-0.7, 0.3, 1.0):
        e, z = cpmg(t1, t2, tr, b1=0.95, mz0=m)
        np.testing.assert_allclose(e, c * m + d, rtol=1e-10, atol=1e-13)
        np.testing.assert_allclose(z, a * m + b, rtol=1e-10, atol=1e-13)
    assert c.shape == (3, 2, 30) and a.shape == (3, 2)


def test_steady_state_180_tse_approaches_the_seed_equation_for_short_trains() -> None:
    """180° refocusing and a train short against TR: PD·(1 − e^(−TR/T1))·e^(−TE/T2), the
    seed's TSE equation without its TE factor, to within the T1 recovery during the train."""
    tr = EchoTrain(10.0, (180.0,) * 4, 2)
    for t1, t2 in ((0.85, 0.07), (1.35, 0.09)):
        s = abs(tse_steady_state(t1, t2, tr, 6000.0))
        ref = float(physics.tse(1.0, t1, t2, 6000.0, 20.0, te_correction=1.0))
        assert s == pytest.approx(ref, rel=0.01)


def test_flair_with_perfect_inversion_nulls_near_the_seed_null() -> None:
    """FLAIR (TR 4800, TI 1650): the steady state's null lies near the T1 where the seed's
    1 − 2e^(−TI/T1) + e^(−TR/T1) vanishes (3.58 s), moved by what the seed leaves out: the
    longitudinal magnetisation the long train stores and regrows (here to ~4.1 s, where CSF
    is: 3D FLAIR protocols are set up to null CSF with their real trains)."""
    tr = EchoTrain(3.5, variable_flip_schedule(120), 60)
    t1 = np.geomspace(1.5, 5.0, 200)
    s = np.abs(tse_steady_state(t1, 0.5, tr, 4800.0, ti_ms=1650.0))
    seed = np.abs(1 - 2 * np.exp(-1.65 / t1) + np.exp(-4.8 / t1))
    null_epg, null_seed = t1[np.argmin(s)], t1[np.argmin(seed)]
    assert null_seed == pytest.approx(3.58, abs=0.05)
    assert abs(null_epg - null_seed) / null_seed < 0.25
    assert 3.8 < null_epg < 4.4
    # an imperfect inversion leaves less negative Mz to regrow: the null moves to longer T1
    s96 = np.abs(tse_steady_state(t1, 0.5, tr, 4800.0, ti_ms=1650.0,
                                  inversion_efficiency=0.96))
    assert t1[np.argmin(s96)] > null_epg


def test_equivalent_te_of_a_180_train_is_its_echo_time() -> None:
    tr = EchoTrain(10.0, (180.0,) * 10, 8)
    assert equivalent_te_ms(tr) == pytest.approx(80.0, rel=1e-9)
    # low refocusing angles preserve signal: the equivalent TE is far below the echo time
    vfa = EchoTrain(3.4, variable_flip_schedule(170, minimum_deg=40.0), 90)
    assert 0.3 * vfa.centre_te_ms < equivalent_te_ms(vfa) < 0.6 * vfa.centre_te_ms


def test_bad_trains_are_refused() -> None:
    with pytest.raises(ValueError, match="at least one"):
        EchoTrain(5.0, (), 1)
    with pytest.raises(ValueError, match="centre echo"):
        EchoTrain(5.0, (180.0,) * 3, 4)
    with pytest.raises(ValueError, match="positive"):
        EchoTrain(0.0, (180.0,), 1)
    with pytest.raises(ValueError, match="shorter than the echo train"):
        tse_steady_state(1.0, 0.1, EchoTrain(10.0, (180.0,) * 20, 10), 100.0)


# ---------------------------------------------------------------------------------------------
# the estimator's echo-train model (physics.signal with Protocol.echo_train)
# ---------------------------------------------------------------------------------------------

T2W_TRAIN = EchoTrain(12.5, (150.0,) * 16, 8)
FLAIR_TRAIN = EchoTrain(4.0, variable_flip_schedule(120, minimum_deg=30.0, end_deg=100.0), 75)


def _brain_like(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    t1 = np.exp(rng.uniform(math.log(0.5), math.log(4.5), n))
    t2 = np.minimum(np.exp(rng.uniform(math.log(0.04), math.log(2.2), n)), 0.9 * t1)
    return t1, t2


def test_echo_train_signal_matches_the_direct_phase_graph() -> None:
    t1, t2 = _brain_like(400)
    tse_p = physics.Protocol("tse", 4200.0, 100.0, fa_deg=90.0, echo_train=T2W_TRAIN)
    fl_p = physics.Protocol("flair", 9000.0, 300.0, ti_ms=2500.0, fa_deg=90.0,
                            echo_train=FLAIR_TRAIN)
    for p, ti in ((tse_p, None), (fl_p, 2500.0)):
        direct = np.abs(tse_steady_state(t1, t2, p.echo_train, p.tr_ms, ti_ms=ti))
        got = physics.signal(p, 0.8, t1, t2)
        assert isinstance(got, np.ndarray) and got.shape == t1.shape
        # tabulated on a 40 x 40 log grid: 1e-3 of the signal's range, away from the null
        assert np.max(np.abs(got - 0.8 * direct)) < 1e-3 * np.max(0.8 * direct)
        away = direct > 0.05 * direct.max()
        assert np.max(np.abs(got[away] / (0.8 * direct[away]) - 1.0)) < 2e-3
    # the T2w model differs from the seed's mono-exponential one (the point of it) but not wildly
    seed = physics.signal(physics.Protocol("tse", 4200.0, 100.0, fa_deg=90.0), 1.0, 0.85, 0.07)
    epg = physics.signal(tse_p, 1.0, 0.85, 0.07)
    assert 0.8 < float(epg) / float(seed) < 1.3 and abs(float(epg) / float(seed) - 1) > 0.01


def test_echo_train_signal_torch_agrees_and_is_differentiable() -> None:
    torch = pytest.importorskip("torch")
    t1, t2 = _brain_like(50, seed=1)
    p = physics.Protocol("flair", 9000.0, 300.0, ti_ms=2500.0, fa_deg=90.0,
                         echo_train=FLAIR_TRAIN)
    a = torch.tensor(t1, requires_grad=True)
    b = torch.tensor(t2, requires_grad=True)
    pd = torch.full((50,), 0.7, dtype=torch.float64, requires_grad=True)
    y = physics.signal(p, pd, a, b)
    assert np.allclose(y.detach().numpy(), physics.signal(p, 0.7, t1, t2), rtol=1e-12)
    y.sum().backward()
    # analytic gradient of the interpolant against central differences of the NumPy path
    h = 1e-6
    num_t1 = (physics.signal(p, 0.7, t1 * (1 + h), t2) - physics.signal(p, 0.7, t1 * (1 - h), t2)
              ) / (2 * h * t1)
    num_t2 = (physics.signal(p, 0.7, t1, t2 * (1 + h)) - physics.signal(p, 0.7, t1, t2 * (1 - h))
              ) / (2 * h * t2)
    assert np.allclose(a.grad.numpy(), num_t1, rtol=1e-4, atol=1e-6)
    assert np.allclose(b.grad.numpy(), num_t2, rtol=1e-4, atol=1e-6)
    assert np.allclose(pd.grad.numpy(), physics.signal(p, 1.0, t1, t2), rtol=1e-12)


def test_echo_train_protocol_round_trips_and_is_refused_where_meaningless() -> None:
    p = physics.Protocol("flair", 9000.0, 300.0, ti_ms=2500.0, fa_deg=90.0,
                         echo_train=FLAIR_TRAIN)
    d = json.loads(json.dumps(p.as_dict()))
    assert d["signal_model"] == "epg" and d["echo_train"]["echo_train_length"] == 120
    q = physics.Protocol.from_dict(d)
    assert q.echo_train == FLAIR_TRAIN
    assert physics.signal(q, 1.0, 0.85, 0.07) == physics.signal(p, 1.0, 0.85, 0.07)
    plain = physics.Protocol.from_dict({**d, "echo_train": None})
    assert plain.signal_model == "te-factor" and plain.echo_train is None
    with pytest.raises(ValueError, match="tse/flair"):
        physics.Protocol("gre", 5.0, 2.3, fa_deg=10.0, echo_train=T2W_TRAIN)
    with pytest.raises(ValueError, match="scalar TR"):
        physics.signal(physics.Protocol("tse", np.array([4000.0, 4100.0]), 100.0,  # type: ignore[arg-type]
                                        echo_train=T2W_TRAIN), 1.0, 0.85, 0.07)
