"""The phantom's scanner forward model (qmriflow.phantom.scanner): each effect on its own."""

from __future__ import annotations

import numpy as np
import pytest

from qmriflow import physics
from qmriflow.phantom.protocols import draw_session_protocols
from qmriflow.phantom.scanner import (
    ALL_EFFECTS,
    BOUND_POOL_FRACTION,
    NO_EFFECTS,
    ScannerEffects,
    compartment_signal,
    draw_b1_field,
    draw_series_physics,
    mt_saturation,
    noisefree_signal,
    slice_profile,
)
from qmriflow.phantom.tissues import BY_NAME, N_TISSUES, TISSUES, SubjectTissues


def _series() -> dict:
    _, series = draw_session_protocols(np.random.default_rng(3), cluster=0)
    rng = np.random.default_rng(17)
    return {sp.role: (sp, draw_series_physics(sp, rng)) for sp in series}


def _tissues() -> SubjectTissues:
    n = N_TISSUES + 1
    pd, t1, t2 = np.zeros(n), np.zeros(n), np.zeros(n)
    for t in TISSUES:
        pd[t.label], t1[t.label], t2[t.label] = t.pd, t.t1_s, t.t2_s
    return SubjectTissues(pd=pd, t1_s=t1, t2_s=t2)


def _pure(names: list[str]) -> np.ndarray:
    f = np.zeros((N_TISSUES, len(names)))
    for i, name in enumerate(names):
        f[BY_NAME[name].label - 1, i] = 1.0
    return f


def _only(**on: bool) -> ScannerEffects:
    return ScannerEffects(**{k: on.get(k, False) for k in NO_EFFECTS.as_dict()})


def test_without_effects_the_scanner_is_the_estimators_equation() -> None:
    """Every effect off: physics.signal of the proton-weighted voxel parameters (the exact
    path), also for a partial-volume voxel."""
    tissues = _tissues()
    f = _pure(["WM", "GM", "CSF"])
    f = np.concatenate([f, 0.5 * (f[:, :1] + f[:, 2:3])], axis=1)  # a WM/CSF voxel
    var = np.ones((3, f.shape[1]))
    from qmriflow.phantom.tissues import mix_parameters

    pd, t1, t2 = mix_parameters(f, tissues, var)
    for sp, phys in _series().values():
        got = noisefree_signal(sp, phys, f, var, tissues, np.ones(f.shape[1]),
                               effects=NO_EFFECTS)
        np.testing.assert_allclose(got, physics.signal(sp.protocol, pd, t1, t2), rtol=1e-10)


def test_mt_lowers_wm_more_than_gm_and_leaves_csf() -> None:
    tissues = _tissues()
    f = _pure(["WM", "GM", "CSF"])
    var = np.ones((3, 3))
    for role, (sp, phys) in _series().items():
        base = noisefree_signal(sp, phys, f, var, tissues, np.ones(3), effects=NO_EFFECTS)
        mt = noisefree_signal(sp, phys, f, var, tissues, np.ones(3), effects=_only(mt=True))
        loss = 1.0 - mt / base
        assert loss[2] == 0.0  # CSF: no macromolecules
        assert loss[0] > loss[1] > 0.0
        if role == "t2w":  # 2D multi-slice TSE: the literature's 10-20 % in WM
            assert 0.10 <= loss[0] <= 0.20
    assert mt_saturation("WM", "t2w", 1.2) == pytest.approx(1.2 * BOUND_POOL_FRACTION["WM"])


def test_b1_scales_the_gre_flip_angle_and_the_refocusing_trains() -> None:
    s = _series()
    sp, phys = s["t1w"]
    t1, t2 = np.array([0.9, 1.4]), np.array([0.07, 0.09])
    b1 = np.array([0.85, 1.15])
    got = compartment_signal(sp, phys, t1, t2, b1, "WM", _only(b1=True))
    p = sp.protocol
    np.testing.assert_allclose(got, physics.spoiled_gre(1.0, t1, t2, p.tr_ms, p.te_ms,
                                                         p.fa_deg * b1), rtol=1e-12)
    for role in ("t2w", "flair"):
        sp, phys = s[role]
        lo, hi = compartment_signal(sp, phys, np.full(2, 1.0), np.full(2, 0.08),
                                    np.array([0.85, 1.15]), "WM",
                                    _only(b1=True, echo_train=True))
        one = compartment_signal(sp, phys, np.array([1.0]), np.array([0.08]),
                                 np.array([1.0]), "WM", _only(b1=True, echo_train=True))[0]
        assert abs(lo - one) / one > 0.005 and abs(hi - one) / one > 0.005
        # without the echo-train model B1 has nothing to act on in a TSE
        flat = compartment_signal(sp, phys, np.full(2, 1.0), np.full(2, 0.08),
                                  np.array([0.85, 1.15]), "WM", _only(b1=True))
        assert flat[0] == pytest.approx(flat[1], rel=1e-12)


def test_b1_field_spans_the_stated_range_across_the_head() -> None:
    for seed in range(5):
        field = draw_b1_field(np.random.default_rng(seed), np.array([2.0, -10.0, 15.0]))
        g = np.linspace(-90, 90, 37)
        xyz = np.stack(np.meshgrid(g, g, g, indexing="ij"), -1).reshape(-1, 3)
        xyz = xyz[(xyz * xyz).sum(1) <= 90.0**2] + np.array([2.0, -10.0, 15.0])
        b1 = field(xyz)
        lo, hi = np.percentile(b1, [1, 99])
        assert 0.84 <= lo <= 0.92 and 1.08 <= hi <= 1.16
        assert b1.min() >= 0.8 and b1.max() <= 1.2


def test_partial_volume_adds_compartment_signals() -> None:
    """A 50/50 WM/CSF voxel reads the mean of the two pure signals — not the signal of its
    mixed (proton-weighted) parameters, which is what an estimator assumes."""
    tissues = _tissues()
    f = _pure(["WM", "CSF"])
    mixed = 0.5 * f.sum(1, keepdims=True)
    var = np.ones((3, 1))
    for sp, phys in _series().values():
        pure = noisefree_signal(sp, phys, f, np.ones((3, 2)), tissues, np.ones(2),
                                effects=_only(partial_volume=True))
        pv = noisefree_signal(sp, phys, mixed, var, tissues, np.ones(1),
                              effects=_only(partial_volume=True))
        assert pv[0] == pytest.approx(pure.mean(), rel=1e-12)
        single = noisefree_signal(sp, phys, mixed, var, tissues, np.ones(1),
                                  effects=NO_EFFECTS)
        assert abs(pv[0] - single[0]) / single[0] > 0.01


def test_t2star_lowers_only_the_gre() -> None:
    tissues = _tissues()
    f = _pure(["WM", "GM"])
    var = np.ones((3, 2))
    for role, (sp, phys) in _series().items():
        base = noisefree_signal(sp, phys, f, var, tissues, np.ones(2), effects=NO_EFFECTS)
        t2s = noisefree_signal(sp, phys, f, var, tissues, np.ones(2), effects=_only(t2star=True))
        if role.startswith("t1w"):
            assert np.all(t2s < base) and np.all(t2s > 0.98 * base)
        else:
            np.testing.assert_allclose(t2s, base, rtol=1e-12)


def test_echo_train_parameters_are_fixed_per_cluster_and_reach_the_header_te() -> None:
    _, series = draw_session_protocols(np.random.default_rng(5), cluster=2)
    a = {sp.role: draw_series_physics(sp, np.random.default_rng(99)) for sp in series}
    b = {sp.role: draw_series_physics(sp, np.random.default_rng(99)) for sp in series}
    assert a == b
    for sp in series:
        tr = a[sp.role].train
        if sp.role in ("t2w", "flair"):
            assert tr is not None
            assert tr.centre_te_ms == pytest.approx(sp.protocol.te_ms, abs=0.5 * tr.esp_ms)
            assert tr.length == sp.echo_train_length
        else:
            assert tr is None


def test_slice_profile_shape() -> None:
    assert slice_profile(0.0) == pytest.approx(1.0)
    assert slice_profile(0.5) == pytest.approx(0.5)
    assert slice_profile(1.0) < 0.01


def test_all_effects_change_the_t2w_by_more_than_3_percent_in_wm() -> None:
    """The inverse crime is gone at tissue level: pure WM in the 2D T2w differs from the
    estimator's equation (TE factor included) by more than 3 %."""
    tissues = _tissues()
    sp, phys = _series()["t2w"]
    f = _pure(["WM"])
    base = noisefree_signal(sp, phys, f, np.ones((3, 1)), tissues, np.ones(1),
                            effects=NO_EFFECTS)
    real = noisefree_signal(sp, phys, f, np.ones((3, 1)), tissues, np.ones(1),
                            effects=ALL_EFFECTS)
    assert abs(real[0] / base[0] - 1.0) > 0.03
