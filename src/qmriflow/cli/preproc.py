"""``qmriflow register | n4 | skullstrip | segment``: preprocessing per session.

Registered with ``@command``; imported lazily by :func:`qmriflow.cli.build_parser`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from . import (
    _provenance,
    _session_args,
    _with_session,
    arguments,
    command,
    positive_int,
)


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
    from ..archive.ingest import session_label
    from ..preproc.register import register_session

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
    from ..archive.ingest import session_label
    from ..preproc.n4 import n4_session

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
    from ..archive.ingest import session_label
    from ..preproc.skullstrip import skull_strip

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

    from ..archive.ingest import session_label
    from ..io import save_nifti
    from ..preproc.segment import erode_near_csf, segment

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
