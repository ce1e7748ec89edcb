"""Write a phantom DICOM archive with known ground truth.

Layout::

    OUT/dicom/<subject>/<session>/<NN_description>/IM_0001.dcm ...
    OUT/truth/<subject>/<session>/<NN_description>/{T1map,T2map,PDmap,dseg,brainmask,
                                                    bias,noisefree}.nii.gz   (series space)
    OUT/truth/<subject>/subject.json                                        (tissues, lesions)
    OUT/manifest.json, OUT/manifest.tsv                                      (every series)

For every series the noise-free image is exactly ``qmriflow.physics.signal(protocol, PD, T1,
T2)`` of the truth maps stored beside it (computed from the float32 maps as stored); the
stored DICOM is ``quantise(|scale · bias · noisefree + complex Gaussian noise|)``.
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
from .protocols import SeriesProtocol, draw_scanner, draw_session_protocols
from .tissues import (
    BRAIN_LABELS,
    BY_NAME,
    TUMOUR_T1_POST_GD_S,
    label_table,
    mix_parameters,
    subject_tissues,
)

CANARY = "QMRICANARY"
"""Marker placed in PatientName/PatientID: it must never reach any pipeline output."""
CANARY_BIRTH_DATE = "18960214"
"""PatientBirthDate of every phantom subject (also must never reach an output)."""

LESION_CYCLE = ("wmh", "tumour", "none")


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
    x = (world - centre) / 100.0
    terms = [x[:, 0], x[:, 1], x[:, 2], x[:, 0] ** 2, x[:, 1] ** 2, x[:, 2] ** 2,
             x[:, 0] * x[:, 1], x[:, 0] * x[:, 2], x[:, 1] * x[:, 2]]
    c = rng.normal(0.0, strength, len(terms)) * np.array([1, 1, 1, .6, .6, .6, .5, .5, .5])
    log_field = sum(ci * t for ci, t in zip(c, terms, strict=True))
    inner = np.einsum("ij,ij->i", x, x) < 0.8**2
    spread = float(np.std(log_field[inner])) if inner.sum() > 10 else 0.0
    if strength > 0 and spread > 0:
        # target amplitude from the draw itself (c[0] ~ N(0, strength) -> uniform u), so the
        # random stream, and with it every other part of the phantom, is unchanged
        u = 0.5 * (1.0 + math.erf(c[0] / (strength * math.sqrt(2.0))))
        log_field = log_field * (strength * (0.6 + 0.4 * u) / spread)
    return np.exp(log_field).astype(np.float32)


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
    rng: np.random.Generator, opts: PhantomOptions,
) -> dict[str, Any]:
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
    pd, t1, t2 = mix_parameters(frac, anat.tissues, var, t1_override)
    # truth maps exactly as stored (float32); noise-free image from those
    pd, t1, t2 = (a.astype(np.float32).reshape(matrix) for a in (pd, t1, t2))
    noisefree = np.asarray(signal(sp.protocol, pd.astype(np.float64), t1.astype(np.float64),
                                  t2.astype(np.float64)))
    noisefree32 = noisefree.astype(np.float32)
    full = np.concatenate([1.0 - frac.sum(0, keepdims=True), frac], 0)
    dseg = full.argmax(0).astype(np.uint8).reshape(matrix)
    brain = (frac[[lab - 1 for lab in BRAIN_LABELS]].sum(0) >= 0.5).reshape(matrix)
    bias = bias_field(rng, world, centre_world, opts.bias_strength).reshape(matrix)
    scale = float(np.exp(rng.uniform(np.log(300.0), np.log(3000.0))))
    clean = scale * bias.astype(np.float64) * noisefree32
    sigma = float(clean[brain].mean() / opts.snr) if brain.any() else scale * 1e-3
    noisy = rician(rng, clean, sigma)
    return {
        "affine": aff, "pd": pd, "t1": t1, "t2": t2, "dseg": dseg, "brain": brain,
        "bias": bias, "noisefree": noisefree32, "image": noisy, "scale": scale, "sigma": sigma,
        "pose": pose,
    }


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
        put("S0map", "S0map", res["s0"], "arbitrary (same scale as the stored image)")
        put("dseg", "dseg", res["label"], "label", np.uint8)
        put("noisefree", "noisefree", res["noisefree"], "arbitrary (S0 = 1 in unit-gain tissue)")
    else:
        put("T1map", "T1map", res["t1"], "s")
        put("T2map", "T2map", res["t2"], "s")
        put("PDmap", "PDmap", res["pd"], "arbitrary (water = 1)")
        put("dseg", "dseg", res["dseg"], "label", np.uint8)
        put("brainmask", "brainmask", res["brain"], "mask", np.uint8)
        put("bias", "bias", res["bias"], "multiplicative")
        put("noisefree", "noisefree", res["noisefree"], "physics.signal of the truth maps")
    return files


def _subject_job(args: tuple) -> list[dict[str, Any]]:
    """Build one subject's anatomy once and acquire all its sessions."""
    (out, opts, subj_i) = args
    spec = SIZES[opts.size]
    subj_rng = np.random.default_rng([opts.seed, subj_i])
    tissues = subject_tissues(subj_rng, opts.tissue_variation, spread=opts.tissue_range)
    lesion = LESION_CYCLE[subj_i % len(LESION_CYCLE)]
    anat = build_subject(subj_rng, tissues, res_mm=spec.anatomy_mm, lesion=lesion,
                         variation=opts.spatial_variation,
                         variation_scale_mm=opts.variation_scale_mm)
    write_json(out / "truth" / _subject_label(subj_i) / "subject.json", {
        "subject": _subject_label(subj_i), "lesion": anat.lesions, "tissues": tissues.as_dict(),
        "warp": anat.warp.describe(), "spatial_variation": opts.spatial_variation,
        "variation_scale_mm": opts.variation_scale_mm,
    })
    rows: list[dict[str, Any]] = []
    for sess_j in range(opts.sessions):
        rows.extend(_acquire_session(out, opts, subj_i, sess_j, anat, lesion))
    return rows


def _acquire_session(
    out: Path, opts: PhantomOptions, subj_i: int, sess_j: int, anat: SubjectAnatomy, lesion: str
) -> list[dict[str, Any]]:
    from .dicomio import write_dicom_series

    spec = SIZES[opts.size]
    subject, session = _subject_label(subj_i), _session_label(sess_j)
    rng = np.random.default_rng([opts.seed, subj_i, sess_j, 7])
    scanner = draw_scanner(rng)
    cluster, series = draw_session_protocols(
        rng, post_gd_t1w=(lesion == "tumour"), cse=opts.cse
    )
    study_uid = _uid(opts.seed, subj_i, sess_j, "study")
    frame_uid = _uid(opts.seed, subj_i, sess_j, "frame")
    common = _header_common(subj_i, sess_j, opts.seed, scanner, study_uid, frame_uid)
    # head position for this session, plus a small movement per series
    centre = anat.head_centre_subject_mm
    session_pose = rigid(rng.uniform(-5, 5, 3), rng.normal(0, 6, 3), centre)
    rows = []
    for n, sp in enumerate(series):
        number = 100 * (n + 2) + 1
        name = f"{n + 2:02d}_{sp.description.replace(' ', '_').replace('+', '')}".rstrip("_")
        sdir = out / "dicom" / subject / session / name
        tdir = out / "truth" / subject / session / name
        srng = np.random.default_rng([opts.seed, subj_i, sess_j, n, 11])
        if sp.role == "megre":
            res = _acquire_cse_series(sp, spec.megre, srng, opts, 3.0)
            image = res["image"]  # (x, y, z, echo)
            echo_times = list(sp.echo_times_ms or ())
        else:
            motion = rigid(srng.uniform(-2, 2, 3), srng.uniform(-2, 2, 3), centre)
            pose = session_pose @ motion
            role_spec = {"t1w": spec.t1w, "t1w_gd": spec.t1w, "t2w": spec.t2w,
                         "flair": spec.flair}[sp.role]
            res = _acquire_head_series(anat, sp, role_spec, pose, srng, opts)
            image = res["image"]
            echo_times = None
        header = {**common, **_series_header(sp, number)}
        info = write_dicom_series(
            sdir, image, res["affine"], header=header, echo_times_ms=echo_times,
            uid_seed=f"{opts.seed}-{subj_i}-{sess_j}-{n}",
        )
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
            "global_scale": res["scale"], "noise_sigma": res["sigma"],
            "rescale_slope": info.rescale_slope, "rescale_intercept": info.rescale_intercept,
            "series_instance_uid": str(info.series_instance_uid),
            "study_instance_uid": study_uid,
            "truth": {k: str(Path(v).relative_to(out)) for k, v in files.items()},
        }
        if sp.role != "megre":
            row["head_pose"] = res["pose"].tolist()
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
        write_json(out / row["truth_dir"] / "series.json", row)
    return rows


def generate_archive(out: str | Path, opts: PhantomOptions) -> dict[str, Any]:
    """Generate the archive; returns the manifest (also written to ``OUT/manifest.json``)."""
    out = Path(out)
    if opts.size not in SIZES:
        raise InputError(f"size must be one of {sorted(SIZES)}")
    if opts.subjects < 1 or opts.sessions < 1:
        raise InputError("need at least one subject and one session")
    if not (opts.snr > 0 and opts.cse_snr > 0):
        raise InputError("SNR must be positive")
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
