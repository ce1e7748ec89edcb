"""Loading and validating a multi-echo GRE magnitude series for the fat/water branch.

Accepted inputs:

* a 4D NIfTI (x, y, z, echo) whose JSON sidecar holds ``EchoTime`` as a list in seconds and
  ``MagneticFieldStrength`` in tesla;
* a folder of per-echo 3D NIfTIs with dcm2niix/BIDS sidecars (``EchoTime`` in seconds,
  ``EchoNumber``), e.g. the ``*_echo-<n>_MEGRE.nii.gz`` files that ``qmriflow convert``
  writes; phase images (``ImageType`` P/PHASE, ``_ph`` names, ``part-phase``) are skipped;
* one per-echo file of such a set (its ``_echo-<n>`` siblings are gathered).

Refused with a one-line :class:`~qmriflow.errors.InputError` naming the file: fewer than 3
echoes (three parameters are fitted), echo times that are not strictly increasing in echo
order (unsorted or duplicate), non-positive or non-finite echo times, missing field strength,
echoes of different grids, non-finite voxels.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputError

__all__ = ["MIN_ECHOES", "MultiEchoSeries", "load_series", "validate_echo_times"]

MIN_ECHOES = 3
_NIFTI = (".nii.gz", ".nii")
_ECHO_RE = re.compile(r"_echo-(\d+)")
_E_SUFFIX_RE = re.compile(r"_e(\d+)(?=(_ph)?$)")


@dataclass
class MultiEchoSeries:
    """A validated magnitude series: ``data`` (x, y, z, echo) float32, echo times in ms."""

    data: np.ndarray
    te_ms: np.ndarray
    field_t: float
    affine: np.ndarray
    sources: list[str]
    prefix: str
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def n_echo(self) -> int:
        return int(self.te_ms.size)


def _stem(p: Path) -> str:
    for ext in _NIFTI:
        if p.name.endswith(ext):
            return p.name[: -len(ext)]
    return p.stem


def _sidecar(p: Path) -> Path:
    return p.with_name(_stem(p) + ".json")


def _read_sidecar(p: Path) -> dict[str, Any]:
    sc = _sidecar(p)
    if not sc.is_file():
        raise InputError("JSON sidecar is missing (EchoTime, MagneticFieldStrength needed)",
                         path=sc)
    try:
        meta = json.loads(sc.read_text())
    except (OSError, ValueError) as exc:
        raise InputError(f"unreadable JSON sidecar: {exc}", path=sc) from None
    if not isinstance(meta, dict):
        raise InputError("JSON sidecar is not an object", path=sc)
    return meta


def validate_echo_times(te_s: Any, path: str | Path) -> np.ndarray:
    """Check echo times (seconds, echo order) and return them in ms.

    Refuses fewer than :data:`MIN_ECHOES`, non-finite or non-positive values, and echo times
    that are not strictly increasing (unsorted or duplicate).
    """
    try:
        te = np.asarray(te_s, dtype=np.float64).ravel()
    except (TypeError, ValueError):
        raise InputError(f"EchoTime is not a list of numbers: {te_s!r}", path=path) from None
    if te.size < MIN_ECHOES:
        raise InputError(
            f"{te.size} echo(es): a fat/water (PDFF, R2*, S0) fit needs at least {MIN_ECHOES}",
            path=path)
    ms = ", ".join(f"{v * 1000:.4g}" for v in te)
    given = ", ".join(f"{v:.6g}" for v in te)  # the user's own values, as written
    if not np.all(np.isfinite(te)) or np.any(te <= 0):
        raise InputError(f"echo times must be positive and finite, got EchoTime [{given}] s",
                         path=path)
    if np.any(te > 1.0):
        raise InputError(f"echo times must be in seconds, got EchoTime [{given}] (values above "
                         "1 s: milliseconds? write the sidecar's EchoTime in seconds, e.g. "
                         f"{te[0] / 1000:.6g})", path=path)
    d = np.diff(te)
    if np.any(d == 0):
        raise InputError(f"duplicate echo times [{ms}] ms", path=path)
    if np.any(d < 0):
        raise InputError(f"echo times are not increasing in echo order: [{ms}] ms", path=path)
    return te * 1000.0


def _field(meta: dict[str, Any], field_t: float | None, path: Path) -> float:
    if field_t is not None:
        b0 = float(field_t)
    else:
        b0 = meta.get("MagneticFieldStrength")
        if b0 is None:
            raise InputError("MagneticFieldStrength missing from the sidecar: add the key "
                             "(tesla) to the sidecar or pass --field-strength (qmriflow cse-fit)",
                             path=_sidecar(path))
        try:
            b0 = float(b0)
        except (TypeError, ValueError):
            raise InputError(f"bad MagneticFieldStrength {b0!r}", path=_sidecar(path)) from None
    if not (0.1 <= b0 <= 12.0):
        raise InputError(f"implausible field strength {b0} T", path=_sidecar(path))
    return b0


def _is_phase(p: Path, meta: dict[str, Any]) -> bool:
    it = [str(x).upper() for x in meta.get("ImageType", []) or []]
    name = _stem(p)
    return (any(x in ("P", "PHASE", "REAL", "IMAGINARY") for x in it)
            or name.endswith("_ph") or "part-phase" in name)


def _load_nifti(p: Path) -> tuple[np.ndarray, np.ndarray]:
    import nibabel as nib

    try:
        img = nib.load(str(p))
        data = np.asarray(img.dataobj, dtype=np.float32)
    except Exception as exc:  # nibabel raises many types for corrupt files
        raise InputError(f"unreadable NIfTI: {type(exc).__name__}: {exc}", path=p) from None
    return data, np.asarray(img.affine, dtype=np.float64)


def _prefix(stem: str) -> str:
    s = _ECHO_RE.sub("", stem)
    s = _E_SUFFIX_RE.sub("", s)
    for suffix in ("_MEGRE", "_part-mag"):
        s = s.replace(suffix, "")
    return s


def _echo_group(path: Path) -> list[Path]:
    """Per-echo files of the series that ``path`` (a folder or one echo) belongs to."""
    if path.is_dir():
        files = sorted(f for f in path.iterdir() if f.name.endswith(_NIFTI))
        if not files:
            raise InputError("folder holds no NIfTI files", path=path)
        return files
    stem = _stem(path)
    if _ECHO_RE.search(stem):
        pat = _ECHO_RE.sub("_echo-*", stem)
        return sorted(f for f in path.parent.glob(pat + ".nii*") if f.name.endswith(_NIFTI))
    return [path]


def load_series(path: str | Path, *, field_t: float | None = None) -> MultiEchoSeries:
    """Load and validate one multi-echo magnitude series (see module docstring)."""
    path = Path(path)
    if not path.exists():
        raise InputError("input does not exist", path=path)
    files = _echo_group(path)
    if len(files) == 1 and not path.is_dir():
        return _load_4d(files[0], field_t)
    # per-echo files: magnitude only, one series
    echoes: list[tuple[Path, dict[str, Any]]] = []
    for f in files:
        meta = _read_sidecar(f)
        if not _is_phase(f, meta):
            echoes.append((f, meta))
    if not echoes:
        raise InputError("no magnitude images found", path=path)
    if len(echoes) == 1:
        return _load_4d(echoes[0][0], field_t)
    prefixes = sorted({_prefix(_stem(f)) for f, _ in echoes})
    if len(prefixes) > 1:
        raise InputError(f"folder holds {len(prefixes)} series ({', '.join(prefixes[:3])}...): "
                         "give one echo file or a folder with one series", path=path)

    def order(item: tuple[Path, dict[str, Any]]) -> tuple[int, str]:
        f, meta = item
        n = meta.get("EchoNumber")
        if n is None:
            m = _ECHO_RE.search(_stem(f)) or _E_SUFFIX_RE.search(_stem(f))
            n = int(m.group(1)) if m else 1
        return int(n), f.name

    echoes.sort(key=order)
    numbers = [order(e)[0] for e in echoes]
    if len(set(numbers)) != len(numbers):
        raise InputError(f"echo numbers repeat: {numbers}", path=path)
    tes = []
    for f, meta in echoes:
        te = meta.get("EchoTime")
        if te is None or isinstance(te, list):
            raise InputError("sidecar has no single EchoTime", path=_sidecar(f))
        tes.append(te)
    te_ms = validate_echo_times(tes, path)
    b0 = _field(echoes[0][1], field_t, echoes[0][0])
    vols = []
    affine = None
    for f, _ in echoes:
        d, a = _load_nifti(f)
        d = np.squeeze(d)
        if d.ndim == 2:
            d = d[..., None]
        if d.ndim != 3:
            raise InputError(f"expected a 3D echo image, got shape {d.shape}", path=f)
        if affine is None:
            affine, shape = a, d.shape
        elif d.shape != shape or not np.allclose(a, affine, atol=1e-3):
            raise InputError("echo images have different grids", path=f)
        vols.append(d)
    data = np.stack(vols, axis=-1)
    _check_finite(data, path)
    return MultiEchoSeries(data=data, te_ms=te_ms, field_t=b0, affine=affine,
                           sources=[str(f) for f, _ in echoes], prefix=prefixes[0],
                           metadata=dict(echoes[0][1]))


def _check_finite(data: np.ndarray, path: Path) -> None:
    if not np.all(np.isfinite(data)):
        raise InputError(f"{int((~np.isfinite(data)).sum())} non-finite voxel value(s)",
                         path=path)


def _load_4d(f: Path, field_t: float | None) -> MultiEchoSeries:
    meta = _read_sidecar(f)
    te = meta.get("EchoTime")
    if te is None:
        raise InputError("sidecar has no EchoTime", path=_sidecar(f))
    if not isinstance(te, list):
        raise InputError(f"1 echo (EchoTime {te!r}): a fat/water fit needs at least "
                         f"{MIN_ECHOES} echoes (a 4D image with an EchoTime list, or a folder "
                         "of echoes)", path=f)
    te_ms = validate_echo_times(te, f)
    b0 = _field(meta, field_t, f)
    data, affine = _load_nifti(f)
    if data.ndim == 3 and te_ms.size > 1:
        data = data[:, :, None, :]  # a single slice stored as (x, y, echo)
    if data.ndim != 4 or data.shape[-1] != te_ms.size:
        raise InputError(f"image shape {data.shape} does not match {te_ms.size} echo times",
                         path=f)
    _check_finite(data, f)
    return MultiEchoSeries(data=data, te_ms=te_ms, field_t=b0, affine=affine, sources=[str(f)],
                           prefix=_prefix(_stem(f)), metadata=dict(meta))
