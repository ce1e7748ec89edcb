"""``qmriflow stats | cohort | repro | report | report-cohort``: statistics and QC pages.

Registered on ``qmriflow.cli`` with the same decorators as the other steps; imported lazily by
:func:`qmriflow.cli.build_parser` (module listed in ``_COMMAND_MODULES``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from . import _provenance, _session_args, _with_session, arguments, command, positive_int

# ---------------------------------------------------------------------------------------------
# stats (per session)
# ---------------------------------------------------------------------------------------------


def _stats_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("session_dir", type=Path, help="derivatives session folder (.../sub-X/ses-Y)")
    p.add_argument("--out-tsv", type=Path, help="default: anat/<label>_space-T2w_desc-"
                                                "tissue_stats.tsv")
    p.add_argument("--out-hist", type=Path, help="default: anat/<label>_space-T2w_desc-"
                                                 "tissue_hist.tsv")
    _session_args(p)


@command("stats", "T1/T2/PD mean, SD, median and voxel count in eroded WM, GM (and CSF)")
@arguments(_stats_args)
def _stats(a: argparse.Namespace) -> int:
    from ..stats.pipeline import run_session_stats
    from ..stats.tissue import session_files

    files = session_files(a.session_dir, a.subject, a.session)
    info = _with_session(files.label, lambda: run_session_stats(files, a.out_tsv, a.out_hist))
    _provenance(a, "stats", info)
    n = info["n_voxels"]
    print(f"{files.label}: tissue statistics (WM {n.get('WM', 0)}, GM {n.get('GM', 0)} voxels)")
    return 0


# ---------------------------------------------------------------------------------------------
# cohort
# ---------------------------------------------------------------------------------------------


def _cohort_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("out_dir", type=Path, help="cohort output folder")
    p.add_argument("tsvs", type=Path, nargs="*", help="per-session tissue_stats.tsv files")
    p.add_argument("--results-dir", type=Path,
                   help="also take every sub-*/ses-*/anat/*_desc-tissue_stats.tsv below this")
    p.add_argument("--clusters", type=int, default=9, help="protocol clusters k (seed: 9)")
    p.add_argument("--strict-clusters", action="store_true",
                   help="fail when k exceeds the distinct protocols (default: lower k, warn)")
    p.add_argument("--min-group-size", type=int, default=1,
                   help="leave groups with fewer sessions out of the inter-group CV")
    p.add_argument("--cse-maps", type=Path, nargs="*", default=[],
                   help="PDFF maps (sub-X_ses-Y_acq-Z_desc-<method>_PDFFmap.nii.gz) to "
                        "summarise in cohort_cse_stats.tsv (with --results-dir: also every "
                        "one below it)")
    p.add_argument("--provenance", type=Path, help="write this step's provenance JSON here")


@command("cohort", "cohort table, population summary, protocol clusters, inter-group CV, "
                   "PDFF/R2* per multi-echo series")
@arguments(_cohort_args)
def _cohort(a: argparse.Namespace) -> int:
    from ..stats.pipeline import run_cohort

    tsvs = list(a.tsvs)
    if a.results_dir is not None:
        tsvs += sorted(Path(a.results_dir).glob(
            "sub-*/ses-*/anat/*_space-T2w_desc-tissue_stats.tsv"))
    tsvs = sorted(set(tsvs))
    cse = list(a.cse_maps)
    if a.results_dir is not None:
        from ..stats.cse import find_cse_series

        for d in sorted(Path(a.results_dir).glob("sub-*/ses-*/anat")):
            cse += [s.pdff for s in find_cse_series(d, f"{d.parent.parent.name}_"
                                                       f"{d.parent.name}")]
    hists = [Path(str(t).replace("_desc-tissue_stats.tsv", "_desc-tissue_hist.tsv"))
             for t in tsvs]
    meta = run_cohort(tsvs, a.out_dir, k=a.clusters, reduce_k=not a.strict_clusters,
                      hists=[h for h in hists if h.is_file()],
                      min_group_size=a.min_group_size, cse_maps=sorted(set(cse)))
    _provenance(a, "cohort", meta)
    for w in meta["warnings"]:
        print(f"warning: {w}")
    for n in meta["notes"]:
        print(f"note: {n}")
    print(f"cohort of {meta['n_sessions']} session(s), {meta['k']} protocol cluster(s): "
          f"{a.out_dir}")
    return 0


# ---------------------------------------------------------------------------------------------
# repro
# ---------------------------------------------------------------------------------------------


def _repro_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("out_dir", type=Path, help="reproducibility output folder")
    p.add_argument("session_dirs", type=Path, nargs="*",
                   help="derivatives session folders with maps (.../sub-X/ses-Y)")
    p.add_argument("--results-dir", type=Path,
                   help="also take every sub-*/ses-* folder below this that has a T1 map")
    p.add_argument("--days", type=Path,
                   help="TSV participant_id, session_id, day (orders sessions; enables the "
                        "interval)")
    p.add_argument("--max-interval-days", type=float, default=None)
    p.add_argument("--figures-dir", type=Path, help="scatter/Bland-Altman PNGs (default: "
                                                    "OUT_DIR)")
    p.add_argument("--threads", type=positive_int, default=1)
    p.add_argument("--seed", type=int, default=1,
                   help="registration seed (>= 1; ANTs treats 0 as unseeded)")
    p.add_argument("--provenance", type=Path, help="write this step's provenance JSON here")


@command("repro", "within-subject reproducibility: register later sessions, r / CCC / rel. diff")
@arguments(_repro_args)
def _repro(a: argparse.Namespace) -> int:
    from ..stats.pipeline import run_repro

    dirs = list(a.session_dirs)
    if a.results_dir is not None:
        dirs += [p.parent.parent for p in Path(a.results_dir).glob(
            "sub-*/ses-*/anat/*_space-T2w_T1map.nii.gz")]
    dirs = sorted(set(dirs))
    meta = run_repro(dirs, a.out_dir, days_tsv=a.days, max_interval_days=a.max_interval_days,
                     threads=a.threads, seed=a.seed, figures_dir=a.figures_dir)
    _provenance(a, "repro", meta)
    for w in meta["warnings"]:
        print(f"warning: {w}")
    print(f"reproducibility of {meta['n_pairs']} session pair(s): {a.out_dir}")
    return 0


# ---------------------------------------------------------------------------------------------
# reports
# ---------------------------------------------------------------------------------------------


def _report_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("session_dir", type=Path, help="derivatives session folder (.../sub-X/ses-Y)")
    p.add_argument("out_html", type=Path)
    p.add_argument("--step-provenance", type=Path, nargs="*", default=[],
                   help="extra provenance JSON files to summarise (e.g. the infer step's)")
    p.add_argument("--slices", type=int, default=3, help="axial slices shown")
    _session_args(p)


@command("report", "self-contained HTML QC page of one session")
@arguments(_report_args)
def _report(a: argparse.Namespace) -> int:
    from ..stats.report import session_report
    from ..stats.tissue import session_files

    files = session_files(a.session_dir, a.subject, a.session)
    warnings = _with_session(files.label, lambda: {"warnings": session_report(
        files, a.out_html, provenance=a.step_provenance, n_slices=a.slices)})["warnings"]
    print(f"{files.label}: report {a.out_html} ({len(warnings)} warning(s))")
    return 0


def _report_cohort_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("cohort_dir", type=Path, help="output folder of `qmriflow cohort`")
    p.add_argument("out_html", type=Path)
    p.add_argument("--repro-dir", type=Path, help="output folder of `qmriflow repro`")
    p.add_argument("--repro-figures-dir", type=Path,
                   help="its figures folder (default: the repro folder)")


@command("report-cohort", "self-contained HTML page of the cohort analysis")
@arguments(_report_cohort_args)
def _report_cohort(a: argparse.Namespace) -> int:
    from ..stats.report import cohort_report

    cohort_report(a.out_html, a.cohort_dir, a.repro_dir, a.repro_figures_dir)
    print(f"cohort report {a.out_html}")
    return 0
