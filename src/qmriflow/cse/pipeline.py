"""One series → PDFF, R2*, S0 maps: mask, σ, dual networks / single network / two-start fit.

Output files (``<prefix>`` = the series' name without echo entities, ``<m>`` = the method):

========================================  =====================================================
``<prefix>_desc-<m>_PDFFmap.nii.gz``      proton density fat fraction, 0–1 (no BIDS suffix
                                          exists for PDFF; named like the BIDS qMRI maps)
``<prefix>_desc-<m>percent_PDFFmap``      the same in percent
``<prefix>_desc-<m>_R2starmap.nii.gz``    R2*, 1/s (BIDS ``R2starmap``)
``<prefix>_desc-<m>_S0map.nii.gz``        S0, signal units (BIDS ``S0map``)
``<prefix>_desc-<m>_choice.nii.gz``       0 background, 1 water-dominant, 2 fat-dominant
                                          winner (dual: network; fit: start)
``<prefix>_desc-<m>_nll.nii.gz``          per-voxel Rician negative log-likelihood (sum over
                                          echoes, signal units)
``<prefix>_desc-<m>_mask.nii.gz``         the foreground mask that was trained and fitted
``<prefix>_desc-<m>_ambiguous.nii.gz``    1 where the likelihood cannot tell water from fat
                                          (the two candidates' NLLs differ by at most
                                          ``ambiguity_nats``); dual and fit only
========================================  =====================================================

The summary ``<prefix>_desc-<m>_cse.json`` holds ``AmbiguousVoxels``/``AmbiguousFraction``
and the readout (``ReadoutPolarity``, ``EvenEchoGain`` and how they were decided).

All in the input's grid and affine (float32; the mask and choice uint8), each with a JSON
sidecar stating units, σ and how it was estimated, method and (networks) the training-curve
summary. Every file is written atomically.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputError
from ..io import save_nifti, write_json
from .bipolar import AUTO_MIN_DEVIATION, READOUTS, estimate_even_echo_gain, readout_from_metadata
from .fit import FitOptions, fit_two_start, granted_threads
from .networks import TrainOptions, predict, train_networks
from .noise import estimate_sigma, foreground_mask
from .series import MultiEchoSeries

__all__ = ["METHODS", "CseOptions", "CseResult", "choose_candidates", "despeckle_choice",
           "run_cse", "write_outputs"]

METHODS = ("dual", "single", "fit")


@dataclass
class CseOptions:
    """Settings of :func:`run_cse`.

    ``sigma``: noise SD in signal units (None: estimated). ``mask_threshold``: fraction of the
    first echo's 99th percentile. ``smooth_choice``: 0 (off) or an odd in-plane size k: the
    likelihood difference of the two candidates is averaged over the k×k in-mask neighbours
    before the per-voxel choice. ``tie_margin`` (nats): the fat-dominant candidate wins only
    if its NLL is lower by more than this, for the networks and the fit alike. Default (None):
    0.05 with 3 echoes, else 0 (chosen on the in-silico grids, see ``TIE_MARGIN_3ECHO``).
    With 3 echoes and 3 parameters both sides usually interpolate the data exactly (a third
    of the voxels of ISMRM case 17 tie to < 0.01 nats): the likelihood holds no information
    on the side there, and the tie is resolved towards the water-dominant solution
    identically for every method, instead of by the rounding noise of each; such voxels are
    flagged in the ambiguity mask — the choice there is a convention, not a measurement.
    ``ambiguity_nats``: voxels whose two candidates' NLLs differ by at most this are flagged
    ambiguous (None: 0.1 with 3 echoes, else 2; see ``AMBIGUITY_NATS``).
    ``readout``: ``auto`` (the sidecar decides, else the odd/even factor is estimated and
    kept only if it is significant and ≥ 2 % from 1), ``bipolar`` (always estimated) or
    ``monopolar`` (factor 1). ``even_echo_gain``: a given factor (skips the estimate).
    ``threads``: CPU threads granted (0: all this process may use; capped at those).
    ``despeckle``: after the choice, a voxel on the other side from all of its in-plane
    neighbours takes theirs (:func:`despeckle_choice`; dual and fit). On the demo's vial
    phantom it removes every isolated swap inside the vials (the salt-and-pepper of
    issue 25).
    """

    method: str = "dual"
    sigma: float | None = None
    mask_threshold: float = 0.1
    smooth_choice: int = 0
    tie_margin: float | None = None
    ambiguity_nats: float | None = None
    readout: str = "auto"
    even_echo_gain: float | None = None
    despeckle: bool = True
    train: TrainOptions = field(default_factory=TrainOptions)
    fit: FitOptions = field(default_factory=FitOptions)
    threads: int = 0
    device: str = "cpu"

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.smooth_choice < 0 or (self.smooth_choice and self.smooth_choice % 2 == 0):
            raise ValueError("smooth_choice must be 0 or an odd size")
        if self.readout not in READOUTS:
            raise ValueError(f"readout must be one of {READOUTS}, got {self.readout!r}")

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class CseResult:
    """Maps as volumes (x, y, z) plus what the sidecars report."""

    pdff: np.ndarray
    r2star_per_s: np.ndarray
    s0: np.ndarray
    choice: np.ndarray
    nll: np.ndarray
    mask: np.ndarray
    ambiguous: np.ndarray | None
    sigma: float
    sigma_info: dict[str, Any]
    method: str
    info: dict[str, Any]
    seconds: dict[str, float]


def choose_candidates(nll_water: np.ndarray, nll_fat: np.ndarray, mask: np.ndarray,
                      smooth: int = 0, margin: float = 0.0) -> np.ndarray:
    """Per-voxel winner of the likelihood comparison: True where the fat candidate wins.

    ``nll_*``: (N,) over the voxels of ``mask`` (in mask order). ``smooth`` > 1: the
    difference is averaged over the ``smooth``×``smooth`` in-plane in-mask neighbourhood first.
    The fat candidate must win by more than ``margin`` nats.
    """
    d = np.asarray(nll_water, np.float64) - np.asarray(nll_fat, np.float64)
    if smooth and smooth > 1:
        from scipy import ndimage

        vol = np.zeros(mask.shape, np.float64)
        vol[mask] = d
        w = mask.astype(np.float64)
        size = (smooth, smooth, 1)
        num = ndimage.uniform_filter(vol, size=size, mode="constant")
        den = ndimage.uniform_filter(w, size=size, mode="constant")
        d = (num / np.maximum(den, 1e-12))[mask]
    return d > margin


def despeckle_choice(fat: np.ndarray, mask: np.ndarray, rounds: int = 3) -> np.ndarray:
    """Flip voxels whose water/fat choice differs from every in-mask in-plane 8-neighbour.

    ``fat``: (N,) choice over the voxels of ``mask`` (in mask order). A single voxel on the
    other side from all of its neighbours is, in a PDFF map, a degeneracy swap (the two
    candidates' likelihoods are close wherever they swap) far more often than anatomy; it
    takes its neighbours' side. Voxels with no in-mask neighbour are left alone; repeated
    ``rounds`` times (a flip can isolate another voxel). Returns the new (N,) choice.
    """
    from scipy import ndimage

    vol = np.zeros(mask.shape, bool)
    vol[mask] = fat
    k = np.ones((3, 3, 1))
    k[1, 1, 0] = 0
    nm = ndimage.convolve(mask.astype(np.int32), k.astype(np.int32), mode="constant")
    for _ in range(rounds):
        nf = ndimage.convolve((vol & mask).astype(np.int32), k.astype(np.int32), mode="constant")
        iso = mask & (nm > 0) & ((vol & (nf == 0)) | (~vol & (nf == nm)))
        if not iso.any():
            break
        vol = np.where(iso, ~vol, vol)
    return vol[mask]


def run_cse(series: MultiEchoSeries, options: CseOptions | None = None,
            mask: np.ndarray | None = None) -> CseResult:
    """Estimate PDFF, R2*, S0 of one series with ``options.method`` (dual | single | fit)."""
    opts = options or CseOptions()
    data = series.data
    src = series.sources[0] if series.sources else None
    t0 = time.perf_counter()
    if mask is None:
        mask = foreground_mask(data, opts.mask_threshold)
    mask = np.asarray(mask, bool)
    if mask.shape != data.shape[:3]:
        raise InputError(f"mask shape {mask.shape} does not match the image {data.shape[:3]}",
                         path=src)
    if mask.sum() < 50:
        raise InputError(f"only {int(mask.sum())} foreground voxels (mask threshold "
                         f"{opts.mask_threshold}): nothing to fit", path=src)
    if opts.sigma is not None:
        if not opts.sigma > 0:
            raise InputError(f"sigma must be > 0, got {opts.sigma}", path=src)
        sigma, sigma_info = float(opts.sigma), {"method": "given",
                                                "description": "given by the user"}
    else:
        sigma, sigma_info = estimate_sigma(data, mask, series.te_ms, series.field_t, path=src)
    t_prep = time.perf_counter() - t0
    vox = np.asarray(data[mask], dtype=np.float32)
    te, b0 = series.te_ms, series.field_t
    margin = opts.tie_margin if opts.tie_margin is not None else default_tie_margin(series.n_echo)
    amb_nats = opts.ambiguity_nats if opts.ambiguity_nats is not None else \
        default_ambiguity_nats(series.n_echo)
    threads = granted_threads(opts.threads) if opts.device == "cpu" else 1
    info: dict[str, Any] = {"tie_margin": margin, "ambiguity_nats": amb_nats,
                            "threads": threads}
    seconds = {"preparation": t_prep}
    fo = FitOptions(**{**opts.fit.as_dict(), "device": opts.device,
                       "threads": opts.fit.threads or opts.threads})
    t1 = time.perf_counter()
    gain, info["readout"] = decide_readout(series, opts, vox, sigma, fo, path=src)
    seconds["readout"] = time.perf_counter() - t1
    ambiguous = None
    if opts.method == "fit":
        res = fit_two_start(vox, te, b0, sigma, options=fo, even_echo_gain=gain)
        fat0 = choose_candidates(res.nll_water, res.nll_fat, mask, opts.smooth_choice, margin)
        fat = despeckle_choice(fat0, mask) if opts.despeckle else fat0
        ambiguous = np.abs(res.nll_water - res.nll_fat) <= amb_nats
        best = np.where(fat[:, None], res.params_fat, res.params_water)
        res.s0, res.pdff, res.r2star_per_s = best[:, 0], best[:, 1], best[:, 2]
        res.nll = np.where(fat, res.nll_fat, res.nll_water)
        s0, pd, r2, nll = res.s0, res.pdff, res.r2star_per_s, res.nll
        seconds["fit"] = res.seconds
        info["fit"] = {"options": fo.as_dict(), "voxels_per_s": res.voxels_per_s,
                       "mean_iterations": res.mean_iterations, "threads": res.threads,
                       "description": "two-start (water PDFF in [0, b], fat in [b, 1]) "
                                      "box-constrained Levenberg-Marquardt on the Rician NLL"}
        info["choice"] = {"smooth": opts.smooth_choice, "despeckle": opts.despeckle,
                          "despeckled_voxels": int((fat != fat0).sum()),
                          "fat_fraction_of_voxels": float(np.mean(fat))}
    else:
        kinds = ("water", "fat") if opts.method == "dual" else ("single",)
        to = TrainOptions(**{**opts.train.as_dict(), "device": opts.device})
        nets, report = train_networks(vox, te, b0, sigma, kinds, options=to,
                                      even_echo_gain=gain)
        pred = predict(nets, vox, te, b0, sigma, threads=threads, even_echo_gain=gain)
        seconds["training"] = report.seconds
        seconds["inference"] = pred.seconds
        info["training"] = report.as_dict(curve=False)
        info["training"]["val_curve_every_10_epochs"] = {
            k: v[::10] for k, v in report.val_curve.items()}
        info["inference_voxels_per_s"] = vox.shape[0] / max(pred.seconds, 1e-12)
        if opts.method == "dual":
            w, f = pred.get("water"), pred.get("fat")
            fat0 = choose_candidates(w["nll"], f["nll"], mask, opts.smooth_choice, margin)
            fat = despeckle_choice(fat0, mask) if opts.despeckle else fat0
            ambiguous = np.abs(w["nll"] - f["nll"]) <= amb_nats
            s0 = np.where(fat, f["s0"], w["s0"])
            pd = np.where(fat, f["pdff"], w["pdff"])
            r2 = np.where(fat, f["r2star_per_s"], w["r2star_per_s"])
            nll = np.where(fat, f["nll"], w["nll"])
            info["choice"] = {"smooth": opts.smooth_choice, "despeckle": opts.despeckle,
                              "despeckled_voxels": int((fat != fat0).sum()),
                              "fat_fraction_of_voxels": float(np.mean(fat))}
        else:
            g = pred.get("single")
            s0, pd, r2, nll = g["s0"], g["pdff"], g["r2star_per_s"], g["nll"]
            fat = pd >= opts.train.boundary
    vol = lambda v, dt=np.float32: _to_volume(v, mask, dt)  # noqa: E731
    choice = np.where(fat, 2, 1).astype(np.uint8)
    if ambiguous is not None:
        info["ambiguous_voxels"] = int(ambiguous.sum())
    seconds["total"] = time.perf_counter() - t0
    return CseResult(pdff=vol(pd), r2star_per_s=vol(r2), s0=vol(s0), choice=vol(choice, np.uint8),
                     nll=vol(nll), mask=mask,
                     ambiguous=None if ambiguous is None else vol(ambiguous, np.uint8),
                     sigma=sigma, sigma_info=sigma_info, method=opts.method, info=info,
                     seconds=seconds)


#: Tie margin and ambiguity threshold (nats), chosen by :func:`.evaluate.tie_rule_study`
#: (bench/bench_cse_eval.py --tie-rules; tuned on seed 1, reported on seed 2; results in
#: bench/results/cse_3echo.json). 3 echoes (ISMRM case 17 protocol, 1.5 T, grid PDFF 0-1 x
#: R2* 0-500 1/s, SNR 60): 69 % of the voxels tie within 0.01 nats; the swap rate is 0.394
#: with margin 0.05 against 0.407 for the plain choice (margin 0: float rounding decides the
#: ties) and 0.416 for the former 0.5; |dNLL| <= 0.1 covers 93 % of the swaps (85 % of the
#: grid is flagged: that protocol cannot tell water from fat over most of the grid).
#: 6 echoes (seed protocol): the plain choice is best (margin 0); covering 90 % of the swaps
#: needs 2 nats (39 % of the grid, mostly R2* > 250 1/s).
TIE_MARGIN_3ECHO = 0.05
AMBIGUITY_NATS_3ECHO = 0.1
AMBIGUITY_NATS = 2.0


def default_tie_margin(n_echo: int) -> float:
    """Nats by which the fat-dominant candidate must win (3 echoes: see the constants)."""
    return TIE_MARGIN_3ECHO if n_echo <= 3 else 0.0


def default_ambiguity_nats(n_echo: int) -> float:
    """NLL difference (nats) at or below which a voxel's water/fat side is flagged ambiguous."""
    return AMBIGUITY_NATS_3ECHO if n_echo <= 3 else AMBIGUITY_NATS


def decide_readout(series: MultiEchoSeries, opts: CseOptions, vox: np.ndarray, sigma: float,
                   fit_options: FitOptions, path: Any = None) -> tuple[float, dict[str, Any]]:
    """Even-echo amplitude factor of the series and a record of how it was decided."""
    meta_pol, meta_src = readout_from_metadata(series.metadata)
    if opts.even_echo_gain is not None:
        g = float(opts.even_echo_gain)
        if not 0.2 <= g <= 5.0:
            raise InputError(f"even-echo gain {g} is implausible (expected near 1)", path=path)
        return g, {"ReadoutPolarity": "bipolar" if g != 1.0 else "monopolar",
                   "EvenEchoGain": g, "source": "given (--even-echo-gain)"}
    if opts.readout != "auto":
        pol, src = opts.readout, f"given (--readout {opts.readout} / cse.readout)"
    elif meta_pol is not None:
        pol, src = meta_pol, meta_src
    else:
        pol, src = None, meta_src
    if pol == "monopolar":
        return 1.0, {"ReadoutPolarity": "monopolar", "EvenEchoGain": 1.0, "source": src}
    if series.n_echo < 4:
        return 1.0, {"ReadoutPolarity": pol or "unknown", "EvenEchoGain": 1.0, "source": src,
                     "note": "fewer than 4 echoes: an odd/even factor is not identifiable "
                             "beside S0, PDFF and R2*; not modelled"}
    if pol is None:  # auto, nothing in the sidecar: a one-fit score screen first
        scr = estimate_even_echo_gain(vox, series.te_ms, series.field_t, sigma,
                                      options=fit_options, max_voxels=5000, screen=True)
        if not (scr["significant"] and abs(scr["gain"] - 1.0) >= AUTO_MIN_DEVIATION / 2):
            return 1.0, {"ReadoutPolarity": "monopolar (assumed)", "EvenEchoGain": 1.0,
                         "source": src, "screen": scr,
                         "rule": "auto: score test at gain 1 on 5000 voxels not significant "
                                 f"(p >= 0.001) or one-step gain within "
                                 f"{AUTO_MIN_DEVIATION / 2} of 1"}
    est = estimate_even_echo_gain(vox, series.te_ms, series.field_t, sigma,
                                  options=fit_options)
    out = {"source": src, "estimate": est,
           "method": "profile maximum likelihood over the brighter half of the foreground "
                     "(two-start fit per factor, secant iterations)"}
    if pol == "bipolar":
        return est["gain"], {"ReadoutPolarity": "bipolar", "EvenEchoGain": est["gain"], **out}
    keep = est["significant"] and abs(est["gain"] - 1.0) >= AUTO_MIN_DEVIATION
    g = est["gain"] if keep else 1.0
    return g, {"ReadoutPolarity": "bipolar (estimated)" if keep else "monopolar (assumed)",
               "EvenEchoGain": g, **out,
               "rule": f"auto: kept if the likelihood-ratio test is significant (p < 0.001) and "
                       f"|gain - 1| >= {AUTO_MIN_DEVIATION}"}


def _to_volume(v: np.ndarray, mask: np.ndarray, dtype: Any) -> np.ndarray:
    out = np.zeros(mask.shape, dtype=dtype)
    out[mask] = np.asarray(v).astype(dtype)
    return out


def write_outputs(result: CseResult, series: MultiEchoSeries, out_dir: str | Path,
                  prefix: str | None = None, *,
                  extra: dict[str, Any] | None = None) -> dict[str, Path]:
    """Write the maps of :func:`run_cse` as NIfTI + JSON sidecars into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pre = prefix or series.prefix
    m = result.method
    common = {
        "Method": {"dual": "self-supervised dual network (water/fat constrained, likelihood "
                           "choice), seed 004",
                   "single": "self-supervised single network (PDFF in [0, 1], naive)",
                   "fit": "two-start voxel-wise Rician maximum-likelihood fit"}[m],
        "MethodName": m,
        "Sources": [Path(s).name for s in series.sources],
        "EchoTime": [float(t) / 1000.0 for t in series.te_ms],
        "MagneticFieldStrength": series.field_t,
        "NoiseSigma": result.sigma,
        "NoiseSigmaUnits": "signal units (SD of the complex Gaussian noise)",
        "NoiseSigmaEstimation": result.sigma_info,
        "SignalModel": "S(t_n) = g_n S0 |(1 - PDFF) + PDFF sum_k a_k exp(i 2 pi f_k t_n)| "
                       "exp(-R2* t_n), 6-peak fat spectrum (qmriflow.physics.FatSpectrum); "
                       "g_n = 1 on odd echoes, EvenEchoGain on even echoes",
        "ReadoutPolarity": ((result.info or {}).get("readout") or {}).get("ReadoutPolarity"),
        "EvenEchoGain": ((result.info or {}).get("readout") or {}).get("EvenEchoGain", 1.0),
        "MaskVoxels": int(result.mask.sum()),
        "Seconds": result.seconds,
        **({"Details": result.info} if result.info else {}),
        **(extra or {}),
    }
    maps = {
        "PDFFmap": (f"{pre}_desc-{m}_PDFFmap.nii.gz", result.pdff, np.float32,
                    {"Units": "fraction (0-1)", "Description": "proton density fat fraction"}),
        "PDFFpercent": (f"{pre}_desc-{m}percent_PDFFmap.nii.gz", result.pdff * 100.0,
                        np.float32, {"Units": "percent", "Description":
                                     "proton density fat fraction in percent"}),
        "R2starmap": (f"{pre}_desc-{m}_R2starmap.nii.gz", result.r2star_per_s, np.float32,
                      {"Units": "1/s", "Description": "R2* relaxation rate"}),
        "S0map": (f"{pre}_desc-{m}_S0map.nii.gz", result.s0, np.float32,
                  {"Units": "arbitrary (signal units of the input)",
                   "Description": "signal at t = 0 (water + fat)"}),
        "choice": (f"{pre}_desc-{m}_choice.nii.gz", result.choice, np.uint8,
                   {"Units": "label", "Levels": {"0": "background", "1": "water-dominant",
                                                  "2": "fat-dominant"},
                    "Description": "winning candidate"}),
        "nll": (f"{pre}_desc-{m}_nll.nii.gz", result.nll, np.float32,
                {"Units": "nats (signal units)", "Description":
                 "Rician negative log-likelihood, summed over echoes"}),
        "mask": (f"{pre}_desc-{m}_mask.nii.gz", result.mask.astype(np.uint8), np.uint8,
                 {"Units": "label", "Description": "foreground mask (first echo threshold, "
                                                   "holes filled)"}),
    }
    amb_n = None
    if result.ambiguous is not None:
        amb_n = int(result.ambiguous[result.mask].sum())
        nats = (result.info or {}).get("ambiguity_nats")
        maps["ambiguous"] = (
            f"{pre}_desc-{m}_ambiguous.nii.gz", result.ambiguous, np.uint8,
            {"Units": "label", "Levels": {"0": "decided (or background)",
                                          "1": "ambiguous: the likelihood cannot tell water "
                                               "from fat"},
             "Description": "voxels whose water- and fat-dominant candidates' Rician NLLs "
                            f"differ by at most {nats} nats",
             "AmbiguousVoxels": amb_n})
    paths: dict[str, Path] = {}
    for key, (name, arr, dt, side) in maps.items():
        paths[key] = save_nifti(out / name, arr, series.affine, {**side, **common}, dtype=dt)
    summary = {
        "method": m, "outputs": {k: p.name for k, p in paths.items()},
        "sigma": result.sigma, "sigma_estimation": result.sigma_info,
        "seconds": result.seconds,
        "pdff_median_in_mask": float(np.median(result.pdff[result.mask])),
        "r2star_median_in_mask": float(np.median(result.r2star_per_s[result.mask])),
        "AmbiguousVoxels": amb_n,
        "AmbiguousFraction": None if amb_n is None else amb_n / max(int(result.mask.sum()), 1),
        "Readout": (result.info or {}).get("readout"),
    }
    paths["summary"] = write_json(out / f"{pre}_desc-{m}_cse.json", summary)
    return paths
