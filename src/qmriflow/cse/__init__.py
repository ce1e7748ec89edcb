"""Fat/water branch (seed 004): PDFF, R2* and S0 from multi-echo GRE magnitude series.

* :mod:`.series` — load and validate a series (4D NIfTI + sidecar, or per-echo NIfTIs);
* :mod:`.noise` — foreground mask and noise σ (background, Rician corrected);
* :mod:`.networks` — self-supervised voxel MLPs (water/fat constrained, naive single);
* :mod:`.fit` — vectorised two-start Rician maximum-likelihood fit (torch, CPU/GPU);
* :mod:`.pipeline` — one series to maps and NIfTI outputs;
* :mod:`.evaluate` — the seed's in-silico experiment and the ISMRM 2012 cases.

The signal model and likelihood come from :mod:`qmriflow.physics` only.
"""

from __future__ import annotations

from .fit import FitOptions, FitResult, fit_two_start, grid_search, voxel_nll
from .networks import NetworkSet, TrainOptions, predict, train_networks
from .noise import estimate_sigma, foreground_mask
from .pipeline import METHODS, CseOptions, CseResult, choose_candidates, run_cse, write_outputs
from .series import MIN_ECHOES, MultiEchoSeries, load_series, validate_echo_times

__all__ = [
    "METHODS",
    "MIN_ECHOES",
    "CseOptions",
    "CseResult",
    "FitOptions",
    "FitResult",
    "MultiEchoSeries",
    "NetworkSet",
    "TrainOptions",
    "choose_candidates",
    "estimate_sigma",
    "fit_two_start",
    "foreground_mask",
    "grid_search",
    "load_series",
    "predict",
    "run_cse",
    "train_networks",
    "validate_echo_times",
    "voxel_nll",
    "write_outputs",
]
