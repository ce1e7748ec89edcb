"""Contrast scales per scanner-protocol cluster (qmriflow.model.cluster_scales / clusters) and
the vendor intensity scaling in the protocol parameters (issue 22).

Synthetic sessions use the estimator's own equations (qmriflow.physics) on purpose: these tests
check the statistics of the cluster model (ratios recovered, the free direction set by a
calibration session, joining without refitting), not realism (bench/bench_yardstick.py).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from qmriflow import physics
from qmriflow.archive.params import intensity_scaling, validate_session_params
from qmriflow.errors import InputError
from qmriflow.io import save_nifti, write_json
from qmriflow.model import calibration
from qmriflow.model.cluster_scales import SessionObservation, fit_cluster, join_cluster
from qmriflow.model.clusters import (
    TISSUE_SD_MAX,
    fit_clusters,
    group_sessions,
    load_clusters,
    protocol_signature,
    same_protocol,
)

PROTOCOLS = {"T1w": physics.Protocol("gre", 5.2, 2.3, fa_deg=10.0),
             "T2w": physics.Protocol("tse", 4000.0, 80.0),
             "FLAIR": physics.Protocol("flair", 4800.0, 300.0, ti_ms=1650.0)}
RATIO = {"T1w": 0.5, "T2w": 1.0, "FLAIR": 2.0}
CENTRES = {"WM": (0.69, 1.084, 0.069), "GM": (0.82, 1.82, 0.099)}
TISSUE_LABEL = {"GM": 1, "WM": 2, "CSF": 3}


def _tissues(rng: np.random.Generator) -> dict[str, dict[str, float]]:
    out = {t: {p: v * float(rng.uniform(0.8, 1.2)) for p, v in zip(("pd", "t1_s", "t2_s"), c,
                                                                  strict=True)}
           for t, c in CENTRES.items()}
    out["CSF"] = {"pd": 1.0, "t1_s": 4.1 * float(rng.uniform(0.97, 1.03)),
                  "t2_s": 1.8 * float(rng.uniform(0.97, 1.03))}
    return out


def _observation(label: str, tis: dict, rng: np.random.Generator, ratio: dict | None = None,
                 reference: dict | None = None, jitter: float = 0.03) -> SessionObservation:
    """Tissue medians of a session with protocol gains: g · ratio · jitter (log-SD)."""
    ratio = ratio or RATIO
    g = 1000.0 * math.exp(rng.normal(0, 0.15))
    gains = {c: g * ratio[c] * math.exp(rng.normal(0, jitter)) for c in PROTOCOLS}
    raw = {t: {c: gains[c] * float(physics.signal(PROTOCOLS[c], v["pd"], v["t1_s"],
                                                  v["t2_s"])) * math.exp(rng.normal(0, 0.005))
               for c in PROTOCOLS} for t, v in tis.items()}
    log_modes = {c: math.log(raw["WM"][c] * rng.uniform(0.9, 1.1)) for c in PROTOCOLS}
    med = {t: {c: raw[t][c] / math.exp(log_modes[c]) for c in PROTOCOLS} for t in raw}
    return SessionObservation(label, PROTOCOLS, med, log_modes, reference)


def _cluster(n: int, seed: int = 0) -> tuple[list[SessionObservation], list[dict]]:
    rng = np.random.default_rng(seed)
    truth = [_tissues(rng) for _ in range(n)]
    return [_observation(f"s{i}", t, rng) for i, t in enumerate(truth)], truth


def test_cluster_fit_recovers_the_t1w_ratio_and_keeps_subject_differences() -> None:
    obs, truth = _cluster(8)
    fit = fit_cluster(obs)
    assert fit.level == "cohort prior" and not fit.reference_sessions
    # CSF anchors the T1w/T2w ratio in every session: recovered within the jitter
    assert math.exp(fit.log_ratios["T1w"]) == pytest.approx(RATIO["T1w"], rel=0.08)
    assert fit.log_ratios["T2w"] == 0.0
    # the free direction (FLAIR) comes from the cohort prior: the level may be off, but the
    # differences between sessions survive (between-subject slope near 1, r high)
    for t in ("WM", "GM"):
        for p in ("t1_s", "t2_s"):
            x = np.array([tr[t][p] for tr in truth])
            y = np.array([fit.sessions[f"s{i}"].tissues[t][p] for i in range(8)])
            slope = np.polyfit(x, y, 1)[0]
            assert 0.75 < slope < 1.25 and np.corrcoef(x, y)[0, 1] > 0.9, (t, p, slope)
    # every session's scales carry the cluster's uncertainty (FLAIR softest)
    s0 = fit.sessions["s0"]
    assert s0.method == "cluster"
    assert s0.log_sd["FLAIR"] > s0.log_sd["T2w"] > 0


def test_a_calibration_session_sets_the_clusters_level() -> None:
    """With gain ratios reproduced to 0.5 % the reference session pins every session's values;
    what is left is set by the ratios' reproducibility (a 3 % jitter moves T1 by up to ~9 %
    in single sessions: the FLAIR direction stays free per session)."""
    rng = np.random.default_rng(3)
    truth = [_tissues(rng) for _ in range(6)]
    ref = {t: dict(truth[0][t]) for t in ("WM", "GM")}
    obs = [_observation(f"s{i}", t, rng, reference=ref if i == 0 else None, jitter=0.005)
           for i, t in enumerate(truth)]
    fit = fit_cluster(obs)
    assert fit.level == "reference" and fit.reference_sessions == ["s0"]
    for c in ("T1w", "FLAIR"):
        assert math.exp(fit.log_ratios[c]) == pytest.approx(RATIO[c], rel=0.03), c
    for i in range(6):
        for t in ("WM", "GM"):
            for p in ("pd", "t1_s", "t2_s"):
                est = fit.sessions[f"s{i}"].tissues[t][p]
                assert est == pytest.approx(truth[i][t][p], rel=0.05), (i, t, p)


def _log_sensitivity(tis: dict[str, float]) -> np.ndarray:
    """d log(PD, T1, T2) / d log(signal of T1w, T2w, FLAIR) of one tissue (3 × 3): the inverse
    of the calibration's log-Jacobian."""
    x = np.log([[tis["pd"], tis["t1_s"], tis["t2_s"]]])
    _, jac = calibration._log_jacobian(list(PROTOCOLS.values()), x)
    return np.linalg.inv(jac[0])


def test_a_sessions_flair_gain_error_reaches_its_own_maps_only() -> None:
    """The FLAIR's gain relative to the T2w is the direction no tissue physics fixes inside a
    session (FLAIR nulls CSF): a 3 % FLAIR jitter of one session moves that session's WM T1
    along the signal model's sensitivity (the jitter prior takes a little of it; at the
    yardstick's echo-train FLAIR the sensitivity is about −2.8 % per 1 %, here −0.65), its
    T1w/T2w scales not at all, and the other sessions' values hardly. This
    is the floor bench/bench_cluster_floor.py measures (bench/results-pages/accuracy.md)."""
    rng = np.random.default_rng(11)
    truth = [_tissues(rng) for _ in range(8)]
    obs = [_observation(f"s{i}", t, rng, jitter=0.0) for i, t in enumerate(truth)]
    base = fit_cluster(obs)
    o3 = obs[3]
    bumped = {t: {c: v * (1.03 if c == "FLAIR" else 1.0) for c, v in m.items()}
              for t, m in o3.medians.items()}
    obs2 = [*obs[:3], SessionObservation(o3.label, o3.protocols, bumped, o3.log_modes),
            *obs[4:]]
    fit = fit_cluster(obs2)
    full = float(_log_sensitivity(truth[3]["WM"])[1, 2]) * math.log(1.03)  # unshrunk move
    assert full == pytest.approx(-0.65 * math.log(1.03), rel=0.1)
    moved = math.log(fit.sessions["s3"].tissues["WM"]["t1_s"]
                     / base.sessions["s3"].tissues["WM"]["t1_s"])
    assert 1.05 * full < moved < 0.7 * full, (moved, full)
    for c in ("T1w", "T2w"):
        assert fit.sessions["s3"].scales[c] == pytest.approx(base.sessions["s3"].scales[c],
                                                             rel=0.005), c
    for i in (0, 1, 2, 4, 5, 6, 7):
        a, b = (f.sessions[f"s{i}"].tissues["WM"]["t1_s"] for f in (fit, base))
        assert a == pytest.approx(b, rel=0.005), i


def test_joining_uses_the_clusters_ratios_and_moves_nothing_else() -> None:
    obs, _ = _cluster(7, seed=5)
    fit = fit_cluster(obs[:6])
    before = {k: dict(v.scales) for k, v in fit.sessions.items()}
    joined = join_cluster(obs[6], fit)
    assert joined.method == "cluster (joined)"
    # the new session's own FLAIR/T2w scale ratio follows the cluster's gain ratio
    lm = obs[6].log_modes
    got = (math.log(joined.scales["FLAIR"]) + lm["FLAIR"]) - (
        math.log(joined.scales["T2w"]) + lm["T2w"])
    assert got == pytest.approx(fit.log_ratios["FLAIR"], abs=0.1)
    assert {k: dict(v.scales) for k, v in fit.sessions.items()} == before
    # a subset of contrasts joins too (a contrast withheld from the maps)
    sub = SessionObservation("s6", {c: PROTOCOLS[c] for c in ("T1w", "FLAIR")},
                             {t: {c: v[c] for c in ("T1w", "FLAIR")}
                              for t, v in obs[6].medians.items()},
                             {c: obs[6].log_modes[c] for c in ("T1w", "FLAIR")})
    part = join_cluster(sub, fit)
    assert part.contrasts == ("T1w", "FLAIR")


def test_protocol_signatures_group_by_tolerance() -> None:
    def params(tr2: float, model: str = "Ingenia") -> dict:
        e = {"manufacturer": "Philips", "manufacturer_model": model, "field_strength_t": 3.0}
        return {"t1w": {**e, "sequence": "gre", "acquisition": "3D", "tr_ms": 5.2,
                        "te_ms": 2.3, "ti_ms": None, "fa_deg": 10.0},
                "t2w": {**e, "sequence": "tse", "acquisition": "2D", "tr_ms": tr2,
                        "te_ms": 80.0, "ti_ms": None, "fa_deg": 90.0},
                "flair": {**e, "sequence": "flair", "acquisition": "3D", "tr_ms": 4800.0,
                          "te_ms": 300.0, "ti_ms": 1650.0, "fa_deg": 90.0}}

    a, b = protocol_signature(params(4000)), protocol_signature(params(4100))
    assert same_protocol(a, b, 0.05) and not same_protocol(a, b, 0.01)
    assert not same_protocol(a, protocol_signature(params(4000, "Achieva")), 0.05)
    # single linkage: a chain of close protocols is one cluster
    sigs = {"x1": params(4000), "x2": params(4150), "x3": params(4300), "y1": params(3000)}
    groups = group_sessions({k: protocol_signature(v) for k, v in sigs.items()}, 0.05)
    assert sorted(map(sorted, groups.values())) == [["x1", "x2", "x3"], ["y1"]]


# --- sessions on disk: the clusters file ------------------------------------------------------


def _write_session(root: Path, subject: str, tis: dict, gains: dict, rng: np.random.Generator,
                   tr2: float = 4000.0, model: str = "Ingenia", snr: float = 200.0) -> Path:
    """A 48 x 48 x 4 session (WM core, GM ring, CSF ventricle and rim) in the preprocessing
    layout, with a Philips FP intensity scaling record."""
    n, ns = 48, 4
    yy, xx = np.mgrid[:n, :n] - (n - 1) / 2
    r = np.hypot(yy, xx)
    lab = np.zeros((n, n), np.uint8)
    lab[r < 21] = 3
    lab[r < 19] = 1
    lab[r < 14] = 2
    lab[r < 6] = 3
    lab3 = np.repeat(lab[:, :, None], ns, 2)
    label = f"sub-{subject}_ses-V01"
    d = root / f"sub-{subject}" / "ses-V01"
    anat = d / "anat"
    aff = np.diag([1.0, 1.0, 4.0, 1.0])
    protos = dict(PROTOCOLS)
    protos["T2w"] = physics.Protocol("tse", tr2, 80.0)
    params: dict = {"session": label}
    for c, p in protos.items():
        img = np.zeros(lab3.shape)
        for t, v in tis.items():
            img[lab3 == TISSUE_LABEL[t]] = float(physics.signal(p, v["pd"], v["t1_s"],
                                                                v["t2_s"]))
        img = gains[c] * img
        img += rng.normal(0, img[lab3 > 0].mean() / snr, img.shape)
        save_nifti(anat / f"{label}_space-T2w_desc-preproc_{c}.nii.gz", np.abs(img), aff)
        role = {"T1w": "t1w", "T2w": "t2w", "FLAIR": "flair"}[c]
        params[role] = {"role": role, **p.as_dict(), "acquisition": "2D" if c == "T2w" else "3D",
                        "field_strength_t": 3.0, "manufacturer": "Philips",
                        "manufacturer_model": model,
                        "intensity_scaling": intensity_scaling({
                            "Manufacturer": "Philips", "PhilipsRescaleSlope": 2.0,
                            "PhilipsRescaleIntercept": 0, "PhilipsScaleSlope": 3.0,
                            "UsePhilipsFloatNotDisplayScaling": 1})}
    save_nifti(anat / f"{label}_space-T2w_desc-brain_mask.nii.gz", (lab3 > 0), aff,
               dtype=np.uint8)
    save_nifti(anat / f"{label}_space-T2w_dseg.nii.gz", lab3, aff, dtype=np.uint8)
    for t in ("WM", "GM"):
        save_nifti(anat / f"{label}_space-T2w_label-{t}_desc-eroded_mask.nii.gz",
                   lab3 == TISSUE_LABEL[t], aff, dtype=np.uint8)
    for key, p in (("T1map", "t1_s"), ("T2map", "t2_s"), ("PDmap", "pd")):
        m = np.zeros(lab3.shape)
        for t, v in tis.items():
            m[lab3 == TISSUE_LABEL[t]] = v[p]
        save_nifti(d / "ref" / f"{label}_{key}.nii.gz", m, aff)
    write_json(d / f"{label}_desc-protocol_params.json", params)
    return d


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("clusters") / "results"
    rng = np.random.default_rng(11)
    out: dict = {"root": root, "a": [], "truth": {}}
    for i in range(5):
        tis = _tissues(rng)
        g = 500.0 * math.exp(rng.normal(0, 0.15))
        # gain ratios reproduced to 0.5 %: exact enough to check the statistics (with a
        # realistic 2-3 % jitter single sessions' T1 moves by up to ~10 %: the FLAIR and
        # T1w directions stay free per session, bench/RESULTS.md)
        gains = {c: g * RATIO[c] * math.exp(rng.normal(0, 0.005)) for c in PROTOCOLS}
        d = _write_session(root, f"A{i}", tis, gains, rng)
        out["a"].append(d)
        out["truth"][d] = tis
    tis = _tissues(rng)
    out["b"] = _write_session(root, "B0", tis, {c: 700.0 for c in PROTOCOLS}, rng, tr2=3000.0)
    return out


def test_clusters_file_fits_keeps_and_joins(archive: dict, tmp_path: Path) -> None:
    out = tmp_path / "clusters.json"
    first = archive["a"][:4]
    doc = fit_clusters([*first, archive["b"]], out, min_sessions=3, log=lambda m: None)
    assert load_clusters(out) == json.loads(out.read_text())
    fitted = [c for c in doc["clusters"].values() if c["fit"]]
    single = [c for c in doc["clusters"].values() if not c["fit"]]
    assert len(fitted) == 1 and len(single) == 1
    assert "fewer than min_sessions 3" in single[0]["status"]
    assert fitted[0]["vendor_comparable"] is True
    lab_b = "sub-B0_ses-V01"
    assert doc["sessions"][lab_b]["method"] == "per-session"
    ratios = fitted[0]["fit"]["log_ratios"]
    assert math.exp(ratios["T1w"]) == pytest.approx(RATIO["T1w"], rel=0.1)
    # a new session of the fitted protocol: recorded, not refitted ...
    doc2 = fit_clusters([*archive["a"], archive["b"]], out, min_sessions=3, log=lambda m: None)
    name = next(n for n, c in doc2["clusters"].items() if c["fit"])
    assert doc2["clusters"][name]["fit"] == json.loads(json.dumps(fitted[0]["fit"]))
    new = "sub-A4_ses-V01"
    assert doc2["clusters"][name]["pending"] == [new]
    assert doc2["sessions"][new]["method"] == "cluster (joins at inference)"
    # ... and at inference it joins the cluster with the cluster's ratios
    from qmriflow.model.data import load_session, session_calibration, session_seg

    sd = load_session(archive["a"][4])
    cal = session_calibration(sd, seg=session_seg(sd), clusters=doc2)
    assert cal.origin["scales_from"] == "cluster (joined without refitting)"
    assert cal.origin["level"] == "cohort prior" and "assumption" in cal.origin[
        "level_assumption"]
    sd_b = load_session(archive["b"])
    cal_b = session_calibration(sd_b, seg=session_seg(sd_b), clusters=doc2)
    assert cal_b.origin["scales_from"] == "per-session calibration"
    assert "fewer than min_sessions" in cal_b.origin["reason"]
    # an explicit refit takes the new session in and records what changed
    doc3 = fit_clusters([*archive["a"], archive["b"]], out, min_sessions=3, refit=True,
                        log=lambda m: None)
    assert new in doc3["clusters"][name]["fit"]["sessions"]
    change = [h for h in doc3["history"] if h["cluster"] == name][-1]
    assert change["sessions_before"] == 4 and change["sessions_after"] == 5
    assert change["log_ratios_before"] == ratios


def test_uncertainty_maps_take_the_model_error_of_where_the_scales_come_from(
        archive: dict, tmp_path: Path) -> None:
    """Scales from a protocol cluster get ``model_error_cluster`` in their uncertainty maps,
    scales from the session alone ``model_error``; the sidecar says which."""
    import nibabel as nib

    from qmriflow.model.infer import infer_session, map_paths

    out = tmp_path / "clusters.json"
    fit_clusters([*archive["a"][:4], archive["b"]], out, min_sessions=3, log=lambda m: None)

    def run(d: Path, name: str, **kw: float) -> tuple[dict, float]:
        infer_session(d, None, tmp_path / name, estimator="network-free", scaling="calibrated",
                      clusters=out, device="cpu", threads=1, synth=False, progress=False, **kw)
        label = d.parent.name + "_" + d.name
        paths = map_paths(tmp_path / name, label)
        side = json.loads(paths["T1map"].with_suffix("").with_suffix(".json").read_text())
        u = nib.load(str(paths["sd_T1map"])).get_fdata()
        return side["Scaling"]["pinning"]["uncertainty"], float(np.median(u[u > 0]))

    a = archive["a"][0]
    unc, sd_small = run(a, "a", model_error=0.5, model_error_cluster=0.02)
    assert unc["model_error_log_sd"] == 0.02 and "protocol cluster" in unc["model_error_for"]
    unc, sd_large = run(a, "a2", model_error=0.5, model_error_cluster=0.2)
    assert unc["model_error_log_sd"] == 0.2
    assert sd_large > 2.0 * sd_small  # the term is used, not only recorded
    unc, _ = run(archive["b"], "b", model_error=0.5, model_error_cluster=0.02)
    assert unc["model_error_log_sd"] == 0.5 and "session alone" in unc["model_error_for"]


def test_a_cluster_too_small_at_first_is_fitted_once_it_can_be(archive: dict,
                                                             tmp_path: Path) -> None:
    out = tmp_path / "clusters.json"
    doc = fit_clusters(archive["a"][:2], out, min_sessions=3, log=lambda m: None)
    (c,) = doc["clusters"].values()
    assert c["fit"] is None and "fewer than min_sessions" in c["status"]
    doc = fit_clusters(archive["a"][:3], out, min_sessions=3, log=lambda m: None)
    (c,) = doc["clusters"].values()
    assert c["fit"] is not None and len(c["fit"]["sessions"]) == 3


def test_calibration_session_maps_and_their_failures(archive: dict, tmp_path: Path) -> None:
    dirs = archive["a"][:4]
    lab0 = "sub-A0_ses-V01"
    ref = dirs[0] / "ref"
    good = {lab0: {"maps": {k: str(ref / f"{lab0}_{k}.nii.gz")
                            for k in ("T1map", "T2map", "PDmap")}}}
    msgs: list[str] = []
    doc = fit_clusters(dirs, tmp_path / "c1.json", calibration=good, log=msgs.append)
    fit = next(c for c in doc["clusters"].values() if c["fit"])["fit"]
    assert fit["level"] == "reference" and fit["reference_sessions"] == [lab0]
    for d in dirs:
        lab = d.parent.name + "_" + d.name
        for t in ("WM", "GM"):
            for p in ("pd", "t1_s", "t2_s"):
                est = fit["sessions"][lab]["tissues"][t][p]
                # PD also carries the session's CSF (its T1/T2 vary ±3 % about the prior's)
                tol = 0.08 if p == "pd" else 0.06
                assert est == pytest.approx(archive["truth"][d][t][p], rel=tol), (lab, t, p)
    # reference maps missing / of another subject: one line each, the session still counts
    missing = {lab0: {"maps": {"T1map": str(ref / "nope_T1map.nii.gz")}}}
    msgs.clear()
    doc = fit_clusters(dirs, tmp_path / "c2.json", calibration=missing, log=msgs.append)
    assert any("reference T1map is missing" in m and "\n" not in m for m in msgs)
    fit = next(c for c in doc["clusters"].values() if c["fit"])["fit"]
    assert fit["level"] == "cohort prior" and lab0 in fit["sessions"]
    other = {lab0: {"maps": {"T1map": str(dirs[1] / "ref" / "sub-A1_ses-V01_T1map.nii.gz")}}}
    msgs.clear()
    fit_clusters(dirs, tmp_path / "c3.json", calibration=other, log=msgs.append)
    assert any("belongs to sub-A1, not to sub-A0" in m for m in msgs)


def test_gains_that_do_not_compare_keep_the_per_session_calibration(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    dirs = []
    for i in range(4):
        gains = {c: float(np.exp(rng.uniform(np.log(300), np.log(3000)))) for c in PROTOCOLS}
        dirs.append(_write_session(tmp_path / "results", f"I{i}", _tissues(rng), gains, rng))
    doc = fit_clusters(dirs, tmp_path / "c.json", log=lambda m: None)
    (c,) = doc["clusters"].values()
    assert c["fit"] is None and "not comparable between sessions" in c["status"]


def test_flair_gains_that_do_not_compare_are_caught_by_the_fits_spread(tmp_path: Path) -> None:
    """T1w/T2w gains keep their ratio, the FLAIR's gain is drawn per session: the T1w check
    passes, but the joint fit could only explain the FLAIR by spreading the sessions' tissue
    values far beyond biology, so the cluster keeps the per-session calibration."""
    rng = np.random.default_rng(4)
    dirs = []
    for i in range(5):
        g = float(np.exp(rng.uniform(np.log(300), np.log(3000))))
        gains = {"T1w": g * RATIO["T1w"], "T2w": g,
                 "FLAIR": g * float(np.exp(rng.uniform(np.log(0.3), np.log(3.0))))}
        dirs.append(_write_session(tmp_path / "results", f"F{i}", _tissues(rng), gains, rng))
    doc = fit_clusters(dirs, tmp_path / "c.json", log=lambda m: None)
    (c,) = doc["clusters"].values()
    assert c["gain_ratio_scatter"]["T1w"] < 0.1
    assert c["fit"] is None and "not comparable between sessions" in c["status"]
    assert max(c["tissue_scatter"].values()) > TISSUE_SD_MAX
    assert {s["method"] for s in doc["sessions"].values()} == {"per-session"}
    # the same sessions with one FLAIR/T2w ratio: fitted, tissue spread within biology
    dirs = []
    for i in range(5):
        g = float(np.exp(rng.uniform(np.log(300), np.log(3000))))
        gains = {c: g * RATIO[c] for c in PROTOCOLS}
        dirs.append(_write_session(tmp_path / "ok", f"F{i}", _tissues(rng), gains, rng))
    doc = fit_clusters(dirs, tmp_path / "c2.json", log=lambda m: None)
    (c,) = doc["clusters"].values()
    assert c["fit"] is not None and max(c["tissue_scatter"].values()) < 0.2


def test_bad_cluster_options_and_files(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="min_sessions"):
        fit_clusters([], tmp_path / "x.json", min_sessions=1)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(InputError, match="unreadable clusters file"):
        load_clusters(bad)
    bad.write_text(json.dumps({"version": 99}))
    with pytest.raises(InputError, match="version 1"):
        load_clusters(bad)


# --- vendor scaling ---------------------------------------------------------------------------


def test_vendor_intensity_scaling_from_sidecars() -> None:
    fp = intensity_scaling({"Manufacturer": "Philips", "PhilipsRescaleSlope": 2.34568,
                            "PhilipsRescaleIntercept": 0, "PhilipsScaleSlope": 2.63354,
                            "UsePhilipsFloatNotDisplayScaling": 1})
    assert fp["values"] == "philips-fp" and fp["comparable_between_series"] is True
    # the FP value of a stored value SV: (SV·RS + RI) / (RS·SS)
    sv = 1234
    assert (sv * fp["rescale_slope"] + fp["rescale_intercept"]) / (
        fp["rescale_slope"] * fp["scale_slope"]) == pytest.approx(sv / 2.63354)
    dv = intensity_scaling({"Manufacturer": "Philips", "PhilipsRescaleSlope": 2.0,
                            "PhilipsScaleSlope": 3.0, "UsePhilipsFloatNotDisplayScaling": 0})
    assert dv["values"] == "philips-display" and not dv["comparable_between_series"]
    other = intensity_scaling({"Manufacturer": "Siemens"})
    assert other["values"] == "vendor-default" and not other["comparable_between_series"]


@pytest.mark.parametrize("sidecar,match", [
    ({"Manufacturer": "Philips", "UsePhilipsFloatNotDisplayScaling": 1},
     "UsePhilipsFloatNotDisplayScaling is 1 but PhilipsScaleSlope"),
    ({"Manufacturer": "SIEMENS", "PhilipsScaleSlope": 2.0,
      "UsePhilipsFloatNotDisplayScaling": 1}, "Philips intensity scaling for a SIEMENS"),
    ({"Manufacturer": "Philips", "PhilipsScaleSlope": -1.0,
      "UsePhilipsFloatNotDisplayScaling": 1}, "PhilipsScaleSlope is -1.0"),
])
def test_contradicting_scaling_fields_are_refused(sidecar: dict, match: str) -> None:
    entry = {"role": "t2w", "sequence": "tse", "tr_ms": 4000.0, "te_ms": 80.0, "fa_deg": 90.0,
             "field_strength_t": 3.0, "sidecar": "x_T2w.json",
             "intensity_scaling": intensity_scaling(sidecar)}
    params = {"session": "sub-1_ses-1", "t2w": entry,
              "t1w": {**entry, "role": "t1w", "sequence": "gre", "tr_ms": 5.0, "te_ms": 2.0,
                      "fa_deg": 10.0, "intensity_scaling": None},
              "flair": {**entry, "role": "flair", "sequence": "flair", "tr_ms": 4800.0,
                        "te_ms": 300.0, "ti_ms": 1650.0, "intensity_scaling": None}}
    with pytest.raises(InputError, match="contradicting intensity scaling") as exc:
        validate_session_params(params)
    assert match in str(exc.value) and "\n" not in str(exc.value)
