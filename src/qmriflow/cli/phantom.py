"""``qmriflow phantom`` and ``qmriflow synth``: the digital phantom and synthetic images.

Registered with ``@command``; imported lazily by :func:`qmriflow.cli.build_parser`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from . import (
    arguments,
    command,
    positive_int,
)

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
    from ..phantom.generate import PhantomOptions, generate_archive

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
    from ..synth import synthesise_files

    synthesise_files(a.t1, a.t2, a.pd, sequence=a.sequence, tr_ms=a.tr, te_ms=a.te,
                     ti_ms=a.ti, fa_deg=a.fa, te_correction=a.te_correction, out=a.out)
    print(f"wrote {a.out}")
    return 0
