"""Statistics, cohort analysis, reproducibility and QC reports (issue 6, seed 000 section 2.3).

* metrics against independent closed-form / textbook formulas with known answers;
* per-session tissue statistics on a synthetic session with exactly known means;
* cohort table, inter-group CV by hand, Ward protocol clusters stable under permutation, and
  the message when k exceeds the number of distinct protocols;
* reproducibility on a phantom subject with two sessions, then with the second session's head
  moved by a further 5 mm / 5 degrees (slow-ish: phantom generation ~25 s, two ANTs
  registrations ~15 s each);
* HTML reports: embedded PNGs decode, no external resources, and (when a headless Chromium is
  installed) a screenshot of the session page shows the colour maps.
"""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from qmriflow.errors import InputError
from qmriflow.io import save_nifti
from qmriflow.stats import metrics as M
from qmriflow.stats.cohort import cluster_protocols, load_cohort
from qmriflow.stats.tissue import session_files

# ---------------------------------------------------------------------------------------------
# metrics
# ---------------------------------------------------------------------------------------------

X5 = np.array([1.0, 2.0, 3.0, 4.0, 5.0])  # mean 3, population variance 2


def _ccc_reference(x: np.ndarray, y: np.ndarray) -> float:
    """Lin (1989) written out with explicit loops (independent of the implementation)."""
    n = len(x)
    mx, my = sum(x) / n, sum(y) / n
    sxx = sum((a - mx) ** 2 for a in x) / n
    syy = sum((b - my) ** 2 for b in y) / n
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y, strict=True)) / n
    return 2 * sxy / (sxx + syy + (mx - my) ** 2)


def test_perfect_concordance():
    assert M.lin_ccc(X5, X5) == pytest.approx(1.0, abs=1e-12)
    assert M.pearson_r(X5, X5) == pytest.approx(1.0, abs=1e-12)
    assert M.relative_difference(X5, X5) == 0.0


@pytest.mark.parametrize(("a", "b", "ccc"), [
    (1.0, 1.0, 2 * 2 / (2 + 2 + 1)),          # shifted by 1: 0.8
    (2.0, 0.0, 2 * 2 * 2 / (2 + 8 + 9)),      # scaled by 2: 8/19
    (0.5, 1.5, 2 * 0.5 * 2 / (2 + 0.5 + 0)),  # scaled and shifted, same mean: 0.8
])
def test_scaled_and_shifted_have_r_one_and_known_ccc(a, b, ccc):
    # y = a x + b: CCC = 2 a s^2 / (s^2 + a^2 s^2 + ((a - 1) mu + b)^2), r = 1
    y = a * X5 + b
    assert M.pearson_r(X5, y) == pytest.approx(1.0, abs=1e-12)
    assert M.lin_ccc(X5, y) == pytest.approx(ccc, abs=1e-12)
    assert M.lin_ccc(X5, y) < 1.0


def test_random_pairs_match_reference_formulas():
    rng = np.random.default_rng(1)
    x = rng.normal(1.0, 0.2, 500)
    y = 0.9 * x + rng.normal(0.1, 0.1, 500)
    assert M.pearson_r(x, y) == pytest.approx(np.corrcoef(x, y)[0, 1], abs=1e-12)
    assert M.lin_ccc(x, y) == pytest.approx(_ccc_reference(list(x), list(y)), abs=1e-12)
    assert M.pearson_r(x, -y) == pytest.approx(-np.corrcoef(x, y)[0, 1], abs=1e-12)
    ba = M.bland_altman(x, y)
    assert ba["bias"] == pytest.approx(float(np.mean(y - x)))
    assert ba["loa_high"] - ba["loa_low"] == pytest.approx(2 * 1.96 * np.std(y - x, ddof=1))


def test_cv_and_relative_difference():
    assert M.coefficient_of_variation([1, 2, 3]) == pytest.approx(0.5)  # SD 1 / mean 2
    assert M.coefficient_of_variation([1, 2, 3], ddof=0) == pytest.approx(np.sqrt(2 / 3) / 2)
    x, y = np.array([1.0, 2.0, 4.0]), np.array([1.1, 1.8, 4.0])
    assert M.relative_difference(x, y) == pytest.approx((0.1 / 1.05 + 0.2 / 1.9 + 0) / 3)
    assert M.relative_difference(x, y, reference="first") == pytest.approx(0.2 / 3)
    assert M.relative_difference(x, y, reference="first", absolute=False) == pytest.approx(0.0)
    # zero pairs (outside the brain) are skipped
    assert M.relative_difference([0, 1.0], [0, 1.5]) == pytest.approx(0.5 / 1.25)


def test_intergroup_cv_uses_group_means():
    # group means 2, 4, 6 -> SD 2 / mean 4 = 0.5; the pooled session mean would be 26/6
    values = [1, 3, 4, 6, 6, 6]
    groups = ["A", "A", "B", "C", "C", "C"]
    assert M.intergroup_cv(values, groups) == pytest.approx(0.5)
    assert M.intergroup_cv({"A": 2.0, "B": 4.0, "C": 6.0}) == pytest.approx(0.5)
    assert M.intergroup_cv(values, groups, ddof=0) == pytest.approx(np.std([2, 4, 6]) / 4)
    # min_group_size drops the single-session group B: means 2, 6 -> SD 2.828 / 4
    assert M.intergroup_cv(values, groups, min_group_size=2) == pytest.approx(
        np.std([2, 6], ddof=1) / 4)
    with pytest.raises(InputError, match="at least 2 groups"):
        M.intergroup_cv([1, 2], ["A", "A"])


def test_metric_input_errors():
    with pytest.raises(InputError, match="differ in size"):
        M.lin_ccc([1, 2, 3], [1, 2])
    with pytest.raises(InputError, match="at least 2"):
        M.pearson_r([1], [1])
    with pytest.raises(InputError, match="non-finite"):
        M.lin_ccc([1, np.nan], [1, 2])
    with pytest.raises(InputError, match="mean is zero"):
        M.coefficient_of_variation([-1, 1])


# ---------------------------------------------------------------------------------------------
# a synthetic session with exactly known tissue values
# ---------------------------------------------------------------------------------------------

SHAPE = (48, 48, 8)
PARAMS = {
    "t1w": {"sequence": "gre", "tr_ms": 5.3, "te_ms": 2.4, "ti_ms": None, "fa_deg": 10.0,
            "manufacturer_model": "Ingenia CX", "field_strength_t": 3.0, "gadolinium": False},
    "t2w": {"sequence": "tse", "tr_ms": 4000.0, "te_ms": 80.0, "ti_ms": None, "fa_deg": 90.0,
            "manufacturer_model": "Ingenia CX", "field_strength_t": 3.0, "gadolinium": True},
    "flair": {"sequence": "flair", "tr_ms": 4800.0, "te_ms": 300.0, "ti_ms": 1650.0,
              "fa_deg": 90.0, "manufacturer_model": "Ingenia CX", "field_strength_t": 3.0,
              "gadolinium": False},
}


def make_session(root: Path, sub: str, ses: str, *, scanner: str = "Ingenia CX",
                 t2w_tr: float = 4000.0, flair_te: float = 300.0, t1_offset: float = 0.0,
                 synth: bool = False) -> dict:
    """Disk phantom: WM core (r < 10), GM ring (12 <= r < 16), CSF ring (18 <= r < 20).

    T1 in WM is 0.8 s in slices 0-3 and 1.0 s in slices 4-7 (mean = median = 0.9 s exactly);
    GM T1 1.3 s, CSF 4 s; T2 WM 0.07 / GM 0.09 / CSF 1.5 s; PD WM 0.6 / GM 0.7 / CSF 1.0.
    """
    sdir = root / f"sub-{sub}" / f"ses-{ses}"
    anat = sdir / "anat"
    lab = f"sub-{sub}_ses-{ses}_space-T2w"
    ii, jj = np.meshgrid(np.arange(SHAPE[0]), np.arange(SHAPE[1]), indexing="ij")
    r = np.hypot(ii - 23.5, jj - 23.5)
    disk = lambda lo, hi: np.repeat(((r >= lo) & (r < hi))[:, :, None], SHAPE[2], axis=2)  # noqa: E731
    wm, gm, csf = disk(0, 10), disk(12, 16), disk(18, 20)
    gm_full, wm_full = disk(10, 18), disk(0, 10)
    brain = disk(0, 20)
    dseg = np.zeros(SHAPE, np.uint8)
    dseg[gm_full] = 1
    dseg[wm_full] = 2
    dseg[csf] = 3
    t1 = np.zeros(SHAPE, np.float32)
    t1[wm] = 0.8
    t1[:, :, 4:][wm[:, :, 4:]] = 1.0
    t1[gm_full] = 1.3
    t1[csf] = 4.0
    t1[brain] += t1_offset
    t2 = np.where(wm_full, 0.07, np.where(gm_full, 0.09, np.where(csf, 1.5, 0.0)))
    pd_ = np.where(wm_full, 0.6, np.where(gm_full, 0.7, np.where(csf, 1.0, 0.0)))
    aff = np.diag([1.0, 1.0, 3.0, 1.0])
    side = {"Units": "s", "ModelCheckpointSHA256": "ab" * 32}
    save_nifti(anat / f"{lab}_T1map.nii.gz", t1, aff, side)
    save_nifti(anat / f"{lab}_T2map.nii.gz", t2, aff, side)
    save_nifti(anat / f"{lab}_PDmap.nii.gz", pd_, aff, side)
    save_nifti(anat / f"{lab}_desc-brain_mask.nii.gz", brain, aff, dtype=np.uint8)
    save_nifti(anat / f"{lab}_dseg.nii.gz", dseg, aff, dtype=np.uint8)
    save_nifti(anat / f"{lab}_label-WM_desc-eroded_mask.nii.gz", wm, aff, dtype=np.uint8)
    save_nifti(anat / f"{lab}_label-GM_desc-eroded_mask.nii.gz", gm, aff, dtype=np.uint8)
    head = disk(0, 23).astype(np.float32)
    for c, img in (("T1w", 100 * (1 - np.exp(-1 / np.maximum(t1, 0.1)))),
                   ("T2w", 100 * np.exp(-0.08 / np.maximum(t2, 1e-3))),
                   ("FLAIR", 50 * pd_)):
        save_nifti(anat / f"{lab}_desc-preproc_{c}.nii.gz", head * 10 + img, aff)
        if synth:
            save_nifti(anat / f"{lab}_desc-synth_{c}.nii.gz", head * 10 + 1.05 * img, aff)
            save_nifti(anat / f"{lab}_desc-synthdiff_{c}.nii.gz", 5.0 * brain, aff)
    params = json.loads(json.dumps(PARAMS))
    for e in params.values():
        e["manufacturer_model"] = scanner
    params["t2w"]["tr_ms"] = t2w_tr
    params["flair"]["te_ms"] = flair_te
    params["session"] = f"sub-{sub}_ses-{ses}"
    (sdir / f"sub-{sub}_ses-{ses}_desc-protocol_params.json").write_text(json.dumps(params))
    return {"dir": sdir, "n_wm": int(wm.sum()), "n_gm": int(gm.sum()), "n_csf": int(csf.sum())}


def test_session_stats_exact(tmp_path):
    from qmriflow.cli import main

    s = make_session(tmp_path, "A", "1")
    assert main(["stats", str(s["dir"]), "--subject", "A", "--session", "1"]) == 0
    files = session_files(s["dir"])
    df = pd.read_csv(files.stats_tsv, sep="\t").set_index("tissue")
    assert list(df.index) == ["WM", "GM", "CSF"]
    assert df.loc["WM", "n_voxels"] == s["n_wm"]
    assert df.loc["GM", "n_voxels"] == s["n_gm"]
    assert df.loc["CSF", "n_voxels"] == s["n_csf"]
    assert df.loc["WM", "T1_mean"] == pytest.approx(0.9, abs=1e-6)
    assert df.loc["WM", "T1_median"] == pytest.approx(0.9, abs=1e-6)
    # half 0.8, half 1.0 -> sample SD = 0.1 * sqrt(n / (n - 1))
    n = s["n_wm"]
    assert df.loc["WM", "T1_sd"] == pytest.approx(0.1 * np.sqrt(n / (n - 1)), rel=1e-5)
    assert df.loc["GM", "T1_mean"] == pytest.approx(1.3, abs=1e-6)
    assert df.loc["GM", "T2_mean"] == pytest.approx(0.09, abs=1e-6)
    assert df.loc["CSF", "T1_mean"] == pytest.approx(4.0, abs=1e-6)
    assert df.loc["WM", "PD_mean"] == pytest.approx(0.6, abs=1e-6)
    # cohort columns: scanner, protocol, gadolinium flags, checkpoint hash
    assert df.loc["WM", "scanner_model"] == "Ingenia CX"
    assert df.loc["WM", "t2w_tr_ms"] == 4000.0 and df.loc["WM", "flair_ti_ms"] == 1650.0
    assert bool(df.loc["WM", "t2w_gadolinium"]) and not bool(df.loc["WM", "t1w_gadolinium"])
    assert bool(df.loc["WM", "gadolinium"])
    assert df.loc["WM", "checkpoint_sha256"] == "ab" * 32
    side = json.loads(files.stats_tsv.with_suffix(".json").read_text())
    assert side["T1_mean"]["Units"] == "s"
    hist = pd.read_csv(files.hist_tsv, sep="\t")
    wm_t1 = hist[(hist.tissue == "WM") & (hist.parameter == "T1")]
    assert wm_t1["fraction"].sum() == pytest.approx(1.0)


def test_stats_missing_map_is_one_line_error(tmp_path, capsys):
    from qmriflow.cli import main

    s = make_session(tmp_path, "A", "1")
    (s["dir"] / "anat" / "sub-A_ses-1_space-T2w_T2map.nii.gz").unlink()
    assert main(["stats", str(s["dir"]), "--subject", "A", "--session", "1"]) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "T2 map: file not found" in err and "sub-A_ses-1" in err


# ---------------------------------------------------------------------------------------------
# cohort and protocol clusters
# ---------------------------------------------------------------------------------------------


def _protocol_frame(n_per: int = 4, seed: int = 0) -> pd.DataFrame:
    """3 protocols (a few sessions each, tiny jitter on one of them) x n_per sessions."""
    rng = np.random.default_rng(seed)
    base = [(5.3, 2.4, 4000, 80, 4800, 300), (5.1, 2.3, 4300, 80, 4800, 340),
            (5.3, 2.4, 3900, 80, 4800, 290)]
    rows = []
    for p, b in enumerate(base):
        for i in range(n_per):
            rows.append({"subject": f"S{p}{i}", "session": "1",
                         **dict(zip(("t1w_tr_ms", "t1w_te_ms", "t2w_tr_ms", "t2w_te_ms",
                                     "flair_tr_ms", "flair_te_ms"), b, strict=True)),
                         "truth": p})
    df = pd.DataFrame(rows).astype({"t2w_tr_ms": float})
    df.loc[df.truth == 1, "t2w_tr_ms"] += rng.normal(0, 1, (df.truth == 1).sum()).round(1)
    return df


def test_clusters_stable_under_permutation():
    df = _protocol_frame()
    res = cluster_protocols(df, k=3)
    assert res.k == 3
    lab = dict(zip(df.subject, res.labels, strict=True))
    # the clusters are the true protocols
    for p in range(3):
        assert len({lab[s] for s in df.subject[df.truth == p]}) == 1
    # canonical numbering by sorted centroid: lowest t1w TR first
    assert res.centroids["cluster"].tolist() == [1, 2, 3]
    assert res.centroids["t1w_tr_ms"].is_monotonic_increasing
    for seed in range(5):
        perm = df.sample(frac=1.0, random_state=seed).reset_index(drop=True)
        res_p = cluster_protocols(perm, k=3)
        assert dict(zip(perm.subject, res_p.labels, strict=True)) == lab
    # also with more clusters than true protocols (splits inside the jittered protocol)
    lab6 = dict(zip(df.subject, cluster_protocols(df, k=5).labels, strict=True))
    for seed in range(3):
        perm = df.sample(frac=1.0, random_state=seed).reset_index(drop=True)
        assert dict(zip(perm.subject, cluster_protocols(perm, k=5).labels,
                        strict=True)) == lab6


def test_too_many_clusters_says_so():
    df = _protocol_frame()
    df["t2w_tr_ms"] = df["t2w_tr_ms"].round(-2)  # exactly 3 distinct protocols
    with pytest.raises(InputError, match=r"9 protocol clusters requested .* only 3 distinct"):
        cluster_protocols(df, k=9)
    res = cluster_protocols(df, k=9, reduce_k=True)
    assert res.k == 3 and len(set(res.labels)) == 3
    assert any("only 3 distinct" in w for w in res.warnings)


def test_cohort_tables_and_intergroup_cv(tmp_path):
    from qmriflow.cli import main

    specs = [("A", "1", "Achieva", 4000, 300, 0.00), ("B", "1", "Achieva", 4000, 300, 0.02),
             ("C", "1", "Ingenia", 4300, 340, 0.04), ("D", "1", "Ingenia", 4300, 340, 0.06),
             ("E", "1", "Elition", 3900, 290, 0.10)]
    tsvs = []
    for sub, ses, scanner, tr, te, off in specs:
        s = make_session(tmp_path / "out", sub, ses, scanner=scanner, t2w_tr=tr, flair_te=te,
                         t1_offset=off)
        assert main(["stats", str(s["dir"]), "--subject", sub, "--session", ses]) == 0
        tsvs.append(session_files(s["dir"]).stats_tsv)
    group = tmp_path / "group"
    assert main(["cohort", str(group), "--results-dir", str(tmp_path / "out"),
                 "--clusters", "9"]) == 0
    cohort = load_cohort([group / "cohort_tissue_stats.tsv"])
    assert len(cohort) == 15 and set(cohort.tissue) == {"WM", "GM", "CSF"}
    meta = json.loads((group / "cohort.json").read_text())
    assert meta["k"] == 3 and any("only 3 distinct" in w for w in meta["warnings"])
    # WM T1 session means 0.90, 0.92, 0.94, 0.96, 1.00; by scanner: Achieva 0.91,
    # Ingenia 0.95, Elition 1.00 -> CV = SD / mean of those three
    cv = pd.read_csv(group / "intergroup_cv.tsv", sep="\t")
    row = cv[(cv.grouping == "scanner_model") & (cv.tissue == "WM") & (cv.parameter == "T1")]
    gm = np.array([0.91, 0.95, 1.00])
    assert float(row.cv.iloc[0]) == pytest.approx(gm.std(ddof=1) / gm.mean(), rel=1e-4)
    row = cv[(cv.grouping == "protocol_cluster") & (cv.tissue == "WM") & (cv.parameter == "T2")]
    assert float(row.cv.iloc[0]) == pytest.approx(0.0, abs=1e-6)
    summ = pd.read_csv(group / "cohort_summary.tsv", sep="\t")
    wm_t1 = summ[(summ.tissue == "WM") & (summ.parameter == "T1")].iloc[0]
    assert wm_t1["mean"] == pytest.approx(np.mean([0.9, 0.92, 0.94, 0.96, 1.0]), abs=1e-6)
    for png in ("cohort_distributions", "protocol_dendrogram", "box_scanner", "box_cluster"):
        assert (group / f"{png}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # strict mode refuses with the message instead
    assert main(["cohort", str(tmp_path / "g2"), *map(str, tsvs), "--strict-clusters"]) == 1


# ---------------------------------------------------------------------------------------------
# reproducibility on a phantom subject
# ---------------------------------------------------------------------------------------------


def _phantom_session(truth_dir: Path, root: Path, sub: str, ses: str, seed: int,
                     move: np.ndarray | None = None) -> Path:
    """A derivatives session from the phantom's T2w-series truth: noisy T2w, brain mask,
    dseg and maps (truth × (1 + 5 % noise) inside the brain). ``move`` (4×4, RAS) is applied
    to every affine: the whole head moves in the world, nothing is resampled."""
    import nibabel as nib

    rng = np.random.default_rng(seed)
    anat = root / f"sub-{sub}" / f"ses-{ses}" / "anat"
    lab = f"sub-{sub}_ses-{ses}_space-T2w"

    def load(name: str) -> tuple[np.ndarray, np.ndarray]:
        img = nib.load(str(truth_dir / f"{name}.nii.gz"))
        return np.asarray(img.dataobj, np.float32), img.affine

    nf, aff = load("noisefree")
    brain = load("brainmask")[0] > 0.5
    dseg = load("dseg")[0]
    if move is not None:
        aff = move @ aff
    save_nifti(anat / f"{lab}_desc-preproc_T2w.nii.gz",
               np.abs(nf + rng.normal(0, 0.02 * nf.max(), nf.shape)), aff)
    save_nifti(anat / f"{lab}_desc-brain_mask.nii.gz", brain, aff, dtype=np.uint8)
    save_nifti(anat / f"{lab}_dseg.nii.gz", dseg * brain, aff, dtype=np.uint8)
    for m in ("T1map", "T2map", "PDmap"):
        v = load(m)[0] * brain * (1 + 0.05 * rng.standard_normal(nf.shape))
        save_nifti(anat / f"{lab}_{m}.nii.gz", v, aff)
    return anat.parent


@pytest.fixture(scope="module")
def phantom_subject(tmp_path_factory) -> Path:
    from qmriflow.phantom.generate import PhantomOptions, generate_archive

    out = tmp_path_factory.mktemp("phantom_stats")
    generate_archive(out, PhantomOptions(subjects=1, sessions=2, size="small", seed=3,
                                         workers=1))
    return out


def test_reproducibility_recovers_after_head_shift(phantom_subject, tmp_path):
    from qmriflow.phantom.generate import rigid
    from qmriflow.stats.repro import pair_reproducibility

    truth = phantom_subject / "truth" / "S001"
    t2 = {v: next(p for p in (truth / v).iterdir() if "T2W" in p.name) for v in ("V01", "V02")}
    root = tmp_path / "out"
    s1 = _phantom_session(t2["V01"], root, "S001", "V01", seed=1)
    s2 = _phantom_session(t2["V02"], root, "S001", "V02", seed=2)
    base = pair_reproducibility(session_files(s1), session_files(s2), threads=2)
    # the same second session, its head rotated 5 deg and shifted 5 mm (about the head centre)
    centre = np.array(json.loads((t2["V02"] / "series.json").read_text())["affine"]) @ [
        128, 128, 18, 1]
    move = rigid([5.0, 0.0, 0.0], [5.0, 0.0, 0.0], centre[:3])
    root2 = tmp_path / "moved"
    s1b = _phantom_session(t2["V01"], root2, "S001", "V01", seed=1)
    s3 = _phantom_session(t2["V02"], root2, "S001", "V02", seed=2, move=move)
    # this one through the CLI step (tables, registration record, scatter/Bland-Altman PNG)
    from qmriflow.cli import main

    rdir = tmp_path / "repro"
    assert main(["repro", str(rdir), str(s3), str(s1b), "--threads", "2"]) == 0
    table = pd.read_csv(rdir / "reproducibility.tsv", sep="\t", dtype={"first_session": str})
    assert set(table.first_session) == {"V01"} and len(table) == 3
    moved_reg = json.loads((rdir / "reproducibility.json").read_text())["registration"][0]
    png = rdir / "sub-S001_ses-V02_to-ses-V01_repro.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    by_b = {r["parameter"]: r for r in base.rows}
    by_m = {r["parameter"]: r for r in table.to_dict("records")}
    for m in ("T1", "T2", "PD"):
        for r in (by_b[m], by_m[m]):  # every metric is reported
            assert np.isfinite([r["pearson_r"], r["ccc"], r["mean_rel_diff"]]).all()
            assert r["n_voxels"] > 100_000
        assert by_b[m]["pearson_r"] > 0.7
        assert by_m[m]["pearson_r"] == pytest.approx(by_b[m]["pearson_r"], abs=0.02)
        assert by_m[m]["ccc"] == pytest.approx(by_b[m]["ccc"], abs=0.02)
        assert by_m[m]["mean_rel_diff"] < 0.15
    # the extra motion was found: the two registrations differ by about 5 degrees
    assert abs(moved_reg["rotation_deg"] - base.registration["rotation_deg"]) > 1.0


def test_repro_pairs_and_interval():
    from qmriflow.stats.repro import plan_pairs
    from qmriflow.stats.tissue import SessionFiles

    ses = [SessionFiles("A", s, Path(f"/x/sub-A/ses-{s}")) for s in ("b", "a", "c")] + [
        SessionFiles("B", "x", Path("/x/sub-B/ses-x"))]
    pairs, warn = plan_pairs(ses)
    assert [(f.session, la.session) for f, la, _ in pairs] == [("a", "b"), ("a", "c")]
    days = {("A", "a"): 30.0, ("A", "b"): 0.0, ("A", "c"): 200.0, ("B", "x"): 0.0}
    pairs, warn = plan_pairs(ses, days=days, max_interval_days=90)
    assert [(f.session, la.session, dt) for f, la, dt in pairs] == [("b", "a", 30.0)]
    assert any("200 days" in w for w in warn)


# ---------------------------------------------------------------------------------------------
# reports
# ---------------------------------------------------------------------------------------------


def _pngs(text: str) -> list[bytes]:
    return [base64.b64decode(m) for m in re.findall(r'src="data:image/png;base64,([^"]+)"',
                                                    text)]


def _check_self_contained(text: str) -> None:
    assert not re.search(r'(src|href)\s*=\s*"(?!data:)', text), "external resource"
    assert "http://" not in text and "https://" not in text
    assert "<script" not in text.lower()


def _chromium() -> str | None:
    return next((p for p in (shutil.which(n) for n in ("chromium", "chromium-browser",
                                                       "google-chrome")) if p), None)


def _colour_pixels(png: Path) -> int:
    import matplotlib.image as mpimg

    img = mpimg.imread(str(png))[..., :3]
    chroma = img.max(axis=2) - img.min(axis=2)
    return int((chroma > 0.25).sum())


def test_session_and_cohort_reports(tmp_path):
    import matplotlib.image as mpimg

    from qmriflow.cli import main

    out = tmp_path / "out"
    for sub, scanner, off in (("A", "Achieva", 0.0), ("B", "Ingenia", 0.05)):
        s = make_session(out, sub, "1", scanner=scanner, synth=sub == "A", t1_offset=off)
        assert main(["stats", str(s["dir"]), "--subject", sub, "--session", "1"]) == 0
    prov = tmp_path / "infer.json"
    prov.write_text(json.dumps({"step": "infer", "tool": "torch", "torch_version": "2.x",
                                "timing_s": {"total": 1.5}, "checkpoint": "/secret/dir/m.pt"}))
    html_s = tmp_path / "reports" / "sub-A_ses-1.html"
    assert main(["report", str(out / "sub-A" / "ses-1"), str(html_s), "--subject", "A",
                 "--session", "1", "--step-provenance", str(prov)]) == 0
    text = html_s.read_text()
    _check_self_contained(text)
    for heading in ("Input contrasts", "Quantitative maps", "Re-synthesised", "Masks",
                    "Tissue values", "Provenance", "Warnings"):
        assert heading in text
    assert "gadolinium" in text  # the post-contrast T2w is flagged
    assert "/secret/dir" not in text and "ab" * 32 in text
    pngs = _pngs(text)
    assert len(pngs) >= 4
    for p in pngs:  # every embedded PNG decodes
        arr = mpimg.imread(io.BytesIO(p), format="png")
        assert arr.ndim == 3 and arr.shape[0] > 50 and float(arr[..., :3].std()) > 0.01

    group = tmp_path / "group"
    assert main(["cohort", str(group), "--results-dir", str(out), "--clusters", "2"]) == 0
    html_c = tmp_path / "reports" / "cohort.html"
    assert main(["report-cohort", str(group), str(html_c), "--repro-dir",
                 str(tmp_path / "none")]) == 0
    text_c = html_c.read_text()
    _check_self_contained(text_c)
    assert "Inter-group coefficient of variation" in text_c and len(_pngs(text_c)) >= 4

    chrome = _chromium()
    if chrome is None:
        pytest.skip("no headless Chromium: HTML parsed and PNGs decoded only")
    # session B (no re-synthesis) with and without its maps: the colour must come from them
    pages = {}
    for name in ("maps", "nomaps"):
        if name == "nomaps":
            for f in (out / "sub-B" / "ses-1" / "anat").glob("*map.nii.gz"):
                f.unlink()
        pages[name] = tmp_path / "reports" / f"{name}.html"
        assert main(["report", str(out / "sub-B" / "ses-1"), str(pages[name]), "--subject",
                     "B", "--session", "1"]) == 0
    counts = {}
    for name, page in (*pages.items(), ("cohort", html_c)):
        shot = tmp_path / f"{name}.png"
        proc = subprocess.run(
            [chrome, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
             "--window-size=1400,4000", f"--screenshot={shot}", page.as_uri()],
            capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert shot.is_file()
        counts[name] = _colour_pixels(shot)
    assert counts["maps"] > 20_000, counts
    assert counts["maps"] > 5 * max(counts["nomaps"], 1), counts
    assert counts["cohort"] > 1_000, counts
