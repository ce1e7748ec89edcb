"""CLI glue of the fat/water branch: ``qmriflow cse-fit`` and ``qmriflow cse-eval``.

No science here: argument parsing, option objects, calls into :mod:`qmriflow.cse`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from . import _provenance, _with_session, arguments, command, count_or_auto

__all__: list[str] = []


def _optional_session_args(p: argparse.ArgumentParser) -> None:
    # as cli._session_args, but optional: the branch also runs standalone
    p.add_argument("--subject", help="subject pseudonym (without sub-)")
    p.add_argument("--session", help="session pseudonym (without ses-)")
    p.add_argument("--failures", type=Path, help="folder for this run's failure records")
    p.add_argument("--provenance", type=Path, help="write this step's provenance JSON here")


def _fit_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("input", type=Path, help="4D NIfTI with sidecar, a folder of per-echo NIfTIs, "
                                            "or one echo file of a set")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--method", choices=["dual", "single", "fit"], default="dual")
    p.add_argument("--prefix", help="output name prefix (default: the input's name)")
    p.add_argument("--sigma", type=float, help="noise SD in signal units (default: estimated)")
    p.add_argument("--field-strength", type=float, help="tesla (default: from the sidecar)")
    p.add_argument("--mask-threshold", type=float, default=0.1,
                   help="foreground: first echo above this fraction of its 99th percentile")
    p.add_argument("--smooth-choice", type=int, default=0,
                   help="average the likelihood difference over k x k in-plane neighbours "
                        "before choosing (odd k; 0 = off)")
    p.add_argument("--no-despeckle", action="store_true",
                   help="keep single voxels whose water/fat choice differs from all their "
                        "neighbours (default: they take their neighbours' side)")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-epochs", type=int, default=500)
    p.add_argument("--threads", type=count_or_auto, default=0,
                   help="CPU threads granted (0 = all available; never more than the cores "
                        "this process may use)")
    p.add_argument("--readout", choices=["auto", "bipolar", "monopolar"], default="auto",
                   help="readout polarity: bipolar = estimate and model an odd/even echo "
                        "amplitude factor; auto = from the sidecar (ReadoutPolarity, Siemens "
                        "ucReadOutMode), else estimated and kept only if significant")
    _optional_session_args(p)


def _device(name: str) -> str:
    if name != "auto":
        return name
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


@command("cse-fit", "PDFF, R2* and S0 maps of one multi-echo GRE magnitude series "
                    "(self-supervised dual network, single network or two-start fit)")
@arguments(_fit_args)
def _cse_fit(a: argparse.Namespace) -> int:
    from ..cse import CseOptions, FitOptions, TrainOptions, load_series, run_cse, write_outputs

    label = f"sub-{a.subject}_ses-{a.session}" if a.subject and a.session else None
    dev = _device(a.device)

    def work() -> dict:
        import torch

        from ..cse.fit import granted_threads

        # the process never runs more threads than granted (stray ops included)
        torch.set_num_threads(granted_threads(a.threads))
        series = load_series(a.input, field_t=a.field_strength)
        opts = CseOptions(
            method=a.method, sigma=a.sigma, mask_threshold=a.mask_threshold,
            smooth_choice=a.smooth_choice, device=dev, threads=a.threads, readout=a.readout,
            despeckle=not a.no_despeckle,
            train=TrainOptions(seed=a.seed, max_epochs=a.max_epochs, device=dev),
            fit=FitOptions(device=dev, threads=a.threads))
        result = run_cse(series, opts)
        prefix = a.prefix or (f"{label}_{series.prefix}" if label and
                              not series.prefix.startswith(f"sub-{a.subject}")
                              else series.prefix)
        paths = write_outputs(result, series, a.out, prefix)
        return {"input": str(a.input), "method": a.method, "device": dev,
                "sigma": result.sigma, "sigma_estimation": result.sigma_info["method"],
                "seconds": result.seconds, "outputs": [p.name for p in paths.values()]}

    info = _with_session(label, work) if label else work()
    _provenance(a, "cse-fit", info)
    print(f"{label or a.input}: {a.method} PDFF/R2*/S0 maps in {a.out} "
          f"({info['seconds']['total']:.1f} s, sigma {info['sigma']:.4g} "
          f"from {info['sigma_estimation']})")
    return 0


def _eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", type=Path, required=True, help="folder for the JSON and figures")
    p.add_argument("--reps", type=int, default=100, help="noise realisations per grid point")
    p.add_argument("--n-pdff", type=int, default=100)
    p.add_argument("--n-r2star", type=int, default=50)
    p.add_argument("--snr", type=float, default=60.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-epochs", type=int, default=500)
    p.add_argument("--ismrm", type=Path, help="folder of ISMRM 2012 challenge .mat cases")


@command("cse-eval", "in-silico evaluation of the fat/water methods (seed 004 figure 4) and, "
                     "optionally, agreement on the ISMRM 2012 challenge cases")
@arguments(_eval_args)
def _cse_eval(a: argparse.Namespace) -> int:
    from ..cse.report import run_evaluation

    summary = run_evaluation(a.out, reps=a.reps, n_pdff=a.n_pdff, n_r2star=a.n_r2star,
                             snr=a.snr, seed=a.seed, max_epochs=a.max_epochs,
                             ismrm_dir=a.ismrm)
    print(summary["table"])
    return 0
