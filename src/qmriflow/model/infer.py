"""Inference of one session: T1/T2/PD maps, re-synthesised images and difference maps.

Outputs (BIDS derivatives, in the session's preprocessed space, with its affine)::

    sub-X_ses-Y_space-T2w_T1map.nii.gz    T1 in seconds   (+ .json sidecar)
    sub-X_ses-Y_space-T2w_T2map.nii.gz    T2 in seconds
    sub-X_ses-Y_space-T2w_PDmap.nii.gz    PD, arbitrary units (water = 1)
    sub-X_ses-Y_space-T2w_desc-synth_{T1w,T2w,FLAIR}.nii.gz       re-synthesised (input units)
    sub-X_ses-Y_space-T2w_desc-synthdiff_{T1w,T2w,FLAIR}.nii.gz   100·(synth − input)/input, %
    sub-X_ses-Y_space-T2w_desc-refinestatus_dseg.nii.gz   per-voxel status of the data
                                                          consistency (calibrated scaling)

With ``scaling: seed`` the network sees exactly what the published inference feeds it
(:mod:`qmriflow.model.published`: closest-canonical orientation, centre crop/pad to 224 × 224,
the published mode normalisation, inputs times the brain mask) and the maps come back onto
the input grid with its affine; published weights load as distributed (a plain state dict,
``latest_net_G.pth``/``best_net_G.pth`` or the folder holding it).

With ``scaling: calibrated`` (:mod:`qmriflow.model.calibration`) the session's per-contrast
scales are calibrated from its own tissue medians (needs the session's ``_dseg``), the network's
maps are moved along the degenerate family until they re-synthesise the images with those
scales, then made consistent voxel by voxel with the input images under those scales (the
network's maps as a prior, :func:`~qmriflow.model.calibration.refine_maps`). With a contrast
withheld, the level along the direction the inputs leave open is then set per tissue from
the calibration (:func:`~qmriflow.model.calibration.anchor_free_directions`) and the maps are
made consistent again. Per-voxel standard deviations from the scales' posterior uncertainty
are written::

    sub-X_ses-Y_space-T2w_desc-uncertainty_{T1map,T2map,PDmap}.nii.gz   (units of the map)

Three estimators (``estimator=``, CLI ``--estimator``; recorded in every sidecar as
``Estimator``): ``refined`` (the default) is the above; ``network-only`` writes the network's
maps exactly as it outputs them (times the brain mask: no pinning, no data consistency, no
smoothing, no uncertainty maps); ``network-free`` runs no network: its starting maps are the
calibration's WM/GM/CSF values blended by smoothed dseg weights
(:func:`~qmriflow.model.calibration.tissue_value_maps`), followed by the same data
consistency, anchoring, smoothing and uncertainty maps as ``refined`` (needs calibrated
scaling; no checkpoint).

Maps are zero outside the brain mask (as the published implementation). Re-synthesis uses
:func:`qmriflow.physics.signal` with the session's protocol (TE correction included), the
bounded least-squares scale over the session's head (as in training) and the histogram mode,
so it is directly comparable with the preprocessed input (seed fig. D.1). Every sidecar names
the estimator, the checkpoint and its SHA-256 (null without a network), the input contrasts
used and the input files.

Long because it is the one code path of a session's inference (network, estimators, uncertainty,
sidecars), shared by ``infer``, ``infer-nifti`` and the workflow.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import __version__, physics
from ..errors import ConfigError, InputError
from ..io import save_nifti
from .calibration import (
    DEFAULT_ESTIMATOR,
    DEFAULT_MODEL_ERROR,
    DEFAULT_MODEL_ERROR_CLUSTER,
    DEFAULT_SMOOTHING,
    ESTIMATORS,
    METHODS,
    PARAMS,
    REFINE_STATUS,
    TISSUES,
    Smoothing,
    anchor_free_directions,
    pin_maps,
    refine_maps,
    scale_sensitivity,
    shift_to_tissues,
    smooth_maps,
    tissue_value_maps,
)
from .checkpoint import load_model
from .data import (
    ROLE,
    SessionFiles,
    load_session,
    scales_from_cluster,
    session_calibration,
    session_files,
    session_seg,
    session_tissue_voxels,
)
from .losses import mono_exponential
from .normalise import CONTRASTS
from .published import SeedInputs, seed_inputs
from .train import _cpu_has_bf16, resolve_device, resolve_precision

__all__ = ["ESTIMATORS", "PUBLISHED_CHECKPOINT_NAMES", "infer_session", "map_paths",
           "network_free_maps", "predict_maps", "resolve_checkpoint", "resynthesise"]

MAP_UNITS = {"T1map": "s", "T2map": "s", "PDmap": "arbitrary"}


def map_paths(out_dir: str | Path, label: str) -> dict[str, Path]:
    """Output paths of one session (keys: T1map, T2map, PDmap, sd_<map>, refine_status,
    synth_<c>, synthdiff_<c>)."""
    d = Path(out_dir)
    pre = f"{label}_space-T2w"
    paths = {m: d / f"{pre}_{m}.nii.gz" for m in MAP_UNITS}
    for m in MAP_UNITS:
        paths[f"sd_{m}"] = d / f"{pre}_desc-uncertainty_{m}.nii.gz"
    paths["refine_status"] = d / f"{pre}_desc-refinestatus_dseg.nii.gz"
    for c in CONTRASTS:
        paths[f"synth_{c}"] = d / f"{pre}_desc-synth_{c}.nii.gz"
        paths[f"synthdiff_{c}"] = d / f"{pre}_desc-synthdiff_{c}.nii.gz"
    return paths


def channels_last_pays(device: torch.device, precision: str) -> bool:
    """Channels-last memory layout where it is faster: on CUDA always; on the CPU only with bf16
    (oneDNN's bf16 convolutions: +12 % slices/s at width 64 on this 2-core EPYC, while fp32
    convolutions were 15 % slower channels-last; measured 2026-11-22)."""
    return device.type == "cuda" or precision == "bf16"


def predict_maps(model: torch.nn.Module, images: np.ndarray, *, device: torch.device,
                 precision: str = "fp32", batch_size: int = 4,
                 mask: np.ndarray | None = None,
                 progress: Any = None) -> np.ndarray:
    """Run the network slice-wise. ``images`` (S, N, H, W) normalised contrasts → (S, 3, H, W)
    float32 (PD, T1 s, T2 s), zero-padded to multiples of 8 and cropped back; multiplied by
    ``mask`` (S, H, W) if given. ``progress(done, total)`` is called after every batch."""
    s, _n, h, w = images.shape
    ph, pw = (-h) % 8, (-w) % 8
    out = np.empty((s, 3, h, w), dtype=np.float32)
    with torch.inference_mode():
        for i in range(0, s, batch_size):
            x = torch.from_numpy(np.ascontiguousarray(images[i:i + batch_size], np.float32))
            if ph or pw:
                x = torch.nn.functional.pad(x, (0, pw, 0, ph))
            x = x.to(device)
            if getattr(model, "channels_last", False):
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
                y = model(x)
            out[i:i + batch_size] = y.float()[..., :h, :w].cpu().numpy()
            if progress is not None:
                progress(min(i + batch_size, s), s)
    if mask is not None:
        out *= mask[:, None].astype(np.float32)
    return out


def signal_models(protocols: dict[str, physics.Protocol], contrasts: tuple[str, ...],
                  params_json: Path) -> dict[str, dict[str, Any]]:
    """Per contrast, the signal model the maps were fitted with (for the sidecars): ``epg``
    with its echo train and where the train came from, or ``te-factor`` with the factor."""
    try:
        entries = json.loads(Path(params_json).read_text())
    except (OSError, ValueError):
        entries = {}
    out: dict[str, dict[str, Any]] = {}
    for c in contrasts:
        p = protocols[c]
        entry = entries.get(ROLE[c]) if isinstance(entries, dict) else None
        rec: dict[str, Any] = {"model": p.signal_model}
        if p.echo_train is not None:
            rec["EchoTrain"] = p.echo_train.as_dict()
        elif p.sequence in ("tse", "flair"):
            rec["TECorrectionFactor"] = p.te_factor
        if isinstance(entry, dict) and entry.get("echo_train_source"):
            rec["Source"] = entry["echo_train_source"] if p.echo_train is not None else (
                "seed TE factor (scaling: seed is the published method)"
                if entry.get("echo_train") else entry["echo_train_source"])
        out[c] = rec
    return out


def _signal_of(maps: np.ndarray, protocol: physics.Protocol) -> np.ndarray:
    """``physics.signal`` of maps (S, 3, H, W), in float64."""
    return np.asarray(physics.signal(protocol, maps[:, 0].astype(np.float64),
                                     maps[:, 1].astype(np.float64),
                                     maps[:, 2].astype(np.float64)))


def resynthesise(maps: np.ndarray, protocol: physics.Protocol, normalised: np.ndarray,
                 head: np.ndarray, bound: float = 0.2,
                 scale: float | None = None) -> tuple[np.ndarray, float]:
    """Weighted image from maps (S, 3, H, W) in the normalised units of ``normalised`` (S, H, W):
    ``a · signal(protocol, PD, T1, T2)`` with the bounded LS scale ``a`` over the head (or the
    given ``scale``, e.g. a calibrated one). Returns the image and ``a / ref`` (the scale
    relative to the WM reference)."""
    synth = _signal_of(maps, protocol)
    ref = physics.wm_reference_scale(protocol)
    m = head & (normalised > 0)
    if scale is not None:
        a = float(scale)
    else:
        a = float(physics.ls_global_scale(synth, normalised.astype(np.float64),
                                          m.astype(np.float64), reference_scale=ref, bound=bound))
    return (a * synth).astype(np.float32), a / ref


PUBLISHED_CHECKPOINT_NAMES = ("latest_net_G.pth", "best_net_G.pth")
"""File names of the published weights (``<epoch>_net_G.pth`` in the model's folder, the
published test script loading ``latest``): a folder given as the checkpoint is searched for
these, then for a single ``*_net_G.pth``, then for qmriflow's ``model.pt``."""


def resolve_checkpoint(checkpoint: str | Path) -> Path:
    """The weights file of ``checkpoint``: the file itself, or in a folder (the published
    model folder or a qmriflow model folder) the file :data:`PUBLISHED_CHECKPOINT_NAMES`
    names, a single ``*_net_G.pth`` or ``model.pt``. A folder without one is an InputError
    (never random weights)."""
    p = Path(checkpoint)
    if not p.is_dir():
        return p
    for name in (*PUBLISHED_CHECKPOINT_NAMES, "model.pt"):
        if (p / name).is_file():
            return p / name
    found = sorted(p.glob("*_net_G.pth"))
    if len(found) == 1:
        return found[0]
    raise InputError("no model weights in this folder (expected latest_net_G.pth, "
                     "best_net_G.pth, one *_net_G.pth or model.pt)"
                     + (f"; {len(found)} *_net_G.pth files: name one" if found else ""),
                     path=p)


@dataclass(frozen=True)
class _Network:
    """A loaded network and where and how it runs."""

    model: Any
    meta: dict[str, Any]
    device: torch.device
    precision: str
    precision_choice: str = ""


def _precision_choice(requested: str, device: torch.device, chosen: str) -> str:
    """Why the network runs at ``chosen`` precision (for the log line and the sidecars)."""
    if requested != "auto":
        return f"{chosen} (requested)"
    if device.type == "cuda":
        return f"{chosen} (auto: CUDA)"
    return (f"{chosen} (auto: this CPU has native bf16)" if chosen == "bf16" and _cpu_has_bf16()
            else f"{chosen} (auto: no native bf16 on this CPU)")


def _load_network(checkpoint: str | Path | None, device: str, precision: str,
                  estimator: str) -> _Network:
    """The network of ``checkpoint`` on the resolved device, with the resolved precision."""
    if checkpoint is None:
        raise ConfigError(f"estimator {estimator!r} needs a model checkpoint (only "
                          "'network-free' runs without one)")
    dev = resolve_device(device)
    prec = resolve_precision(precision, dev, inference=True)
    model, meta = load_model(resolve_checkpoint(checkpoint), dev)
    model.use_channels_last(channels_last_pays(dev, prec))
    return _Network(model, meta, dev, prec, _precision_choice(precision, dev, prec))


class _Progress:
    """Progress lines on stderr for sessions that take longer than ``after_s``: a line per
    stage and, during the network, at most one every ``every_s`` seconds."""

    def __init__(self, label: str, enabled: bool = True, after_s: float = 3.0,
                 every_s: float = 5.0) -> None:
        self.label, self.enabled = label, enabled
        self.after_s, self.every_s = after_s, every_s
        self.t0 = time.perf_counter()
        self.last = -1e9

    def _emit(self, text: str) -> None:
        print(f"{self.label}: {text} ({time.perf_counter() - self.t0:.0f} s)",
              file=sys.stderr, flush=True)

    def stage(self, text: str) -> None:
        now = time.perf_counter()
        if self.enabled and now - self.t0 >= self.after_s:
            self._emit(text)
            self.last = now

    def slices(self, done: int, total: int) -> None:
        now = time.perf_counter()
        if (self.enabled and now - self.t0 >= self.after_s and now - self.last >= self.every_s
                and done < total):
            self._emit(f"network {done}/{total} slices")
            self.last = now


def _scaling_method(estimator: str, scaling: str | None, net: _Network | None,
                    smoothing: Smoothing) -> str:
    """The scaling method of the run (``seed`` or ``calibrated``), checked against the
    estimator: ``network-free`` takes its maps from the calibration, so it needs it."""
    if net is None:
        method = scaling or "calibrated"
        if method != "calibrated":
            raise ConfigError(f"estimator 'network-free' needs scaling 'calibrated' (its maps "
                              f"come from the session's calibration), got {method!r}")
        if smoothing.guide == "network":
            raise ConfigError("estimator 'network-free' has no network maps to guide the "
                              "smoothing: use the smoothing guide 'images'")
        return method
    method = scaling or (net.meta.get("hyperparameters") or {}).get("scaling", "seed")
    if method not in METHODS:
        raise ConfigError(f"scaling must be one of {METHODS}, got {method!r}")
    return method


def _estimator_record(estimator: str, calibrated: bool) -> dict[str, str]:
    """The sidecars' ``Estimator``: the name and a one-sentence description."""
    text = ESTIMATORS[estimator]
    if estimator == "refined" and not calibrated:
        text = ("the network's maps as it outputs them (times the brain mask): with scaling "
                "'seed' there are no calibrated scales to refine them against")
    return {"Name": estimator, "Description": text}


BOX_MARGIN = 8
"""Voxels kept around the brain's in-plane bounding box when the network's field of view is
narrowed to the brain (:func:`_brain_box`)."""


def _brain_box(brain: np.ndarray, shape: tuple[int, ...]) -> tuple[slice, slice]:
    """In-plane rows and columns of the brain's bounding box over all slices, widened by
    :data:`BOX_MARGIN` voxels on each side (within the image)."""
    ys = np.flatnonzero(brain.any(axis=(0, 2)))
    xs = np.flatnonzero(brain.any(axis=(0, 1)))
    return (slice(max(int(ys[0]) - BOX_MARGIN, 0), min(int(ys[-1]) + 1 + BOX_MARGIN, shape[0])),
            slice(max(int(xs[0]) - BOX_MARGIN, 0), min(int(xs[-1]) + 1 + BOX_MARGIN, shape[1])))


def _network_maps(net: _Network, sd: Any, sel: Sequence[int], masked: bool,
                  batch_size: int, seed: SeedInputs | None = None,
                  progress: _Progress | None = None, crop: bool = False) -> np.ndarray:
    """The network's maps (S, 3, H, W) float32 (PD, T1 s, T2 s) from the inputs ``sel`` of the
    loaded session ``sd``, times its brain mask if ``masked``. With ``seed`` (the published
    input path, :func:`~qmriflow.model.published.seed_inputs`) the network sees its inputs and
    the maps come back onto the input grid. Otherwise, with ``masked``, slices without brain
    are not run (their maps are zero either way; the network is slice-wise, so the others do
    not change). With ``crop`` (the calibrated estimators, whose maps the data consistency
    determines: the network's are its prior) the network sees only the brain's bounding box
    plus :data:`BOX_MARGIN` voxels — half the pixels of a head's field of view."""
    report = None if progress is None else progress.slices
    try:
        if seed is not None:
            out = predict_maps(net.model, seed.images, device=net.device,
                               precision=net.precision, batch_size=batch_size,
                               mask=seed.mask if masked else None, progress=report)
            maps = seed.to_input_grid(out)
        else:
            run = (np.flatnonzero(sd.brain.any(axis=(1, 2))) if masked
                   else np.arange(sd.images.shape[0]))
            maps = np.zeros((sd.images.shape[0], 3, *sd.images.shape[2:]), np.float32)
            rows, cols = (_brain_box(sd.brain, sd.images.shape[2:]) if crop and run.size
                          else (slice(None), slice(None)))
            if run.size:
                maps[run, :, rows, cols] = predict_maps(
                    net.model, sd.images[run][:, list(sel), rows, cols], device=net.device,
                    precision=net.precision, batch_size=batch_size,
                    mask=sd.brain[run][:, rows, cols] if masked else None, progress=report)
    except RuntimeError as exc:
        raise InputError(f"inference failed: {' '.join(str(exc).split())[:200]}",
                         session=sd.label) from None
    if not np.isfinite(maps).all():
        raise InputError("network produced non-finite values", session=sd.label)
    return maps


def _tissue_maps(sd: Any, calib: Any, seg: np.ndarray) -> np.ndarray:
    """The network-free starting maps (S, 3, H, W) float32 (PD, T1 s, T2 s): the calibration's
    tissue values blended by smoothed dseg weights inside the brain
    (:func:`~qmriflow.model.calibration.tissue_value_maps`), 0 outside."""
    maps = tissue_value_maps(seg, calib.tissues, sd.brain)
    return np.moveaxis(maps, -1, 1).astype(np.float32)


def network_free_maps(sd: Any, calib: Any, seg: np.ndarray,
                      contrasts: Sequence[str] = CONTRASTS,
                      smoothing: Smoothing = DEFAULT_SMOOTHING) -> np.ndarray:
    """The ``network-free`` estimate (S, 3, H, W) float32 (PD, T1 s, T2 s; 0 outside the brain)
    of a loaded session ``sd`` with its calibration ``calib`` and dseg ``seg``: the
    calibration's tissue values made consistent with the inputs ``contrasts`` and smoothed,
    exactly as ``qmriflow infer --estimator network-free``. No network and no truth: the
    targets of the network's distillation term (:func:`qmriflow.model.losses.distill_l1`)."""
    maps, _, _ = _pin(_tissue_maps(sd, calib, seg), sd, calib, tuple(contrasts), seg, smoothing,
                      from_network=False)
    return maps


def _estimate(estimator: str, maps: np.ndarray, sd: Any, calib: Any, inputs: Sequence[str],
              seg: np.ndarray | None, smoothing: Smoothing,
              model_error: float = DEFAULT_MODEL_ERROR
              ) -> tuple[np.ndarray, np.ndarray | None, dict[str, Any] | None]:
    """The estimator's maps (S, 3, H, W) from the starting maps (the network's, or the
    calibration's tissue values for ``network-free``), their per-voxel SDs (None where not
    estimated) and the pinning summary (None where nothing was moved)."""
    if estimator == "network-only" or calib is None or seg is None:
        return maps, None, None
    return _pin(maps, sd, calib, inputs, seg, smoothing,
                from_network=estimator != "network-free", model_error=model_error)


def infer_session(session_dir: str | Path, checkpoint: str | Path | None,
                  out_dir: str | Path, *,
                  subject: str | None = None, session: str | None = None,
                  contrasts: Sequence[str] = CONTRASTS, device: str = "auto",
                  precision: str = "auto", batch_size: int = 4, threads: int | None = None,
                  brain_mask: bool = True, synth: bool = True,
                  scale_bound: float = 0.2, scaling: str | None = None,
                  smoothing: Smoothing = DEFAULT_SMOOTHING,
                  estimator: str = DEFAULT_ESTIMATOR,
                  clusters: str | Path | None = None, files: SessionFiles | None = None,
                  progress: bool = True, network_fov: str = "brain",
                  model_error: float = DEFAULT_MODEL_ERROR,
                  model_error_cluster: float = DEFAULT_MODEL_ERROR_CLUSTER) -> dict[str, Any]:
    """Predict and write one session's maps (see the module docstring); returns a summary.

    ``estimator`` (:data:`~qmriflow.model.calibration.ESTIMATORS`): ``refined`` (default) the
    network's maps pinned, made data-consistent and smoothed; ``network-only`` the network's
    maps as they are (times the brain mask; no uncertainty maps); ``network-free`` no network
    (``checkpoint`` is ignored and may be None): the calibration's tissue values blended by
    smoothed dseg weights, then the same data consistency, anchoring, smoothing and
    uncertainty maps as ``refined`` (needs ``scaling`` calibrated and the session's dseg; its
    maps are zero outside the brain whatever ``brain_mask`` says).
    ``scaling``: ``seed`` or ``calibrated``; ``None`` takes the one the checkpoint was trained
    with (``seed`` for checkpoints that do not say, e.g. published weights; ``calibrated``
    without a network).
    ``smoothing``: the edge-preserving smoothing of the data-consistent maps (calibrated
    scaling only; radius 0 = off), see :func:`~qmriflow.model.calibration.smooth_maps`.
    ``clusters``: a ``clusters.json`` (``qmriflow cluster-fit``): the calibrated scales come
    from the session's protocol cluster (its fit, or joining it), else from the session alone;
    the sidecar's ``Scaling.calibration.origin`` says which and why.
    ``files``: the session's input files when they are not laid out as a preprocessed session
    folder (``qmriflow infer-nifti``; ``session_dir`` is then ignored).
    ``model_error``: relative error (log-SD) of each contrast's signal model added to the
    calibrated scales' covariance in the uncertainty maps (calibrated scaling) when the scales
    come from the session alone; ``model_error_cluster`` the same when they come from a
    protocol cluster (its fit or a join), whose posterior already holds the gain jitter.
    ``progress``: stage lines (and the network's slices) on stderr once the session has taken
    a few seconds; the precision chosen is always printed there.
    ``network_fov``: ``brain`` (default) runs the network of the calibrated estimators on the
    brain's in-plane bounding box plus :data:`BOX_MARGIN` voxels, ``slice`` on the whole
    slice (``network-only`` and ``seed`` always see the whole slice / the published crop).

    With ``scaling: seed`` the network sees exactly the published pipeline's inputs
    (:mod:`qmriflow.model.published`) and its maps are written back on the input grid. With
    ``calibrated`` scaling a brain mask much larger than the segmented brain (a head mask) is
    narrowed to the segmented brain, with a warning (:func:`narrow_head_mask`); the per-voxel
    data consistency runs there only and writes the status of every voxel
    (``desc-refinestatus``).
    """
    t0 = time.perf_counter()
    if estimator not in ESTIMATORS:
        raise ConfigError(f"estimator must be one of {tuple(ESTIMATORS)}, got {estimator!r}")
    for name, v in (("model_error", model_error), ("model_error_cluster", model_error_cluster)):
        if not (v >= 0 and np.isfinite(v)):
            raise ConfigError(f"{name} must be a finite number >= 0, got {v!r}")
    if threads:
        torch.set_num_threads(int(threads))
    # the checkpoint first: a missing/corrupt model fails before any work
    net = (None if estimator == "network-free"
           else _load_network(checkpoint, device, precision, estimator))
    contrasts = tuple(contrasts)
    if not contrasts or any(c not in CONTRASTS for c in contrasts):
        raise InputError(f"contrasts must be a non-empty subset of {CONTRASTS}, got {contrasts}")
    method = _scaling_method(estimator, scaling, net, smoothing)
    cluster_doc = None
    if clusters is not None and method == "calibrated":
        from .clusters import load_clusters

        cluster_doc = load_clusters(clusters)
    calibrated = method == "calibrated"
    masked = brain_mask or net is None
    seed = not calibrated and net is not None
    # re-synthesise every contrast whose image exists, also those not fed to the network; the
    # published input path takes its Otsu mask from the T1w whenever there is one
    if files is None:
        files = session_files(session_dir, subject, session)
    present = files.images
    need = tuple(c for c in CONTRASTS if c in contrasts or (
        (synth or calibrated or (seed and c == "T1w")) and present[c].is_file()))
    # the head mask (and so the normalisation) from the inputs too
    sd = load_session(session_dir, subject, session, need, keep_raw=True, head_from=contrasts,
                      files=files)
    report = _Progress(sd.label, progress)
    if net is not None:
        print(f"{sd.label}: network width {net.meta['width']} on {net.device}, precision "
              f"{net.precision_choice}", file=sys.stderr, flush=True)
    prep: SeedInputs | None = None
    if not calibrated:
        # the published method exactly: the seed's mono-exponential models, no echo trains
        sd.protocols = {c: mono_exponential(p) for c, p in sd.protocols.items()}
    if seed:
        prep = _seed_prepare(sd, contrasts)
    sel = [need.index(c) for c in contrasts]
    # calibrated from, pinned to and made consistent with the network's inputs only: a contrast
    # withheld from the network is withheld from the maps altogether (it is re-synthesised)
    seg = session_seg(sd) if calibrated else None
    narrowing = None
    if seg is not None and masked:
        narrowing = narrow_head_mask(sd, seg)
    calib = (session_calibration(sd, contrasts, seg=seg, clusters=cluster_doc) if calibrated
             else None)
    t_read = time.perf_counter() - t0
    t1 = time.perf_counter()
    if net is not None:
        report.stage("network")
        # the calibrated estimate is the data's: the network (its prior) sees the brain's box
        if network_fov not in ("brain", "slice"):
            raise ConfigError(f"network_fov must be 'brain' or 'slice', got {network_fov!r}")
        crop_net = (network_fov == "brain" and calibrated and estimator != "network-only"
                    and masked)
        maps = _network_maps(net, sd, sel, masked, batch_size, prep, report, crop=crop_net)
        t_net: float | None = time.perf_counter() - t1
    else:
        assert calib is not None and seg is not None  # calibrated, checked above
        maps, t_net = _tissue_maps(sd, calib, seg), None
    if calib is not None and estimator != "network-only":
        report.stage("calibrated estimate (pinning, data consistency, smoothing)")
    # the signal-model error of the uncertainty maps: its own setting where the scales come
    # from a protocol cluster (whose posterior holds the gain jitter and the cohort level)
    from_cluster = calib is not None and scales_from_cluster(calib)
    sigma = model_error_cluster if from_cluster else model_error
    maps, sds, pinning = _estimate(estimator, maps, sd, calib, contrasts, seg, smoothing,
                                   sigma)
    if pinning is not None:
        pinning["uncertainty"]["model_error_for"] = (
            "scales from a protocol cluster (model_error_cluster)" if from_cluster
            else "scales from the session alone (model_error)")
    status = None if pinning is None else pinning["refine"].pop("status_map", None)
    t_est = time.perf_counter() - t1 - (t_net or 0.0)
    report.stage("writing")
    # file references are Paths: save_nifti writes them relative to the dataset
    # (io.dataset_ref: bids::sub-X/..., or the name alone for a checkpoint outside it)
    common = {
        "Sources": [Path(files.images[c]) for c in contrasts] + [Path(files.brain_mask),
                                                                 Path(files.params)],
        "InputContrasts": list(contrasts),
        "ModelCheckpoint": None if net is None else Path(net.meta["path"]),
        "ModelCheckpointSHA256": None if net is None else net.meta["sha256"],
        "ModelWidth": None if net is None else net.meta["width"],
        "ModelEpoch": None if net is None else net.meta.get("epoch"),
        "Normalisation": (prep.record() if prep is not None else
                          {"method": "histogram mode of the head (512 bins, percentile window)",
                           "modes": {c: sd.modes[c] for c in contrasts}}),
        "MaskedBy": Path(files.brain_mask) if masked else None,
        "MaskNarrowed": narrowing,
        "NetworkFieldOfView": (None if net is None else
                               "the published 224x224 crop" if prep is not None else
                               f"the brain's in-plane bounding box plus {BOX_MARGIN} voxels"
                               if crop_net else "the whole slice"),
        "Precision": None if net is None else net.precision,
        "PrecisionChoice": None if net is None else net.precision_choice,
        "Device": None if net is None else str(net.device),
        "Estimator": _estimator_record(estimator, calibrated),
        "SignalModels": signal_models(sd.protocols, need, files.params),
        "Scaling": {"method": method, **({"calibration": calib.as_dict(), "pinning": pinning,
                                           "Segmentation": Path(files.dseg)} if calib else {})},
        "GeneratedBy": {"Name": "qmriflow", "Version": __version__},
    }
    paths = map_paths(out_dir, sd.label)
    written = _write_maps(paths, maps, sds, sd.affine, common, _MADE_BY.get(estimator, _NETWORK))
    if status is not None:
        written.append(_write_status(paths["refine_status"], status, sd.affine, common))
    scales: dict[str, float] = {}
    if synth:
        written += _write_synth(paths, maps, sd, need, contrasts, calib, scale_bound, masked,
                                common, scales)
    brain = sd.brain
    total = time.perf_counter() - t0
    report.stage(f"done: {len(written)} files")
    return {
        "session": sd.label, "contrasts": list(contrasts), "estimator": estimator,
        "checkpoint": None if net is None else str(net.meta["path"]), "checkpoint_sha256":
            common["ModelCheckpointSHA256"], "precision": common["Precision"],
        "precision_choice": common["PrecisionChoice"],
        "device": common["Device"], "n_slices": int(maps.shape[0]), "outputs": written,
        "brain_median": {k: float(np.median(maps[:, ch][brain])) if brain.any() else None
                         for ch, k in enumerate(("PD", "T1_s", "T2_s"))},
        "scale_relative_to_reference": scales,
        "scaling": method,
        "mask_narrowed": narrowing,
        "refine": None if pinning is None else {
            k: pinning["refine"].get(k) for k in ("voxels", "iterations", "still_moving",
                                                  "restarted", "status_counts")},
        "calibration": None if calib is None else calib.as_dict(),
        "timing_s": {"read": round(t_read, 3),
                     "network": None if t_net is None else round(t_net, 3),
                     "estimate": round(t_est, 3),
                     "total": round(total, 3)},
    }


HEAD_SIZED_RATIO = 1.25
"""A brain mask with more than this many times the voxels the segmentation labels as tissue
inside it is taken for a head mask (a skull-stripped brain mask and its FAST/Atropos
segmentation agree to within a few per cent; a head mask is 1.5-2.5 times the brain)."""


def narrow_head_mask(sd: Any, seg: np.ndarray) -> dict[str, Any] | None:
    """Narrow a head-sized brain mask of the loaded session ``sd`` (in place) to its segmented
    brain: the voxels the dseg ``seg`` (S, H, W) labels as tissue, holes filled slice by slice,
    inside the mask. Prints a warning and returns what was done; ``None`` when the mask is
    brain-sized (or the segmentation empty)."""
    from scipy import ndimage as ndi

    tissue = (seg > 0) & sd.brain
    n_mask, n_tissue = int(sd.brain.sum()), int(tissue.sum())
    if n_tissue == 0 or n_mask <= HEAD_SIZED_RATIO * n_tissue:
        return None
    narrowed = np.stack([ndi.binary_fill_holes(t) for t in tissue]) & sd.brain
    sd.brain = narrowed
    info = {"mask_voxels": n_mask, "segmented_brain_voxels": int(narrowed.sum()),
            "ratio": round(n_mask / n_tissue, 3),
            "reason": f"the brain mask holds {n_mask / n_tissue:.2f}x the voxels the "
                      f"segmentation labels as tissue (> {HEAD_SIZED_RATIO}): a head mask; "
                      "data consistency and maps restricted to the segmented brain"}
    print(f"warning: {sd.label}: {info['reason']} ({int(narrowed.sum())} of {n_mask} voxels)",
          file=sys.stderr, flush=True)
    return info


def _seed_prepare(sd: Any, contrasts: Sequence[str]) -> SeedInputs:
    """The published inputs of the loaded session ``sd`` (:func:`seed_inputs`); the session's
    normalised images and modes become the published ones (so the re-synthesis compares with
    the images the network saw)."""
    from .data import _load_volume

    mask, _ = _load_volume(sd.files.brain_mask, "brain mask", sd.label)
    try:
        prep = seed_inputs(sd.raw, mask, sd.affine, contrasts)
    except InputError as exc:
        raise exc.with_context(session=sd.label) from None
    sd.modes = {c: prep.modes[c] for c in sd.contrasts}
    sd.images = np.stack([np.moveaxis(sd.raw[c] / np.float32(sd.modes[c]), 2, 0)
                          for c in sd.contrasts], axis=1).astype(np.float32)
    return prep


def _write_status(path: Path, status: np.ndarray, affine: np.ndarray,
                  common: dict[str, Any]) -> str:
    """The per-voxel status of the data consistency (S, H, W) uint8, as a label image."""
    save_nifti(path, np.moveaxis(status, 0, 2), affine, {
        "Description": "status of the per-voxel data consistency (refine_maps)",
        "Labels": {str(k): v for k, v in REFINE_STATUS.items()}, **common}, dtype=np.uint8)
    return str(path)


_NETWORK = "qmriflow, seed 000 self-supervised network"
_MADE_BY = {"network-free": "qmriflow, network-free: calibrated tissue values made "
                            "data-consistent"}
"""What made the maps, in their sidecars' ``Description`` (by estimator; default
:data:`_NETWORK`)."""


def _write_maps(paths: dict[str, Path], maps: np.ndarray, sds: np.ndarray | None,
                affine: np.ndarray, common: dict[str, Any], made_by: str) -> list[str]:
    """Write the maps (S, 3, H, W: PD, T1 s, T2 s) and, if given, their SDs, with sidecars;
    returns the paths written."""
    written: list[str] = []
    desc = {"T1map": "longitudinal relaxation time T1", "T2map": "transverse relaxation time T2",
            "PDmap": "proton density relative to water"}
    for ch, key in enumerate(("PDmap", "T1map", "T2map")):
        vol = np.moveaxis(maps[:, ch], 0, 2)
        save_nifti(paths[key], vol, affine, {"Units": MAP_UNITS[key],
                                             "Description": f"{desc[key]} ({made_by})",
                                             **common})
        written.append(str(paths[key]))
        if sds is not None:
            save_nifti(paths[f"sd_{key}"], np.moveaxis(sds[:, ch], 0, 2), affine, {
                "Units": MAP_UNITS[key],
                "Description": f"standard deviation of the {key} from the posterior uncertainty "
                               "of the calibrated per-contrast scales (the free directions of "
                               "the problem) plus a relative error of each contrast's signal "
                               "model (Scaling.pinning.uncertainty.model_error_log_sd): where "
                               "this is large, the value is soft", **common})
            written.append(str(paths[f"sd_{key}"]))
    return written


def _write_synth(paths: dict[str, Path], maps: np.ndarray, sd: Any, need: Sequence[str],
                 inputs: Sequence[str], calib: Any, scale_bound: float, masked: bool,
                 common: dict[str, Any], scales: dict[str, float]) -> list[str]:
    """Re-synthesise every contrast of ``need`` from the maps (with the calibrated scale where
    there is one, else the bounded LS scale) and write it (input units) and its difference
    with the input (%, inside the brain if ``masked``, else the head); fills ``scales``
    (contrast → scale relative to the WM reference) and returns the paths written."""
    written: list[str] = []
    for ci, c in enumerate(need):
        proto = sd.protocols[c]
        img, rel = resynthesise(maps, proto, sd.images[:, ci], sd.head, scale_bound,
                                None if calib is None else calib.scales.get(c))
        scales[c] = rel
        mode = sd.modes[c]
        synth_in = np.moveaxis(img, 0, 2) * np.float32(mode)
        raw = sd.raw[c]
        valid = np.moveaxis(sd.brain if masked else sd.head, 0, 2) & (raw > 0.05 * mode)
        diff = np.zeros_like(raw, dtype=np.float32)
        diff[valid] = 100.0 * (synth_in[valid] - raw[valid]) / raw[valid]
        side = {"Units": "same as the preprocessed input",
                "Description": f"{c} re-synthesised from the maps with physics.signal",
                "Protocol": proto.as_dict(), "ScaleRelativeToWMReference": rel,
                "InputUsedForMaps": c in inputs, **common}
        save_nifti(paths[f"synth_{c}"], synth_in, sd.affine, side)
        save_nifti(paths[f"synthdiff_{c}"], diff, sd.affine,
                   {"Units": "percent", "Description": f"100*(synthesised - input)/input "
                                                       f"for {c} inside the mask", **common})
        written += [str(paths[f"synth_{c}"]), str(paths[f"synthdiff_{c}"])]
    return written


def _to_log_maps(maps: np.ndarray) -> np.ndarray:
    """log of (..., 3) maps, floored (the guide of ``smoothing.guide == "network"``)."""
    return np.log(np.maximum(np.asarray(maps, dtype=np.float64), 1e-6))


def _pin_to_scales(maps: np.ndarray, sd: Any, calib: Any, inputs: Sequence[str],
                   brain: np.ndarray) -> tuple[np.ndarray, dict[str, Any]]:
    """Move the network's maps (S, 3, H, W) along the degenerate family onto the calibrated
    scales: per input, the log-ratio of the LS scale the maps imply over ``brain`` to the
    calibrated one (:func:`~qmriflow.model.calibration.pin_maps`). Returns the moved maps
    (S, H, W, 3) and a summary (with those log-shifts)."""
    shifts = {}
    for c in inputs:
        f = _signal_of(maps, sd.protocols[c])
        img = sd.images[:, sd.contrasts.index(c)].astype(np.float64)
        m = (brain & (img > 0)).astype(np.float64)
        implied = float(physics.ls_global_scale(f, img, m))
        if not (np.isfinite(implied) and implied > 0):
            raise InputError(f"cannot relate the maps to the {c} image (no signal in the brain)",
                             session=sd.label)
        shifts[c] = float(np.log(implied / calib.scales[c]))
    moved, info = pin_maps(np.moveaxis(maps, 1, -1), brain, [sd.protocols[c] for c in inputs],
                           [shifts[c] for c in inputs])
    return moved, {**info, "log_shift": shifts}


def _consistent(start: np.ndarray, brain: np.ndarray, sd: Any, calib: Any,
                inputs: Sequence[str], images: np.ndarray, seg: np.ndarray
                ) -> tuple[np.ndarray, dict[str, Any], dict[str, Any]]:
    """Make the starting maps (S, H, W, 3) consistent with the ``images`` (S, H, W, C) of the
    ``inputs`` under the calibrated scales, the starting maps as the prior
    (:func:`~qmriflow.model.calibration.refine_maps`, restarts from the calibration's tissue
    values, FLAIR branch chosen by ``seg``); with fewer than three inputs, set the level along
    the direction they leave open from the calibration and make the maps consistent again.
    Returns the maps (S, H, W, 3) and the anchoring's and the data consistency's summaries."""
    protos = [sd.protocols[c] for c in inputs]
    scales = [calib.scales[c] for c in inputs]
    # where the descent from the starting value stalls (values pinned at the limits), the
    # data consistency restarts from the calibration's tissue values
    starts = [tuple(calib.tissues[t][p] for p in PARAMS) for t in TISSUES if t in calib.tissues]
    # WM/GM voxels on the FLAIR's CSF-like branch are moved to their tissue's branch where
    # that fits the data as well
    branch = {"dseg": seg, "tissues": calib.tissues}
    anchor: dict[str, Any] = {"applied": False, "contrasts": len(inputs)}
    if len(inputs) < 3:
        # a contrast withheld: the inputs leave each voxel a direction they do not determine,
        # and the network's guess along it is unreliable. (1) the starting maps, shifted per
        # tissue to the calibration's tissue values, become the prior of the data consistency
        # (robust to a far-off guess); (2) the result is moved along the open direction so its
        # tissue means match the calibration (per tissue, blended across edges) and made
        # consistent with the data again (the move is large enough to matter at second order)
        voxels, weights = session_tissue_voxels(sd, inputs, seg=seg)
        prior, shift = shift_to_tissues(start, brain, voxels, calib.tissues, weights)
        refined, _ = refine_maps(prior, brain, protos, images, scales, starts=starts,
                                 **branch)
        anchored, anchor = anchor_free_directions(refined, brain, protos, voxels,
                                                  calib.tissues, weights)
        anchor["prior_shift"] = shift
        refined, refine = refine_maps(anchored, brain, protos, images, scales,
                                      starts=starts, **branch)
    else:
        refined, refine = refine_maps(start, brain, protos, images, scales, starts=starts,
                                      **branch)
    return refined, anchor, refine


def _smooth(maps: np.ndarray, brain: np.ndarray, images: np.ndarray, start: np.ndarray,
            smoothing: Smoothing, inputs: Sequence[str], from_network: bool
            ) -> tuple[np.ndarray, dict[str, Any]]:
    """Edge-preserving smoothing of the maps (S, H, W, 3) inside ``brain``, steered by the log
    of the input ``images`` (S, H, W, C) or of the starting maps (S, H, W, 3: the pinned
    network maps); radius 0 = off. Returns the maps and the settings' record."""
    if smoothing.radius > 0:
        guide = (np.log(np.maximum(images.astype(np.float64), 1e-3))
                 if smoothing.guide == "images" else _to_log_maps(start))
        maps = smooth_maps(maps, brain, guide, radius=smoothing.radius,
                           sigma_space=smoothing.sigma_space,
                           sigma_range=smoothing.sigma_range,
                           sigma_value=smoothing.sigma_value)
    return maps, {"radius": smoothing.radius,
                  "sigma_space_voxels": smoothing.sigma_space,
                  "sigma_range_log": smoothing.sigma_range,
                  "sigma_value_log": smoothing.sigma_value,
                  "guide": ("log of the mode-normalised inputs " + "+".join(inputs)
                            if smoothing.guide == "images"
                            else "log of the network's maps" if from_network
                            else "log of the starting maps")}


def _pin(maps: np.ndarray, sd: Any, calib: Any, inputs: Sequence[str], seg: np.ndarray,
         smoothing: Smoothing = DEFAULT_SMOOTHING, *, from_network: bool = True,
         model_error: float = DEFAULT_MODEL_ERROR
         ) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """The calibrated estimate from starting maps (S, 3, H, W): with ``from_network`` they are
    the network's, and are first moved onto the calibrated scales (:func:`_pin_to_scales`);
    without, they are already on them (the calibration's tissue values of the network-free
    estimator) and start as they are. Then made consistent with the input images under those
    scales, the starting maps as the prior; with fewer than three inputs, set at the
    calibration's level along the directions the inputs leave open and made consistent again
    (:func:`_consistent`); smoothed edge-preservingly (``smoothing``; radius 0 = off), guided
    by the input images or the starting maps (:func:`_smooth`). ``seg``: the session's dseg
    (S, H, W), which also chooses between the data-consistent branches of WM/GM voxels (see
    :func:`~qmriflow.model.calibration.refine_maps`). Returns the maps, their per-voxel SDs
    (S, 3, H, W) from the scales' posterior covariance plus ``model_error``² per contrast
    (:func:`~qmriflow.model.calibration.scale_sensitivity`) and a summary."""
    inputs = tuple(inputs)
    brain = sd.brain & np.all(maps > 0, axis=1)
    if from_network:
        start, info = _pin_to_scales(maps, sd, calib, inputs, brain)
    else:
        start, info = np.moveaxis(maps, 1, -1), {
            "pinned": False, "start": "the calibration's tissue values blended by smoothed "
                                      "dseg weights (on the calibrated scales as they are)"}
    idx = [sd.contrasts.index(c) for c in inputs]
    images = np.moveaxis(sd.images[:, idx], 1, -1)
    refined, anchor, refine = _consistent(start, brain, sd, calib, inputs, images, seg)
    refined, refine["smoothing"] = _smooth(refined, brain, images, start, smoothing, inputs,
                                           from_network)
    sds = scale_sensitivity(refined, brain, [sd.protocols[c] for c in inputs],
                            np.asarray(calib.log_cov), model_error)
    info = {**info, "anchor": anchor, "refine": refine,
            "uncertainty": {"scales_log_cov": "the calibration's posterior",
                            "model_error_log_sd": float(model_error)}}
    return (np.moveaxis(refined, -1, 1).astype(np.float32),
            np.moveaxis(sds, -1, 1).astype(np.float32), info)
