"""Write a phantom DICOM archive with known ground truth.

Layout::

    OUT/dicom/<subject>/<session>/<NN_description>/IM_0001.dcm ...
    OUT/truth/<subject>/<session>/<NN_description>/{T1map,T2map,PDmap,dseg,brainmask,
                                                    bias,noisefree}.nii.gz   (series space)
    OUT/truth/<subject>/subject.json                                        (tissues, lesions)
    OUT/manifest.json, OUT/manifest.tsv                                      (every series)

For every series the noise-free image is, with ``mismatch`` off (the default), exactly
``qmriflow.physics.signal(protocol, PD, T1, T2)`` of the truth maps stored beside it (computed
from the float32 maps as stored) — the estimator's own equations, for unit tests of the
inversion; with ``mismatch`` on it comes from the scanner forward model
(:mod:`qmriflow.phantom.scanner`: echo trains, magnetisation transfer, B1+, T2*, compartment
partial volume and through-slice integration), which the estimator does not share; the truth
maps are then the voxels' proton-weighted parameters. The
scanner's floating-point image (Philips "FP" value) is ``|gain · bias · noisefree + complex
Gaussian noise|``; the gain follows ``PhantomOptions.gain_model`` (see
:mod:`qmriflow.phantom.protocols`). It is stored as a Philips scanner does: stored value SV =
round(FP · SS), display value DV = SV · RS + RI, FP = DV / (RS · SS), with RescaleSlope RS
(0028,1053), RescaleIntercept RI = 0 (0028,1052) and the private ScaleSlope SS (2005,100E).

dcm2niix (the PyPI wheel the pipeline runs, v1.0.20260724, without ``-p``, i.e. its default
``-p y``) converts such a series to FP: NIfTI scl_slope = 1/SS, sidecar
``UsePhilipsFloatNotDisplayScaling: 1`` with ``PhilipsRescaleSlope`` RS,
``PhilipsRescaleIntercept`` 0 and ``PhilipsScaleSlope`` SS; with ``-p n`` it writes DV
(scl_slope = RS, ``UsePhilipsFloatNotDisplayScaling: 0``). Hence, per manifest row:

* ``gain``: the FP gain; ``gain_components``: how it was made;
* ``global_scale``: the pipeline's default conversion (FP) is global_scale × bias × noisefree +
  noise, so ``global_scale == gain``; ``noise_sigma`` is in the same (FP) units;
* ``display_scale`` = gain · RS · SS: the same for a ``-p n`` (DV) conversion, whose noise SD
  is noise_sigma · RS · SS.

Long because it assembles a whole archive (subjects, sessions, series, ground truth, manifest)
from the phantom's parts; the parts live in the sibling modules.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .. import __version__
from ..errors import InputError
from ..io import save_nifti, write_json
from ..physics import signal
from .anatomy import SubjectAnatomy, build_subject
from .dicomio import PhilipsScaling
from .protocols import (
    CLUSTERS,
    GAIN_MODELS,
    GAIN_ROLES,
    SeriesProtocol,
    assigned_cluster,
    cluster_gain_ratios,
    cluster_scanner,
    draw_philips_scaling,
    draw_scanner,
    draw_session_gain,
    draw_session_protocols,
)
from .scanner import (
    ALL_EFFECTS,
    B1Field,
    ScannerEffects,
    SeriesPhysics,
    draw_b1_field,
    draw_series_physics,
    noisefree_signal,
)
from .tissues import (
    BRAIN_LABELS,
    BY_NAME,
    TISSUE_TABLES,
    TUMOUR_T1_POST_GD_S,
    SubjectTissues,
    label_table,
    mix_parameters,
    shift_brain_relaxation,
    subject_tissues,
)

CANARY = "QMRICANARY"
"""Marker placed in PatientName/PatientID: it must never reach any pipeline output."""
CANARY_BIRTH_DATE = "18960214"
"""PatientBirthDate of every phantom subject (also must never reach an output)."""

LESION_CYCLE = ("wmh", "tumour", "none")

# SeedSequence tags of the streams added with the gain model, the Philips scaling and the
# subject-wide shift (distinct from the older streams, which therefore stay as they were).
_SHIFT_TAG = 900_002
_SESSION_GAIN_TAG = 900_003
_SERIES_SCALING_TAG = 900_004
# ... and of the scanner forward model (mismatch on): subject MT size, session B1+ field,
# cluster echo-train details
_MT_TAG = 900_005
_B1_TAG = 900_006
_TRAIN_TAG = 900_007
_RECEIVE_TAG = 900_008
_ROLE_INDEX = {"t1w": 0, "t1w_gd": 0, "t2w": 1, "flair": 2}


@dataclass(frozen=True)
class _Forward:
    """The scanner forward model's inputs for one series (``mismatch`` on)."""

    physics: SeriesPhysics
    b1: B1Field
    receive: ReceiveField
    mt_scale: float
    effects: ScannerEffects = ALL_EFFECTS


@dataclass(frozen=True)
class SizeSpec:
    anatomy_mm: float
    # (orientation, voxel mm (i, j, k), matrix (i, j, k)) per role
    t1w: tuple[str, tuple[float, float, float], tuple[int, int, int]]
    t2w: tuple[str, tuple[float, float, float], tuple[int, int, int]]
    flair: tuple[str, tuple[float, float, float], tuple[int, int, int]]
    megre: tuple[str, tuple[float, float, float], tuple[int, int, int]]


SIZES = {
    # realistic clinical geometry: 1 mm 3D T1w, 0.45 mm × 4 mm 2D T2w, 1 mm sagittal 3D FLAIR
    "full": SizeSpec(
        anatomy_mm=1.0,
        t1w=("axial", (1.0, 1.0, 1.0), (240, 240, 176)),
        t2w=("axial", (0.449, 0.449, 4.0), (512, 512, 38)),
        flair=("sagittal", (1.0, 1.0, 1.0), (250, 250, 180)),
        megre=("axial", (1.5, 1.5, 5.0), (232, 256, 32)),
    ),
    # small, for tests: same FOVs, coarser voxels
    "small": SizeSpec(
        anatomy_mm=2.0,
        t1w=("axial", (2.0, 2.0, 2.0), (120, 120, 88)),
        t2w=("axial", (0.9, 0.9, 4.0), (256, 256, 36)),
        flair=("sagittal", (2.0, 2.0, 2.0), (125, 125, 90)),
        megre=("axial", (3.0, 3.0, 6.0), (96, 112, 6)),
    ),
}

# RAS directions of voxel axes (i, j, k) as a scanner writes them (radiological order).
ORIENTATIONS = {
    "axial": np.array([[-1, 0, 0], [0, -1, 0], [0, 0, 1]], float).T,
    "sagittal": np.array([[0, -1, 0], [0, 0, -1], [-1, 0, 0]], float).T,
    "coronal": np.array([[-1, 0, 0], [0, 0, -1], [0, 1, 0]], float).T,
}


def rotation(rx_deg: float, ry_deg: float, rz_deg: float) -> np.ndarray:
    """Rotation matrix R = Rz · Ry · Rx (angles in degrees, about RAS axes)."""
    rx, ry, rz = (math.radians(a) for a in (rx_deg, ry_deg, rz_deg))
    cx, sx, cy, sy, cz, sz = (math.cos(rx), math.sin(rx), math.cos(ry), math.sin(ry),
                              math.cos(rz), math.sin(rz))
    mx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    my = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    mz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return mz @ my @ mx


def rigid(rot_deg: Sequence[float], trans_mm: Sequence[float], centre: np.ndarray) -> np.ndarray:
    """4×4 rigid transform rotating about ``centre`` then translating."""
    m = np.eye(4)
    rm = rotation(*rot_deg)
    m[:3, :3] = rm
    m[:3, 3] = centre - rm @ centre + np.asarray(trans_mm, float)
    return m


def series_affine(
    orientation: str, voxel_mm: Sequence[float], matrix: Sequence[int], centre: np.ndarray,
    angulation: np.ndarray,
) -> np.ndarray:
    """Voxel → world (RAS mm) affine of a slab of ``matrix`` voxels centred on ``centre``."""
    direc = angulation @ ORIENTATIONS[orientation]
    a = np.eye(4)
    a[:3, :3] = direc * np.asarray(voxel_mm, float)[None, :]
    mid = (np.asarray(matrix, float) - 1.0) / 2.0
    a[:3, 3] = centre - a[:3, :3] @ mid
    return a


def voxel_world(affine: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """World coordinates (N, 3) of every voxel, C order."""
    ijk = np.indices(shape, dtype=np.float64).reshape(3, -1)
    return (affine[:3, :3] @ ijk + affine[:3, 3:4]).T


def bias_field(
    rng: np.random.Generator, world: np.ndarray, centre: np.ndarray, strength: float
) -> np.ndarray:
    """Smooth multiplicative receive-coil field: exp(2nd-order polynomial) in world mm.

    The polynomial's shape is random; its amplitude is set so that the standard deviation of
    the log-field within 80 mm of the head centre (the brain) is between 0.6 and 1.0 ×
    ``strength`` (default 0.2: 12-20 % across the brain, what a 3 T multi-channel head coil
    typically leaves after the vendor's intensity normalisation). Without this, a random draw
    can give a nearly flat field, which is neither realistic nor a test of bias correction.
    """
    c = rng.normal(0.0, strength, len(_BIAS_WEIGHTS)) * _BIAS_WEIGHTS
    x = (world - centre) / 100.0
    log_field = _bias_log(c, x)
    inner = np.einsum("ij,ij->i", x, x) < 0.8**2
    log_field = log_field * _bias_amplitude(c, log_field[inner], strength)
    return np.exp(log_field).astype(np.float32)


_BIAS_WEIGHTS = np.array([1, 1, 1, .6, .6, .6, .5, .5, .5])


def _bias_log(c: np.ndarray, x: np.ndarray) -> np.ndarray:
    """The receive field's log: a 2nd-order polynomial of x = (world − centre) / 100 mm."""
    terms = [x[:, 0], x[:, 1], x[:, 2], x[:, 0] ** 2, x[:, 1] ** 2, x[:, 2] ** 2,
             x[:, 0] * x[:, 1], x[:, 0] * x[:, 2], x[:, 1] * x[:, 2]]
    return sum(ci * t for ci, t in zip(c, terms, strict=True))


def _bias_amplitude(c: np.ndarray, inner_log_field: np.ndarray, strength: float) -> float:
    """Factor that sets the log-field's SD over the brain (``inner_log_field``) to 0.6-1.0 ×
    ``strength``: the target comes from the draw itself (c[0] ~ N(0, strength) -> uniform u),
    so the random stream, and with it every other part of the phantom, is unchanged."""
    spread = float(np.std(inner_log_field)) if inner_log_field.size > 10 else 0.0
    if not (strength > 0 and spread > 0):
        return 1.0
    u = 0.5 * (1.0 + math.erf(c[0] / (strength * math.sqrt(2.0))))
    return strength * (0.6 + 0.4 * u) / spread


@dataclass(frozen=True)
class ReceiveField:
    """One session's receive-coil field, fixed in scanner space (``mismatch`` on): every
    series of the session sees the same coil, so its field is the same function of the
    world position (the head's small moves between series move through it). Same shape
    statistics as :func:`bias_field`; the amplitude is set over a fixed 80 mm ball around the
    session's head centre instead of over one series' voxels."""

    centre: tuple[float, float, float]
    coefficients: tuple[float, ...]

    def __call__(self, world: np.ndarray) -> np.ndarray:
        x = (np.asarray(world, dtype=np.float64) - np.asarray(self.centre)) / 100.0
        return np.exp(_bias_log(np.asarray(self.coefficients), x)).astype(np.float32)


def draw_receive_field(rng: np.random.Generator, centre: np.ndarray,
                       strength: float) -> ReceiveField:
    """A session's :class:`ReceiveField` around the head ``centre`` (world mm)."""
    c = rng.normal(0.0, strength, len(_BIAS_WEIGHTS)) * _BIAS_WEIGHTS
    g = np.linspace(-0.8, 0.8, 17)
    x = np.stack(np.meshgrid(g, g, g, indexing="ij"), -1).reshape(-1, 3)
    x = x[np.einsum("ij,ij->i", x, x) < 0.8**2]
    c = c * _bias_amplitude(c, _bias_log(c, x), strength)
    return ReceiveField(tuple(float(v) for v in centre), tuple(float(v) for v in c))


def rician(rng: np.random.Generator, s: np.ndarray, sigma: float) -> np.ndarray:
    n1 = rng.normal(0.0, sigma, s.shape)
    n2 = rng.normal(0.0, sigma, s.shape)
    return np.sqrt((s + n1) ** 2 + n2**2)


# ----------------------------------------------------------------------------------------------


@dataclass
class PhantomOptions:
    subjects: int = 2
    sessions: int = 2
    size: str = "small"
    seed: int = 0
    cse: bool = False
    snr: float = 40.0
    cse_snr: float = 60.0
    bias_strength: float = 0.2
    tissue_variation: float = 0.03
    tissue_range: float = 0.0  # > 0: uniform ±range per tissue parameter instead (issue 8)
    spatial_variation: float = 0.03
    variation_scale_mm: float = 15.0
    workers: int = 2
    # 0: cluster and scanner drawn per session; K >= 1: round robin over clusters 0..K-1
    clusters: int = 0
    gain_model: str = "independent"  # "independent" | "protocol" (protocols module docstring)
    gain_jitter: float = 0.03  # log-SD of the per-series gain jitter ("protocol" model)
    tissue_table: str = "seed"  # "seed" | "independent" (tissues module docstring)
    global_shift: float = 0.0  # G: per subject, brain T1 and T2 × U(1 - G, 1 + G)
    # True: noise-free images from the scanner forward model (qmriflow.phantom.scanner: echo
    # trains, MT, B1+, T2*, compartment partial volume); False: physics.signal of the truth
    # maps (the estimator's own equations: for unit tests of the inversion)
    mismatch: bool = False


def validate_options(opts: PhantomOptions) -> None:
    """Raise :class:`InputError` (one line) for an option value the generator cannot use."""
    if opts.size not in SIZES:
        raise InputError(f"size must be one of {sorted(SIZES)}")
    if opts.subjects < 1 or opts.sessions < 1:
        raise InputError("need at least one subject and one session")
    if not (opts.snr > 0 and opts.cse_snr > 0):
        raise InputError("SNR must be positive")
    k = opts.clusters
    if isinstance(k, bool) or not isinstance(k, int | np.integer):
        raise InputError(f"clusters must be an integer, got {k!r}")
    if not 0 <= k <= len(CLUSTERS):
        raise InputError(f"clusters must be between 0 and {len(CLUSTERS)} (the number of "
                         f"protocol clusters), got {k}")
    if opts.gain_model not in GAIN_MODELS:
        raise InputError(f"gain model must be one of {', '.join(GAIN_MODELS)}, "
                         f"got {opts.gain_model!r}")
    if not (math.isfinite(opts.gain_jitter) and 0 <= opts.gain_jitter <= 1):
        raise InputError(f"gain jitter (a log-SD) must be in [0, 1], got {opts.gain_jitter!r}")
    if opts.tissue_table not in TISSUE_TABLES:
        raise InputError(f"tissue table must be one of {', '.join(TISSUE_TABLES)}, "
                         f"got {opts.tissue_table!r}")
    if not (math.isfinite(opts.global_shift) and 0 <= opts.global_shift < 0.5):
        raise InputError(f"global shift must be in [0, 0.5), got {opts.global_shift!r}")


def _subject_label(i: int) -> str:
    return f"S{i + 1:03d}"


def _session_label(j: int) -> str:
    return f"V{j + 1:02d}"


def _header_common(subj_i: int, sess_j: int, seed: int, scanner: tuple[str, str],
                   study_uid: str, frame_uid: str) -> dict[str, Any]:
    model, sw = scanner
    y, m = 2019 + sess_j // 4, 1 + 3 * (sess_j % 4)
    return {
        "PatientName": f"{CANARY}^Subject{subj_i + 1:03d}^{seed}",
        "PatientID": f"{CANARY}{seed:04d}{subj_i + 1:04d}",
        "PatientBirthDate": CANARY_BIRTH_DATE,
        "PatientSex": "O",
        "StudyInstanceUID": study_uid,
        "FrameOfReferenceUID": frame_uid,
        "StudyDate": f"{y}{m:02d}{10 + subj_i % 15:02d}",
        "StudyTime": f"{8 + sess_j % 9:02d}3000",
        "StudyDescription": "MRI BRAIN",
        "StudyID": f"{sess_j + 1}",
        "AccessionNumber": "",
        "ReferringPhysicianName": "",
        "Manufacturer": "Philips",
        "ManufacturerModelName": model,
        "SoftwareVersions": sw,
        "MagneticFieldStrength": 3.0,
        "InstitutionName": "qmriflow phantom hospital",
        "BodyPartExamined": "BRAIN",
    }


def _uid(*parts: Any) -> str:
    from pydicom.uid import generate_uid

    return str(generate_uid(entropy_srcs=[str(p) for p in ("qmriflow-phantom", *parts)]))


def _series_header(sp: SeriesProtocol, number: int) -> dict[str, Any]:
    p = sp.protocol
    return {
        "SeriesDescription": sp.description,
        "ProtocolName": sp.description.replace(" +C", ""),
        "SeriesNumber": number,
        "MRAcquisitionType": sp.acquisition,
        "ScanningSequence": sp.scanning_sequence.split("\\"),
        "SequenceVariant": sp.sequence_variant.split("\\"),
        "ScanOptions": "",
        "RepetitionTime": p.tr_ms if p is not None else sp.tr_ms,
        "EchoTime": sp.te_ms,
        "InversionTime": p.ti_ms if p is not None else None,
        "FlipAngle": (p.fa_deg if p is not None else sp.fa_deg),
        "EchoTrainLength": sp.echo_train_length,
        "PixelBandwidth": sp.pixel_bandwidth,
        "ContrastBolusAgent": sp.contrast_agent,
        "NumberOfAverages": 1,
    }


def _acquire_head_series(
    anat: SubjectAnatomy, sp: SeriesProtocol, spec: tuple, pose: np.ndarray,
    rng: np.random.Generator, opts: PhantomOptions, gain: float | None = None,
    forward: _Forward | None = None,
) -> dict[str, Any]:
    """Acquire one head series. ``gain``: the FP gain; ``None`` draws an independent one
    (log-uniform in 300–3000). The draw is made either way, so the noise stays the same.
    ``forward``: the scanner forward model (``mismatch`` on); ``None``: the noise-free image is
    ``physics.signal`` of the truth maps."""
    orientation, voxel, matrix = spec
    centre_world = (pose @ np.append(anat.head_centre_subject_mm, 1.0))[:3]
    centre_world = centre_world + rng.normal(0, 3.0, 3)
    ang = rotation(*rng.uniform(-6, 6, 3) * np.array([1.0, 0.4, 0.4]))
    aff = series_affine(orientation, voxel, matrix, centre_world, ang)
    world = voxel_world(aff, matrix)
    frac, var = anat.sample(world, pose)
    t1_override = None
    if sp.role == "t1w_gd" and anat.lesions.get("type") == "tumour":
        t1_override = {BY_NAME["tumour"].label: TUMOUR_T1_POST_GD_S}
    noisefree = None
    if forward is not None:
        frac, var, noisefree = _scanner_acquisition(anat, sp, aff, world, pose, frac, var,
                                                    forward, t1_override)
    pd, t1, t2 = mix_parameters(frac, anat.tissues, var, t1_override)
    # truth maps exactly as stored (float32); noise-free image from those (exact path)
    pd, t1, t2 = (a.astype(np.float32).reshape(matrix) for a in (pd, t1, t2))
    if noisefree is None:
        noisefree = np.asarray(signal(sp.protocol, pd.astype(np.float64),
                                      t1.astype(np.float64), t2.astype(np.float64)))
    noisefree32 = noisefree.astype(np.float32).reshape(matrix)
    full = np.concatenate([1.0 - frac.sum(0, keepdims=True), frac], 0)
    dseg = full.argmax(0).astype(np.uint8).reshape(matrix)
    brain = (frac[[lab - 1 for lab in BRAIN_LABELS]].sum(0) >= 0.5).reshape(matrix)
    bias = bias_field(rng, world, centre_world, opts.bias_strength).reshape(matrix)
    if forward is not None:  # the session's coil, not one field per series
        bias = forward.receive(world).reshape(matrix)
    drawn_gain = float(np.exp(rng.uniform(np.log(300.0), np.log(3000.0))))
    scale = drawn_gain if gain is None else float(gain)
    clean = scale * bias.astype(np.float64) * noisefree32
    sigma = float(clean[brain].mean() / opts.snr) if brain.any() else scale * 1e-3
    noisy = rician(rng, clean, sigma)
    out = {
        "affine": aff, "pd": pd, "t1": t1, "t2": t2, "dseg": dseg, "brain": brain,
        "bias": bias, "noisefree": noisefree32, "image": noisy, "scale": scale, "sigma": sigma,
        "pose": pose,
    }
    if forward is not None:
        b1 = forward.b1(world)[brain.ravel()]
        out["forward_model"] = {
            "effects": forward.effects.as_dict(), "series": forward.physics.as_dict(),
            "b1_in_brain": ([float(v) for v in np.percentile(b1, [1, 50, 99])]
                            if b1.size else None),
            "mt_subject_scale": forward.mt_scale}
    return out


def _scanner_acquisition(
    anat: SubjectAnatomy, sp: SeriesProtocol, aff: np.ndarray, world: np.ndarray,
    pose: np.ndarray, frac: np.ndarray, var: np.ndarray, forward: _Forward,
    t1_override: dict[int, float] | None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The scanner forward model's noise-free image (flat, per voxel) and the voxels' tissue
    fractions and variation. A 2D slice integrates the anatomy across its thickness: the
    anatomy is sampled at ``ceil(thickness / anatomy resolution)`` evenly spaced points along
    the slice normal, the compartment signals are averaged over them, and the truth
    (fractions, variation) is their mean."""
    thick = float(np.linalg.norm(aff[:3, 2]))
    res_mm = float(np.linalg.norm(anat.template_affine[:3, 0]))  # the anatomy's grid
    n_sub = 1
    if forward.physics.two_d and forward.effects.partial_volume:
        n_sub = max(1, math.ceil(thick / res_mm - 1e-6))
    if n_sub > 1:
        unit = aff[:3, 2] / thick
        offsets = ((np.arange(n_sub) + 0.5) / n_sub - 0.5) * thick
        subs = [anat.sample(world + o * unit, pose) for o in offsets]
        frac_s = np.concatenate([f for f, _ in subs], axis=1)
        var_s = np.concatenate([v for _, v in subs], axis=1)
        frac = np.mean([f for f, _ in subs], axis=0)
        var = np.mean([v for _, v in subs], axis=0)
    else:
        frac_s, var_s = frac, var
    tissues = anat.tissues
    if t1_override:
        t1s = tissues.t1_s.copy()
        for lab, v in t1_override.items():
            t1s[lab] = v
        tissues = SubjectTissues(pd=tissues.pd, t1_s=t1s, t2_s=tissues.t2_s)
    b1 = np.tile(forward.b1(world), n_sub)
    sig = noisefree_signal(sp, forward.physics, frac_s, var_s, tissues, b1,
                           mt_scale=forward.mt_scale, effects=forward.effects)
    return frac, var, sig.reshape(n_sub, -1).mean(axis=0)


def _acquire_cse_series(
    sp: SeriesProtocol, spec: tuple, rng: np.random.Generator, opts: PhantomOptions,
    field_t: float,
) -> dict[str, Any]:
    """Abdomen-like slab with known PDFF (0–1), R2* (0–500 1/s) and S0, plus a vial grid."""
    from ..physics import cse_magnitude

    orientation, voxel, matrix = spec
    aff = series_affine(orientation, voxel, matrix, np.array([0.0, 0.0, 0.0]) + rng.normal(0, 5, 3),
                        np.eye(3))
    nx, ny, nz = matrix
    fx, fy = nx * voxel[0], ny * voxel[1]
    x = (np.arange(nx) - (nx - 1) / 2) * voxel[0]
    y = (np.arange(ny) - (ny - 1) / 2) * voxel[1]
    xx, yy = np.meshgrid(x, y, indexing="ij")
    ax, ay = 0.40 * fx, 0.30 * fy
    rho = np.sqrt((xx / ax) ** 2 + (yy / ay) ** 2)
    pdff = np.zeros((nx, ny))
    r2s = np.zeros((nx, ny))
    s0 = np.zeros((nx, ny))
    label = np.zeros((nx, ny), np.uint8)

    def put(mask: np.ndarray, lab: int, f: float, r: float, s: float) -> None:
        pdff[mask], r2s[mask], s0[mask], label[mask] = f, r, s, lab

    body = rho <= 1.0
    put(body, 1, 0.04, 35.0, 1.0)  # muscle/visceral background
    subq = body & (rho > 1.0 - 12.0 / min(ax, ay))
    put(subq, 2, float(rng.uniform(0.85, 0.95)), 45.0, 1.1)  # subcutaneous fat
    liver = ((xx + 0.35 * ax) / (0.45 * ax)) ** 2 + ((yy + 0.1 * ay) / (0.55 * ay)) ** 2 <= 1
    put(liver & ~subq, 3, float(rng.uniform(0.02, 0.3)), float(rng.uniform(35, 90)), 0.9)
    spleen = ((xx - 0.45 * ax) / (0.18 * ax)) ** 2 + ((yy + 0.2 * ay) / (0.25 * ay)) ** 2 <= 1
    put(spleen & ~subq, 4, 0.0, 30.0, 0.95)
    vert = (xx / (0.12 * ax)) ** 2 + ((yy - 0.55 * ay) / (0.15 * ay)) ** 2 <= 1
    put(vert & ~subq, 5, float(rng.uniform(0.35, 0.6)), 150.0, 0.8)
    # vial grid across the body centre: PDFF 0..1 (columns) × R2* 0..500 (rows)
    nv_f, nv_r = 6, 4
    vr = 0.06 * min(fx, fy)
    for a, f in enumerate(np.linspace(0.0, 1.0, nv_f)):
        for b_, r in enumerate(np.linspace(0.0, 500.0, nv_r)):
            cx = (a - (nv_f - 1) / 2) * 2.6 * vr
            cy = (b_ - (nv_r - 1) / 2) * 2.6 * vr - 0.1 * ay
            vial = (xx - cx) ** 2 + (yy - cy) ** 2 <= vr**2
            put(vial, 10 + a * nv_r + b_, float(f), float(r), 1.0)
    coil = np.exp(-((xx / (1.6 * ax)) ** 2 + (yy / (1.6 * ay)) ** 2))  # smooth sensitivity
    s0_map = s0 * coil
    pdff3 = np.repeat(pdff[..., None], nz, 2).astype(np.float32)
    r2s3 = np.repeat(r2s[..., None], nz, 2).astype(np.float32)
    s03 = np.repeat(s0_map[..., None], nz, 2).astype(np.float32)
    te = np.asarray(sp.echo_times_ms)
    noisefree = cse_magnitude(s03.astype(np.float64), pdff3.astype(np.float64),
                              r2s3.astype(np.float64), te, field_t).astype(np.float32)
    scale = float(np.exp(rng.uniform(np.log(300.0), np.log(3000.0))))
    sigma = scale * 1.0 / opts.cse_snr  # SNR relative to S0 = 1 (unit-gain region)
    noisy = rician(rng, scale * noisefree.astype(np.float64), sigma)
    return {
        "affine": aff, "pdff": pdff3, "r2s": r2s3, "s0": s03 * np.float32(scale),
        "label": np.repeat(label[..., None], nz, 2), "noisefree": noisefree, "image": noisy,
        "scale": scale, "sigma": sigma,
    }


def _write_truth(tdir: Path, res: dict[str, Any], role: str) -> dict[str, str]:
    aff = res["affine"]
    files: dict[str, str] = {}

    def put(key: str, name: str, arr: np.ndarray, units: str, dtype: Any = np.float32) -> None:
        p = tdir / f"{name}.nii.gz"
        save_nifti(p, arr, aff, {"Units": units, "Description": f"phantom truth: {key}"},
                   dtype=dtype)
        files[key] = str(p)

    if role == "megre":
        put("PDFF", "PDFF", res["pdff"], "fraction (0-1)")
        put("R2starmap", "R2starmap", res["r2s"], "1/s")
        put("S0map", "S0map", res["s0"], "arbitrary (same scale as the FP image)")
        put("dseg", "dseg", res["label"], "label", np.uint8)
        put("noisefree", "noisefree", res["noisefree"], "arbitrary (S0 = 1 in unit-gain tissue)")
    else:
        put("T1map", "T1map", res["t1"], "s")
        put("T2map", "T2map", res["t2"], "s")
        put("PDmap", "PDmap", res["pd"], "arbitrary (water = 1)")
        put("dseg", "dseg", res["dseg"], "label", np.uint8)
        put("brainmask", "brainmask", res["brain"], "mask", np.uint8)
        put("bias", "bias", res["bias"], "multiplicative")
        put("noisefree", "noisefree", res["noisefree"],
            "physics.signal of the truth maps" if "forward_model" not in res else
            "scanner forward model (qmriflow.phantom.scanner), unit gain")
    return files


def _subject_job(args: tuple) -> list[dict[str, Any]]:
    """Build one subject's anatomy once and acquire all its sessions."""
    (out, opts, subj_i) = args
    spec = SIZES[opts.size]
    subj_rng = np.random.default_rng([opts.seed, subj_i])
    tissues = subject_tissues(subj_rng, opts.tissue_variation, spread=opts.tissue_range,
                              table=opts.tissue_table)
    # brain-wide shift of T1 and T2, after the per-tissue variation (own stream)
    g = opts.global_shift
    shift = np.random.default_rng([opts.seed, subj_i, _SHIFT_TAG]).uniform(1.0 - g, 1.0 + g, 2)
    shift_t1, shift_t2 = float(shift[0]), float(shift[1])
    tissues = shift_brain_relaxation(tissues, shift_t1, shift_t2)
    # the subject's MT effect size (myelin/macromolecules: no header records it)
    mt_scale = float(np.random.default_rng([opts.seed, subj_i, _MT_TAG]).uniform(0.85, 1.15))
    lesion = LESION_CYCLE[subj_i % len(LESION_CYCLE)]
    anat = build_subject(subj_rng, tissues, res_mm=spec.anatomy_mm, lesion=lesion,
                         variation=opts.spatial_variation,
                         variation_scale_mm=opts.variation_scale_mm)
    write_json(out / "truth" / _subject_label(subj_i) / "subject.json", {
        "subject": _subject_label(subj_i), "lesion": anat.lesions, "tissues": tissues.as_dict(),
        "warp": anat.warp.describe(), "spatial_variation": opts.spatial_variation,
        "variation_scale_mm": opts.variation_scale_mm, "tissue_table": opts.tissue_table,
        "global_shift": {"T1": shift_t1, "T2": shift_t2},
        "mismatch": opts.mismatch, "mt_subject_scale": mt_scale if opts.mismatch else None,
    })
    rows: list[dict[str, Any]] = []
    for sess_j in range(opts.sessions):
        for row in _acquire_session(out, opts, subj_i, sess_j, anat, lesion, mt_scale):
            row["global_shift_t1"], row["global_shift_t2"] = shift_t1, shift_t2
            write_json(out / row["truth_dir"] / "series.json", row)
            rows.append(row)
    return rows


def _series_gain(opts: PhantomOptions, role: str, cluster: int, session_gain: float,
                 jitter: float) -> tuple[float | None, dict[str, Any]]:
    """(FP gain or ``None`` = the series' own independent draw, gain_components)."""
    if opts.gain_model == "protocol" and role in GAIN_ROLES:
        ratio = cluster_gain_ratios(opts.seed, cluster)[role]
        return ratio * session_gain * jitter, {
            "model": "protocol", "cluster_ratio": ratio, "session_gain": session_gain,
            "jitter": jitter}
    return None, {"model": "independent", "cluster_ratio": None, "session_gain": None,
                  "jitter": None}


def _acquire_session(
    out: Path, opts: PhantomOptions, subj_i: int, sess_j: int, anat: SubjectAnatomy, lesion: str,
    mt_scale: float = 1.0,
) -> list[dict[str, Any]]:
    from .dicomio import write_dicom_series

    spec = SIZES[opts.size]
    subject, session = _subject_label(subj_i), _session_label(sess_j)
    rng = np.random.default_rng([opts.seed, subj_i, sess_j, 7])
    scanner = draw_scanner(rng)
    # the cluster draw draw_session_protocols would make: kept so the stream is the same
    cluster = int(rng.integers(len(CLUSTERS)))
    if opts.clusters:
        cluster = assigned_cluster(subj_i, sess_j, opts.sessions, opts.clusters)
        scanner = cluster_scanner(cluster)
    cluster, series = draw_session_protocols(
        rng, cluster=cluster, post_gd_t1w=(lesion == "tumour"), cse=opts.cse
    )
    session_gain = draw_session_gain(
        np.random.default_rng([opts.seed, subj_i, sess_j, _SESSION_GAIN_TAG]))
    study_uid = _uid(opts.seed, subj_i, sess_j, "study")
    frame_uid = _uid(opts.seed, subj_i, sess_j, "frame")
    common = _header_common(subj_i, sess_j, opts.seed, scanner, study_uid, frame_uid)
    # head position for this session, plus a small movement per series
    centre = anat.head_centre_subject_mm
    session_pose = rigid(rng.uniform(-5, 5, 3), rng.normal(0, 6, 3), centre)
    # scanner forward model: the session's transmit field around the head, in scanner space
    b1 = receive = None
    if opts.mismatch:
        head_world = (session_pose @ np.append(centre, 1.0))[:3]
        b1 = draw_b1_field(np.random.default_rng([opts.seed, subj_i, sess_j, _B1_TAG]),
                           head_world)
        receive = draw_receive_field(
            np.random.default_rng([opts.seed, subj_i, sess_j, _RECEIVE_TAG]), head_world,
            opts.bias_strength)
    rows = []
    for n, sp in enumerate(series):
        number = 100 * (n + 2) + 1
        name = f"{n + 2:02d}_{sp.description.replace(' ', '_').replace('+', '')}".rstrip("_")
        sdir = out / "dicom" / subject / session / name
        tdir = out / "truth" / subject / session / name
        srng = np.random.default_rng([opts.seed, subj_i, sess_j, n, 11])
        # per-series gain jitter and Philips display scaling: their own stream
        prng = np.random.default_rng([opts.seed, subj_i, sess_j, n, _SERIES_SCALING_TAG])
        jitter = float(np.exp(prng.normal(0.0, opts.gain_jitter)))
        rescale_slope, fill = draw_philips_scaling(prng)
        gain, gain_components = _series_gain(opts, sp.role, cluster, session_gain, jitter)
        if sp.role == "megre":
            res = _acquire_cse_series(sp, spec.megre, srng, opts, 3.0)
            image = res["image"]  # (x, y, z, echo)
            echo_times = list(sp.echo_times_ms or ())
        else:
            motion = rigid(srng.uniform(-2, 2, 3), srng.uniform(-2, 2, 3), centre)
            pose = session_pose @ motion
            role_spec = {"t1w": spec.t1w, "t1w_gd": spec.t1w, "t2w": spec.t2w,
                         "flair": spec.flair}[sp.role]
            forward = None
            if b1 is not None and receive is not None:
                # echo-train details are the protocol cluster's (fixed per cluster and role)
                crng = np.random.default_rng([opts.seed, cluster, _ROLE_INDEX[sp.role],
                                              _TRAIN_TAG])
                forward = _Forward(draw_series_physics(sp, crng), b1, receive, mt_scale)
            res = _acquire_head_series(anat, sp, role_spec, pose, srng, opts, gain=gain,
                                       forward=forward)
            image = res["image"]
            echo_times = None
        header = {**common, **_series_header(sp, number)}
        info = write_dicom_series(
            sdir, image, res["affine"], header=header, echo_times_ms=echo_times,
            uid_seed=f"{opts.seed}-{subj_i}-{sess_j}-{n}",
            philips=PhilipsScaling(rescale_slope=rescale_slope, fill=fill),
        )
        assert info.scale_slope is not None
        files = _write_truth(tdir, res, sp.role)
        row = {
            "subject": subject, "session": session, "series": name,
            "dicom_dir": str(sdir.relative_to(out)), "truth_dir": str(tdir.relative_to(out)),
            "n_files": len(info.files), "scanner_model": scanner[0], "protocol_cluster": cluster,
            "lesion": lesion, **sp.manifest(),
            "Manufacturer": "Philips", "ManufacturerModelName": scanner[0],
            "MagneticFieldStrength": 3.0,
            "RepetitionTime_ms": header["RepetitionTime"], "EchoTime_ms": header["EchoTime"],
            "InversionTime_ms": header["InversionTime"], "FlipAngle_deg": header["FlipAngle"],
            "shape": list(image.shape), "affine": res["affine"].tolist(),
            "gain": res["scale"], "gain_components": gain_components,
            # dcm2niix's default conversion writes FP (module docstring): its scale is the gain
            "global_scale": res["scale"], "noise_sigma": res["sigma"],
            "display_scale": res["scale"] * info.rescale_slope * info.scale_slope,
            "rescale_slope": info.rescale_slope, "rescale_intercept": info.rescale_intercept,
            "scale_slope": info.scale_slope,
            "series_instance_uid": str(info.series_instance_uid),
            "study_instance_uid": study_uid,
            "truth": {k: str(Path(v).relative_to(out)) for k, v in files.items()},
        }
        if sp.role != "megre":
            row["head_pose"] = res["pose"].tolist()
            row["forward_model"] = res.get("forward_model", {"effects": None})
            row["snr"] = opts.snr
        else:
            row["snr"] = opts.cse_snr
            row["field_strength_t"] = 3.0
        rows.append(row)
    # Registration truth: maps a point's world position in this series to its world position
    # in the session's T2w (the registration target of the pipeline).
    t2w_pose = next((np.array(r["head_pose"]) for r in rows if r["role"] == "t2w"), None)
    for row in rows:
        if "head_pose" in row and t2w_pose is not None:
            row["world_to_t2w_world"] = (t2w_pose @ np.linalg.inv(np.array(row["head_pose"]))
                                         ).tolist()
    return rows


def generate_archive(out: str | Path, opts: PhantomOptions) -> dict[str, Any]:
    """Generate the archive; returns the manifest (also written to ``OUT/manifest.json``)."""
    out = Path(out)
    validate_options(opts)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    jobs = [(out, opts, i) for i in range(opts.subjects)]
    rows: list[dict[str, Any]] = []
    if opts.workers > 1 and len(jobs) > 1:
        import multiprocessing as mp

        ctx = mp.get_context("fork")
        with ProcessPoolExecutor(max_workers=opts.workers, mp_context=ctx) as ex:
            for r in ex.map(_subject_job, jobs):
                rows.extend(r)
    else:
        for job in jobs:
            rows.extend(_subject_job(job))
    manifest = {
        "generator": {"name": "qmriflow phantom", "version": __version__},
        "options": {k: getattr(opts, k) for k in opts.__dataclass_fields__ if k != "workers"},
        "canary": {"string": CANARY, "birth_date": CANARY_BIRTH_DATE},
        "labels": label_table(),
        "coordinates": "world = scanner RAS mm; head_pose maps subject mm -> world mm",
        "seconds": round(time.time() - t0, 2),
        "series": rows,
    }
    write_json(out / "manifest.json", manifest)
    _write_manifest_tsv(out / "manifest.tsv", rows)
    return manifest


def _write_manifest_tsv(path: Path, rows: list[dict[str, Any]]) -> None:
    cols = ["subject", "session", "series", "role", "dicom_dir", "scanner_model",
            "protocol_cluster", "MRAcquisitionType", "RepetitionTime_ms", "EchoTime_ms",
            "InversionTime_ms", "FlipAngle_deg", "ContrastBolusAgent", "lesion"]
    lines = ["\t".join(cols)]
    for r in rows:
        lines.append("\t".join("n/a" if r.get(c) is None else str(r.get(c)) for c in cols))
    from ..io import atomic_path

    with atomic_path(path) as tmp:
        tmp.write_text("\n".join(lines) + "\n")


def load_manifest(root: str | Path) -> dict[str, Any]:
    return json.loads((Path(root) / "manifest.json").read_text())
