"""``qmriflow pack | train | infer | search``: the relaxometry model's steps (seed 000).

Registered on ``qmriflow.cli`` with the same decorators as the other steps; imported lazily by
:func:`qmriflow.cli.build_parser`.

Long because it holds the argument definitions of six model steps (pack, cluster-fit, train,
infer, infer-nifti, search); no science.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from ..errors import ConfigError
from ..model.calibration import (
    DEFAULT_ESTIMATOR,
    DEFAULT_METHOD,
    DEFAULT_MODEL_ERROR,
    DEFAULT_MODEL_ERROR_CLUSTER,
    DEFAULT_SMOOTHING,
    ESTIMATORS,
    SMOOTHING_GUIDES,
    Smoothing,
)
from . import _provenance, _session_args, _with_session, arguments, command, positive_int

CONTRAST_CHOICES = ("T1w", "T2w", "FLAIR")


def _floats(text: str, n: int, what: str) -> tuple[float, ...]:
    try:
        vals = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise ConfigError(f"{what}: expected {n} comma-separated numbers, got {text!r}") from None
    if len(vals) != n:
        raise ConfigError(f"{what}: expected {n} comma-separated numbers, got {text!r}")
    return vals


def _non_negative(text: str) -> float:
    """argparse type of a finite number >= 0."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not (v >= 0 and v < float("inf")):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return v


def _smoothing(text: str) -> Smoothing:
    """``R,SS,SR,SV`` of ``--smoothing`` (an argparse type: bad values are usage errors; the
    guide is set from ``--smoothing-guide`` by :func:`_smoothing_of`)."""
    try:
        radius, sigma_space, sigma_range, sigma_value = _floats(text, 4, "--smoothing")
        if radius != int(radius):
            raise ValueError(f"smoothing radius must be a whole number >= 0, got {radius}")
        return Smoothing(int(radius), sigma_space, sigma_range, sigma_value)  # validates
    except (ConfigError, ValueError) as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _smoothing_of(a: argparse.Namespace) -> Smoothing:
    return dataclasses.replace(a.smoothing or DEFAULT_SMOOTHING, guide=a.smoothing_guide)


def _contrasts(text: str) -> tuple[str, ...]:
    names = tuple(c.strip() for c in text.split(",") if c.strip())
    bad = [c for c in names if c not in CONTRAST_CHOICES]
    if not names or bad or len(set(names)) != len(names):
        raise ConfigError(f"--contrasts must be a comma list of distinct {CONTRAST_CHOICES}, "
                          f"got {text!r}")
    return names


# ---------------------------------------------------------------------------------------------
# pack
# ---------------------------------------------------------------------------------------------


def _pack_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("out_dir", type=Path, help="folder for images.npy, masks.npy, index.json")
    p.add_argument("session_dirs", type=Path, nargs="*",
                   help="preprocessed session folders (.../sub-X/ses-Y)")
    p.add_argument("--results-dir", type=Path,
                   help="take every results/sub-*/ses-* folder with a preprocessed T2w")
    p.add_argument("--min-head-fraction", type=float, default=0.05,
                   help="leave out slices whose head covers less than this fraction")
    p.add_argument("--skip-incomplete", action="store_true",
                   help="list unreadable sessions in index.json instead of failing")
    p.add_argument("--clusters", type=Path, default=None,
                   help="clusters.json of `qmriflow cluster-fit`: train against each session's "
                        "protocol-cluster scales")
    p.add_argument("--targets", action="store_true",
                   help="also pack every calibrated session's network-free maps (targets of "
                        "`qmriflow train --distill`)")
    p.add_argument("--provenance", type=Path, help="write this step's provenance JSON here")


def _results_sessions(a: argparse.Namespace) -> list[Path]:
    """The session folders given, plus every preprocessed one under ``--results-dir``."""
    dirs = list(a.session_dirs)
    if a.results_dir is not None:
        dirs += sorted(p.parent.parent for p in Path(a.results_dir).glob(
            "sub-*/ses-*/anat/*_space-T2w_desc-preproc_T2w.nii.gz"))
    return dirs


def _cluster_doc(path: Path | None) -> dict | None:
    from ..model.clusters import load_clusters

    return None if path is None else load_clusters(path)


@command("pack", "normalise preprocessed sessions once and pack their slices for training")
@arguments(_pack_args)
def _pack(a: argparse.Namespace) -> int:
    from ..model.data import pack_sessions

    index = pack_sessions(_results_sessions(a), a.out_dir,
                          min_head_fraction=a.min_head_fraction,
                          skip_incomplete=a.skip_incomplete, clusters=_cluster_doc(a.clusters),
                          targets=a.targets)
    _provenance(a, "pack", {"n_sessions": len(index["sessions"]), "n_slices": index["n_slices"],
                            "skipped": index["skipped"]})
    print(f"packed {index['n_slices']} slices of {len(index['sessions'])} session(s) into "
          f"{a.out_dir}" + (f" ({len(index['skipped'])} skipped)" if index["skipped"] else ""))
    return 0


# ---------------------------------------------------------------------------------------------
# cluster-fit
# ---------------------------------------------------------------------------------------------


def _cluster_fit_args(p: argparse.ArgumentParser) -> None:
    from ..model.clusters import DEFAULT_MIN_SESSIONS, DEFAULT_TOLERANCE

    p.add_argument("out_json", type=Path, help="clusters.json to write")
    p.add_argument("session_dirs", type=Path, nargs="*",
                   help="preprocessed session folders (.../sub-X/ses-Y)")
    p.add_argument("--results-dir", type=Path,
                   help="take every results/sub-*/ses-* folder with a preprocessed T2w")
    p.add_argument("--calibration", default=None,
                   help="reference values of calibration sessions: a JSON file, or JSON text, "
                        "mapping session label -> {\"values\": {\"WM\": {\"T1\": s, \"T2\": "
                        "s, \"PD\": x}, \"GM\": {...}}} or {\"maps\": {\"T1map\": path, "
                        "\"T2map\": path, \"PDmap\": path}}")
    p.add_argument("--state", type=Path, default=None,
                   help="where fitted clusters persist between runs (default: OUT_JSON); "
                        "fitted clusters found there are kept unless --refit")
    p.add_argument("--skip-incomplete", action="store_true",
                   help="accepted for symmetry with pack: unreadable sessions are always "
                        "left out with their reason")
    p.add_argument("--min-sessions", type=int, default=DEFAULT_MIN_SESSIONS,
                   help="fewer sessions: a cluster keeps the per-session calibration")
    p.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE,
                   help="relative TR/TE/TI/FA difference within one protocol")
    p.add_argument("--refit", action="store_true",
                   help="refit clusters already in OUT_JSON (records what changed); without "
                        "it, fitted clusters are kept and new sessions join at inference")
    p.add_argument("--provenance", type=Path, help="write this step's provenance JSON here")


@command("cluster-fit", "group sessions into scanner-protocol clusters and fit each "
                        "cluster's gain ratios")
@arguments(_cluster_fit_args)
def _cluster_fit(a: argparse.Namespace) -> int:
    import json

    from ..errors import InputError
    from ..model.clusters import fit_clusters

    calibration = None
    if a.calibration:
        text = a.calibration.strip()
        try:
            calibration = json.loads(text if text.startswith("{") else
                                     Path(text).read_text())
        except (OSError, ValueError) as exc:
            raise InputError(f"unreadable --calibration ({exc})") from None
        if not isinstance(calibration, dict):
            raise InputError("--calibration must map session labels to reference values")
    doc = fit_clusters(_results_sessions(a), a.out_json, calibration=calibration,
                       min_sessions=a.min_sessions, tolerance=a.tolerance, refit=a.refit,
                       state=a.state)
    fitted = sum(1 for c in doc["clusters"].values() if c.get("fit"))
    _provenance(a, "cluster-fit", {"clusters": len(doc["clusters"]), "fitted": fitted,
                                   "sessions": len(doc["sessions"]),
                                   "skipped": doc["skipped"]})
    print(f"{len(doc['clusters'])} protocol cluster(s), {fitted} fitted, "
          f"{len(doc['sessions'])} session(s) -> {a.out_json}")
    return 0


# ---------------------------------------------------------------------------------------------
# train
# ---------------------------------------------------------------------------------------------


def _hyper_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--width", type=int, default=64, help="first-level channels (seed: 64)")
    p.add_argument("--epochs", type=int, default=50)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--lambda-tv", type=float, default=0.01)
    p.add_argument("--lambda-pd", type=float, default=0.1)
    p.add_argument("--pd-threshold", type=float, default=0.60)
    p.add_argument("--scale-bound", type=float, default=0.2, help="±fraction of the WM scale")
    p.add_argument("--dropout", type=float, default=0.5, help="contrast dropout probability")
    p.add_argument("--init", choices=["kaiming", "xavier", "normal"], default="kaiming")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--split", default="0.8,0.05,0.15", help="train,val,test subject fractions")
    p.add_argument("--scale-group", choices=["session", "slice"], default="session")
    p.add_argument("--scaling", choices=["seed", "calibrated"], default=DEFAULT_METHOD,
                   help="how the free per-contrast scales are pinned: seed = bounded LS around "
                        "the WM reference (published); calibrated = per-session MAP calibration "
                        f"on CSF/WM/GM (needs _dseg; default {DEFAULT_METHOD})")
    p.add_argument("--steps-per-epoch", type=int, default=None,
                   help="batches per epoch (default: one pass over the training slices)")
    p.add_argument("--val-max-slices", type=int, default=1024)
    p.add_argument("--warmup-epochs", type=int, default=1,
                   help="epochs that also pull the maps towards WM values (published: 1)")
    p.add_argument("--warmup-min-steps", type=int, default=300,
                   help="the warm-up lasts at least this many optimiser steps")
    p.add_argument("--distill", type=float, default=0.0,
                   help="weight of the distillation term towards the packed network-free maps "
                        "(calibrated scaling; pack with --targets; 0 = off, the published loss)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto")
    p.add_argument("--threads", type=positive_int, default=None)


def _train_config(a: argparse.Namespace):
    from ..model.train import TrainConfig

    return TrainConfig(
        width=a.width, epochs=a.epochs, batch_size=a.batch_size, lr=a.lr,
        lambda_tv=a.lambda_tv, lambda_pd=a.lambda_pd, pd_threshold=a.pd_threshold,
        scale_bound=a.scale_bound, dropout=a.dropout, init=a.init, seed=a.seed,
        split=_floats(a.split, 3, "--split"), scale_group=a.scale_group,  # type: ignore[arg-type]
        scaling=a.scaling,
        steps_per_epoch=a.steps_per_epoch, val_max_slices=a.val_max_slices,
        warmup_epochs=a.warmup_epochs, warmup_min_steps=a.warmup_min_steps, distill=a.distill,
        device=a.device,
        precision=a.precision, threads=a.threads,
    )


def _train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("pack_dir", type=Path, help="output folder of `qmriflow pack`")
    p.add_argument("out_dir", type=Path, help="model folder (model.pt, last.pt, curve, ...)")
    _hyper_args(p)
    p.add_argument("--no-resume", action="store_true",
                   help="start afresh even if last.pt exists in OUT_DIR")
    p.add_argument("--max-epochs-this-run", type=int, default=None,
                   help="stop after this many epochs (resume later with the same command)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--provenance", type=Path, help="write this step's provenance JSON here")


@command("train", "train the self-supervised relaxometry network on packed slices")
@arguments(_train_args)
def _train(a: argparse.Namespace) -> int:
    from ..model.train import train

    summary = train(a.pack_dir, a.out_dir, _train_config(a), resume=not a.no_resume,
                    progress=not a.no_progress, max_epochs_this_run=a.max_epochs_this_run)
    _provenance(a, "train", {k: v for k, v in summary.items() if k != "history"})
    state = "finished" if summary["finished"] else "stopped (resume with the same command)"
    print(f"training {state}: best validation loss {summary['best_val_loss']:.5f} at epoch "
          f"{summary['best_epoch']}; model {a.out_dir / 'model.pt'}")
    return 0


# ---------------------------------------------------------------------------------------------
# infer
# ---------------------------------------------------------------------------------------------


def _infer_model_args(p: argparse.ArgumentParser, contrasts_default: str | None) -> None:
    """The options `infer` and `infer-nifti` share (how the maps are estimated)."""
    p.add_argument("--checkpoint", type=Path, default=None,
                   help="model.pt of `qmriflow train`, published weights (a state_dict such as "
                        "latest_net_G.pth), or the folder holding either; required except with "
                        "--estimator network-free")
    p.add_argument("--estimator", choices=tuple(ESTIMATORS), default=DEFAULT_ESTIMATOR,
                   help="how the maps are estimated: "
                        + "; ".join(f"{k}: {v}" for k, v in ESTIMATORS.items())
                        + f" (default {DEFAULT_ESTIMATOR})")
    p.add_argument("--out-dir", type=Path, required=True, help="folder for the maps")
    p.add_argument("--contrasts", default=contrasts_default,
                   help="inputs fed to the network" + (
                       "" if contrasts_default else " (default: every image given)"))
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                   help="auto: bf16 on CUDA and on CPUs with native bf16, else fp32 (the "
                        "choice is printed and recorded in the sidecars)")
    p.add_argument("--batch-size", type=int, default=4, help="slices per forward pass")
    p.add_argument("--threads", type=positive_int, default=None)
    p.add_argument("--scale-bound", type=float, default=0.2)
    p.add_argument("--scaling", choices=["seed", "calibrated"], default=None,
                   help="default: the checkpoint's training setting (seed for published "
                        "weights); seed reproduces the published inference exactly")
    d = DEFAULT_SMOOTHING
    p.add_argument("--smoothing", type=_smoothing, default=None, metavar="R,SS,SR,SV",
                   help="calibrated scaling: radius (voxels, 0 = off), spatial SD (voxels), "
                        "guide SD and value SD (log-units) of the edge-preserving smoothing of "
                        f"the data-consistent maps (default: {d.radius},{d.sigma_space},"
                        f"{d.sigma_range},{d.sigma_value})")
    p.add_argument("--smoothing-guide", choices=SMOOTHING_GUIDES,
                   default=DEFAULT_SMOOTHING.guide,
                   help="what steers the smoothing's edge-preserving weights: the input "
                        "images or the network's maps (not with --estimator network-free)")
    p.add_argument("--clusters", type=Path, default=None,
                   help="clusters.json of `qmriflow cluster-fit`: calibrated scales from the "
                        "session's protocol cluster (else from the session alone)")
    p.add_argument("--no-brain-mask", action="store_true", help="keep maps outside the brain")
    p.add_argument("--no-synth", action="store_true",
                   help="skip the re-synthesised images and difference maps")
    p.add_argument("--network-fov", choices=["brain", "slice"], default="brain",
                   help="calibrated scaling, refined/network-free: the network (the data "
                        "consistency's prior) sees the brain's bounding box (default, about "
                        "half the work) or the whole slice")
    p.add_argument("--model-error", type=_non_negative, default=DEFAULT_MODEL_ERROR,
                   metavar="SD",
                   help="calibrated scaling: relative error (log-SD) of each contrast's signal "
                        "model added to the calibrated scales' covariance in the uncertainty "
                        "maps, where the scales come from the session alone (default "
                        f"{DEFAULT_MODEL_ERROR}; 0 = the scales' posterior alone)")
    p.add_argument("--model-error-cluster", type=_non_negative,
                   default=DEFAULT_MODEL_ERROR_CLUSTER, metavar="SD",
                   help="the same where the scales come from a protocol cluster (--clusters; "
                        f"default {DEFAULT_MODEL_ERROR_CLUSTER})")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress lines on stderr (the precision line stays)")
    # the usage error of a missing --checkpoint (required unless --estimator network-free)
    p.set_defaults(infer_parser=p)


def _infer_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("session_dir", type=Path, help="preprocessed session folder (.../sub-X/ses-Y)")
    _infer_model_args(p, "T1w,T2w,FLAIR")
    _session_args(p)


def _infer_kwargs(a: argparse.Namespace, contrasts: tuple[str, ...]) -> dict:
    """infer_session's keyword arguments from the shared options."""
    return dict(contrasts=contrasts, device=a.device, precision=a.precision,
                batch_size=a.batch_size, threads=a.threads, brain_mask=not a.no_brain_mask,
                synth=not a.no_synth, scale_bound=a.scale_bound, scaling=a.scaling,
                smoothing=_smoothing_of(a), estimator=a.estimator, clusters=a.clusters,
                progress=not a.no_progress, network_fov=a.network_fov,
                model_error=a.model_error, model_error_cluster=a.model_error_cluster)


def _report(label: str, a: argparse.Namespace, contrasts: tuple[str, ...], info: dict) -> None:
    med = info["brain_median"]
    refine = info.get("refine") or {}
    counts = refine.get("status_counts")
    print(f"{label}: {a.estimator} maps from {'+'.join(contrasts)} in "
          f"{info['timing_s']['total']:.1f} s "
          f"(brain median T1 {med['T1_s']:.3f} s, T2 {med['T2_s'] * 1000:.1f} ms, "
          f"PD {med['PD']:.3f})"
          + (f"; data consistency: {', '.join(f'{v} {k}' for k, v in counts.items())}"
             if counts else ""))


@command("infer", "T1/T2/PD maps of one session with a trained relaxometry network")
@arguments(_infer_args)
def _infer(a: argparse.Namespace) -> int:
    from ..archive.ingest import session_label
    from ..model.infer import infer_session

    if a.checkpoint is None and a.estimator != "network-free":
        a.infer_parser.error("the following arguments are required: --checkpoint")
    label = session_label(a.subject, a.session)
    contrasts = _contrasts(a.contrasts)
    info = _with_session(label, lambda: infer_session(
        a.session_dir, a.checkpoint, a.out_dir, subject=a.subject, session=a.session,
        **_infer_kwargs(a, contrasts)))
    _provenance(a, "infer", info)
    _report(label, a, contrasts, info)
    return 0


# ---------------------------------------------------------------------------------------------
# infer-nifti
# ---------------------------------------------------------------------------------------------

_PROTOCOL_FIELDS = (("tr", "TR", "TR (ms)"), ("te", "TE", "TE (ms)"),
                    ("ti", "TI", "TI (ms); empty = none"), ("fa", "FA", "flip angle (deg)"),
                    ("seq", "seq_type", "sequence label: GRE/TFE, SE, TSE, IR/FLAIR, MPRAGE"))


def _infer_nifti_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("images", type=Path, nargs="*",
                   help="registered NIfTIs named *_T1w / *_T2w / *_FLAIR (.nii or .nii.gz); "
                        "or give them with --t1w/--t2w/--flair")
    for c in CONTRAST_CHOICES:
        p.add_argument(f"--{c.lower()}", type=Path, action="append", default=None,
                       metavar="NIFTI", help=f"the {c} image")
    p.add_argument("--brain-mask", type=Path, required=True,
                   help="brain mask on the images' grid (non-zero = brain)")
    p.add_argument("--dseg", type=Path, default=None,
                   help="tissue labels on the images' grid: 1 GM, 2 WM, 3 CSF")
    for t in ("wm", "gm", "csf"):
        p.add_argument(f"--{t}", type=Path, default=None,
                       help=f"{t.upper()} mask (instead of --dseg)")
    p.add_argument("--protocol", type=Path, default=None,
                   help="the published CSV (ID, <C>_seq_type, <C>_TE, <C>_TR, <C>_TI, <C>_FA) "
                        "or a JSON with T1w/T2w/FLAIR entries")
    p.add_argument("--protocol-id", default=None,
                   help="the CSV row's ID when the CSV holds several subjects (default: the "
                        "subject label or the images' common stem)")
    for c in CONTRAST_CHOICES:
        for key, _field, text in _PROTOCOL_FIELDS:
            p.add_argument(f"--{c.lower()}-{key}", default=None, metavar="X",
                           help=f"{c} {text} (overrides --protocol)")
    _infer_model_args(p, None)
    p.add_argument("--subject", default=None,
                   help="subject label (default: sub-<label> in the file names, else their "
                        "common stem)")
    p.add_argument("--session", default=None,
                   help="session label (default: ses-<label> in the file names, else 01)")
    p.add_argument("--failures", type=Path, help="folder for this run's failure records")
    p.add_argument("--provenance", type=Path, help="write this step's provenance JSON here")


def _nifti_images(a: argparse.Namespace) -> dict[str, Path]:
    """Contrast → image from --t1w/--t2w/--flair and the positional names; a contrast given
    twice, or a positional name without a contrast suffix, is an InputError."""
    from ..errors import InputError
    from ..model.nifti_inputs import contrast_of_name

    found: dict[str, list[Path]] = {c: list(getattr(a, c.lower()) or []) for c in
                                    CONTRAST_CHOICES}
    for path in a.images:
        c = contrast_of_name(path)
        if c is None:
            raise InputError("cannot tell the contrast from the name (expected *_T1w, *_T2w or "
                             "*_FLAIR .nii/.nii.gz): give it with --t1w/--t2w/--flair",
                             path=path)
        found[c].append(path)
    for c, paths in found.items():
        if len(paths) > 1:
            raise InputError(f"contrast {c} given twice ({', '.join(p.name for p in paths)})")
    return {c: paths[0] for c, paths in found.items() if paths}


def _nifti_protocol(a: argparse.Namespace, images: dict[str, Path], row_ids: list[str]
                    ) -> tuple[dict, Path | None]:
    from ..model.nifti_inputs import read_protocol_file

    fields = read_protocol_file(a.protocol, row_ids) if a.protocol is not None else {}
    for c in CONTRAST_CHOICES:
        for key, field, _text in _PROTOCOL_FIELDS:
            v = getattr(a, f"{c.lower()}_{key.replace('-', '_')}")
            if v is not None:
                entry = fields.setdefault(c, {})
                if "sequence" in entry or "tr_ms" in entry:  # qmriflow JSON: back to fields
                    entry = fields[c] = {"seq_type": entry.get("sequence_label") or
                                         entry.get("sequence"), "TR": entry.get("tr_ms"),
                                         "TE": entry.get("te_ms"), "TI": entry.get("ti_ms"),
                                         "FA": entry.get("fa_deg")}
                entry[field] = v
    return fields, a.protocol


@command("infer-nifti", "T1/T2/PD maps from plain NIfTIs, masks and a protocol CSV/JSON "
                        "(the published code's inputs)")
@arguments(_infer_nifti_args)
def _infer_nifti(a: argparse.Namespace) -> int:
    import shutil
    import tempfile

    from ..archive.ingest import session_label
    from ..errors import InputError
    from ..model.infer import infer_session
    from ..model.nifti_inputs import label_from_names, stage_session

    if a.checkpoint is None and a.estimator != "network-free":
        a.infer_parser.error("the following arguments are required: --checkpoint")
    images = _nifti_images(a)
    if not images:
        raise InputError("no input image: give NIfTIs named *_T1w/*_T2w/*_FLAIR or "
                         "--t1w/--t2w/--flair")
    subject, session, how = label_from_names(images, a.subject, a.session)
    label = session_label(subject, session)
    contrasts = (_contrasts(a.contrasts) if a.contrasts else
                 tuple(c for c in CONTRAST_CHOICES if c in images))
    missing = [c for c in contrasts if c not in images]
    if missing:
        raise InputError(f"--contrasts names {', '.join(missing)} but no such image was given")
    stem_ids = sorted({p.name.split("_T")[0].split("_FLAIR")[0] for p in images.values()})
    row_ids = [x for x in ([a.protocol_id] if a.protocol_id else
                           [subject, f"sub-{subject}", *stem_ids]) if x]
    fields, source = _nifti_protocol(a, images, row_ids)
    tissue = {t.upper(): getattr(a, t) for t in ("wm", "gm", "csf") if getattr(a, t)}
    if how != "given":
        print(f"{label}: subject/session {how} (give --subject/--session to choose)")
    with tempfile.TemporaryDirectory(prefix="qmriflow_infer_nifti_") as work:
        files = _with_session(label, lambda: {"files": stage_session(
            images, a.brain_mask, work, subject=subject, session=session, protocol=fields,
            protocol_source=source, dseg=a.dseg, tissue_masks=tissue or None)})["files"]
        info = _with_session(label, lambda: infer_session(
            None, a.checkpoint, a.out_dir, subject=subject, session=session, files=files,
            **_infer_kwargs(a, contrasts)))
        # the protocol (and the dseg built from the masks) the maps were made with, beside
        # them: the sidecars name these files
        for p in (files.params, *([files.dseg] if tissue else [])):
            shutil.copy2(p, Path(a.out_dir) / p.name)
            if p.suffix == ".gz" and p.with_name(p.name[:-7] + ".json").is_file():
                j = p.with_name(p.name[:-7] + ".json")
                shutil.copy2(j, Path(a.out_dir) / j.name)
    _provenance(a, "infer-nifti", info)
    _report(label, a, contrasts, info)
    return 0


# ---------------------------------------------------------------------------------------------
# search (optional: needs optuna)
# ---------------------------------------------------------------------------------------------


def _search_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("pack_dir", type=Path)
    p.add_argument("out_dir", type=Path)
    p.add_argument("--trials", type=int, default=20)
    p.add_argument("--epochs", type=int, default=5, help="epochs per trial")
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--steps-per-epoch", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=positive_int, default=None)


@command("search", "Optuna search over the seed's hyper-parameter space (Table B.1; optional)")
@arguments(_search_args)
def _search(a: argparse.Namespace) -> int:
    from ..model.search import run_search

    res = run_search(a.pack_dir, a.out_dir, trials=a.trials, epochs=a.epochs, width=a.width,
                     steps_per_epoch=a.steps_per_epoch, seed=a.seed, device=a.device,
                     threads=a.threads)
    print(f"best trial {res['best_trial']}: validation L1 {res['best_value']:.5f} with "
          f"{res['best_params']}")
    return 0
