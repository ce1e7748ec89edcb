"""Which echo train the estimator simulates for a T2w/FLAIR series (qmriflow.archive.params), and
that the cluster fit's batched signals follow it."""

from __future__ import annotations

import numpy as np
import pytest

from qmriflow import physics
from qmriflow.archive.params import ASSUMED_3D_SCHEDULE, EchoTrainSettings, estimator_echo_train
from qmriflow.epg import EchoTrain
from qmriflow.model.cluster_scales import _batched_signals


def _t2w(**kw: object) -> dict:
    return {"role": "t2w", "sequence": "tse", "tr_ms": 4200.0, "te_ms": 100.0, "ti_ms": None,
            "fa_deg": 90.0, "acquisition": "2D", "echo_train_length": 16.0,
            "te_correction_factor": 0.9, **kw}


def _flair(**kw: object) -> dict:
    return {"role": "flair", "sequence": "flair", "tr_ms": 4800.0, "te_ms": 320.0,
            "ti_ms": 1650.0, "fa_deg": 90.0, "acquisition": "3D",
            "echo_train_length": 170.0, "te_correction_factor": 0.42, **kw}


def test_refocusing_angle_sources_in_order() -> None:
    # a converter's RefocusingFlipAngle first, then a Siemens-style FlipAngle > 90, then the site
    site = EchoTrainSettings(t2w_refocusing_deg=130.0)
    train, src = estimator_echo_train(_t2w(fa_deg=150.0), {"RefocusingFlipAngle": 120}, site)
    assert train is not None and set(train["refocusing_deg"]) == {120.0}
    assert "RefocusingFlipAngle" in src
    train, src = estimator_echo_train(_t2w(fa_deg=150.0), {}, site)
    assert set(train["refocusing_deg"]) == {150.0} and "FlipAngle > 90" in src
    train, src = estimator_echo_train(_t2w(), {}, site)
    assert set(train["refocusing_deg"]) == {130.0} and "t2w_refocusing_deg" in src
    # linear order: TE is echo ceil(16/2) = 8, spacing TE/8
    t = EchoTrain.from_dict(train)
    assert (t.length, t.centre_echo, t.esp_ms) == (16, 8, 12.5)
    assert t.centre_te_ms == pytest.approx(100.0)


def test_missing_header_information_falls_back_to_the_seed_factor() -> None:
    train, src = estimator_echo_train(_t2w(), {}, EchoTrainSettings())
    assert train is None and "seed TE factor 0.9" in src and "exam card" in src
    train, src = estimator_echo_train(_t2w(echo_train_length=None), {"RefocusingFlipAngle": 150},
                                      EchoTrainSettings())
    assert train is None and "EchoTrainLength" in src
    # a train that cannot fit in TR is not simulated
    train, src = estimator_echo_train(_t2w(tr_ms=180.0, te_ms=100.0, echo_train_length=40.0),
                                      {"RefocusingFlipAngle": 150}, EchoTrainSettings())
    assert train is None and "does not fit in TR" in src
    train, src = estimator_echo_train(_t2w(fa_deg=150.0), {}, EchoTrainSettings(model="off"))
    assert train is None and "model: off" in src
    train, src = estimator_echo_train({**_t2w(), "role": "t1w", "sequence": "gre"}, {}, None)
    assert train is None


def test_long_3d_flair_takes_the_assumed_schedule_and_says_so() -> None:
    train, src = estimator_echo_train(_flair(), {}, EchoTrainSettings())
    assert train is not None and "ASSUMED" in src
    t = EchoTrain.from_dict(train)
    assert t.length == 170 and t.esp_ms == ASSUMED_3D_SCHEDULE["echo_spacing_ms"]
    assert t.centre_echo == 80 and t.centre_te_ms == pytest.approx(320.0)
    assert t.refocusing_deg[0] == ASSUMED_3D_SCHEDULE["start_deg"]
    assert min(t.refocusing_deg) == pytest.approx(ASSUMED_3D_SCHEDULE["minimum_deg"], abs=0.5)
    assert t.refocusing_deg[-1] == pytest.approx(ASSUMED_3D_SCHEDULE["end_deg"], abs=0.5)
    train, src = estimator_echo_train(_flair(), {},
                                      EchoTrainSettings(flair_3d_schedule="off"))
    assert train is None and "seed TE factor 0.42" in src
    # a long train whose TE lies beyond 170 echoes at 4 ms is stretched to reach it
    train, _ = estimator_echo_train(_flair(te_ms=800.0, tr_ms=9000.0), {}, EchoTrainSettings())
    t = EchoTrain.from_dict(train)
    assert t.centre_echo == 170 and t.centre_te_ms == pytest.approx(800.0)


def test_bad_settings_are_refused_in_one_line() -> None:
    with pytest.raises(ValueError, match="model must be auto or off"):
        EchoTrainSettings(model="epg")
    with pytest.raises(ValueError, match=r"t2w_refocusing_deg must be in \[60, 180\]"):
        EchoTrainSettings(t2w_refocusing_deg=200.0)


def test_cluster_fit_signals_use_each_sessions_train() -> None:
    t2w = physics.Protocol("tse", 4200.0, 100.0, fa_deg=90.0,
                           echo_train=EchoTrain(12.5, (150.0,) * 16, 8))
    other = physics.Protocol("tse", 4300.0, 96.0, fa_deg=90.0,
                             echo_train=EchoTrain(12.0, (130.0,) * 16, 8))
    logp = np.log(np.array([[0.7, 0.85, 0.07], [0.8, 1.35, 0.09], [0.7, 0.9, 0.075]]))
    protos = [t2w, other, t2w]
    got = _batched_signals(protos, logp)
    want = [float(physics.signal(p, *np.exp(x))) for p, x in zip(protos, logp, strict=True)]
    assert got == pytest.approx(want, rel=1e-12)
    assert abs(got[0] / float(physics.signal(physics.Protocol("tse", 4200.0, 100.0), 0.7, 0.85,
                                                0.07)) - 1) > 0.01


def test_a_site_can_give_its_3d_flair_schedule() -> None:
    site = EchoTrainSettings(flair_3d_minimum_deg=45.0, flair_3d_end_deg=120.0,
                             flair_3d_start_deg=160.0, flair_3d_echo_spacing_ms=3.4)
    train, src = estimator_echo_train(_flair(), {}, site)
    t = EchoTrain.from_dict(train)
    assert "from the site's physics.echo_train" in src and "ASSUMED" not in src
    assert t.esp_ms == 3.4 and t.refocusing_deg[0] == 160.0
    assert min(t.refocusing_deg) == pytest.approx(45.0, abs=0.5)
    assert t.refocusing_deg[-1] == pytest.approx(120.0, abs=0.5)
    train, src = estimator_echo_train(_flair(), {}, EchoTrainSettings(flair_3d_minimum_deg=45.0))
    assert "site's minimum_deg, the rest ASSUMED" in src
    with pytest.raises(ValueError, match="flair_3d_echo_spacing_ms must be in"):
        EchoTrainSettings(flair_3d_echo_spacing_ms=0.1)
