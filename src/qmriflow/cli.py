"""Command-line interface: ``qmriflow <step> ...``.

Every Snakemake rule calls exactly one of these subcommands. Failures that the user can act on
end with a one-line message on stderr (``qmriflow <step>: error: session ...: file: reason``)
and exit status 1; nothing partial is left where a complete output is expected.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from . import __version__
from .errors import InputError, QmriflowError

Handler = Callable[[argparse.Namespace], int]
_COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Handler]] = {}


def command(name: str, help_text: str):
    def deco(fn: Handler) -> Handler:
        _COMMANDS[name] = (help_text, getattr(fn, "_configure", lambda p: None), fn)
        return fn

    return deco


def arguments(configure: Callable[[argparse.ArgumentParser], None]):
    def deco(fn: Handler) -> Handler:
        fn._configure = configure  # type: ignore[attr-defined]
        return fn

    return deco


def positive_int(text: str) -> int:
    """argparse type of every thread, core and worker count: an integer >= 1.

    ``--threads -2`` or ``--cores 0`` is refused with a usage error (exit status 2) instead of
    reaching a tool, or a provenance record, as a nonsensical count."""
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {n}")
    return n


def count_or_auto(text: str) -> int:
    """argparse type of a thread count where 0 has the documented meaning "all available":
    an integer >= 0."""
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if n < 0:
        raise argparse.ArgumentTypeError(f"must be at least 0 (0 = all available), got {n}")
    return n


# ---------------------------------------------------------------------------------------------
# phantom
# ---------------------------------------------------------------------------------------------


def _phantom_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("out", type=Path, help="output folder (dicom/, truth/, manifest.json)")
    p.add_argument("--subjects", type=int, default=3)
    p.add_argument("--sessions", type=int, default=1)
    p.add_argument("--size", choices=["small", "full"], default="small")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cse", action="store_true", help="add a 6-echo GRE fat/water series")
    p.add_argument("--snr", type=float, default=40.0, help="brain-mean signal / noise sigma")
    p.add_argument("--workers", type=positive_int, default=2, help="parallel subjects")
    p.add_argument("--tissue-range", type=float, default=0.0, metavar="F",
                   help="draw every tissue parameter per subject uniformly within ±F of its "
                        "reference (e.g. 0.2); default: N(0, 3 %%) variation")
    p.add_argument("--spatial-variation", type=float, default=0.03, metavar="F",
                   help="SD of the smooth within-tissue variation of PD, T1, T2 (default 0.03)")
    p.add_argument("--clusters", type=int, default=0, metavar="K",
                   help="assign sessions round robin to protocol clusters 0..K-1, each with a "
                        "fixed scanner model; default 0: cluster and scanner drawn at random")
    p.add_argument("--gain-model", choices=["independent", "protocol"], default="independent",
                   help="scanner FP gains: independent per series (default), or fixed "
                        "per-cluster role ratios x a session gain x per-series jitter")
    p.add_argument("--gain-jitter", type=float, default=0.03, metavar="SD",
                   help="log-SD of the per-series gain jitter of --gain-model protocol "
                        "(default 0.03)")
    p.add_argument("--tissue-table", choices=["seed", "independent"], default="seed",
                   help="reference tissue values: 'seed' (= the estimator's priors, default) or "
                        "'independent' (Stanisz et al. 2005 WM/GM relaxation)")
    p.add_argument("--global-shift", type=float, default=0.0, metavar="G",
                   help="per subject, multiply brain-tissue T1 and T2 by two factors drawn "
                        "uniformly in [1-G, 1+G] (0 <= G < 0.5; default 0)")
    p.add_argument("--mismatch", choices=["on", "off"], default="off",
                   help="on: images from the scanner forward model the estimator does not "
                        "share (EPG echo trains, MT, B1+, T2*, compartment partial volume); "
                        "off (default): the estimator's own equations (unit tests)")


@command("phantom", "generate a digital brain phantom DICOM archive with ground truth")
@arguments(_phantom_args)
def _phantom(a: argparse.Namespace) -> int:
    from .phantom.generate import PhantomOptions, generate_archive

    m = generate_archive(a.out, PhantomOptions(
        subjects=a.subjects, sessions=a.sessions, size=a.size, seed=a.seed, cse=a.cse,
        snr=a.snr, workers=a.workers, tissue_range=a.tissue_range,
        spatial_variation=a.spatial_variation, clusters=a.clusters, gain_model=a.gain_model,
        gain_jitter=a.gain_jitter, tissue_table=a.tissue_table, global_shift=a.global_shift,
        mismatch=a.mismatch == "on",
    ))
    print(f"wrote {len(m['series'])} series for {a.subjects} subject(s) x {a.sessions} "
          f"session(s) to {a.out} in {m['seconds']:.1f} s")
    return 0


# ---------------------------------------------------------------------------------------------
# synth
# ---------------------------------------------------------------------------------------------


def _synth_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--t1", type=Path, required=True, help="T1 map in seconds (BIDS T1map)")
    p.add_argument("--t2", type=Path, required=True, help="T2 map in seconds (BIDS T2map)")
    p.add_argument("--pd", type=Path, required=True, help="PD map (a.u.)")
    p.add_argument("--sequence", choices=["gre", "tse", "flair", "irgre", "se"], required=True)
    p.add_argument("--tr", type=float, required=True, metavar="MS")
    p.add_argument("--te", type=float, required=True, metavar="MS")
    p.add_argument("--ti", type=float, metavar="MS")
    p.add_argument("--fa", type=float, metavar="DEG")
    p.add_argument("--te-correction", type=float, metavar="F",
                   help="TE factor (default: 0.90 TSE, 0.42 FLAIR, 0.89 FLAIR TE<200 ms)")
    p.add_argument("--out", type=Path, required=True)


@command("synth", "re-synthesise a weighted image from T1/T2/PD maps (synthetic MRI)")
@arguments(_synth_args)
def _synth(a: argparse.Namespace) -> int:
    from .synth import synthesise_files

    synthesise_files(a.t1, a.t2, a.pd, sequence=a.sequence, tr_ms=a.tr, te_ms=a.te,
                     ti_ms=a.ti, fa_deg=a.fa, te_correction=a.te_correction, out=a.out)
    print(f"wrote {a.out}")
    return 0


# ---------------------------------------------------------------------------------------------
# discover / convert
# ---------------------------------------------------------------------------------------------


def _discover_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("input_dir", type=Path)
    p.add_argument("sessions_tsv", type=Path)
    p.add_argument("series_tsv", type=Path)
    p.add_argument("--salt", required=True, help="secret pseudonymisation salt")
    p.add_argument("--input-format", choices=["dicom", "bids"], default="dicom")
    p.add_argument("--quiet-period-min", type=float, default=0.0,
                   help="defer studies with a file written less than this many minutes ago "
                        "(DICOM; 0 = off)")


@command("discover", "find sessions and classify series in an archive (sessions/series TSV)")
@arguments(_discover_args)
def _discover(a: argparse.Namespace) -> int:
    from .discover import discover, is_deferred, write_tables

    sessions, series = discover(a.input_dir, a.salt, input_format=a.input_format,
                                quiet_period_s=60.0 * a.quiet_period_min)
    write_tables(sessions, series, a.sessions_tsv, a.series_tsv)
    ok = sum(1 for r in sessions if r.get("status") == "ok")
    deferred = sum(1 for r in sessions if is_deferred(r))
    print(f"{len(sessions)} session(s), {ok} complete, {deferred} deferred, "
          f"{len(series)} series in {a.input_dir}")
    return 0


def _locate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("input_dir", type=Path, help="the archive folder given to discovery")
    p.add_argument("refs", nargs="+", metavar="REF",
                   help="a file reference (#<12 hex>) from a status or failure message, or a "
                        "folder reference (the 'folder' column of series.tsv)")
    p.add_argument("--salt", required=True, help="the discovery's pseudonym salt")


@command("locate", "print the archive path behind a file or folder reference of a message "
                   "(on this terminal only: the path may identify the patient)")
@arguments(_locate_args)
def _locate(a: argparse.Namespace) -> int:
    from .discover import locate

    missing = 0
    for ref in a.refs:
        found = locate(a.input_dir, ref, a.salt)
        missing += not found
        for p in found:
            print(f"{ref}\t{p}")
        if not found:
            print(f"{ref}\tnot found (another archive folder or salt?)", file=sys.stderr)
    return 1 if missing else 0


def _session_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--subject", required=True, help="subject pseudonym (without sub-)")
    p.add_argument("--session", required=True, help="session pseudonym (without ses-)")
    p.add_argument("--failures", type=Path, help="folder for this run's failure records")
    p.add_argument("--provenance", type=Path, help="write this step's provenance JSON here")


def _convert_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("sessions_tsv", type=Path)
    p.add_argument("series_tsv", type=Path)
    p.add_argument("input_dir", type=Path)
    p.add_argument("out_dir", type=Path, help="session folder to create")
    p.add_argument("--input-format", choices=["dicom", "bids"], default="dicom")
    p.add_argument("--no-anonymise", action="store_true")
    p.add_argument("--timeout", type=float, default=600)
    p.add_argument("--salt", help="the discovery's pseudonym salt (series folders are hashed "
                                  "with it in the series table)")
    _session_args(p)


@command("convert", "convert one session's selected series to role-named NIfTI (dcm2niix)")
@arguments(_convert_args)
def _convert(a: argparse.Namespace) -> int:
    from .discover import read_series_tsv, read_sessions_tsv
    from .ingest import ingest_session

    summary = ingest_session(
        a.subject, a.session, read_sessions_tsv(a.sessions_tsv), read_series_tsv(a.series_tsv),
        a.input_dir, a.out_dir, input_format=a.input_format, anonymise=not a.no_anonymise,
        timeout_s=a.timeout, salt=a.salt,
    )
    _provenance(a, "convert", {k: v for k, v in summary.items() if k != "session"})
    print(f"{summary['session']}: {len(summary['images'])} image(s)")
    return 0


def _params_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("session_dir", type=Path, help="converted session folder")
    p.add_argument("series_tsv", type=Path)
    p.add_argument("out_json", type=Path)
    p.add_argument("--allow-non-3t", action="store_true", help="do not require 3 T")
    p.add_argument("--te-correction", default="",
                   help="comma list, e.g. tse=0.9,flair=0.42,flair_short=0.89,"
                        "flair_short_te_ms=200")
    p.add_argument("--echo-train", default="",
                   help="comma list of physics.echo_train settings, e.g. model=auto,"
                        "t2w_refocusing_deg=150,flair_3d_schedule=assumed (model=off: the "
                        "seed's TE factors only)")
    _session_args(p)


def _echo_train_settings(text: str, label: str) -> Any:
    """``--echo-train`` -> :class:`~qmriflow.params.EchoTrainSettings` (one-line error)."""
    from .params import EchoTrainSettings

    values: dict[str, Any] = {}
    try:
        for kv in (x for x in text.split(",") if x):
            k, v = kv.split("=")
            values[k] = (None if v in ("", "null", "None") else float(v)
                         if k.endswith(("_deg", "_ms")) else v)
        return EchoTrainSettings(**values)
    except (TypeError, ValueError) as exc:
        raise InputError(f"bad --echo-train {text!r}: {exc}", session=label) from None


@command("params", "extract and validate one session's acquisition parameters (JSON)")
@arguments(_params_args)
def _params(a: argparse.Namespace) -> int:
    from .discover import read_series_tsv
    from .ingest import converted_sidecars, session_label
    from .io import write_json
    from .params import extract_session_params
    from .physics import TECorrection

    label = session_label(a.subject, a.session)
    try:
        tec = TECorrection(**{k: float(v) for k, v in
                              (kv.split("=") for kv in a.te_correction.split(",") if kv)})
    except (TypeError, ValueError) as exc:
        raise InputError(f"bad --te-correction: {exc}", session=label) from None
    rows = [r for r in read_series_tsv(a.series_tsv)
            if r["subject"] == a.subject and r["session"] == a.session]
    trains = _echo_train_settings(a.echo_train, label)
    params = extract_session_params(converted_sidecars(a.session_dir), rows,
                                    require_3t=not a.allow_non_3t, te_correction=tec,
                                    session=label, echo_train=trains)
    write_json(a.out_json, params)
    _provenance(a, "params", {"require_3t": not a.allow_non_3t,
                              "te_correction": tec.__dict__,
                              "echo_train": dict(trains.__dict__)})
    print(f"{label}: parameters valid")
    return 0


def _register_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--t1w", type=Path, required=True)
    p.add_argument("--t2w", type=Path, required=True)
    p.add_argument("--flair", type=Path, required=True)
    p.add_argument("--out-dir", type=Path, required=True)
    p.add_argument("--inplane-mm", type=float, default=1.0)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--threads", type=positive_int, default=1)
    p.add_argument("--multithreaded", action="store_true",
                   help="let ITK use --threads threads for the registration too: faster, but "
                        "the transforms then differ slightly from run to run (default: "
                        "single-threaded registration, bit-identical results)")
    _session_args(p)


@command("register", "register T1w and FLAIR to the T2w, resample to 1x1 mm, crop to 224x224")
@arguments(_register_args)
def _register(a: argparse.Namespace) -> int:
    from .ingest import session_label
    from .preproc.register import register_session

    label = session_label(a.subject, a.session)
    d = a.out_dir
    outputs = {"T1w": d / f"{label}_space-T2w_desc-reg_T1w.nii.gz",
               "T2w": d / f"{label}_space-T2w_desc-reg_T2w.nii.gz",
               "FLAIR": d / f"{label}_space-T2w_desc-reg_FLAIR.nii.gz",
               "T1w_xfm": d / f"{label}_from-T1w_to-T2w_mode-image_xfm.mat",
               "FLAIR_xfm": d / f"{label}_from-FLAIR_to-T2w_mode-image_xfm.mat"}
    info = _with_session(label, lambda: register_session(
        a.t2w, a.t1w, a.flair, outputs, d / ".work", inplane_mm=a.inplane_mm, size=a.size,
        threads=a.threads, deterministic=not a.multithreaded))
    _provenance(a, "register", info)
    print(f"{label}: registered to T2w")
    return 0


def _n4_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--t1w", type=Path, required=True)
    p.add_argument("--t2w", type=Path, required=True)
    p.add_argument("--flair", type=Path, required=True)
    p.add_argument("--out-t1w", type=Path, required=True)
    p.add_argument("--out-t2w", type=Path, required=True)
    p.add_argument("--out-flair", type=Path, required=True)
    p.add_argument("--min-area-fraction", type=float, default=0.15)
    p.add_argument("--drop-fraction", type=float, default=0.0)
    p.add_argument("--shrink", type=int, default=2)
    p.add_argument("--threads", type=positive_int, default=1)
    _session_args(p)


@command("n4", "N4 bias-field correction of the three contrasts and end-slice selection")
@arguments(_n4_args)
def _n4(a: argparse.Namespace) -> int:
    from .ingest import session_label
    from .preproc.n4 import n4_session

    label = session_label(a.subject, a.session)
    info = _with_session(label, lambda: n4_session(
        {"T1w": a.t1w, "T2w": a.t2w, "FLAIR": a.flair},
        {"T1w": a.out_t1w, "T2w": a.out_t2w, "FLAIR": a.out_flair},
        min_area_fraction=a.min_area_fraction, drop_fraction=a.drop_fraction, shrink=a.shrink,
        threads=a.threads))
    _provenance(a, "n4", info)
    print(f"{label}: N4 done")
    return 0


def _skullstrip_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("t1w", type=Path)
    p.add_argument("out_mask", type=Path)
    p.add_argument("--backend", choices=["hd-bet", "deepbet", "hd-bet2"], default="hd-bet")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto")
    p.add_argument("--allow-download", action="store_true",
                   help="let hd-bet2 download its weights (off by default)")
    p.add_argument("--threads", type=positive_int, default=1)
    p.add_argument("--t2w", type=Path, help="T2w on the T1w's grid: grow the mask into the "
                   "CSF around the brain (see --csf-fill-mm)")
    p.add_argument("--csf-fill-mm", type=float, default=5.0,
                   help="how far (mm, in-plane) the mask may grow into CSF; 0: off")
    _session_args(p)


@command("skullstrip", "brain mask of the registered T1w (HD-BET, deepbet)")
@arguments(_skullstrip_args)
def _skullstrip(a: argparse.Namespace) -> int:
    from .ingest import session_label
    from .preproc.skullstrip import skull_strip

    label = session_label(a.subject, a.session)
    info = _with_session(label, lambda: skull_strip(
        a.t1w, a.out_mask, backend=a.backend, device=a.device,
        allow_download=a.allow_download, threads=a.threads, t2w=a.t2w,
        csf_fill_mm=a.csf_fill_mm))
    _provenance(a, "skullstrip", info)
    print(f"{label}: brain mask ({a.backend})")
    return 0


def _segment_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("t1w", type=Path)
    p.add_argument("mask", type=Path)
    p.add_argument("--out-prefix", required=True, help="path prefix of the outputs")
    p.add_argument("--t2w", type=Path)
    p.add_argument("--flair", type=Path)
    p.add_argument("--backend", choices=["atropos", "fast"], default="atropos")
    p.add_argument("--erode-mm", type=float, default=2.0)
    p.add_argument("--threads", type=positive_int, default=1)
    _session_args(p)


@command("segment", "WM/GM/CSF segmentation (Atropos or FSL FAST) and CSF-distance erosion")
@arguments(_segment_args)
def _segment(a: argparse.Namespace) -> int:
    import nibabel as nib
    import numpy as np

    from .ingest import session_label
    from .io import save_nifti
    from .preproc.segment import erode_near_csf, segment

    label = session_label(a.subject, a.session)
    pre = a.out_prefix
    outputs = {"dseg": Path(f"{pre}_dseg.nii.gz")}
    for t in ("GM", "WM", "CSF"):
        outputs[f"probseg_{t}"] = Path(f"{pre}_label-{t}_probseg.nii.gz")
    extra = {k: v for k, v in (("T2w", a.t2w), ("FLAIR", a.flair)) if v is not None}

    def run() -> dict:
        info = segment(a.t1w, a.mask, outputs, extra=extra or None, backend=a.backend,
                       threads=a.threads)
        img = nib.load(str(outputs["dseg"]))
        wm, gm = erode_near_csf(np.asarray(img.dataobj), img.header.get_zooms()[:3],
                                distance_mm=a.erode_mm)
        for name, m in (("WM", wm), ("GM", gm)):
            save_nifti(f"{pre}_label-{name}_desc-eroded_mask.nii.gz", m, img.affine,
                       {"Description": f"{name} mask eroded where within {a.erode_mm} mm of CSF",
                        "Sources": [Path(outputs["dseg"])]}, dtype=np.uint8)
        return {**info, "erode_mm": a.erode_mm}

    info = _with_session(label, run)
    _provenance(a, "segment", info)
    print(f"{label}: segmentation ({a.backend})")
    return 0


def _provmerge_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("out_json", type=Path)
    p.add_argument("steps", type=Path, nargs="+", help="per-step provenance JSON files")
    p.add_argument("--label", required=True, help="sub-X_ses-Y")


@command("provenance", "merge a session's per-step provenance into one JSON")
@arguments(_provmerge_args)
def _provmerge(a: argparse.Namespace) -> int:
    from .io import dataset_root_of, portable_paths, write_json
    from .provenance import merge_steps

    # the session's provenance sits in the derivatives (shared): file references relative to
    # the dataset, as in the sidecars; the per-step files in the work folder keep them as given
    merged = merge_steps(a.steps, a.label)
    write_json(a.out_json, portable_paths(merged, dataset_root_of(a.out_json), existing=True))
    return 0


def _done_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("out_json", type=Path)
    p.add_argument("outputs", type=Path, nargs="+", help="the session's finished outputs")
    p.add_argument("--root", type=Path, required=True, help="paths are written relative to this")
    p.add_argument("--label", required=True, help="sub-X_ses-Y")


@command("session-done", "write a session's completion marker (its outputs with SHA-256)")
@arguments(_done_args)
def _done(a: argparse.Namespace) -> int:
    from .nightly import write_done_marker

    write_done_marker(a.out_json, a.outputs, a.root, a.label)
    return 0


def _workflow_args(default_profile: str) -> Callable[[argparse.ArgumentParser], None]:
    def configure(p: argparse.ArgumentParser) -> None:
        p.add_argument("--configfile", type=Path, required=True, help="the workflow config")
        p.add_argument("--cores", type=positive_int, default=None,
                       help="default: the profile's (all)")
        p.add_argument("--profile", type=Path, default=None,
                       help=f"Snakemake profile (default: {default_profile} of the checkout)")
        p.add_argument("--directory", type=Path, default=None,
                       help="Snakemake's working directory (default: the current one)")
        p.add_argument("snakemake_args", nargs=argparse.REMAINDER,
                       help="after --: more Snakemake options and targets")

    return configure


_nightly_args = _workflow_args("profiles/nightly")


@command("nightly", "incremental run over a growing archive: new sessions only, report")
@arguments(_nightly_args)
def _nightly(a: argparse.Namespace) -> int:
    from .nightly import run_nightly

    extra = [x for x in a.snakemake_args if x != "--"]
    return run_nightly(a.configfile, cores=a.cores, profile=a.profile, directory=a.directory,
                       snakemake_args=extra)


@command("run", "run the workflow; first stops the jobs and removes the lock a killed run left")
@arguments(_workflow_args("profiles/workstation"))
def _run(a: argparse.Namespace) -> int:
    from .runner import run_workflow

    extra = [x for x in a.snakemake_args if x != "--"]
    return run_workflow(a.configfile, cores=a.cores, profile=a.profile, directory=a.directory,
                        snakemake_args=extra)


def _dd_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("out_dir", type=Path)
    p.add_argument("--container", default=None)


@command("dataset-description", "write the derivatives' dataset_description.json")
@arguments(_dd_args)
def _dd(a: argparse.Namespace) -> int:
    from .provenance import write_dataset_description

    write_dataset_description(a.out_dir, a.container)
    return 0


def _failures_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("failures_dir", type=Path)
    p.add_argument("out_tsv", type=Path)


@command("failures", "collect this run's failed sessions and reasons into a TSV")
@arguments(_failures_args)
def _failures(a: argparse.Namespace) -> int:
    from .failures import write_failures_tsv

    n = write_failures_tsv(a.failures_dir, a.out_tsv)
    print(f"{n} failed step(s) listed in {a.out_tsv}")
    return 0


def _with_session(label: str, fn: Callable[[], dict]) -> dict:
    try:
        return fn()
    except QmriflowError as exc:
        raise exc.with_context(session=label) from None


def _provenance(a: argparse.Namespace, step: str, info: dict) -> None:
    if getattr(a, "provenance", None):
        from .provenance import write_step

        write_step(a.provenance, step, info)


# ---------------------------------------------------------------------------------------------
# config / demo
# ---------------------------------------------------------------------------------------------


def _validate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", type=Path, nargs="?", default=Path("workflow_config.yaml"))


@command("validate-config", "validate a workflow config file against the shipped schema")
@arguments(_validate_args)
def _validate(a: argparse.Namespace) -> int:
    from .config import load_config

    load_config(a.config)
    print(f"{a.config}: valid")
    return 0


def _demo_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", type=Path, default=Path("demo"), help="demo folder")
    p.add_argument("--cores", type=positive_int, default=2)
    p.add_argument("--subjects", type=int, default=3)
    p.add_argument("--sessions", type=int, default=1)


@command("demo", "generate a small phantom archive and run the workflow on it")
@arguments(_demo_args)
def _demo(a: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(a.out, cores=a.cores, subjects=a.subjects, sessions=a.sessions)


# ---------------------------------------------------------------------------------------------


#: modules that add more steps with the same ``@command`` decorator (imported lazily so that
#: ``qmriflow --help`` stays fast and the science modules are not imported at start-up)
_COMMAND_MODULES = ("qmriflow.cli_cse", "qmriflow.cli_model", "qmriflow.cli_stats")


def _load_command_modules() -> None:
    import importlib
    import importlib.util

    for name in _COMMAND_MODULES:
        if importlib.util.find_spec(name) is not None:
            importlib.import_module(name)


def build_parser() -> argparse.ArgumentParser:
    _load_command_modules()
    parser = argparse.ArgumentParser(
        prog="qmriflow",
        description="Quantitative T1/T2/PD and fat/water maps from routine clinical MRI.",
    )
    parser.add_argument("--version", action="version", version=f"qmriflow {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="<step>", title="steps")
    for name, (help_text, configure, _fn) in _COMMANDS.items():
        sp = sub.add_parser(name, help=help_text, description=help_text)
        configure(sp)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 2
    _help, _conf, fn = _COMMANDS[args.command]
    failures = getattr(args, "failures", None)
    label = (f"sub-{args.subject}_ses-{args.session}"
             if getattr(args, "subject", None) and getattr(args, "session", None) else None)
    try:
        rc = fn(args)
    except QmriflowError as exc:
        if failures is not None and label:
            from .failures import record_failure

            record_failure(failures, label, args.command, str(exc))
        print(f"qmriflow {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:
        # a bug or an unforeseen tool failure: keep the traceback in the log, and still list
        # the session in this run's failures table
        if failures is not None and label:
            from .failures import record_failure

            first = (str(exc).splitlines() or [""])[0][:300]
            record_failure(failures, label, args.command,
                           f"unexpected error in {args.command}: {type(exc).__name__}: {first}")
        raise
    if failures is not None and label:
        from .failures import clear_failure

        clear_failure(failures, label, args.command)
    return rc


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
