"""Inference of one session: T1/T2/PD maps, re-synthesised images and difference maps.

Outputs (BIDS derivatives, in the session's preprocessed space, with its affine)::

    sub-X_ses-Y_space-T2w_T1map.nii.gz    T1 in seconds   (+ .json sidecar)
    sub-X_ses-Y_space-T2w_T2map.nii.gz    T2 in seconds
    sub-X_ses-Y_space-T2w_PDmap.nii.gz    PD, arbitrary units (water = 1)
    sub-X_ses-Y_space-T2w_desc-synth_{T1w,T2w,FLAIR}.nii.gz       re-synthesised (input units)
    sub-X_ses-Y_space-T2w_desc-synthdiff_{T1w,T2w,FLAIR}.nii.gz   100·(synth − input)/input, %

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

Maps are zero outside the brain mask (as the published implementation). Re-synthesis uses
:func:`qmriflow.physics.signal` with the session's protocol (TE correction included), the
bounded least-squares scale over the session's head (as in training) and the histogram mode,
so it is directly comparable with the preprocessed input (seed fig. D.1). Every sidecar names
the checkpoint and its SHA-256, the input contrasts used and the input files.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import __version__, physics
from ..errors import ConfigError, InputError
from ..io import save_nifti
from .calibration import (
    DEFAULT_SMOOTHING,
    METHODS,
    PARAMS,
    TISSUES,
    Smoothing,
    anchor_free_directions,
    pin_maps,
    refine_maps,
    scale_sensitivity,
    shift_to_tissues,
    smooth_maps,
)
from .checkpoint import load_model
from .data import (
    load_session,
    session_calibration,
    session_files,
    session_seg,
    session_tissue_voxels,
)
from .normalise import CONTRASTS
from .train import resolve_device, resolve_precision

__all__ = ["infer_session", "map_paths", "predict_maps", "resynthesise"]

MAP_UNITS = {"T1map": "s", "T2map": "s", "PDmap": "arbitrary"}


def map_paths(out_dir: str | Path, label: str) -> dict[str, Path]:
    """Output paths of one session (keys: T1map, T2map, PDmap, sd_<map>, synth_<c>,
    synthdiff_<c>)."""
    d = Path(out_dir)
    pre = f"{label}_space-T2w"
    paths = {m: d / f"{pre}_{m}.nii.gz" for m in MAP_UNITS}
    for m in MAP_UNITS:
        paths[f"sd_{m}"] = d / f"{pre}_desc-uncertainty_{m}.nii.gz"
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
                 mask: np.ndarray | None = None) -> np.ndarray:
    """Run the network slice-wise. ``images`` (S, N, H, W) normalised contrasts → (S, 3, H, W)
    float32 (PD, T1 s, T2 s), zero-padded to multiples of 8 and cropped back; multiplied by
    ``mask`` (S, H, W) if given."""
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
    if mask is not None:
        out *= mask[:, None].astype(np.float32)
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


def infer_session(session_dir: str | Path, checkpoint: str | Path, out_dir: str | Path, *,
                  subject: str | None = None, session: str | None = None,
                  contrasts: Sequence[str] = CONTRASTS, device: str = "auto",
                  precision: str = "auto", batch_size: int = 4, threads: int | None = None,
                  brain_mask: bool = True, synth: bool = True,
                  scale_bound: float = 0.2, scaling: str | None = None,
                  smoothing: Smoothing = DEFAULT_SMOOTHING) -> dict[str, Any]:
    """Predict and write one session's maps (see the module docstring); returns a summary.

    ``scaling``: ``seed`` or ``calibrated``; ``None`` takes the one the checkpoint was trained
    with (``seed`` for checkpoints that do not say, e.g. published weights).
    ``smoothing``: the edge-preserving smoothing of the data-consistent maps (calibrated
    scaling only; radius 0 = off), see :func:`~qmriflow.model.calibration.smooth_maps`.
    """
    t0 = time.perf_counter()
    if threads:
        torch.set_num_threads(int(threads))
    dev = resolve_device(device)
    prec = resolve_precision(precision, dev, inference=True)
    # the checkpoint first: a missing/corrupt model fails before any work
    model, meta = load_model(checkpoint, dev)
    model.use_channels_last(channels_last_pays(dev, prec))
    contrasts = tuple(contrasts)
    if not contrasts or any(c not in CONTRASTS for c in contrasts):
        raise InputError(f"contrasts must be a non-empty subset of {CONTRASTS}, got {contrasts}")
    method = scaling or (meta.get("hyperparameters") or {}).get("scaling", "seed")
    if method not in METHODS:
        raise ConfigError(f"scaling must be one of {METHODS}, got {method!r}")
    calibrated = method == "calibrated"
    # re-synthesise every contrast whose image exists, also those not fed to the network
    present = session_files(session_dir, subject, session).images
    need = tuple(c for c in CONTRASTS if c in contrasts or ((synth or calibrated)
                                                           and present[c].is_file()))
    # the head mask (and so the normalisation) from the inputs too
    sd = load_session(session_dir, subject, session, need, keep_raw=True, head_from=contrasts)
    label = sd.label
    sel = [need.index(c) for c in contrasts]
    # calibrated from, pinned to and made consistent with the network's inputs only: a contrast
    # withheld from the network is withheld from the maps altogether (it is re-synthesised)
    seg = session_seg(sd) if calibrated else None
    calib = session_calibration(sd, contrasts, seg=seg) if calibrated else None
    t_read = time.perf_counter() - t0
    t1 = time.perf_counter()
    try:
        maps = predict_maps(model, sd.images[:, sel], device=dev, precision=prec,
                            batch_size=batch_size, mask=sd.brain if brain_mask else None)
    except RuntimeError as exc:
        raise InputError(f"inference failed: {' '.join(str(exc).split())[:200]}",
                         session=label) from None
    t_net = time.perf_counter() - t1
    if not np.isfinite(maps).all():
        raise InputError("network produced non-finite values", session=label)
    sds = None
    pinning: dict[str, Any] = {}
    if calib is not None and seg is not None:
        maps, sds, pinning = _pin(maps, sd, calib, contrasts, seg, smoothing)
    paths = map_paths(out_dir, label)
    files = sd.files
    common = {
        "Sources": [str(files.images[c]) for c in contrasts] + [str(files.brain_mask),
                                                                str(files.params)],
        "InputContrasts": list(contrasts),
        "ModelCheckpoint": str(meta["path"]),
        "ModelCheckpointSHA256": meta["sha256"],
        "ModelWidth": meta["width"],
        "ModelEpoch": meta.get("epoch"),
        "Normalisation": {"method": "histogram mode of the head (512 bins, percentile window)",
                          "modes": {c: sd.modes[c] for c in contrasts}},
        "MaskedBy": str(files.brain_mask) if brain_mask else None,
        "Precision": prec,
        "Device": str(dev),
        "Scaling": {"method": method, **({"calibration": calib.as_dict(), "pinning": pinning,
                                           "Segmentation": str(files.dseg)} if calib else {})},
        "GeneratedBy": {"Name": "qmriflow", "Version": __version__},
    }
    affine = sd.affine
    written: list[str] = []
    desc = {"T1map": "longitudinal relaxation time T1", "T2map": "transverse relaxation time T2",
            "PDmap": "proton density relative to water"}
    for ch, key in enumerate(("PDmap", "T1map", "T2map")):
        vol = np.moveaxis(maps[:, ch], 0, 2)
        save_nifti(paths[key], vol, affine, {"Units": MAP_UNITS[key],
                                             "Description": f"{desc[key]} (qmriflow, seed 000 "
                                                            "self-supervised network)", **common})
        written.append(str(paths[key]))
        if sds is not None:
            save_nifti(paths[f"sd_{key}"], np.moveaxis(sds[:, ch], 0, 2), affine, {
                "Units": MAP_UNITS[key],
                "Description": f"standard deviation of the {key} from the posterior uncertainty "
                               "of the calibrated per-contrast scales (the free directions of "
                               "the problem): where this is large, the value is soft", **common})
            written.append(str(paths[f"sd_{key}"]))
    scales = {}
    if synth:
        for ci, c in enumerate(need):
            proto = sd.protocols[c]
            img, rel = resynthesise(maps, proto, sd.images[:, ci], sd.head, scale_bound,
                                    None if calib is None else calib.scales.get(c))
            scales[c] = rel
            mode = sd.modes[c]
            synth_in = np.moveaxis(img, 0, 2) * np.float32(mode)
            raw = sd.raw[c]
            valid = np.moveaxis(sd.brain if brain_mask else sd.head, 0, 2) & (raw > 0.05 * mode)
            diff = np.zeros_like(raw, dtype=np.float32)
            diff[valid] = 100.0 * (synth_in[valid] - raw[valid]) / raw[valid]
            side = {"Units": "same as the preprocessed input",
                    "Description": f"{c} re-synthesised from the maps with physics.signal",
                    "Protocol": proto.as_dict(), "ScaleRelativeToWMReference": rel,
                    "InputUsedForMaps": c in contrasts, **common}
            save_nifti(paths[f"synth_{c}"], synth_in, affine, side)
            save_nifti(paths[f"synthdiff_{c}"], diff, affine,
                       {"Units": "percent", "Description": f"100*(synthesised - input)/input "
                                                           f"for {c} inside the mask", **common})
            written += [str(paths[f"synth_{c}"]), str(paths[f"synthdiff_{c}"])]
    brain = sd.brain
    summary = {
        "session": label, "contrasts": list(contrasts), "checkpoint": str(meta["path"]),
        "checkpoint_sha256": meta["sha256"], "precision": prec, "device": str(dev),
        "n_slices": int(maps.shape[0]), "outputs": written,
        "brain_median": {k: float(np.median(maps[:, ch][brain])) if brain.any() else None
                         for ch, k in enumerate(("PD", "T1_s", "T2_s"))},
        "scale_relative_to_reference": scales,
        "scaling": method,
        "calibration": None if calib is None else calib.as_dict(),
        "timing_s": {"read": round(t_read, 3), "network": round(t_net, 3),
                     "total": round(time.perf_counter() - t0, 3)},
    }
    return summary


def _to_log_maps(maps: np.ndarray) -> np.ndarray:
    """log of (..., 3) maps, floored (the guide of ``smoothing.guide == "network"``)."""
    return np.log(np.maximum(np.asarray(maps, dtype=np.float64), 1e-6))


def _pin(maps: np.ndarray, sd: Any, calib: Any, inputs: Sequence[str], seg: np.ndarray,
         smoothing: Smoothing = DEFAULT_SMOOTHING
         ) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Move the network's maps (S, 3, H, W) onto the calibrated scales, then make them
    consistent with the input images under those scales (the network as prior); with fewer
    than three inputs, set their level along the directions the inputs leave open from the
    calibration's tissue values and make them consistent again; smooth the result
    edge-preservingly (``smoothing``; radius 0 = off), guided by the input images or the
    network's maps. ``seg``: the session's dseg (S, H, W), which also chooses between the
    data-consistent branches of WM/GM voxels (see :func:`refine_maps`). Returns the maps, their
    per-voxel SDs (S, 3, H, W) and a summary."""
    inputs = tuple(inputs)
    protos = [sd.protocols[c] for c in inputs]
    brain = sd.brain & np.all(maps > 0, axis=1)
    shifts = {}
    for ci, c in enumerate(inputs):
        f = _signal_of(maps, protos[ci])
        img = sd.images[:, sd.contrasts.index(c)].astype(np.float64)
        m = (brain & (img > 0)).astype(np.float64)
        implied = float(physics.ls_global_scale(f, img, m))
        if not (np.isfinite(implied) and implied > 0):
            raise InputError(f"cannot relate the maps to the {c} image (no signal in the brain)",
                             session=sd.label)
        shifts[c] = float(np.log(implied / calib.scales[c]))
    moved, info = pin_maps(np.moveaxis(maps, 1, -1), brain, protos,
                           [shifts[c] for c in inputs])
    idx = [sd.contrasts.index(c) for c in inputs]
    images = np.moveaxis(sd.images[:, idx], 1, -1)
    scales = [calib.scales[c] for c in inputs]
    # where the descent from the network's value stalls (values pinned at the limits), the
    # data consistency restarts from the calibration's tissue values
    starts = [tuple(calib.tissues[t][p] for p in PARAMS) for t in TISSUES if t in calib.tissues]
    # WM/GM voxels on the FLAIR's CSF-like branch are moved to their tissue's branch where
    # that fits the data as well
    branch = {"dseg": seg, "tissues": calib.tissues}
    anchor: dict[str, Any] = {"applied": False, "contrasts": len(inputs)}
    if len(inputs) < 3:
        # a contrast withheld: the inputs leave each voxel a direction they do not determine,
        # and the network's guess along it is unreliable. (1) the network's maps, shifted per
        # tissue to the calibration's tissue values, become the prior of the data consistency
        # (robust to a far-off guess); (2) the result is moved along the open direction so its
        # tissue means match the calibration (per tissue, blended across edges) and made
        # consistent with the data again (the move is large enough to matter at second order)
        voxels, weights = session_tissue_voxels(sd, inputs, seg=seg)
        prior, shift = shift_to_tissues(moved, brain, voxels, calib.tissues, weights)
        refined, _ = refine_maps(prior, brain, protos, images, scales, starts=starts,
                                 **branch)
        anchored, anchor = anchor_free_directions(refined, brain, protos, voxels,
                                                  calib.tissues, weights)
        anchor["prior_shift"] = shift
        refined, refine = refine_maps(anchored, brain, protos, images, scales,
                                     starts=starts, **branch)
    else:
        refined, refine = refine_maps(moved, brain, protos, images, scales, starts=starts,
                                     **branch)
    # edge-preserving smoothing of the result, steered by the inputs' (or the network's) edges
    if smoothing.radius > 0:
        guide = (np.log(np.maximum(images.astype(np.float64), 1e-3))
                 if smoothing.guide == "images" else _to_log_maps(moved))  # pinned network maps
        refined = smooth_maps(refined, brain, guide, radius=smoothing.radius,
                              sigma_space=smoothing.sigma_space,
                              sigma_range=smoothing.sigma_range,
                              sigma_value=smoothing.sigma_value)
    moved = refined
    refine["smoothing"] = {"radius": smoothing.radius,
                           "sigma_space_voxels": smoothing.sigma_space,
                           "sigma_range_log": smoothing.sigma_range,
                           "sigma_value_log": smoothing.sigma_value,
                           "guide": ("log of the mode-normalised inputs "
                                     + "+".join(inputs) if smoothing.guide == "images"
                                     else "log of the network's maps")}
    sds = scale_sensitivity(moved, brain, protos, np.asarray(calib.log_cov))
    info = {**info, "log_shift": shifts, "anchor": anchor, "refine": refine}
    return (np.moveaxis(moved, -1, 1).astype(np.float32),
            np.moveaxis(sds, -1, 1).astype(np.float32), info)
