"""Session inputs, slice packing, the subject-level split and contrast dropout.

A session folder (written by the preprocessing rules) holds, for ``sub-X_ses-Y``::

    sub-X/ses-Y/anat/sub-X_ses-Y_space-T2w_desc-preproc_{T1w,T2w,FLAIR}.nii.gz
    sub-X/ses-Y/anat/sub-X_ses-Y_space-T2w_desc-brain_mask.nii.gz
    sub-X/ses-Y/sub-X_ses-Y_desc-protocol_params.json

Training reads slices many times, so every session is read, normalised and written **once**
into a packed folder:

* ``images.npy`` — (N, 3, H, W) float16, mode-normalised T1w, T2w, FLAIR (memory-mapped);
* ``masks.npy`` — (N, H, W) uint8, bit 0 = head mask (loss), bit 1 = brain mask;
* ``index.json`` — per session: subject, session, folder, protocols, histogram modes, the
  (3, 6) protocol rows of :mod:`qmriflow.model.losses` (reference scale in the last column),
  the same rows with the calibrated scale of :mod:`qmriflow.model.calibration` when the
  session has a tissue segmentation (``_dseg``), and that calibration; per slice: its session
  index and slice number (so each slice's protocol and subject are one look-up away).

Files are written under temporary names and renamed at the end: a folder either has a complete
pack or none.

Long because loading, normalising and packing sessions for training and inference share the same
session and mask handling.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .. import physics
from ..errors import InputError
from ..io import write_json
from .calibration import (
    Calibration,
    calibrate_scales,
    tissue_masks,
    tissue_medians,
    tissue_weights,
)
from .losses import protocol_row, training_scale
from .normalise import CONTRASTS, head_mask, mode_normalise

__all__ = [
    "PACK_VERSION",
    "PackedSlices",
    "SessionData",
    "SessionFiles",
    "contrast_dropout",
    "load_protocols",
    "load_session",
    "pack_sessions",
    "parse_session_dir",
    "session_calibration",
    "session_files",
    "session_tissue_voxels",
    "split_subjects",
]

PACK_VERSION = 2
ROLE = {"T1w": "t1w", "T2w": "t2w", "FLAIR": "flair"}
"""Contrast name → key of the session's protocol-parameters JSON."""


# ---------------------------------------------------------------------------------------------
# one session
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SessionFiles:
    """Paths of one preprocessed session (optional ones may not exist)."""

    label: str
    subject: str
    session: str
    images: Mapping[str, Path]
    brain_mask: Path
    params: Path
    dseg: Path
    wm_eroded: Path
    gm_eroded: Path


def parse_session_dir(session_dir: str | Path) -> tuple[str, str]:
    """``.../sub-X/ses-Y`` → ``("X", "Y")``."""
    p = Path(session_dir)
    m_ses = re.fullmatch(r"ses-([A-Za-z0-9]+)", p.name)
    m_sub = re.fullmatch(r"sub-([A-Za-z0-9]+)", p.parent.name)
    if not (m_ses and m_sub):
        raise InputError("not a session folder (expected .../sub-X/ses-Y)", path=p)
    return m_sub.group(1), m_ses.group(1)


def session_files(session_dir: str | Path, subject: str | None = None,
                  session: str | None = None) -> SessionFiles:
    """Paths of a preprocessed session folder (subject/session default to the folder names)."""
    d = Path(session_dir)
    if subject is None or session is None:
        subject, session = parse_session_dir(d)
    label = f"sub-{subject}_ses-{session}"
    anat = d / "anat"
    pre = anat / f"{label}_space-T2w"
    return SessionFiles(
        label=label, subject=subject, session=session,
        images={c: Path(f"{pre}_desc-preproc_{c}.nii.gz") for c in CONTRASTS},
        brain_mask=Path(f"{pre}_desc-brain_mask.nii.gz"),
        params=d / f"{label}_desc-protocol_params.json",
        dseg=Path(f"{pre}_dseg.nii.gz"),
        wm_eroded=Path(f"{pre}_label-WM_desc-eroded_mask.nii.gz"),
        gm_eroded=Path(f"{pre}_label-GM_desc-eroded_mask.nii.gz"),
    )


def load_protocols(params_json: str | Path, contrasts: Iterable[str] = CONTRASTS,
                   session: str | None = None) -> dict[str, physics.Protocol]:
    """``physics.Protocol`` per contrast from a session's ``desc-protocol_params.json``.

    The TE-correction factor recorded by the parameter step (``te_correction_factor``) is the
    one used, so training, inference and re-synthesis apply exactly the same effective TE.
    """
    path = Path(params_json)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise InputError("protocol parameters file is missing", session=session,
                         path=path) from None
    except (OSError, ValueError) as exc:
        raise InputError(f"unreadable protocol parameters: {exc}", session=session,
                         path=path) from None
    out = {}
    for c in contrasts:
        entry = data.get(ROLE[c]) if isinstance(data, dict) else None
        if not isinstance(entry, dict):
            raise InputError(f"no {ROLE[c]} entry in the protocol parameters", session=session,
                             path=path)
        try:
            proto = physics.Protocol.from_dict(entry)
            ref = physics.wm_reference_signal(proto)
        except (KeyError, TypeError, ValueError) as exc:
            raise InputError(f"{ROLE[c]}: invalid protocol parameters ({exc})", session=session,
                             path=path) from None
        if not (math.isfinite(ref) and ref > 0):
            raise InputError(f"{ROLE[c]}: protocol gives no white-matter signal ({proto})",
                             session=session, path=path)
        out[c] = proto
    return out


def _load_volume(path: Path, what: str, label: str) -> tuple[np.ndarray, np.ndarray]:
    import nibabel as nib

    if not path.is_file():
        raise InputError(f"{what} is missing", session=label, path=path)
    try:
        img = nib.load(str(path))
        data = np.asarray(img.dataobj, dtype=np.float32)
    except Exception as exc:  # nibabel raises many types for corrupt files
        raise InputError(f"{what} is not a readable NIfTI ({type(exc).__name__})",
                         session=label, path=path) from None
    if data.ndim == 2:
        data = data[..., None]
    if data.ndim != 3:
        raise InputError(f"{what} must be 3D, got shape {data.shape}", session=label, path=path)
    if not np.isfinite(data).all():
        raise InputError(f"{what} contains NaN or infinite values", session=label, path=path)
    return data, np.asarray(img.affine, dtype=np.float64)


@dataclass
class SessionData:
    """A session read and normalised for the network (arrays in (S, ...) slice-first order)."""

    files: SessionFiles
    affine: np.ndarray
    shape: tuple[int, int, int]
    images: np.ndarray  # (S, C, H, W) float32, mode-normalised, contrasts in `contrasts` order
    contrasts: tuple[str, ...]
    head: np.ndarray  # (S, H, W) bool
    brain: np.ndarray  # (S, H, W) bool
    modes: dict[str, float]
    protocols: dict[str, physics.Protocol]
    raw: dict[str, np.ndarray] = field(default_factory=dict)  # (H, W, S) input units

    @property
    def label(self) -> str:
        return self.files.label


def load_session(session_dir: str | Path, subject: str | None = None,
                 session: str | None = None, contrasts: Sequence[str] = CONTRASTS,
                 keep_raw: bool = False, head_from: Sequence[str] | None = None,
                 files: SessionFiles | None = None) -> SessionData:
    """Read, check and mode-normalise one preprocessed session.

    The head mask comes from the T2w when it is among ``head_from`` (default: ``contrasts``;
    the T2w is the grid's reference), otherwise from the first of them. ``files``: the
    session's files when they are not laid out as a session folder (``session_dir`` is then
    ignored).
    """
    if files is None:
        files = session_files(session_dir, subject, session)
    label = files.label
    contrasts = tuple(contrasts)
    if not contrasts or any(c not in CONTRASTS for c in contrasts) or \
            len(set(contrasts)) != len(contrasts):
        raise InputError(f"contrasts must be a non-empty subset of {CONTRASTS}, got {contrasts}",
                         session=label)
    protocols = load_protocols(files.params, contrasts, session=label)
    vols: dict[str, np.ndarray] = {}
    affine = None
    for c in contrasts:
        data, aff = _load_volume(files.images[c], c, label)
        if affine is None:
            affine = aff
        elif data.shape != next(iter(vols.values())).shape or not np.allclose(aff, affine,
                                                                              atol=1e-3):
            raise InputError(f"{c} is not on the same grid as {contrasts[0]}", session=label,
                             path=files.images[c])
        vols[c] = data
    assert affine is not None
    shape = next(iter(vols.values())).shape
    brain, _ = _load_volume(files.brain_mask, "brain mask", label)
    if brain.shape != shape:
        raise InputError(f"brain mask shape {brain.shape} differs from the images {shape}",
                         session=label, path=files.brain_mask)
    pool = tuple(head_from) if head_from else contrasts
    if any(c not in vols for c in pool):
        raise InputError(f"head_from {pool} must be among the contrasts read {contrasts}",
                         session=label)
    ref = "T2w" if "T2w" in pool else pool[0]
    head = head_mask(vols[ref])
    if head.sum() < 100:
        raise InputError(f"no head found in the {ref} (empty head mask)", session=label,
                         path=files.images[ref])
    normed = []
    modes = {}
    for c in contrasts:
        try:
            n, mode = mode_normalise(vols[c], head, c)
        except InputError as exc:
            raise exc.with_context(session=label, path=files.images[c]) from None
        normed.append(n)
        modes[c] = mode
    images = np.stack([np.moveaxis(n, 2, 0) for n in normed], axis=1)  # (S, C, H, W)
    return SessionData(
        files=files, affine=affine, shape=tuple(int(s) for s in shape), images=images,
        contrasts=contrasts, head=np.moveaxis(head, 2, 0), brain=np.moveaxis(brain > 0.5, 2, 0),
        modes=modes, protocols=protocols, raw=vols if keep_raw else {},
    )


def session_seg(sd: SessionData) -> np.ndarray:
    """The session's ``_dseg`` (S, H, W) int16, checked against the images' grid."""
    dseg, _ = _load_volume(sd.files.dseg, "tissue segmentation (dseg)", sd.label)
    if dseg.shape != sd.shape:
        raise InputError(f"tissue segmentation shape {dseg.shape} differs from the images "
                         f"{sd.shape}", session=sd.label, path=sd.files.dseg)
    return np.moveaxis(np.rint(dseg).astype(np.int16), 2, 0)


def session_tissue_voxels(sd: SessionData, contrasts: Sequence[str] | None = None,
                          seg: np.ndarray | None = None,
                          ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """The calibration's tissue voxels (S, H, W) of a loaded session and soft WM/GM/CSF weights
    (needs its ``_dseg``: 1 GM, 2 WM, 3 CSF, on the images' grid; ``seg``: that dseg already
    read by :func:`session_seg`); see :func:`qmriflow.model.calibration.tissue_masks` and
    :func:`~qmriflow.model.calibration.tissue_weights`."""
    use = tuple(contrasts) if contrasts is not None else sd.contrasts
    idx = [sd.contrasts.index(c) for c in use]
    seg = session_seg(sd) if seg is None else seg
    return (tissue_masks(sd.images[:, idx], seg, sd.brain, use),
            tissue_weights(seg, tissues=("WM", "GM", "CSF")))


def session_calibration(sd: SessionData, contrasts: Sequence[str] | None = None,
                        seg: np.ndarray | None = None,
                        clusters: Mapping[str, Any] | None = None) -> Calibration:
    """Calibrated per-contrast scales of a loaded session (needs its ``_dseg``: 1 GM, 2 WM,
    3 CSF, on the images' grid; ``seg``: that dseg already read by :func:`session_seg`).
    ``contrasts``: calibrate from these only (default: every contrast loaded). With a
    ``clusters`` document (:func:`qmriflow.model.clusters.load_clusters`) the scales come from
    the session's protocol cluster where it has been fitted
    (:func:`qmriflow.model.clusters.session_calibration`); otherwise, and as the fallback, from
    the session alone (:func:`qmriflow.model.calibration.calibrate_scales`). ``origin`` of the
    result says which, and why."""
    use = tuple(contrasts) if contrasts is not None else sd.contrasts
    idx = [sd.contrasts.index(c) for c in use]
    seg = session_seg(sd) if seg is None else seg
    origin: dict[str, Any] = {"scales_from": "per-session calibration",
                              "reason": "no clusters file"}
    if clusters is not None:
        from .clusters import session_calibration as from_cluster

        try:
            cal, origin = from_cluster(clusters, sd, use, seg)
        except (ValueError, np.linalg.LinAlgError) as exc:
            cal, origin = None, {"scales_from": "per-session calibration",
                                 "reason": f"joining the cluster failed ({exc})"}
        if cal is not None:
            cal.origin = origin
            return cal
    medians, counts = tissue_medians(sd.images[:, idx], seg, sd.brain, use)
    if "CSF" not in medians:
        raise InputError(f"too few CSF voxels ({counts.get('CSF', 0)}) in the segmentation "
                         "to calibrate the scales", session=sd.label, path=sd.files.dseg)
    try:
        cal = calibrate_scales({c: sd.protocols[c] for c in use}, medians)
    except (ValueError, np.linalg.LinAlgError) as exc:
        raise InputError(f"scale calibration failed: {exc}", session=sd.label,
                         path=sd.files.dseg) from None
    cal.n_voxels = counts
    cal.origin = origin
    return cal


def scales_from_cluster(calib: Calibration) -> bool:
    """Whether a calibration's scales come from a protocol cluster (its fit, or joining it)
    rather than from the session alone (``origin`` of :func:`session_calibration`)."""
    return str((calib.origin or {}).get("scales_from", "")).startswith("cluster")


# ---------------------------------------------------------------------------------------------
# packing
# ---------------------------------------------------------------------------------------------


def pack_sessions(session_dirs: Sequence[str | Path], out_dir: str | Path, *,
                  min_head_fraction: float = 0.05, skip_incomplete: bool = False,
                  progress: bool = False,
                  clusters: Mapping[str, Any] | None = None,
                  targets: bool = False) -> dict[str, Any]:
    """Normalise every session once and pack its slices into memory-mapped arrays.

    Slices whose head mask covers less than ``min_head_fraction`` of the slice are left out.
    ``skip_incomplete``: sessions that cannot be read are listed in the index under
    ``skipped`` (with the one-line reason) instead of failing the whole pack.
    ``clusters``: a clusters document; each session's calibrated scales (the ones the network
    is trained with) then come from its protocol cluster (:func:`session_calibration`).
    ``targets``: also pack each calibrated session's ``network-free`` maps
    (:func:`qmriflow.model.infer.network_free_maps`; a head-sized brain mask narrowed as at
    inference) into ``targets.npy`` (slices, 3, H, W; float32, 0 where
    a session has none), the targets of the training's distillation term
    (``TrainConfig.distill``).
    Returns the index (also written to ``out_dir/index.json``).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if not session_dirs:
        raise InputError("no sessions to pack")
    # pass 1: read headers only, to size the arrays
    import nibabel as nib

    plan: list[tuple[SessionFiles, tuple[int, ...]]] = []
    skipped: list[dict[str, str]] = []
    for d in session_dirs:
        try:
            f = session_files(d)
            p = f.images["T2w"]
            if not p.is_file():
                raise InputError("T2w is missing", session=f.label, path=p)
            plan.append((f, tuple(int(s) for s in nib.load(str(p)).shape[:3])))
        except InputError as exc:
            if not skip_incomplete:
                raise
            skipped.append({"session_dir": str(d), "reason": str(exc)})
    if not plan:
        raise InputError("no readable session to pack")
    hw = plan[0][1][:2]
    for f, shp in plan:
        if shp[:2] != hw:
            raise InputError(f"in-plane size {shp[:2]} differs from {hw} of the first session",
                             session=f.label, path=f.images["T2w"])
    n_max = sum(s[2] for _, s in plan)
    tmp_img = out / ".images.tmp.npy"
    tmp_msk = out / ".masks.tmp.npy"
    images = np.lib.format.open_memmap(tmp_img, mode="w+", dtype=np.float16,
                                       shape=(n_max, 3, *hw))
    masks = np.lib.format.open_memmap(tmp_msk, mode="w+", dtype=np.uint8, shape=(n_max, *hw))
    if targets:
        from .infer import narrow_head_mask, network_free_maps  # infer imports this module
    tmp_tgt = out / ".targets.tmp.npy"
    tgts = (np.lib.format.open_memmap(tmp_tgt, mode="w+", dtype=np.float32,
                                      shape=(n_max, 3, *hw)) if targets else None)
    sessions: list[dict[str, Any]] = []
    slice_session: list[int] = []
    slice_z: list[int] = []
    n = 0
    it: Iterable = plan
    if progress:
        from tqdm import tqdm

        it = tqdm(plan, desc="pack", unit="session")
    try:
        for f, _shp in it:
            try:
                sd = load_session(f.images["T2w"].parent.parent, f.subject, f.session)
            except InputError as exc:
                if not skip_incomplete:
                    raise
                skipped.append({"session_dir": str(f.params.parent), "reason": str(exc)})
                continue
            area = sd.head.reshape(sd.head.shape[0], -1).mean(axis=1)
            keep = np.nonzero(area >= min_head_fraction)[0]
            if keep.size == 0:
                skipped.append({"session_dir": str(f.params.parent),
                                "reason": f"{f.label}: no slice with enough head"})
                continue
            k = keep.size
            calib = None
            if f.dseg.is_file():
                try:
                    seg = session_seg(sd)
                    if tgts is not None:
                        # as at inference: a head-sized mask narrowed, in the order infer
                        # runs (``sd.brain`` changes with it, also in the packed brain mask)
                        narrow_head_mask(sd, seg)
                    calib = session_calibration(sd, seg=seg, clusters=clusters)
                    if tgts is not None:
                        tgts[n:n + k] = network_free_maps(sd, calib, seg)[keep]
                except InputError as exc:
                    if not skip_incomplete:
                        raise
                    skipped.append({"session_dir": str(f.params.parent), "reason": str(exc)})
                    continue
            elif tgts is not None:
                tgts[n:n + k] = 0.0
            images[n:n + k] = sd.images[keep].astype(np.float16)
            masks[n:n + k] = sd.head[keep].astype(np.uint8) | (sd.brain[keep].astype(np.uint8) << 1)
            si = len(sessions)
            rows = [protocol_row(sd.protocols[c]) for c in CONTRASTS]
            sessions.append({
                "label": f.label, "subject": f.subject, "session": f.session,
                "session_dir": str(f.params.parent), "n_slices": int(k),
                "modes": sd.modes,
                "protocols": {c: sd.protocols[c].as_dict() for c in CONTRASTS},
                "protocol_rows": rows,
                "calibrated_rows": None if calib is None else [
                    [*r[:5], training_scale(sd.protocols[c], calib.scales[c])]
                    for r, c in zip(rows, CONTRASTS, strict=True)],
                "calibration": None if calib is None else calib.as_dict(),
                "targets": tgts is not None and calib is not None,
            })
            slice_session.extend([si] * k)
            slice_z.extend(int(z) for z in keep)
            n += k
        images.flush()
        masks.flush()
        del images, masks
        # shrink to the slices kept (rewrite the header of a truncated copy when needed)
        _finalise(tmp_img, out / "images.npy", n)
        _finalise(tmp_msk, out / "masks.npy", n)
        if tgts is not None:
            tgts.flush()
            del tgts
            _finalise(tmp_tgt, out / "targets.npy", n)
        else:
            with contextlib.suppress(FileNotFoundError):
                (out / "targets.npy").unlink()  # a repack without targets
    except BaseException:
        for t in (tmp_img, tmp_msk, tmp_tgt):
            with contextlib.suppress(FileNotFoundError):
                t.unlink()
        raise
    index = {
        "version": PACK_VERSION, "contrasts": list(CONTRASTS), "n_slices": n,
        "height": int(hw[0]), "width": int(hw[1]), "images_dtype": "float16",
        "mask_bits": {"head": 1, "brain": 2}, "min_head_fraction": min_head_fraction,
        "targets": ("network-free maps (qmriflow.model.infer.network_free_maps), float32"
                    if targets else None),
        "protocol_columns": ["sequence", "tr_ms", "te_eff_ms", "ti_ms", "fa_deg", "ref_scale"],
        "sequences": list(physics.SEQUENCES),
        "sessions": sessions, "slice_session": slice_session, "slice_z": slice_z,
        "skipped": skipped,
    }
    write_json(out / "index.json", index)
    return index


def _finalise(tmp: Path, final: Path, n: int) -> None:
    arr = np.load(tmp, mmap_mode="r")
    if arr.shape[0] == n:
        del arr
        os.replace(tmp, final)
        return
    part = final.with_name(f".{final.name}.part.npy")
    dst = np.lib.format.open_memmap(part, mode="w+", dtype=arr.dtype, shape=(n, *arr.shape[1:]))
    step = 256
    for i in range(0, n, step):
        dst[i:i + step] = arr[i:min(n, i + step)]
    dst.flush()
    del dst, arr
    os.replace(part, final)
    tmp.unlink()


class PackedSlices:
    """Read access to a packed folder (memory-mapped; nothing is loaded up front)."""

    def __init__(self, pack_dir: str | Path, scaling: str = "seed") -> None:
        d = Path(pack_dir)
        idx_path = d / "index.json"
        if not idx_path.is_file():
            raise InputError("no packed slices here (index.json missing): run `qmriflow pack`",
                             path=d)
        self.index = json.loads(idx_path.read_text())
        if self.index.get("version") != PACK_VERSION:
            raise InputError(f"pack version {self.index.get('version')} is not {PACK_VERSION}",
                             path=idx_path)
        try:
            self.images = np.load(d / "images.npy", mmap_mode="r")
            self.masks = np.load(d / "masks.npy", mmap_mode="r")
        except (OSError, ValueError) as exc:
            raise InputError(f"packed arrays unreadable: {exc}", path=d) from None
        n = int(self.index["n_slices"])
        if self.images.shape[0] != n or self.masks.shape[0] != n:
            raise InputError("packed arrays and index.json disagree on the slice count", path=d)
        self.slice_session = np.asarray(self.index["slice_session"], dtype=np.int64)
        key = "calibrated_rows" if scaling == "calibrated" else "protocol_rows"
        missing = [s["label"] for s in self.index["sessions"] if s.get(key) is None]
        if missing:
            raise InputError(f"scaling {scaling!r} needs a tissue segmentation (_dseg) for every "
                             f"packed session; none for {', '.join(missing[:5])}"
                             f"{' ...' if len(missing) > 5 else ''}", path=idx_path)
        self.protocols = np.asarray([s[key] for s in self.index["sessions"]],
                                    dtype=np.float32)  # (S, 3, 6)
        self.subjects = [s["subject"] for s in self.index["sessions"]]
        self.targets = None
        if (d / "targets.npy").is_file():
            try:
                self.targets = np.load(d / "targets.npy", mmap_mode="r")
            except (OSError, ValueError) as exc:
                raise InputError(f"packed targets unreadable: {exc}", path=d) from None
            if self.targets.shape != (n, 3, *self.images.shape[2:]):
                raise InputError("targets.npy and the packed images disagree in shape", path=d)

    def __len__(self) -> int:
        return int(self.index["n_slices"])

    def slice_subjects(self) -> list[str]:
        return [self.subjects[s] for s in self.slice_session]

    def batch(self, idx: np.ndarray) -> dict[str, np.ndarray]:
        """Arrays of the slices ``idx`` (read in sorted order, returned in the given order)."""
        idx = np.asarray(idx, dtype=np.int64)
        order = np.argsort(idx, kind="stable")
        inv = np.empty_like(order)
        inv[order] = np.arange(order.size)
        srt = idx[order]
        images = np.asarray(self.images[srt], dtype=np.float32)[inv]
        masks = np.asarray(self.masks[srt])[inv]
        ses = self.slice_session[idx]
        out = {"images": images, "head": (masks & 1).astype(bool)[:, None],
               "brain": (masks & 2).astype(bool)[:, None], "protocols": self.protocols[ses],
               "groups": ses}
        if self.targets is not None:
            out["targets"] = np.asarray(self.targets[srt], dtype=np.float32)[inv]
        return out


# ---------------------------------------------------------------------------------------------
# split and dropout
# ---------------------------------------------------------------------------------------------


def split_subjects(subjects: Iterable[str], seed: int = 0,
                   fractions: Sequence[float] = (0.80, 0.05, 0.15)) -> dict[str, str]:
    """Deterministic subject-level split into ``train``/``val``/``test``.

    The sorted unique subjects are permuted with ``numpy.random.default_rng(seed)``; the first
    ``round(f_test·n)`` go to test, the next ``round(f_val·n)`` to val, the rest to train. With
    three or more subjects, val and test get at least one subject each (when their fraction is
    positive). Every subject is in exactly one split, so no subject's sessions leak across.
    """
    f = [float(x) for x in fractions]
    if len(f) != 3 or any(x < 0 for x in f) or not math.isclose(sum(f), 1.0, abs_tol=1e-6):
        raise InputError(f"split fractions must be three non-negative numbers summing to 1, "
                         f"got {list(fractions)}")
    subs = sorted(set(subjects))
    n = len(subs)
    perm = np.random.default_rng(seed).permutation(n)
    n_test = round(f[2] * n)
    n_val = round(f[1] * n)
    if n >= 3:
        n_test = max(n_test, 1 if f[2] > 0 else 0)
        n_val = max(n_val, 1 if f[1] > 0 else 0)
    n_test = min(n_test, max(n - 1, 0))
    n_val = min(n_val, max(n - 1 - n_test, 0))
    out = {}
    for rank, i in enumerate(perm):
        out[subs[i]] = "test" if rank < n_test else "val" if rank < n_test + n_val else "train"
    return out


def contrast_dropout(rng: np.random.Generator, n_contrasts: int = 3, p: float = 0.5,
                     shuffle: bool = True) -> list[int]:
    """Input channels to feed for one batch (the same for every slice of the batch).

    With probability ``p`` one contrast, chosen uniformly, is withheld (never more than one, so
    at least ``n_contrasts − 1 ≥ 1`` remain); ``shuffle`` permutes the order of the kept
    contrasts (the network is order-invariant; this exercises it). Draws, in this order: one
    uniform for the decision, one integer for the dropped contrast (only if dropping), one
    permutation (only if shuffling).
    """
    if not 0.0 <= p <= 1.0:
        raise InputError(f"contrast dropout probability must be in [0, 1], got {p}")
    keep = list(range(n_contrasts))
    if n_contrasts > 1 and rng.random() < p:
        keep.pop(int(rng.integers(n_contrasts)))
    if shuffle:
        keep = [keep[i] for i in rng.permutation(len(keep))]
    return keep
