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
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from qmriflow.errors import InputError
from qmriflow.io import save_nifti
from qmriflow.stats import metrics as M
from qmriflow.stats.cohort import cluster_protocols, load_cohort
from qmriflow.stats.tissue import session_files

from .conftest import tool_missing

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
    # adapting k to a small cohort is no fault: a note, not a warning (issue 24 finding 10)
    assert res.warnings == [] and any("k = 3" in n for n in res.notes)


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
    assert meta["k"] == 3 and not any("clusters" in w for w in meta["warnings"])
    assert any("k = 3" in n for n in meta["notes"])
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
    table = pd.read_csv(rdir / "reproducibility.tsv", sep="\t")
    assert set(table.first_session_id) == {"ses-V01"} and len(table) == 3
    assert set(table.participant_id) == {"sub-S001"}
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
        tool_missing("no headless Chromium: HTML parsed and PNGs decoded only")
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


# ---------------------------------------------------------------------------------------------
# readable reports (issue 24 finding 10) and fat/water in the reports (issue 25 item 4)
# ---------------------------------------------------------------------------------------------

#: dimensionless columns (no unit in their header)
UNITLESS = {"Pearson r", "CCC", "TE factor"}


class _TableParser(HTMLParser):
    """Every <table> of a page as (headers, rows of cell texts)."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: list[tuple[list[str], list[list[str]]]] = []
        self._cell: list[str] | None = None
        self._row: list[str] = []
        self._head = False

    def handle_starttag(self, tag, attrs):
        if tag == "table":
            self.tables.append(([], []))
        elif tag in ("td", "th"):
            self._cell, self._head = [], tag == "th"

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self._row.append("".join(self._cell).strip())
            self._cell = None
        elif tag == "tr" and self.tables:
            heads, rows = self.tables[-1]
            if self._head and not heads:
                heads.extend(self._row)
            elif self._row:
                rows.append(self._row)
            self._row = []

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


def _tables(text: str) -> list[tuple[list[str], list[list[str]]]]:
    p = _TableParser()
    p.feed(text)
    return p.tables


def _column(table: tuple[list[str], list[list[str]]], header: str) -> list[str]:
    heads, rows = table
    return [r[heads.index(header)] for r in rows]


def _float(s: str) -> float | None:
    try:
        return float(s)
    except ValueError:
        return None


def add_cse(sdir: Path, sub: str, ses: str, seed: int, ambiguous: bool = False) -> dict:
    """A multi-echo GRE series (water body PDFF 0.05 / R2* 60 1/s with a fat disc PDFF 0.9)
    through the real two-start fit (``qmriflow cse-fit``) into the session's anat folder, and
    (``ambiguous``) an ambiguity mask as the CSE step writes it."""
    import nibabel as nib

    from qmriflow.cli import main

    from .test_cse import TE, _phantom_series, _write_4d

    data, _body, _fat = _phantom_series(shape=(40, 36, 3), sigma=0.01, seed=seed)
    f = sdir.parent.parent / f"echoes_{sub}_{ses}.nii.gz"
    _write_4d(f, data, [t / 1000 for t in TE])
    pre = f"sub-{sub}_ses-{ses}_acq-7"
    anat = sdir / "anat"
    assert main(["cse-fit", str(f), "--out", str(anat), "--prefix", pre, "--method", "fit",
                 "--mask-threshold", "0.2", "--subject", sub, "--session", ses,
                 "--threads", "1"]) == 0
    f.unlink()
    f.with_name(f.name.replace(".nii.gz", ".json")).unlink()
    mask = np.asarray(nib.load(anat / f"{pre}_desc-fit_mask.nii.gz").dataobj) > 0
    out = {"prefix": pre, "mask_voxels": int(mask.sum())}
    amb_file = anat / f"{pre}_desc-fit_ambiguous.nii.gz"
    if ambiguous:
        amb = np.zeros(mask.shape, np.uint8)
        amb[8:14, 10:14, :] = 1
        save_nifti(amb_file, amb, np.diag([2.0, 2.0, 3.0, 1.0]), {"Units": "label"},
                   dtype=np.uint8)
        out["ambiguous_fraction"] = float((amb.astype(bool) & mask).sum() / mask.sum())
    elif amb_file.exists():  # a CSE step that writes the mask itself: not this series
        amb_file.unlink()
        amb_file.with_name(amb_file.name.replace(".nii.gz", ".json")).unlink(missing_ok=True)
    return out


@pytest.fixture(scope="module")
def cohort_pages(tmp_path_factory) -> dict:
    """4 sessions, 2 scanners, 3 distinct protocols (A and B share one), fat/water series in
    A (with an ambiguity mask) and B; session pages at the top of the derivatives; the cohort
    step with its default k = 9, its printed lines kept."""
    import contextlib

    from qmriflow.cli import main

    base = tmp_path_factory.mktemp("pages")
    out = base / "results"
    specs = [("A", "Achieva", 4000, 0.00), ("B", "Achieva", 4000, 0.02),
             ("C", "Ingenia", 4300, 0.04), ("D", "Ingenia", 4600, 0.06)]
    cse = {}
    for i, (sub, scanner, tr, off) in enumerate(specs):
        s = make_session(out, sub, "1", scanner=scanner, t2w_tr=tr, t1_offset=off,
                         synth=sub == "A")
        assert main(["stats", str(s["dir"]), "--subject", sub, "--session", "1"]) == 0
        if sub in ("A", "B"):
            cse[sub] = add_cse(s["dir"], sub, "1", seed=i, ambiguous=sub == "A")
        assert main(["report", str(s["dir"]), str(out / f"sub-{sub}_ses-1.html"),
                     "--subject", sub, "--session", "1"]) == 0
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(["cohort", str(out / "group"), "--results-dir", str(out)]) == 0
    html_c = out / "reports" / "cohort.html"
    assert main(["report-cohort", str(out / "group"), str(html_c)]) == 0
    return {"out": out, "group": out / "group", "stdout": buf.getvalue(), "cse": cse,
            "session": (out / "sub-A_ses-1.html").read_text(),
            "session_b": (out / "sub-B_ses-1.html").read_text(),
            "cohort": html_c.read_text(), "cohort_html": html_c}


def test_cluster_count_adapts_to_the_protocols_without_warning(cohort_pages):
    assert "warning" not in cohort_pages["stdout"].lower(), cohort_pages["stdout"]
    meta = json.loads((cohort_pages["group"] / "cohort.json").read_text())
    assert meta["k_requested"] == 9 and meta["k"] == 3 and meta["n_distinct_protocols"] == 3
    assert meta["warnings"] == []
    assert "No warnings." in cohort_pages["cohort"]
    assert "3 protocol cluster(s), numbered 1..3" in cohort_pages["cohort"]


def test_dendrogram_leaves_carry_the_cluster_numbers_of_the_tables(cohort_pages, tmp_path,
                                                                   monkeypatch):
    from qmriflow.stats import figures
    from qmriflow.stats.pipeline import run_cohort

    drawn: dict[str, list[str]] = {}
    real_png = figures._png

    def keep(fig, *a, **k):
        for ax in fig.axes:
            if ax.get_title().startswith("Protocol clustering"):
                drawn["leaves"] = [t.get_text() for t in ax.get_xticklabels()]
        return real_png(fig, *a, **k)

    monkeypatch.setattr(figures, "_png", keep)
    tsvs = sorted(cohort_pages["out"].glob("sub-*/ses-*/anat/*_desc-tissue_stats.tsv"))
    run_cohort(tsvs, tmp_path / "g", k=9)
    clusters = pd.read_csv(tmp_path / "g" / "protocol_clusters.tsv", sep="\t")
    assert sorted(clusters.protocol_cluster) == [1, 1, 2, 3]  # A and B share a protocol
    # one leaf per session, labelled with its cluster as numbered in the tables (1..k)
    assert sorted(int(t.split()[0]) for t in drawn["leaves"]) == [1, 1, 2, 3], drawn
    cent = pd.read_csv(tmp_path / "g" / "protocol_cluster_centroids.tsv", sep="\t")
    assert cent.cluster.tolist() == [1, 2, 3]


def test_every_report_table_states_its_units(cohort_pages):
    pages = {"session": cohort_pages["session"], "cohort": cohort_pages["cohort"]}
    n_tables = 0
    for name, text in pages.items():
        for heads, rows in _tables(text):
            n_tables += 1
            for j, h in enumerate(heads):
                cells = [r[j] for r in rows if j < len(r) and r[j] != "n/a"]
                vals = [_float(c) for c in cells]
                if cells and all(v is not None for v in vals) and any(
                        v != int(v) for v in vals if np.isfinite(v)):
                    assert re.search(r"\[.+\]", h) or h in UNITLESS, (name, h, heads)
    assert n_tables >= 7
    # T1/T2 in ms in both the population and the inter-group CV tables: WM session means
    # 0.90/0.92 (Achieva) and 0.94/0.96 s (Ingenia)
    tabs = _tables(cohort_pages["cohort"])
    pop = next(t for t in tabs if "T1 mean [ms]" in t[0] and "T1 SD [ms]" in t[0])
    wm = _column(pop, "tissue").index("WM")
    assert float(_column(pop, "T1 mean [ms]")[wm]) == pytest.approx(930, abs=0.5)
    cv = next(t for t in tabs if "T1 CV [%]" in t[0])
    row = [i for i, (g, t) in enumerate(zip(_column(cv, "grouping"), _column(cv, "tissue"),
                                            strict=True)) if g == "scanner_model" and t == "WM"]
    assert float(_column(cv, "T1 mean of group means [ms]")[row[0]]) == pytest.approx(
        930, abs=0.5)
    gm = np.array([910.0, 950.0])
    assert float(_column(cv, "T1 CV [%]")[row[0]]) == pytest.approx(
        100 * gm.std(ddof=1) / gm.mean(), rel=1e-3)


def test_csf_row_says_it_is_partial_volume_dominated(cohort_pages):
    for text in (cohort_pages["session"], cohort_pages["cohort"]):
        tissue_tables = [t for t in _tables(text) if t[0] and t[0][0] == "tissue"]
        assert tissue_tables
        for t in tissue_tables:
            assert "CSF†" in _column(t, "tissue") and "CSF" not in _column(t, "tissue")
        assert "CSF†: dseg label 3, not eroded" in text and "partial volumes" in text


def _screenshot(page: Path, shot: Path, height: int = 12000) -> np.ndarray:
    """RGB screenshot (0-1) of ``page`` in a headless Chromium window 1400 px wide."""

    import matplotlib.image as mpimg

    chrome = _chromium()
    if chrome is None:
        tool_missing("no headless Chromium")
    proc = subprocess.run(
        [chrome, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
         f"--window-size=1400,{height}", f"--screenshot={shot}", page.as_uri()],
        capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0 and shot.is_file(), proc.stderr[-2000:]
    return mpimg.imread(str(shot))[..., :3]


def _colour_extent(img: np.ndarray) -> float:
    """Widest horizontal span of colour pixels over the rows that cross a figure (rows with
    >= 200 colour pixels), as a fraction of the window width."""
    colour = (img.max(axis=2) - img.min(axis=2)) > 0.25
    rows = colour.sum(axis=1) >= 200
    if not rows.any():
        return 0.0
    cols = np.nonzero(colour[rows].any(axis=0))[0]
    return float((cols.max() - cols.min() + 1) / img.shape[1])


def test_pages_use_the_full_window_width(cohort_pages, tmp_path):
    for name in ("sub-A_ses-1.html", "reports/cohort.html"):
        img = _screenshot(cohort_pages["out"] / name, tmp_path / "shot.png")
        assert _colour_extent(img) > 0.85, name


def test_session_report_shows_pdff_r2star_choice_and_ambiguity(cohort_pages, tmp_path):
    import matplotlib.image as mpimg

    from qmriflow.cli import main

    text = cohort_pages["session"]
    assert "Fat/water (multi-echo GRE) acq-7 (fit)" in text
    shown = {alt: base64.b64decode(b64) for alt, b64 in re.findall(
        r'<img alt="([^"]+)" src="data:image/png;base64,([^"]+)"', text)}
    fig = mpimg.imread(io.BytesIO(shown["fat/water acq-7 (fit)"]), format="png")[..., :3]
    assert fig.shape[1] > 1000 and float(fig.std()) > 0.1  # a real figure, not blank
    assert int(((fig.max(axis=2) - fig.min(axis=2)) > 0.25).sum()) > 20_000
    tab = next(t for t in _tables(text) if "PDFF median [%]" in t[0])
    assert tab[0][:3] == ["series", "method", "voxels"] and "R2* median [1/s]" in tab[0]
    assert int(_column(tab, "voxels")[0]) == cohort_pages["cse"]["A"]["mask_voxels"]
    # truth: body PDFF 5 %, R2* 60 1/s (the fat disc is a minority of the mask)
    assert float(_column(tab, "PDFF median [%]")[0]) == pytest.approx(5.0, abs=1.0)
    assert float(_column(tab, "R2* median [1/s]")[0]) == pytest.approx(60.0, abs=5.0)
    assert float(_column(tab, "ambiguous [%]")[0]) == pytest.approx(
        100 * cohort_pages["cse"]["A"]["ambiguous_fraction"], rel=1e-3)
    tab_b = next(t for t in _tables(cohort_pages["session_b"]) if "PDFF median [%]" in t[0])
    assert _column(tab_b, "ambiguous [%]") == ["n/a"]  # B has no ambiguity mask
    # in a browser: the colour of a page without T1/T2/PD maps comes from the fat/water panels
    out = cohort_pages["out"]
    shutil.copytree(out / "sub-B", tmp_path / "res" / "sub-B")
    anat = tmp_path / "res" / "sub-B" / "ses-1" / "anat"
    for f in anat.glob("*_space-T2w_*map.nii.gz"):
        f.unlink()
    counts = {}
    for name in ("cse", "nocse"):
        if name == "nocse":
            for f in anat.glob("*_acq-7_*"):
                f.unlink()
        page = tmp_path / f"{name}.html"
        assert main(["report", str(tmp_path / "res" / "sub-B" / "ses-1"), str(page),
                     "--subject", "B", "--session", "1"]) == 0
        counts[name] = _colour_pixels_of(_screenshot(page, tmp_path / f"{name}.png"))
    assert counts["cse"] > 20_000 and counts["cse"] > 5 * max(counts["nocse"], 1), counts


def _colour_pixels_of(img: np.ndarray) -> int:
    return int(((img.max(axis=2) - img.min(axis=2)) > 0.25).sum())


def test_cohort_report_tabulates_pdff_and_r2star_per_series(cohort_pages):
    table = pd.read_csv(cohort_pages["group"] / "cohort_cse_stats.tsv", sep="\t")
    assert table.participant_id.tolist() == ["sub-A", "sub-B"]
    assert table.acq.astype(str).tolist() == ["7", "7"] and set(table.method) == {"fit"}
    assert table.PDFF_median.to_numpy() == pytest.approx([0.05, 0.05], abs=0.01)
    assert table.R2star_median.to_numpy() == pytest.approx([60, 60], abs=5)
    assert (table.PDFF_q25 <= table.PDFF_median).all()
    assert (table.PDFF_median <= table.PDFF_q75).all()
    side = json.loads((cohort_pages["group"] / "cohort_cse_stats.json").read_text())
    assert side["PDFF_median"]["Units"] == "fraction (0-1)"
    assert side["R2star_median"]["Units"] == "1/s"
    tab = next(t for t in _tables(cohort_pages["cohort"]) if "PDFF median [%]" in t[0])
    assert _column(tab, "participant_id") == ["sub-A", "sub-B"]
    shown = [float(v) for v in _column(tab, "PDFF median [%]")]
    assert shown == pytest.approx(100 * table.PDFF_median.to_numpy(), rel=1e-3)
    assert [float(v) for v in _column(tab, "R2* median [1/s]")] == pytest.approx(
        table.R2star_median.to_numpy(), rel=1e-3)
