"""The statistics steps as called by the CLI (one function per ``qmriflow`` subcommand).

Outputs (``<out>`` = the derivatives folder; ``<group>`` = the cohort output folder,
``<out>/group`` in the workflow)::

    <out>/sub-X/ses-Y/anat/sub-X_ses-Y_space-T2w_desc-tissue_stats.tsv (+ .json)   stats
    <out>/sub-X/ses-Y/anat/sub-X_ses-Y_space-T2w_desc-tissue_hist.tsv  (+ .json)   stats
    <group>/cohort_tissue_stats.tsv        cohort table (+ protocol_cluster column)  cohort
    <group>/cohort_summary.tsv             population mean ± SD of session means
    <group>/protocol_clusters.tsv          session -> cluster (1..k), with its TR/TE values
    <group>/protocol_cluster_centroids.tsv
    <group>/intergroup_cv.tsv              by scanner_model and by protocol_cluster
    <group>/cohort_cse_stats.tsv           PDFF / R2* median and IQR per multi-echo series
    <group>/cohort.json                    k, warnings, notes, counts

Every table's identifier columns are ``participant_id`` (``sub-X``) and ``session_id``
(``ses-Y``), as in BIDS; values are stored in the maps' units (T1/T2 in s, PD a.u., PDFF 0-1,
R2* 1/s) and the TSVs beside the maps and the cohort tables have JSON data dictionaries.
    <group>/{cohort_distributions,protocol_dendrogram,box_scanner,box_cluster}.png
    <repro>/reproducibility.tsv, reproducibility.json                             repro
    <figures>/sub-X_ses-B_to-ses-A_repro.png     scatter + Bland-Altman per later session
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..errors import InputError
from ..io import atomic_path, dataset_root_of, portable_paths, write_json
from . import figures
from .cohort import (
    CLUSTER_FEATURES,
    cluster_protocols,
    intergroup_cv_table,
    load_cohort,
    population_summary,
    session_table,
)
from .cse import CSE_COLUMNS, cse_table
from .repro import pair_reproducibility, plan_pairs, read_days
from .tissue import ID_COLUMNS, SessionFiles, compute_session_stats, session_files, write_tsv

__all__ = ["run_cohort", "run_repro", "run_session_stats"]

_T = "T1/T2 in s, PD a.u."
#: data dictionaries of the cohort summary and the inter-group CV tables
SUMMARY_COLUMNS: dict[str, dict[str, str]] = {
    "n_sessions": {"Description": "sessions with a value"},
    **{c: {"Description": f"{c} of the session means ({_T})",
           "Units": "s (T1, T2); arbitrary (PD)"} for c in ("mean", "sd", "min", "max")},
}
CV_COLUMNS: dict[str, dict[str, str]] = {
    "grouping": {"Description": "column the sessions are grouped by"},
    "n_groups": {"Description": "groups with at least min_group_size sessions"},
    "n_sessions": {"Description": "sessions in those groups"},
    "mean_of_group_means": {"Description": f"mean of the group means ({_T})",
                            "Units": "s (T1, T2); arbitrary (PD)"},
    "cv": {"Description": "SD of the group means / their mean", "Units": "fraction"},
    "cv_percent": {"Description": "100 x cv", "Units": "percent"},
    "note": {"Description": "why the CV is n/a (fewer than two groups)"},
}


def run_session_stats(files: SessionFiles, out_tsv: Path | None = None,
                      out_hist: Path | None = None) -> dict[str, Any]:
    """Write one session's tissue TSV and histogram TSV; returns provenance."""
    t0 = time.perf_counter()
    try:
        stats, hist = compute_session_stats(files)
    except InputError as exc:
        raise exc.with_context(session=files.label) from None
    out_tsv = Path(out_tsv or files.stats_tsv)
    out_hist = Path(out_hist or files.hist_tsv)
    write_tsv(stats, out_tsv, extra={"Sources": [files.map(m).name for m in ("T1", "T2", "PD")]
                                     + [files.eroded("WM").name, files.eroded("GM").name,
                                        files.dseg.name]})
    write_tsv(hist, out_hist)
    return {"step": "stats", "outputs": [str(out_tsv), str(out_hist)],
            "n_voxels": {r.tissue: int(r.n_voxels) for r in stats.itertuples()},
            "seconds": round(time.perf_counter() - t0, 3)}


def _write_png(path: Path, png: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(png)


def run_cohort(tsvs: Sequence[str | Path], out_dir: str | Path, *, k: int = 9,
               reduce_k: bool = True, hists: Sequence[str | Path] = (),
               ddof: int = 1, min_group_size: int = 1,
               cse_maps: Sequence[str | Path] = ()) -> dict[str, Any]:
    """Cohort table, summary, protocol clusters, inter-group CVs, the CSE table (one row per
    PDFF map of ``cse_maps``) and figures (module doc)."""
    out = Path(out_dir)
    cohort = load_cohort(tsvs)
    sessions = session_table(cohort)
    warnings: list[str] = []
    notes: list[str] = []
    res = None
    if len(sessions) >= 1 and all(c in sessions.columns for c in CLUSTER_FEATURES):
        res = cluster_protocols(sessions, k, reduce_k=reduce_k)
        warnings += res.warnings
        notes += res.notes
        sessions["protocol_cluster"] = res.labels
    else:
        warnings.append("protocol parameters missing from the tissue tables: no clustering")
        sessions["protocol_cluster"] = 1
    cohort = cohort.merge(sessions[[*ID_COLUMNS, "protocol_cluster"]], on=list(ID_COLUMNS),
                          how="left")
    summary = population_summary(cohort)
    cv = pd.concat([intergroup_cv_table(cohort, by, ddof=ddof, min_group_size=min_group_size)
                    for by in ("scanner_model", "protocol_cluster")], ignore_index=True)
    # one group only (e.g. a single scanner model) is no fault: a note, and the CV table
    # says n/a with the reason
    for by in cv["grouping"].unique():
        why = next((str(r.note) for r in cv[cv["grouping"] == by].itertuples() if r.note), "")
        if why:
            notes.append(f"inter-group CV by {by}: {why}")
    hist = None
    if hists:
        frames = [pd.read_csv(h, sep="\t", dtype=dict.fromkeys(ID_COLUMNS, str))
                  for h in hists if Path(h).is_file()]
        hist = pd.concat(frames, ignore_index=True) if frames else None
    write_tsv(cohort, out / "cohort_tissue_stats.tsv")
    write_tsv(summary, out / "cohort_summary.tsv", extra=SUMMARY_COLUMNS)
    write_tsv(sessions[[*ID_COLUMNS, "scanner_model", "protocol_cluster",
                        *[c for c in CLUSTER_FEATURES if c in sessions.columns]]],
              out / "protocol_clusters.tsv")
    write_tsv(res.centroids if res is not None else pd.DataFrame(columns=[
        "cluster", "n_sessions", *CLUSTER_FEATURES]), out / "protocol_cluster_centroids.tsv",
        sidecar=False)
    write_tsv(cv, out / "intergroup_cv.tsv", extra=CV_COLUMNS)
    write_tsv(cse_table(cse_maps), out / "cohort_cse_stats.tsv", sidecar=False)
    write_json(out / "cohort_cse_stats.json", CSE_COLUMNS)
    _write_png(out / "cohort_distributions.png", figures.distributions_png(cohort, hist))
    _write_png(out / "protocol_dendrogram.png", figures.dendrogram_png(
        res.linkage if res is not None else np.zeros((0, 4)),
        res.cut_height if res is not None else 0.0, res.k if res is not None else 0,
        leaf_clusters=res.sorted_labels if res is not None else None))
    _write_png(out / "box_scanner.png", figures.box_by_group(
        cohort, "scanner_model", "Session means by scanner model"))
    _write_png(out / "box_cluster.png", figures.box_by_group(
        cohort, "protocol_cluster", "Session means by protocol cluster"))
    meta = {"n_sessions": len(sessions), "n_subjects": int(sessions["participant_id"].nunique()),
            "k_requested": int(k), "k": int(res.k) if res else 0,
            "n_distinct_protocols": int(res.n_distinct) if res else 0,
            "cluster_features": list(CLUSTER_FEATURES), "zscore": "population SD",
            "linkage": "Ward", "cv_ddof": ddof, "n_cse_series": len(cse_maps),
            "warnings": warnings, "notes": notes}
    # a shared derivative: file references relative to the dataset (io.dataset_ref)
    write_json(out / "cohort.json", portable_paths(meta, dataset_root_of(out / "cohort.json")))
    return meta


def run_repro(session_dirs: Sequence[str | Path], out_dir: str | Path, *,
              days_tsv: str | Path | None = None, max_interval_days: float | None = None,
              threads: int = 1, seed: int = 1,
              figures_dir: str | Path | None = None) -> dict[str, Any]:
    """Within-subject reproducibility of every subject with ≥ 2 sessions (module doc).

    Tables go to ``out_dir``, the per-pair figures to ``figures_dir`` (default ``out_dir``).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    figs = Path(figures_dir) if figures_dir is not None else out
    figs.mkdir(parents=True, exist_ok=True)
    files = [session_files(d) for d in session_dirs]
    pairs, warnings = plan_pairs(files, days=read_days(days_tsv),
                                 max_interval_days=max_interval_days)
    rows: list[dict[str, Any]] = []
    regs = []
    for first, later, dt in pairs:
        res = pair_reproducibility(first, later, work_dir=out, threads=threads, seed=seed,
                                   interval_days=dt)
        rows += res.rows
        regs.append({"participant_id": f"sub-{res.subject}",
                     "first_session_id": f"ses-{res.first}",
                     "later_session_id": f"ses-{res.later}", **res.registration})
        name = f"sub-{res.subject}_ses-{res.later}_to-ses-{res.first}_repro.png"
        _write_png(figs / name, figures.repro_png(
            res.values, res.rows, f"sub-{res.subject}: ses-{res.later} vs ses-{res.first} "
                                  "(WM + GM)"))
    cols = ["participant_id", "first_session_id", "later_session_id", "interval_days",
            "parameter", "n_voxels", "pearson_r", "ccc", "mean_rel_diff"]
    df = pd.DataFrame(rows, columns=None if rows else cols)
    write_tsv(df, out / "reproducibility.tsv", sidecar=False)
    meta = {"n_pairs": len(pairs), "mask": "first session dseg WM+GM (labels 1, 2) ∩ brain "
            "masks of both sessions", "relative_difference": "mean |later - first| / "
            "((first + later) / 2)", "registration": regs, "warnings": warnings}
    # a shared derivative: the registrations' image and transform paths relative to the
    # dataset (io.dataset_ref); the returned provenance (work folder) keeps them as given
    write_json(out / "reproducibility.json",
               portable_paths(meta, dataset_root_of(out / "reproducibility.json")))
    return meta
